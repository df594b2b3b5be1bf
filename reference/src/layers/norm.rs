//! RMSNorm (Zhang & Sennrich 2019), as Llama uses it: no mean subtraction,
//! no bias, a learned per-channel gain.

/// `y = x / sqrt(mean(x²) + eps) · w`, one row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), g) in y.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut y = [0.0; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut y);
        let rms = (y.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_applies_gain_and_eps() {
        let x = [1.0f32, 1.0];
        let mut y = [0.0; 2];
        rms_norm(&x, &[2.0, -3.0], 3.0, &mut y);
        // mean(x²) = 1, so 1/sqrt(1 + 3) = 0.5.
        assert_eq!(y, [1.0, -1.5]);
    }
}
