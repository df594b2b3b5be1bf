//! How the CPU backend rounds activations: exactly (f32, the default) or
//! the way llama.cpp's CPU backend does, so a run can be compared token for
//! token with llama.cpp on the same GGUF model.
//!
//! llama.cpp never multiplies a quantized weight by an f32 activation: each
//! activation row is first quantized to 8 bits in blocks of 32 (`Q8_0` for
//! `Q8_0`/`Q4_0` weights, `Q8_1` for `Q4_1`: the same values, `Q8_1` adds a
//! block sum), and with flash attention (its CPU default) the query is
//! rounded to FP16, keys and values are stored in FP16, and the weighted sum
//! of values is accumulated *in FP16* under an online softmax. Each of these
//! moves the residual stream by ~1% per layer; near-ties in the logits can
//! then flip. [`Numerics::LlamaCpp`] reproduces those roundings (not the
//! integer kernels themselves: the 8-bit values are multiplied in f32, which
//! is exact for the products and differs only in summation order), the
//! FP16-rounded block sum of the Q4_1 × Q8_1 dot product
//! ([`add_q4_1_sum_term`]), and, when loaded with
//! [`super::CpuBackend::load_with`], the exact (not FP16-rounded) weights.
//!
//! ```text
//!   Q8 block of 32 activations (ggml's AVX2 quantize_row_q8_0/q8_1):
//!     amax = max |x_i|;  id = 127 / amax;  q_i = round_half_even(x_i · id)
//!     d = fp16(amax / 127);  x̃_i = d · q_i
//! ```

use super::ops::{for_each_head, AttnShape, Query};
use half::f16;

/// Activations per llama.cpp Q8 block (`QK8_0` = `QK8_1` = 32).
pub const Q8_BLOCK: usize = 32;
/// Largest 8-bit code of a Q8 block: codes are symmetric in −127..=127.
const Q8_MAX: f32 = 127.0;

/// How activations are rounded on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// f32 activations and KV cache (the reference semantics).
    #[default]
    Exact,
    /// llama.cpp CPU: Q8 activations into every linear, FP16 query/KV and
    /// FP16 value accumulation in attention.
    LlamaCpp,
}

impl std::str::FromStr for Numerics {
    type Err = String;
    fn from_str(s: &str) -> Result<Numerics, String> {
        match s {
            "exact" => Ok(Numerics::Exact),
            "llama-cpp" => Ok(Numerics::LlamaCpp),
            _ => Err(format!("numerics {s:?}: expected exact or llama-cpp")),
        }
    }
}

/// Rounds `x` in place to the values of its Q8 blocks, block boundaries
/// counted from the start of each row of `row_len` (a partial last block is
/// a block of its own; llama.cpp never has one for the types it quantizes
/// activations against). Returns, per row and block, what llama.cpp's Q4_1
/// dot product sees differently: it adds `m · s` with the block sum
/// `s = fp16(amax/127 · Σq)` (unrounded scale, rounded sum), where
/// `Σ x̃ = fp16(amax/127) · Σq` is what the rounded values give. So
/// `x̃·w + Σ_blocks m·correction` is llama.cpp's Q4_1 × Q8_1 product.
///
/// ```text
///   corrections: [rows][ceil(row_len / 32)]   fp16(d·Σq) − fp16(d)·Σq
/// ```
pub fn round_q8_rows(x: &mut [f32], row_len: usize) -> Vec<f32> {
    let mut corrections = Vec::with_capacity(x.len().div_ceil(Q8_BLOCK));
    for row in x.chunks_mut(row_len) {
        for block in row.chunks_mut(Q8_BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 {
                block.fill(0.0);
                corrections.push(0.0);
                continue;
            }
            let id = Q8_MAX / amax;
            let d = amax / Q8_MAX;
            let d16 = f16::from_f32(d).to_f32();
            let mut sum_q = 0f32;
            for v in block.iter_mut() {
                let q = (*v * id).round_ties_even();
                sum_q += q;
                *v = d16 * q;
            }
            corrections.push(f16::from_f32(d * sum_q).to_f32() - d16 * sum_q);
        }
    }
    corrections
}

/// Adds llama.cpp's Q4_1 block-sum term (see [`round_q8_rows`]) to the
/// rows of `y [rows, out]` that `uses_base` selects: `y[r][o] +=
/// Σ_b mins[o][b] · corrections[r][b]`.
pub fn add_q4_1_sum_term(
    y: &mut [f32],
    out: usize,
    mins: &[f16],
    corrections: &[f32],
    uses_base: impl Fn(usize) -> bool,
) {
    let blocks = mins.len() / out;
    for (r, (yr, cr)) in y
        .chunks_mut(out)
        .zip(corrections.chunks(blocks))
        .enumerate()
    {
        if !uses_base(r) {
            continue;
        }
        for (o, v) in yr.iter_mut().enumerate() {
            let m = &mins[o * blocks..(o + 1) * blocks];
            *v += m.iter().zip(cr).map(|(a, c)| a.to_f32() * c).sum::<f32>();
        }
    }
}

/// Rounds every value to FP16 and back.
pub fn round_f16(x: &mut [f32]) {
    for v in x {
        *v = f16::from_f32(*v).to_f32();
    }
}

/// One query head against its keys/values at positions `lo..=pos`, as
/// ggml's CPU flash attention does it with an FP16 KV cache: `q` already
/// FP16-rounded, scores in f32, and the value accumulator kept in FP16
/// (rounded after every rescale and every multiply-add), divided by the
/// softmax sum at the end.
pub fn attend_head_f16_accumulate<'a>(
    q: &[f32],
    positions: std::ops::RangeInclusive<usize>,
    kv: &dyn Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    out: &mut [f32],
) {
    let d = q.len();
    let mut acc = vec![0f32; d];
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for j in positions {
        let (k, v) = kv(j);
        let s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let m_old = m;
            m = s;
            ms = (m_old - m).exp();
            for a in acc.iter_mut() {
                *a = f16::from_f32(*a * ms).to_f32();
            }
        } else {
            vs = (s - m).exp();
        }
        for (a, b) in acc.iter_mut().zip(v) {
            *a = f16::from_f32(*a + b * vs).to_f32();
        }
        sum = sum * ms + vs;
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a / sum;
    }
}

/// [`super::ops::attention`] with llama.cpp's CPU flash-attention
/// roundings (see [`attend_head_f16_accumulate`]); the caller has stored the
/// keys and values FP16-rounded. Same window and GQA rules
/// ([`for_each_head`]).
pub fn attention_llama_cpp(s: AttnShape, q: &[f32], queries: &[Query], out: &mut [f32]) {
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    for_each_head(s, q, queries, out, |task, o| {
        let mut q16 = task.q.to_vec();
        round_f16(&mut q16);
        let kv = |j: usize| task.kv(j);
        attend_head_f16_accumulate(&q16, task.positions.clone(), &kv, scale, o);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_rounding_keeps_the_block_max_and_is_idempotent_in_shape() {
        let mut x: Vec<f32> = (0..70).map(|i| ((i as f32) * 0.731).sin() * 3.0).collect();
        let orig = x.clone();
        let corr = round_q8_rows(&mut x, 70);
        assert_eq!(corr.len(), 3);
        for (b, (r, o)) in x.chunks(Q8_BLOCK).zip(orig.chunks(Q8_BLOCK)).enumerate() {
            let amax = o.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Each value moves by at most half a step (plus the FP16 scale's rounding).
            let step = amax / Q8_MAX;
            for (a, b2) in r.iter().zip(o) {
                assert!((a - b2).abs() <= 0.5 * step + amax * 1e-3, "block {b}");
            }
        }
        assert_ne!(x, orig, "8-bit rounding must change generic values");
        let mut zeros = vec![0f32; 40];
        assert_eq!(round_q8_rows(&mut zeros, 40), vec![0.0, 0.0]);
        assert!(zeros.iter().all(|v| *v == 0.0));
    }

    /// `x̃·w + Σ m·correction` equals llama.cpp's Q4_1 × Q8_1 dot product
    /// `Σ_b d_w·fp16(d_x)·Σ q_w q_x + m·fp16(d_x·Σ q_x)`, written out here
    /// block by block from the quantized values.
    #[test]
    fn q4_1_sum_term_reproduces_the_q4_1_q8_1_dot_product() {
        let (out, inp) = (3, 64);
        let blocks = inp / Q8_BLOCK;
        let d_w: Vec<f32> = (0..out * blocks).map(|i| 0.01 + 0.003 * i as f32).collect();
        let m_w: Vec<f16> = (0..out * blocks)
            .map(|i| f16::from_f32(-0.08 - 0.01 * i as f32))
            .collect();
        let q_w: Vec<f32> = (0..out * inp).map(|i| ((i * 7 + 3) % 16) as f32).collect();
        let w: Vec<f32> = (0..out * inp)
            .map(|i| d_w[i / Q8_BLOCK] * q_w[i] + m_w[i / Q8_BLOCK].to_f32())
            .collect();
        let x: Vec<f32> = (0..inp).map(|i| (i as f32 * 0.37).sin() * 1.7).collect();

        let mut xq = x.clone();
        let corrections = round_q8_rows(&mut xq, inp);
        let mut ours: Vec<f32> = (0..out)
            .map(|o| (0..inp).map(|i| w[o * inp + i] * xq[i]).sum())
            .collect();
        add_q4_1_sum_term(&mut ours, out, &m_w, &corrections, |_| true);

        for o in 0..out {
            let mut want = 0f32;
            for b in 0..blocks {
                let xb = &x[b * Q8_BLOCK..(b + 1) * Q8_BLOCK];
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / Q8_MAX;
                let q_x: Vec<f32> = xb
                    .iter()
                    .map(|v| (v * (Q8_MAX / amax)).round_ties_even())
                    .collect();
                let dot: f32 = (0..Q8_BLOCK)
                    .map(|j| q_w[o * inp + b * Q8_BLOCK + j] * q_x[j])
                    .sum();
                let s = f16::from_f32(d * q_x.iter().sum::<f32>()).to_f32();
                want += d_w[o * blocks + b] * f16::from_f32(d).to_f32() * dot
                    + m_w[o * blocks + b].to_f32() * s;
            }
            assert!(
                (ours[o] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{o}: {} vs {want}",
                ours[o]
            );
        }
        // Without the term the product is measurably off (what FP16 sums miss).
        let plain: f32 = (0..inp).map(|i| w[i] * xq[i]).sum();
        assert!(corrections.iter().any(|c| *c != 0.0));
        assert_ne!(plain, ours[0]);
    }

    #[test]
    fn f16_accumulated_attention_is_close_to_softmax() {
        let d = 8;
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.3).cos()).collect();
        let ks: Vec<Vec<f32>> = (0..5)
            .map(|j| (0..d).map(|i| ((i + j) as f32 * 0.7).sin()).collect())
            .collect();
        let vs: Vec<Vec<f32>> = (0..5)
            .map(|j| (0..d).map(|i| ((i * j) as f32 * 0.2).cos()).collect())
            .collect();
        let mut out = vec![0f32; d];
        let kv = |j: usize| (ks[j].as_slice(), vs[j].as_slice());
        attend_head_f16_accumulate(&q, 0..=4, &kv, 0.5, &mut out);
        let scores: Vec<f32> = ks
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * 0.5)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = w.iter().sum();
        for i in 0..d {
            let want: f32 = (0..5).map(|j| w[j] / total * vs[j][i]).sum();
            assert!((out[i] - want).abs() < 5e-3, "{i}: {} vs {want}", out[i]);
        }
    }
}
