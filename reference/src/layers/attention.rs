//! Causal grouped-query attention (Ainslie et al. 2023) over a KV cache, with
//! Mistral's sliding window.

use rayon::prelude::*;

/// Geometry of attention for one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

impl AttnShape {
    /// Width of one query row, `n_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of one cached key (or value) row, `n_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads sharing one KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// First position a query at `pos` attends to: position i sees j when
/// i − j < window (so the window counts the query's own position).
pub fn attention_window_start(pos: usize, sliding_window: Option<usize>) -> usize {
    match sliding_window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

/// One query row to attend: its position, and the cached keys/values of its
/// sequence (`[len, n_kv_heads · head_dim]`, containing at least `pos + 1`
/// positions).
pub struct Query<'a> {
    pub pos: usize,
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

/// One (query row, head) pair of an attention step, as [`for_each_head`]
/// hands it to a per-head computation: the head's query, the positions it
/// attends to, and where its KV head sits in each cached position.
pub struct HeadTask<'a> {
    pub q: &'a [f32],
    /// `lo ..= pos`, `lo` from the sliding window.
    pub positions: std::ops::RangeInclusive<usize>,
    query: &'a Query<'a>,
    /// Offset of the KV head inside one position's `kv_dim` floats.
    kv_offset: usize,
    kv_dim: usize,
    head_dim: usize,
}

impl<'a> HeadTask<'a> {
    /// The key and value of position `j` for this head.
    pub fn kv(&self, j: usize) -> (&'a [f32], &'a [f32]) {
        let at = j * self.kv_dim + self.kv_offset;
        (
            &self.query.keys[at..at + self.head_dim],
            &self.query.values[at..at + self.head_dim],
        )
    }
}

/// Runs `head` for every (query row, head) of the step in parallel, each
/// writing its `head_dim` outputs: query row `t` (in `q`,
/// `[rows, n_heads · head_dim]`) attends to positions `lo ..= pos` of its
/// cache, `lo` set by the sliding window ([`attention_window_start`]); head
/// h reads KV head `h / (n_heads / n_kv_heads)` (grouped-query attention).
pub fn for_each_head(
    s: AttnShape,
    q: &[f32],
    queries: &[Query],
    out: &mut [f32],
    head: impl Fn(&HeadTask, &mut [f32]) + Sync + Send,
) {
    let d = s.head_dim;
    let group = s.group();
    out.par_chunks_mut(d)
        .zip(q.par_chunks(d))
        .enumerate()
        .for_each(|(i, (o, qh))| {
            let (t, h) = (i / s.n_heads, i % s.n_heads);
            let query = &queries[t];
            let task = HeadTask {
                q: qh,
                positions: attention_window_start(query.pos, s.sliding_window)..=query.pos,
                query,
                kv_offset: (h / group) * d,
                kv_dim: s.kv_dim(),
                head_dim: d,
            };
            head(&task, o);
        });
}

/// Causal grouped-query attention ([`for_each_head`] for the geometry):
/// softmax in f32 with the maximum subtracted, scale `1/sqrt(head_dim)`.
pub fn attention(s: AttnShape, q: &[f32], queries: &[Query], out: &mut [f32]) {
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    for_each_head(s, q, queries, out, |task, o| {
        let mut scores: Vec<f32> = task
            .positions
            .clone()
            .map(|j| {
                let (k, _) = task.kv(j);
                task.q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            total += *sc;
        }
        o.fill(0.0);
        for (j, p) in task.positions.clone().zip(&scores) {
            let (_, v) = task.kv(j);
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
    fn window_start_counts_own_position() {
        assert_eq!(attention_window_start(0, Some(4)), 0);
        assert_eq!(attention_window_start(3, Some(4)), 0);
        assert_eq!(attention_window_start(4, Some(4)), 1);
        assert_eq!(attention_window_start(9, None), 0);
    }

    /// GQA: heads 0,1 read KV head 0 and heads 2,3 read KV head 1; with one
    /// cached position the output is that head's value whatever q is.
    #[test]
    fn gqa_heads_read_their_kv_head() {
        let s = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 2,
            sliding_window: None,
        };
        let keys = vec![0.3, -0.2, 0.7, 0.1];
        let values = vec![1.0, 2.0, 3.0, 4.0];
        let q: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let queries = [Query {
            pos: 0,
            keys: &keys,
            values: &values,
        }];
        let mut out = vec![f32::NAN; 8];
        attention(s, &q, &queries, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
    }
}
