//! Attention as ggml's CPU flash attention computes it with an FP16 KV
//! cache (`ggml_compute_forward_flash_attn_ext_f16`, one query row at a
//! time, keys in position order):
//!
//! ```text
//!   q₁₆ = fp16(q)
//!   s   = dot_f16(k, q₁₆) · scale                 (f32; see `dot_f16`)
//!   if s > M:  ms = expf(M_old − s); V = fp16(V · ms)      else: vs = expf(s − M)
//!   V   = fp16(fma(v, vs, V))                        (FP16 accumulator)
//!   S   = fma(S, ms, vs)
//!   out = f32(V) · (1/S)
//! ```

use half::f16;
use meswitch_reference::layers::{for_each_head, AttnShape, Query};

use super::round_f16;

/// Values per AVX register and registers per step of `ggml_vec_dot_f16`
/// (`GGML_F16_EPR`, `GGML_F16_STEP / GGML_F16_EPR`).
const EPR: usize = 8;
const ARR: usize = 4;

/// `ggml_vec_dot_f16` (AVX2 + F16C): four 8-lane FMA accumulators over
/// steps of 32, reduced `(acc0+acc2) + (acc1+acc3)`, then the 8 lanes as
/// `((l0+l4) + (l1+l5)) + ((l2+l6) + (l3+l7))`; a tail past the last whole
/// step is added in f64.
pub fn dot_f16(x: &[f32], y: &[f32]) -> f32 {
    let step = EPR * ARR;
    let whole = x.len() / step * step;
    let mut acc = [[0f32; EPR]; ARR];
    for i in (0..whole).step_by(step) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, lane) in a.iter_mut().enumerate() {
                let at = i + j * EPR + l;
                *lane = x[at].mul_add(y[at], *lane);
            }
        }
    }
    let mut r = [0f32; EPR];
    for (l, v) in r.iter_mut().enumerate() {
        let a02 = acc[0][l] + acc[2][l];
        let a13 = acc[1][l] + acc[3][l];
        *v = a02 + a13;
    }
    let t0 = [r[0] + r[4], r[1] + r[5], r[2] + r[6], r[3] + r[7]];
    let mut sum = ((t0[0] + t0[1]) + (t0[2] + t0[3])) as f64;
    for i in whole..x.len() {
        sum += (x[i] * y[i]) as f64;
    }
    sum as f32
}

/// Reorders every head of `row` from the HF RoPE layout this runtime keeps
/// (`[x_0 .. x_{d/2−1} | x_{d/2} .. x_{d−1}]`) to the GGUF layout ggml
/// computes in (`x_0, x_{d/2}, x_1, x_{d/2+1}, ...`). Scores are the same
/// numbers either way, but `dot_f16` sums in lanes, so the order of the
/// elements decides the rounding.
pub fn to_gguf_head_order(row: &mut [f32], head_dim: usize) {
    let half = head_dim / 2;
    for head in row.chunks_mut(head_dim) {
        let hf = head.to_vec();
        for i in 0..half {
            head[2 * i] = hf[i];
            head[2 * i + 1] = hf[half + i];
        }
    }
}

/// One query head against its keys/values at `positions`, as above; `q`
/// already FP16-rounded, keys and values stored FP16-rounded.
pub fn attend_head_f16_accumulate<'a>(
    q: &[f32],
    positions: std::ops::RangeInclusive<usize>,
    kv: &dyn Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    out: &mut [f32],
) {
    let fp16 = |v: f32| f16::from_f32(v).to_f32();
    let mut acc = vec![0f32; out.len()];
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for j in positions {
        let (k, v) = kv(j);
        let s = dot_f16(k, q) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let m_old = m;
            m = s;
            ms = (m_old - m).exp();
            for a in acc.iter_mut() {
                *a = fp16(*a * ms);
            }
        } else {
            vs = (s - m).exp();
        }
        for (a, b) in acc.iter_mut().zip(v) {
            *a = fp16(b.mul_add(vs, *a));
        }
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * inv;
    }
}

/// [`meswitch_reference::layers::attention`] with llama.cpp's roundings;
/// the caller has stored keys and values FP16-rounded. Same window and GQA
/// rules ([`for_each_head`]).
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
    fn f16_dot_is_a_dot_product_in_ggml_order() {
        let x: Vec<f32> = (0..70).map(|i| (i as f32 * 0.3).cos()).collect();
        let y: Vec<f32> = (0..70).map(|i| (i as f32 * 0.7).sin()).collect();
        let want: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        assert!((dot_f16(&x, &y) as f64 - want).abs() < 1e-5);
        // A sum that depends on order: 1e8 cancels only when lanes 0 and 4
        // are added before anything else touches them.
        let mut big = vec![0f32; 32];
        big[0] = 1e8;
        big[4] = -1e8;
        big[1] = 1.0;
        assert_eq!(dot_f16(&big, &[1.0; 32]), 1.0);
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
