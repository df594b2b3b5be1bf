//! CPU dot-product kernels under the multi-expert linear op.
//!
//! The decode path is memory-bound on the FP16 base weights, so the kernel
//! converts FP16 to f32 in registers (F16C) and fuses it with the multiply-add
//! (FMA) instead of widening each weight row into a buffer first. Up to
//! [`X_BLOCK`] activation rows share one load of each weight vector, which is
//! what makes prefill (many rows) compute- rather than load-bound.
//!
//! Every SIMD path has a portable twin with the same summation structure,
//! selected at run time when the CPU lacks AVX2/FMA/F16C; tests compare both.

use half::f16;

/// Activation rows handled per pass over a weight row: 4 rows × 1 f32x8
/// accumulator each, plus the weight vector, stays well inside 16 ymm
/// registers.
pub const X_BLOCK: usize = 4;

/// Lanes of one f32 SIMD register (AVX2), and the portable twin's
/// accumulator count so both sum in the same order class.
const LANES: usize = 8;

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma_f16c() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// `out[i] = w · xs[i]` for every activation row (`w` FP16, `xs[i]` f32, all
/// the same length).
pub fn dots_f16(w: &[f16], xs: &[&[f32]], out: &mut [f32]) {
    debug_assert_eq!(xs.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        for (xb, ob) in xs.chunks(X_BLOCK).zip(out.chunks_mut(X_BLOCK)) {
            // SAFETY: the features were detected above; lengths checked inside.
            unsafe { avx::dots_f16_block(w, xb, ob) };
        }
        return;
    }
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        *o = portable_dot(x.len(), |i| w[i].to_f32(), x);
    }
}

/// `w · x` for f32 vectors (dequantized delta rows).
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: features detected above.
        return unsafe { avx::dot_f32(w, x) };
    }
    portable_dot(x.len(), |i| w[i], x)
}

/// `LANES` independent partial sums (so the compiler may vectorise, and the
/// rounding resembles the SIMD path), then a scalar tail.
fn portable_dot(n: usize, w: impl Fn(usize) -> f32, x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let body = n - n % LANES;
    for base in (0..body).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += w(base + l) * x[base + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (i, xi) in x.iter().enumerate().take(n).skip(body) {
        sum += w(i) * xi;
    }
    sum
}

/// Reference for tests: the same dot in f64.
#[cfg(test)]
fn dot_f64(w: &[f32], x: &[f32]) -> f64 {
    w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{LANES, X_BLOCK};
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx")]
    unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One block of up to `X_BLOCK` activation rows against one FP16 row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_f16_block(w: &[f16], xs: &[&[f32]], out: &mut [f32]) {
        let n = w.len();
        let m = xs.len();
        assert!(m <= X_BLOCK && out.len() == m);
        for x in xs {
            assert_eq!(x.len(), n);
        }
        let mut acc = [_mm256_setzero_ps(); X_BLOCK];
        let body = n - n % LANES;
        let wp = w.as_ptr() as *const u16;
        let mut i = 0;
        while i < body {
            // f16 is a transparent u16; 8 of them are one unaligned 128-bit load.
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i) as *const __m128i));
            for j in 0..m {
                let xv = _mm256_loadu_ps(xs[j].as_ptr().add(i));
                acc[j] = _mm256_fmadd_ps(wv, xv, acc[j]);
            }
            i += LANES;
        }
        for j in 0..m {
            let mut s = hsum(acc[j]);
            for t in body..n {
                s += w[t].to_f32() * xs[j][t];
            }
            out[j] = s;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len();
        assert_eq!(x.len(), n);
        let body = n - n % LANES;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < body {
            let wv = _mm256_loadu_ps(w.as_ptr().add(i));
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            acc = _mm256_fmadd_ps(wv, xv, acc);
            i += LANES;
        }
        let mut s = hsum(acc);
        for t in body..n {
            s += w[t] * x[t];
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// f32 accumulation of n products of magnitude ≤ 1 is off from the f64
    /// sum by at most ~n·ε·Σ|w·x|; the bound below uses that with margin.
    fn tolerance(w: &[f32], x: &[f32]) -> f64 {
        let mag: f64 = w
            .iter()
            .zip(x)
            .map(|(a, b)| (*a as f64 * *b as f64).abs())
            .sum();
        4.0 * (w.len() as f64) * f32::EPSILON as f64 * mag + 1e-30
    }

    proptest! {
        #[test]
        fn dots_match_f64(n in 1usize..300, m in 1usize..9, seed in any::<u64>()) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let w16: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.random_range(-1.0..1.0))).collect();
            let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let xs: Vec<Vec<f32>> = (0..m).map(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
            let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let mut out = vec![f32::NAN; m];
            dots_f16(&w16, &refs, &mut out);
            for (x, o) in xs.iter().zip(&out) {
                let exact = dot_f64(&w32, x);
                prop_assert!((*o as f64 - exact).abs() <= tolerance(&w32, x), "{o} vs {exact}");
                let p = portable_dot(n, |i| w32[i], x) as f64;
                prop_assert!((p - exact).abs() <= tolerance(&w32, x));
                let d = dot_f32(&w32, x) as f64;
                prop_assert!((d - exact).abs() <= tolerance(&w32, x));
            }
        }
    }
}
