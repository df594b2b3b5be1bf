//! ggml's CPU RMSNorm, RoPE and SwiGLU, in ggml's arithmetic (see the
//! parent module for which build). Each function has the signature of its
//! reference counterpart in `meswitch_reference::layers` and differs only
//! in rounding.

/// `ggml_compute_forward_rms_norm_f32` followed by the weight multiply
/// (`ggml_mul`): Σx² accumulated in f64 from f32 squares, the mean rounded
/// to f32, `scale = 1/sqrtf(mean + eps)`, then `(x·scale)·w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum: f64 = x.iter().map(|v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, v), g) in y.iter_mut().zip(x).zip(w) {
        *o = (v * scale) * g;
    }
}

/// ggml's RoPE angle table for one position: `θ₀ = pos`, each next angle
/// the previous times `powf(base, −2/head_dim)` in f32 (so the rounding
/// error grows along the head, unlike an angle computed afresh), then
/// `cosf`/`sinf`.
pub fn rope_angles(pos: usize, head_dim: usize, base: f32) -> (Vec<f32>, Vec<f32>) {
    let theta_scale = base.powf(-2.0 / head_dim as f32);
    let mut theta = pos as f32;
    let mut cos = Vec::with_capacity(head_dim / 2);
    let mut sin = Vec::with_capacity(head_dim / 2);
    for _ in 0..head_dim / 2 {
        cos.push(theta.cos());
        sin.push(theta.sin());
        theta *= theta_scale;
    }
    (cos, sin)
}

/// [`meswitch_reference::layers::rope`] with ggml's angles and its fused
/// rotation. ggml (GGUF row order) pairs `(x0, x1) = (2i, 2i+1)`, which is
/// `(i, i + d/2)` in the HF order this runtime keeps, and computes
/// `x0·cos − x1·sin` and `x0·sin + x1·cos`, each contracted to one FMA
/// over the second product.
pub fn rope(row: &mut [f32], head_dim: usize, pos: usize, base: f32) {
    let half = head_dim / 2;
    let (cos, sin) = rope_angles(pos, head_dim, base);
    for head in row.chunks_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (lo[i], hi[i]);
            lo[i] = x0.mul_add(cos[i], -(x1 * sin[i]));
            hi[i] = x0.mul_add(sin[i], x1 * cos[i]);
        }
    }
}

/// Values per AVX2 register: `ggml_vec_swiglu_f32` runs the polynomial
/// `expf` over whole groups of 8 and libm's `expf` over the rest.
const AVX2_F32_LANES: usize = 8;

/// `ggml_vec_swiglu_f32` on each row of `row_len`: `gate ← silu(gate)·up`.
pub fn swiglu(gate: &mut [f32], up: &[f32], row_len: usize) {
    for (g, u) in gate.chunks_mut(row_len).zip(up.chunks(row_len)) {
        let vector_part = g.len() / AVX2_F32_LANES * AVX2_F32_LANES;
        for (i, (a, b)) in g.iter_mut().zip(u).enumerate() {
            let silu = if i < vector_part {
                *a / (1.0 + expf_poly(0.0 - *a))
            } else {
                *a / (1.0 + (-*a).exp())
            };
            *a = silu * b;
        }
    }
}

/// Constants of ggml's `ggml_v_expf` (x86 AVX2 + FMA), after ARM's
/// optimized-routines `expf`: `2^n · p(b)`, `n = round(x·log2 e)`,
/// `b = x − n·ln2` (ln2 in two parts), `p` a degree-5 polynomial. Its
/// error is up to 1.45 ulp + 0.5, which is why it is reproduced and not
/// replaced by libm's.
mod expf_consts {
    /// 1.5·2²³: adding it rounds to an integer in the low mantissa bits.
    pub const SHIFT: u32 = 0x4b40_0000;
    pub const LOG2E: u32 = 0x3fb8_aa3b;
    pub const LN2_HI: u32 = 0x3f31_7200;
    pub const LN2_LO: u32 = 0x35bf_be8e;
    pub const C5: u32 = 0x3c07_2010;
    pub const C4: u32 = 0x3d2b_9f17;
    pub const C3: u32 = 0x3e2a_af33;
    pub const C2: u32 = 0x3eff_fedb;
    pub const C1: u32 = 0x3f7f_fff6;
    /// |n| beyond which `2^n` is built from two factors (`s1`, `s2`).
    pub const SPLIT: f32 = 126.0;
    /// |n| beyond which the result is 0 or ∞.
    pub const SATURATE: f32 = 192.0;
    /// Exponent bias adjustment for the two-factor case.
    pub const SPLIT_BIAS: u32 = 0x8200_0000;
    pub const HALF_SCALE: u32 = 0x7f00_0000;
}

/// ggml's `ggml_v_expf`, one lane.
pub fn expf_poly(x: f32) -> f32 {
    use expf_consts::*;
    let c = f32::from_bits;
    let z = x.mul_add(c(LOG2E), c(SHIFT));
    let n = z - c(SHIFT);
    let b = (-n).mul_add(c(LN2_LO), (-n).mul_add(c(LN2_HI), x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = c(C5)
        .mul_add(b, c(C4))
        .mul_add(u, c(C3).mul_add(b, c(C2)))
        .mul_add(u, c(C1) * b);
    let split = n.abs() > SPLIT;
    if !split {
        return j.mul_add(k, k);
    }
    let g = if n <= 0.0 { SPLIT_BIAS } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(HALF_SCALE));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > SATURATE {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_expf_is_within_two_ulp_of_libm() {
        let mut worst = 0u32;
        for i in -8000..8000 {
            let x = i as f32 * 0.0107;
            let (a, b) = (expf_poly(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(expf_poly(0.0), 1.0);
        assert_eq!(expf_poly(-200.0), 0.0);
        assert_eq!(expf_poly(100.0), f32::INFINITY);
        // The two-factor range (|n| in 126..192) stays accurate.
        let x = -95.0f32;
        assert!((expf_poly(x) / x.exp() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ggml_norm_rope_and_swiglu_stay_close_to_the_reference() {
        use meswitch_reference::layers as r;
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.61).sin() * 2.0).collect();
        let w: Vec<f32> = (0..128).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let (mut a, mut b) = (vec![0f32; 128], vec![0f32; 128]);
        rms_norm(&x, &w, 1e-5, &mut a);
        r::rms_norm(&x, &w, 1e-5, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-6 * q.abs().max(1.0));
        }

        let (mut a, mut b) = (x.clone(), x.clone());
        rope(&mut a, 64, 300, 1e5);
        r::rope(&mut b, 64, 300, &r::rope_inv_freq(64, 1e5));
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-3, "{p} vs {q}");
        }
        assert_ne!(a, b, "ggml's f32 angle recurrence differs from f64 angles");

        let up: Vec<f32> = (0..100).map(|i| (i as f32 * 0.3).cos()).collect();
        let (mut a, mut b) = (x[..100].to_vec(), x[..100].to_vec());
        swiglu(&mut a, &up, 100);
        r::swiglu(&mut b, &up);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-6 * q.abs().max(1.0));
        }
    }
}
