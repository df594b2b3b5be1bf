//! Error measures reported by `meswitch compress` and used by tests.

/// ‖Δ − Δ̂‖_F / ‖Δ‖_F (0 when Δ is zero and Δ̂ equals it).
pub fn relative_error(delta: &[f32], approx: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&d, &a) in delta.iter().zip(approx) {
        num += f64::from(d - a).powi(2);
        den += f64::from(d).powi(2);
    }
    ratio(num, den)
}

/// ‖X(Δ − Δ̂)ᵀ‖_F / ‖XΔᵀ‖_F for activations X `[tokens, in]`.
pub fn output_relative_error(
    x: &[f32],
    tokens: usize,
    delta: &[f32],
    approx: &[f32],
    out_features: usize,
    in_features: usize,
) -> f64 {
    use rayon::prelude::*;
    let (num, den) = (0..out_features)
        .into_par_iter()
        .map(|r| {
            let d = &delta[r * in_features..(r + 1) * in_features];
            let a = &approx[r * in_features..(r + 1) * in_features];
            let (mut num, mut den) = (0f64, 0f64);
            for t in 0..tokens {
                let xt = &x[t * in_features..(t + 1) * in_features];
                let (mut yd, mut ye) = (0f64, 0f64);
                for c in 0..in_features {
                    let xv = f64::from(xt[c]);
                    yd += xv * f64::from(d[c]);
                    ye += xv * f64::from(d[c] - a[c]);
                }
                num += ye * ye;
                den += yd * yd;
            }
            (num, den)
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    ratio(num, den)
}

/// ‖X[:, j]‖² for every input channel j.
pub fn activation_energy(x: &[f32], tokens: usize, in_features: usize) -> Vec<f32> {
    let mut e = vec![0f64; in_features];
    for t in 0..tokens {
        for (c, acc) in e.iter_mut().enumerate() {
            *acc += f64::from(x[t * in_features + c]).powi(2);
        }
    }
    e.into_iter().map(|v| v as f32).collect()
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}
