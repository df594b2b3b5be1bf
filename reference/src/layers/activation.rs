//! SwiGLU (Shazeer 2020): the gated activation of the Llama MLP.

/// `silu(gate) · up`, in place into `gate`, where `silu(g) = g / (1 + e^−g)`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_matches_silu_times_up() {
        let mut gate = [0.0f32, 2.0, -2.0, 40.0, -40.0];
        let up = [5.0f32, 1.0, 1.0, 0.5, 3.0];
        swiglu(&mut gate, &up);
        let silu2 = 2.0 / (1.0 + (-2.0f32).exp());
        assert_eq!(gate[0], 0.0);
        assert!((gate[1] - silu2).abs() < 1e-6);
        // silu(−g) = silu(g) − g.
        assert!((gate[2] - (silu2 - 2.0)).abs() < 1e-6);
        // Large |g|: silu → g for g ≫ 0, → 0 for g ≪ 0, never NaN.
        assert!((gate[3] - 20.0).abs() < 1e-5);
        assert!(gate[4].abs() < 1e-12 && !gate[4].is_nan());
    }
}
