//! Rotary position embedding (Su et al. 2021) in the Hugging Face
//! "rotate_half" convention.
//!
//! The angles are computed in f64 and rounded to f32 once
//! ([`rope_angles`]); the CUDA kernel reads a table filled by the same
//! function on the host, so CPU and GPU rotate by bit-identical cos/sin.

/// Inverse frequencies of RoPE, `θ^(−2i/d)` for `i < d/2`.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect()
}

/// `(cos(pos·f_i), sin(pos·f_i))` for every inverse frequency, angle in f64,
/// result rounded to f32: one row of the kernel's cos/sin tables.
pub fn rope_angles(pos: usize, inv_freq: &[f64]) -> (Vec<f32>, Vec<f32>) {
    inv_freq
        .iter()
        .map(|f| {
            let a = pos as f64 * f;
            (a.cos() as f32, a.sin() as f32)
        })
        .unzip()
}

/// The kernel's cos/sin tables for positions `0..max_positions`: each
/// `[max_positions][head_dim / 2]`, row `pos` = [`rope_angles`]`(pos, ..)`.
pub fn rope_tables(head_dim: usize, theta: f64, max_positions: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_freq = rope_inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for pos in 0..max_positions {
        let (c, s) = rope_angles(pos, &inv_freq);
        cos.extend(c);
        sin.extend(s);
    }
    (cos, sin)
}

/// Rotates every head of one row (`[n_heads · head_dim]`) for position
/// `pos`, Hugging Face "rotate_half" convention: the pair rotated together
/// is (i, i + d/2), not (2i, 2i+1) as in the original paper and in
/// llama.cpp's GGUF layout (whose loader permutes Q/K rows back to HF).
///
/// ```text
///   head = [ x_0 .. x_{d/2-1} | x_{d/2} .. x_{d-1} ]
///   x_i'       = x_i·cos(p·f_i) − x_{i+d/2}·sin(p·f_i)
///   x_{i+d/2}' = x_{i+d/2}·cos(p·f_i) + x_i·sin(p·f_i)
/// ```
pub fn rope(row: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f64]) {
    let half = head_dim / 2;
    let (cos, sin) = rope_angles(pos, inv_freq);
    for head in row.chunks_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let inv = rope_inv_freq(8, 10_000.0);
        let orig: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut r = orig.clone();
        rope(&mut r, 8, 0, &inv);
        assert_eq!(r, orig);
        rope(&mut r, 8, 17, &inv);
        assert_ne!(r, orig);
        for (a, b) in r.chunks(8).zip(orig.chunks(8)) {
            let na: f32 = a.iter().map(|v| v * v).sum();
            let nb: f32 = b.iter().map(|v| v * v).sum();
            assert!((na - nb).abs() < 1e-4);
        }
    }

    /// Relative positions are what RoPE encodes: q(p)·k(p') depends on p − p'.
    #[test]
    fn rope_scores_depend_on_relative_position() {
        let inv = rope_inv_freq(8, 100.0);
        let q: Vec<f32> = (0..8).map(|i| i as f32 * 0.1 - 0.3).collect();
        let k: Vec<f32> = (0..8).map(|i| (i as f32).cos()).collect();
        let score = |pq: usize, pk: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope(&mut a, 8, pq, &inv);
            rope(&mut b, 8, pk, &inv);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(5, 2) - score(13, 10)).abs() < 1e-4);
        assert!((score(5, 2) - score(5, 4)).abs() > 1e-3);
    }

    /// The pair rotated together is (i, i + d/2): a vector with only x_0 set
    /// moves into x_{d/2}, never into x_1.
    #[test]
    fn rope_pairs_i_with_i_plus_half() {
        let inv = rope_inv_freq(4, 10_000.0);
        let mut r = [1.0f32, 0.0, 0.0, 0.0];
        rope(&mut r, 4, 1, &inv);
        assert_eq!(r[1], 0.0);
        assert!((r[0] - 1f32.cos()).abs() < 1e-7);
        assert!((r[2] - 1f32.sin()).abs() < 1e-7);
    }
}
