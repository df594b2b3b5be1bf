//! The non-linear pieces of the decoder on CPU, in f32: RMSNorm, RoPE,
//! causal grouped-query attention over a KV cache, SwiGLU.

use rayon::prelude::*;

/// `y = x / sqrt(mean(x²) + eps) · w`, one row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), g) in y.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// Inverse frequencies of RoPE, `θ^(−2i/d)` for `i < d/2`.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect()
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
    let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
        .iter()
        .map(|f| {
            let a = pos as f64 * f;
            (a.cos() as f32, a.sin() as f32)
        })
        .unzip();
    for head in row.chunks_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// `silu(gate) · up`, in place into `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Geometry of attention for one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

/// One query row to attend: its position, and the cached keys/values of its
/// sequence (`[len, n_kv_heads · head_dim]`, containing at least `pos + 1`
/// positions).
pub struct Query<'a> {
    pub pos: usize,
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

/// Causal attention: query row `t` (in `q`, `[rows, n_heads · head_dim]`)
/// attends to positions `lo ..= pos` of its cache, `lo` set by the sliding
/// window (position i sees j when i − j < window). Head h reads KV head
/// `h / (n_heads / n_kv_heads)` (grouped-query attention).
pub fn attention(s: AttnShape, q: &[f32], queries: &[Query], out: &mut [f32]) {
    let d = s.head_dim;
    let kv_dim = s.n_kv_heads * d;
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(d)
        .zip(q.par_chunks(d))
        .enumerate()
        .for_each(|(i, (o, qh))| {
            let (t, h) = (i / s.n_heads, i % s.n_heads);
            let query = &queries[t];
            let kvh = h / group;
            let lo = match s.sliding_window {
                Some(w) => (query.pos + 1).saturating_sub(w),
                None => 0,
            };
            let mut scores: Vec<f32> = (lo..=query.pos)
                .map(|j| {
                    let k = &query.keys[j * kv_dim + kvh * d..][..d];
                    qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                total += *sc;
            }
            o.fill(0.0);
            for (j, p) in (lo..=query.pos).zip(&scores) {
                let v = &query.values[j * kv_dim + kvh * d..][..d];
                let w = p / total;
                for (a, b) in o.iter_mut().zip(v) {
                    *a += w * b;
                }
            }
        });
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

    #[test]
    fn attention_with_window_one_returns_own_value() {
        let s = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            sliding_window: Some(1),
        };
        let keys = vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let values = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let q = vec![9.0, -9.0, 0.5, 0.5];
        let queries = [Query {
            pos: 1,
            keys: &keys,
            values: &values,
        }];
        let mut out = vec![0.0; 4];
        attention(s, &q, &queries, &mut out);
        assert_eq!(out, vec![3.0, 4.0, 3.0, 4.0]);
        // Without the window, position 1 mixes values 0 and 1.
        let s = AttnShape {
            sliding_window: None,
            ..s
        };
        attention(s, &q, &queries, &mut out);
        assert!(out[0] > 1.0 && out[0] < 3.0);
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut y = [0.0; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut y);
        let rms = (y.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }
}
