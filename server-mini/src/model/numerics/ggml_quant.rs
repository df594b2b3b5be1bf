//! ggml's quantized matrix × activation product on x86 (AVX2 + FMA),
//! reproduced bit for bit: the weight blocks as stored in the GGUF file,
//! the activations quantized to 8 bits the way ggml does it, integer block
//! dots summed in ggml's lanes and ggml's order.
//!
//! ```text
//!   block (32 values)          bytes
//!   Q4_1  [d f16][m f16][qs 16]   w_j = d·q_j + m,  q_j = qs[j] & 0xF (j < 16), qs[j−16] >> 4 (j ≥ 16)
//!   Q8_0  [d f16][qs 32 × i8]     w_j = d·q_j
//!
//!   activations, per block (quantize_row_q8_0 / quantize_row_q8_1):
//!     amax = max |x_j|;  d = amax/127;  id = 127/amax (0 if amax = 0)
//!     q_j = round_half_even(x_j · id);  d₁₆ = fp16(d);  s = fp16(d · Σq)   (s: Q8_1 only)
//!
//!   one output (vec_dot_q4_1_q8_1 / vec_dot_q8_0_q8_0):
//!     lane k of block b = Σ_{j=4k}^{4k+3} q_w[j]·q_x[j]            exact, i32 → f32
//!     acc[k] = fma(d_w·d₁₆, lane_k, acc[k])                       blocks in order
//!     y = ((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7))  [+ Σ_b m·s for Q4_1]
//! ```
//!
//! The x86 path uses the same instructions as ggml (maddubs/madd/fmadd);
//! the portable path computes the same lanes with integer arithmetic and
//! `mul_add`, so both give identical bits (tested).

use half::f16;
use rayon::prelude::*;

/// Values per block, for every type here (`QK4_1` = `QK8_0` = `QK8_1`).
pub const BLOCK: usize = 32;
/// Largest 8-bit activation code: codes are symmetric in −127..=127.
const Q8_MAX: f32 = 127.0;
/// Lanes of an AVX2 f32 accumulator: ggml keeps one partial sum per lane.
const LANES: usize = 8;
/// Values per lane per block (`BLOCK / LANES`): `maddubs` pairs, `madd` pairs again.
const PER_LANE: usize = BLOCK / LANES;
/// Output rows per parallel task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 64;

/// The ggml block types computed exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Q4_1,
    Q8_0,
}

impl BlockKind {
    pub fn block_bytes(self) -> usize {
        match self {
            BlockKind::Q4_1 => 4 + BLOCK / 2,
            BlockKind::Q8_0 => 2 + BLOCK,
        }
    }
}

/// A matrix `[rows, cols]` as ggml blocks, each row's blocks contiguous.
/// The blocks' FP16 scales (and Q4_1 minima) are also kept widened to f32,
/// once, because converting them per product cost as much as the product.
#[derive(Clone, Debug)]
pub struct GgmlBlocks {
    pub kind: BlockKind,
    pub rows: usize,
    pub cols: usize,
    bytes: Vec<u8>,
    /// Per block, `d` as f32.
    scales: Vec<f32>,
    /// Per block, Q4_1's `m` as f32 (empty for Q8_0).
    mins: Vec<f32>,
}

/// One weight row: its blocks and their widened scales and minima.
struct WeightRow<'a> {
    blocks: &'a [u8],
    scales: &'a [f32],
    mins: &'a [f32],
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl GgmlBlocks {
    /// Checks that `bytes` holds exactly `rows × cols / 32` blocks.
    pub fn new(kind: BlockKind, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self, String> {
        if cols % BLOCK != 0 {
            return Err(format!("{cols} columns are not whole blocks of {BLOCK}"));
        }
        let want = rows * cols / BLOCK * kind.block_bytes();
        if bytes.len() != want {
            return Err(format!(
                "{kind:?} [{rows}, {cols}] needs {want} bytes, found {}",
                bytes.len()
            ));
        }
        let bb = kind.block_bytes();
        let scales = bytes.chunks_exact(bb).map(|b| f16_at(b, 0)).collect();
        let mins = match kind {
            BlockKind::Q4_1 => bytes.chunks_exact(bb).map(|b| f16_at(b, 2)).collect(),
            BlockKind::Q8_0 => Vec::new(),
        };
        Ok(GgmlBlocks {
            kind,
            rows,
            cols,
            bytes,
            scales,
            mins,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.kind.block_bytes()
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.bytes[r * self.row_bytes()..(r + 1) * self.row_bytes()]
    }

    fn weight_row(&self, r: usize) -> WeightRow<'_> {
        let nb = self.cols / BLOCK;
        WeightRow {
            blocks: self.row(r),
            scales: &self.scales[r * nb..(r + 1) * nb],
            mins: match self.kind {
                BlockKind::Q4_1 => &self.mins[r * nb..(r + 1) * nb],
                BlockKind::Q8_0 => &[],
            },
        }
    }

    /// Row `r` as f32, as ggml's `dequantize_row_*` (`get_rows`) gives it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let w = self.weight_row(r);
        let blocks = w.blocks.chunks_exact(self.kind.block_bytes());
        for (b, (blk, y)) in blocks.zip(out.chunks_mut(BLOCK)).enumerate() {
            let d = w.scales[b];
            match self.kind {
                BlockKind::Q8_0 => {
                    for (v, &q) in y.iter_mut().zip(&blk[2..]) {
                        *v = q as i8 as f32 * d;
                    }
                }
                BlockKind::Q4_1 => {
                    for (j, v) in y.iter_mut().enumerate() {
                        *v = (q4_code(&blk[4..], j) as f32).mul_add(d, w.mins[b]);
                    }
                }
            }
        }
    }

    /// `y [x.rows, self.rows] = x · selfᵀ` with ggml's arithmetic. `x`
    /// must be quantized for this matrix's kind ([`Q8Rows::quantize`]).
    pub fn matmul(&self, x: &Q8Rows, y: &mut [f32]) {
        assert_eq!(x.cols, self.cols, "activation width");
        assert_eq!(y.len(), x.rows() * self.rows, "output shape");
        let nb = self.cols / BLOCK;
        #[cfg(target_arch = "x86_64")]
        let simd = avx2::available();
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        for (r, yr) in y.chunks_mut(self.rows).enumerate() {
            let xr = x.row(r, nb);
            yr.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(t, ys)| {
                    for (i, v) in ys.iter_mut().enumerate() {
                        *v = self.dot(t * ROWS_PER_TASK + i, &xr, simd);
                    }
                });
        }
    }

    /// One output; `simd` only where [`avx2::available`] said so.
    fn dot(&self, o: usize, x: &Q8Row<'_>, simd: bool) -> f32 {
        let w = self.weight_row(o);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA (the caller checked), and the
            // loads stay inside `w`'s and `x`'s whole blocks.
            return unsafe {
                match self.kind {
                    BlockKind::Q4_1 => avx2::dot_q4_1(&w, x),
                    BlockKind::Q8_0 => avx2::dot_q8_0(&w, x),
                }
            };
        }
        let _ = simd;
        portable_dot(self.kind, &w, x)
    }
}

/// The 4-bit code `j` of a Q4_1 block's `qs`.
fn q4_code(qs: &[u8], j: usize) -> u8 {
    if j < BLOCK / 2 {
        qs[j] & 0xF
    } else {
        qs[j - BLOCK / 2] >> 4
    }
}

/// ggml's `hsum_float_8`: high half onto low half, then pairs.
fn hsum8(a: [f32; LANES]) -> f32 {
    let r = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

fn portable_dot(kind: BlockKind, w: &WeightRow<'_>, x: &Q8Row<'_>) -> f32 {
    let mut acc = [0f32; LANES];
    let mut summs = 0f32;
    for (b, blk) in w.blocks.chunks_exact(kind.block_bytes()).enumerate() {
        let qx = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        let d = w.scales[b] * x.d[b];
        let code = |j: usize| -> i32 {
            match kind {
                BlockKind::Q4_1 => q4_code(&blk[4..], j) as i32,
                BlockKind::Q8_0 => blk[2 + j] as i8 as i32,
            }
        };
        for (k, a) in acc.iter_mut().enumerate() {
            let lane: i32 = (k * PER_LANE..(k + 1) * PER_LANE)
                .map(|j| code(j) * qx[j] as i32)
                .sum();
            *a = d.mul_add(lane as f32, *a);
        }
        if kind == BlockKind::Q4_1 {
            summs = w.mins[b].mul_add(x.s[b], summs);
        }
    }
    hsum8(acc) + summs
}

/// Activation rows quantized to ggml's 8-bit blocks (`Q8_0`, or `Q8_1`
/// with the block sums `s`, which only `Q4_1` weights read).
#[derive(Clone, Debug)]
pub struct Q8Rows {
    cols: usize,
    /// Per block: `fp16(amax/127)` as f32.
    d: Vec<f32>,
    /// Per block: `fp16(amax/127 · Σq)` as f32.
    s: Vec<f32>,
    qs: Vec<i8>,
}

struct Q8Row<'a> {
    d: &'a [f32],
    s: &'a [f32],
    qs: &'a [i8],
}

impl Q8Rows {
    /// Quantizes `x [rows, cols]` (`cols` a multiple of 32) as ggml's AVX2
    /// `quantize_row_q8_1` does (`q8_0` gives the same `d` and codes).
    pub fn quantize(x: &[f32], cols: usize) -> Q8Rows {
        assert_eq!(cols % BLOCK, 0, "activation width in whole blocks");
        let n = x.len() / BLOCK;
        let mut out = Q8Rows {
            cols,
            d: Vec::with_capacity(n),
            s: Vec::with_capacity(n),
            qs: Vec::with_capacity(x.len()),
        };
        for block in x.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / Q8_MAX;
            let id = if amax != 0.0 { Q8_MAX / amax } else { 0.0 };
            let mut sum = 0i32;
            for v in block {
                let q = (v * id).round_ties_even() as i32;
                sum += q;
                out.qs.push(q as i8);
            }
            out.d.push(f16::from_f32(d).to_f32());
            out.s.push(f16::from_f32(d * sum as f32).to_f32());
        }
        out
    }

    pub fn rows(&self) -> usize {
        self.qs.len() / self.cols.max(1)
    }

    fn row(&self, r: usize, nb: usize) -> Q8Row<'_> {
        Q8Row {
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
            qs: &self.qs[r * self.cols..(r + 1) * self.cols],
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The same products with ggml's instructions (its AVX2 path, no VNNI).
    use std::arch::x86_64::*;

    use super::{hsum8, BlockKind, Q8Row, WeightRow, BLOCK, LANES};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes(acc: __m256) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1(w: &WeightRow<'_>, x: &Q8Row<'_>) -> f32 {
        let bb = BlockKind::Q4_1.block_bytes();
        let low_nibbles = _mm256_set1_epi8(0xF);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        let blocks = w.blocks.chunks_exact(bb).zip(x.qs.chunks_exact(BLOCK));
        let scales = w.scales.iter().zip(w.mins).zip(x.d.iter().zip(x.s));
        for ((blk, qx), ((&dw, &m), (&dx, &s))) in blocks.zip(scales) {
            summs = m.mul_add(s, summs);
            let d = _mm256_set1_ps(dw * dx);
            let packed = _mm_loadu_si128(blk[4..].as_ptr() as *const __m128i);
            let codes = _mm256_and_si256(
                low_nibbles,
                _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
            );
            let qx = _mm256_loadu_si256(qx.as_ptr() as *const __m256i);
            let pairs = _mm256_maddubs_epi16(codes, qx);
            let quads = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, pairs));
            acc = _mm256_fmadd_ps(d, quads, acc);
        }
        hsum8(lanes(acc)) + summs
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(w: &WeightRow<'_>, x: &Q8Row<'_>) -> f32 {
        let bb = BlockKind::Q8_0.block_bytes();
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let blocks = w.blocks.chunks_exact(bb).zip(x.qs.chunks_exact(BLOCK));
        for ((blk, qx), (&dw, &dx)) in blocks.zip(w.scales.iter().zip(x.d)) {
            let d = _mm256_set1_ps(dw * dx);
            let qw = _mm256_loadu_si256(blk[2..].as_ptr() as *const __m256i);
            let qx = _mm256_loadu_si256(qx.as_ptr() as *const __m256i);
            // maddubs takes one unsigned operand: move the weights' signs
            // onto the activations, as ggml does.
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
            let quads = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, pairs));
            acc = _mm256_fmadd_ps(d, quads, acc);
        }
        hsum8(lanes(acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn avx2_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return avx2::available();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    fn random_blocks(kind: BlockKind, rows: usize, cols: usize, seed: u64) -> GgmlBlocks {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            bytes.extend_from_slice(&d.to_le_bytes());
            match kind {
                BlockKind::Q4_1 => {
                    let m = f16::from_f32(-((next() % 1000) as f32) * 1e-4);
                    bytes.extend_from_slice(&m.to_le_bytes());
                    bytes.extend((0..BLOCK / 2).map(|_| next() as u8));
                }
                BlockKind::Q8_0 => bytes.extend((0..BLOCK).map(|_| (next() % 255) as u8)),
            }
        }
        GgmlBlocks::new(kind, rows, cols, bytes).unwrap()
    }

    #[test]
    fn q8_quantization_follows_ggml() {
        let mut x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.731).sin() * 3.0).collect();
        // amax 127 makes id = 1: 2.5 and −3.5 sit halfway between codes
        // and round to the even ones.
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        let q = Q8Rows::quantize(&x, 64);
        let amax = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(q.d[0], f16::from_f32(amax / 127.0).to_f32());
        assert!(q.qs[..32].iter().any(|&c| c == 127 || c == -127));
        assert_eq!(&q.qs[..3], &[127, 2, -4]);
        let sum: i32 = q.qs[..32].iter().map(|&c| c as i32).sum();
        assert_eq!(q.s[0], f16::from_f32(amax / 127.0 * sum as f32).to_f32());
        let zeros = Q8Rows::quantize(&[0.0; 32], 32);
        assert_eq!((zeros.d[0], zeros.s[0]), (0.0, 0.0));
        assert!(zeros.qs.iter().all(|&c| c == 0));
    }

    /// The block product equals the dequantized product up to f32
    /// rounding: a check of the layout, independent of the lane order.
    #[test]
    fn block_products_match_the_dequantized_matrix() {
        for kind in [BlockKind::Q4_1, BlockKind::Q8_0] {
            let (rows, cols) = (5, 96);
            let w = random_blocks(kind, rows, cols, 7);
            let x: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.37).cos()).collect();
            let q = Q8Rows::quantize(&x, cols);
            let mut y = vec![0f32; 2 * rows];
            w.matmul(&q, &mut y);
            for r in 0..2 {
                let xr: Vec<f32> = (0..cols)
                    .map(|j| q.qs[r * cols + j] as f32 * q.d[r * cols / BLOCK + j / BLOCK])
                    .collect();
                for o in 0..rows {
                    let mut wr = vec![0f32; cols];
                    w.dequantize_row(o, &mut wr);
                    let mut want: f64 = wr.iter().zip(&xr).map(|(a, b)| (a * b) as f64).sum();
                    if kind == BlockKind::Q4_1 {
                        // ggml adds m·s with the FP16-rounded block sum `s`
                        // where the dequantized product has m·d₁₆·Σq.
                        for b in 0..cols / BLOCK {
                            let m = f16_at(w.row(o), b * kind.block_bytes() + 2) as f64;
                            let nb = cols / BLOCK;
                            let sum_q: i32 = q.qs[r * cols + b * BLOCK..][..BLOCK]
                                .iter()
                                .map(|&c| c as i32)
                                .sum();
                            want += m
                                * (q.s[r * nb + b] as f64 - q.d[r * nb + b] as f64 * sum_q as f64);
                        }
                    }
                    let got = y[r * rows + o] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{kind:?} {r} {o}: {got} vs {want}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The instruction path and the portable path agree bit for bit.
        #[test]
        fn simd_and_portable_products_are_identical(
            seed in 0u64..1_000_000, blocks in 1usize..6, q4 in any::<bool>(),
            xs in proptest::collection::vec(-30.0f32..30.0, 192),
        ) {
            let kind = if q4 { BlockKind::Q4_1 } else { BlockKind::Q8_0 };
            let cols = blocks * BLOCK;
            let w = random_blocks(kind, 3, cols, seed);
            let q = Q8Rows::quantize(&xs[..cols], cols);
            let row = q.row(0, blocks);
            for o in 0..3 {
                let portable = portable_dot(kind, &w.weight_row(o), &row);
                let simd = cfg!(target_arch = "x86_64") && avx2_available();
                prop_assert_eq!(w.dot(o, &row, simd).to_bits(), portable.to_bits());
            }
        }
    }
}
