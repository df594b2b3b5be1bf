//! Shared harness of the layer-kernel tests (`gpu_layers.rs` on a device,
//! `emu_layers.rs` in the host emulation): random data, one attention step's
//! plan, and the comparisons against `meswitch_reference::layers` with the
//! tolerances derived in `gpu_layers.rs`'s module docs.

pub use crate::gpu_support::*;
pub use meswitch::reference::layers as cpu;
pub use meswitch::reference::layers::AttnShape;

/// An f32 NaN poison for f32 outputs (embed), like `POISON` for f16.
pub const POISON_F32: f32 = f32::NAN;

pub fn f32s(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn uniform(rng: &mut StdRng, n: usize, lim: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-lim..lim)).collect()
}

pub fn uniform_f16(rng: &mut StdRng, n: usize, lim: f32) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.random_range(-lim..lim)))
        .collect()
}

/// `|got − want| ≤ tol`, with a message naming the element.
pub fn assert_within(got: f16, want: f64, tol: f64, what: &str, at: impl FnOnce() -> String) {
    let g = f64::from(got.to_f32());
    assert!(
        got.is_finite() && (g - want).abs() <= tol,
        "{what}{}: got {g} (bits {:#06x}), reference {want}, tolerance {tol:.3e}",
        at(),
        got.to_bits()
    );
}

/// Widths: one element, odd, small, and model sizes (576 SmolLM2, 4096 Mistral).
pub fn width() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), 1usize..=700, Just(576usize), Just(4096usize)]
}

// ---- one attention step over several sequences --------------------------------

/// A step: sequences with `history` positions already cached and `new`
/// positions in this step (a prefill when many, a decode when one), rows of
/// all sequences shuffled together.
#[derive(Debug, Clone)]
pub struct StepCase {
    pub shape: AttnShape,
    /// (history, new, spare capacity) per sequence.
    pub sequences: Vec<(usize, usize, usize)>,
    pub n_layers: usize,
    pub layer: usize,
    pub seed: u64,
}

pub fn head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(2usize),
        (1usize..=40).prop_map(|h| 2 * h),
        Just(64usize),
        Just(128usize),
        Just(256usize)
    ]
}

pub fn step_case() -> impl Strategy<Value = StepCase> {
    (
        head_dim(),
        1usize..=4,
        prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        prop::collection::vec(
            (
                prop_oneof![Just(0usize), 0usize..=80, 100usize..=300],
                prop_oneof![Just(1usize), 1usize..=24],
                0usize..=5,
            ),
            1..=4,
        ),
        prop_oneof![Just(None), (1usize..=40).prop_map(Some)],
        1usize..=3,
        any::<u64>(),
    )
        .prop_map(
            |(head_dim, n_kv_heads, group, sequences, window, n_layers, seed)| StepCase {
                shape: AttnShape {
                    n_heads: n_kv_heads * group,
                    n_kv_heads,
                    head_dim,
                    sliding_window: window,
                },
                sequences,
                n_layers,
                layer: (seed as usize) % n_layers,
                seed,
            },
        )
}

/// The named attention steps (also what compute-sanitizer runs on a
/// device): one row at position 0 with the smallest head and a window of
/// one (only itself); the largest head under GQA 8, a decode row beside a
/// long prefill; a SmolLM2-like head (64, 9 heads over 3 KV heads) with a
/// window cutting both sequences.
pub fn named_steps() -> Vec<StepCase> {
    let step = |head_dim, n_kv_heads, group, sliding_window, sequences, seed| StepCase {
        shape: AttnShape {
            n_heads: n_kv_heads * group,
            n_kv_heads,
            head_dim,
            sliding_window,
        },
        sequences,
        n_layers: 2,
        layer: 1,
        seed,
    };
    vec![
        step(2, 1, 1, Some(1), vec![(0, 1, 0)], 1),
        step(256, 1, 8, None, vec![(300, 1, 0), (0, 37, 3)], 2),
        step(64, 3, 3, Some(5), vec![(7, 2, 1), (4, 1, 0)], 3),
    ]
}

pub struct SeqData {
    pub keys: Vec<f16>,
    pub values: Vec<f16>,
}

/// Layer `layer`'s data of a sequence: the sequence's own keys at the tested
/// layer, a transformed copy (negated) at the others.
pub fn layer_data(d: &SeqData, layer: usize, tested: usize) -> (Vec<f16>, Vec<f16>) {
    if layer == tested {
        (d.keys.clone(), d.values.clone())
    } else {
        let neg = |v: &[f16]| v.iter().map(|x| -*x).collect();
        (neg(&d.keys), neg(&d.values))
    }
}

pub fn assert_attention_close(
    s: AttnShape,
    q: &[f16],
    queries: &[cpu::Query],
    out: &[f16],
    expected: &[f32],
) {
    let (d, kv_dim) = (s.head_dim, s.kv_dim());
    let scale = 1.0 / (d as f64).sqrt();
    let mut weighted_abs = vec![0f64; d];
    fn at(buf: &[f32], j: usize, kv_dim: usize, offset: usize, d: usize) -> &[f32] {
        &buf[j * kv_dim + offset..][..d]
    }
    for (t, query) in queries.iter().enumerate() {
        let lo = cpu::attention_window_start(query.pos, s.sliding_window);
        let len = query.pos + 1 - lo;
        for h in 0..s.n_heads {
            let kvh = h / s.group();
            let qh = &q[(t * s.n_heads + h) * d..][..d];
            // Scores and their rounding bound, in f64.
            let mut scores = Vec::with_capacity(len);
            let mut max_ds = 0f64;
            for j in lo..=query.pos {
                let (mut dot, mut mag) = (0f64, 0f64);
                for (a, b) in qh.iter().zip(at(query.keys, j, kv_dim, kvh * d, d)) {
                    let p = f64::from(a.to_f32()) * f64::from(*b);
                    dot += p;
                    mag += p.abs();
                }
                scores.push(dot * scale);
                max_ds = max_ds.max(SUM_ORDER * d as f64 * U32 * mag * scale);
            }
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let total: f64 = w.iter().sum();
            // Σⱼ pⱼ·|vⱼ| per element of the head.
            weighted_abs.fill(0.0);
            for (j, w) in (lo..=query.pos).zip(&w) {
                for (acc, v) in weighted_abs
                    .iter_mut()
                    .zip(at(query.values, j, kv_dim, kvh * d, d))
                {
                    *acc += w / total * f64::from(v.abs());
                }
            }
            for (c, wa) in weighted_abs.iter().enumerate() {
                let i = (t * s.n_heads + h) * d + c;
                let want = f64::from(expected[i]);
                // Kernel and reference each round their L-term f32 sums and
                // exponentials: SUM_ORDER·(L + 8)·u₃₂ for each side.
                let tol = wa * (2.0 * max_ds + 2.0 * SUM_ORDER * (len + 8) as f64 * U32)
                    + 2.0 * U16 * want.abs()
                    + FP16_TINY;
                assert_within(out[i], want, tol, "attention", || {
                    format!(
                        " row {t} (pos {}, window {:?}) head {h} (kv head {kvh}) elem {c}; shape {s:?}",
                        query.pos, s.sliding_window
                    )
                });
            }
        }
    }
}

/// One attention step's data, whatever runs it: every sequence's keys and
/// values, the history rows (positions already cached, appended at every
/// layer in an earlier step), this step's rows (all sequences' new positions,
/// shuffled together) and their queries.
pub struct StepPlan<'c> {
    pub case: &'c StepCase,
    pub data: Vec<SeqData>,
    /// (sequence, position) of the earlier step.
    pub history: Vec<(usize, usize)>,
    /// (sequence, position) of this step.
    pub rows: Vec<(usize, usize)>,
    pub q: Vec<f16>,
}

impl<'c> StepPlan<'c> {
    pub fn new(case: &'c StepCase) -> StepPlan<'c> {
        let kv_dim = case.shape.kv_dim();
        let mut rng = StdRng::seed_from_u64(case.seed);
        let data: Vec<SeqData> = case
            .sequences
            .iter()
            .map(|&(history, new, _)| SeqData {
                keys: uniform_f16(&mut rng, (history + new) * kv_dim, 1.0),
                values: uniform_f16(&mut rng, (history + new) * kv_dim, 1.0),
            })
            .collect();
        let history: Vec<(usize, usize)> = case
            .sequences
            .iter()
            .enumerate()
            .flat_map(|(i, &(h, _, _))| (0..h).map(move |p| (i, p)))
            .collect();
        let mut rows: Vec<(usize, usize)> = case
            .sequences
            .iter()
            .enumerate()
            .flat_map(|(i, &(h, n, _))| (h..h + n).map(move |p| (i, p)))
            .collect();
        for i in (1..rows.len()).rev() {
            rows.swap(i, rng.random_range(0..=i));
        }
        let q = uniform_f16(&mut rng, rows.len() * case.shape.q_dim(), 1.0);
        StepPlan {
            case,
            data,
            history,
            rows,
            q,
        }
    }

    /// Capacity of sequence `i`'s cache: its positions plus its spare.
    pub fn capacity(&self, i: usize) -> usize {
        let (h, n, spare) = self.case.sequences[i];
        h + n + spare
    }

    /// The keys and values `rows` append at `layer` (other layers get other
    /// data, so reading the wrong layer fails).
    pub fn gather(&self, rows: &[(usize, usize)], layer: usize) -> (Vec<f16>, Vec<f16>) {
        let kv_dim = self.case.shape.kv_dim();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for &(i, p) in rows {
            let (keys, values) = layer_data(&self.data[i], layer, self.case.layer);
            k.extend_from_slice(&keys[p * kv_dim..][..kv_dim]);
            v.extend_from_slice(&values[p * kv_dim..][..kv_dim]);
        }
        (k, v)
    }

    /// Sequence `i`'s cache at the tested layer holds exactly what was
    /// appended there, zeros past it.
    pub fn assert_cache(&self, i: usize, keys: &[f16], values: &[f16]) {
        let len = self.data[i].keys.len();
        assert_eq!(&keys[..len], &self.data[i].keys[..], "cache {i} keys");
        assert_eq!(&values[..len], &self.data[i].values[..], "cache {i} values");
        assert!(keys[len..]
            .iter()
            .chain(&values[len..])
            .all(|x| x.to_bits() == 0));
    }

    /// The step's attention output against the reference: each row against
    /// its sequence's full f32 cache.
    pub fn assert_output(&self, out: &[f16]) {
        let s = self.case.shape;
        let keys: Vec<Vec<f32>> = self.data.iter().map(|d| f32s(&d.keys)).collect();
        let values: Vec<Vec<f32>> = self.data.iter().map(|d| f32s(&d.values)).collect();
        let queries: Vec<cpu::Query> = self
            .rows
            .iter()
            .map(|&(i, pos)| cpu::Query {
                pos,
                keys: &keys[i],
                values: &values[i],
            })
            .collect();
        let mut expected = vec![0f32; self.q.len()];
        cpu::attention(s, &f32s(&self.q), &queries, &mut expected);
        assert_attention_close(s, &self.q, &queries, out, &expected);
    }
}

// ---- the elementwise kernels' comparisons -------------------------------------

/// RMSNorm of `rows` rows of width `n`: the reduction order differs
/// (`SUM_ORDER·n·u₃₂` relative), then one f16 rounding.
pub fn assert_rms_norm(x: &[f32], w: &[f32], eps: f32, rows: usize, y: &[f16]) {
    let n = w.len();
    let mut want = vec![0f32; n];
    for r in 0..rows {
        cpu::rms_norm(&x[r * n..][..n], w, eps, &mut want);
        for c in 0..n {
            let want = f64::from(want[c]);
            let tol = SUM_ORDER * n as f64 * U32 * want.abs() + 2.0 * U16 * want.abs() + FP16_TINY;
            assert_within(y[r * n + c], want, tol, "rms_norm", || {
                format!(" y[{r},{c}], n {n}")
            });
        }
    }
}

/// RoPE is bit-exact: the kernel evaluates the reference's expression.
pub fn assert_rope(x: &[f16], got: &[f16], head_dim: usize, positions: &[usize], theta: f64) {
    let width = x.len() / positions.len();
    let inv_freq = cpu::rope_inv_freq(head_dim, theta);
    for (r, &pos) in positions.iter().enumerate() {
        let mut want = f32s(&x[r * width..][..width]);
        cpu::rope(&mut want, head_dim, pos, &inv_freq);
        for (c, w) in want.iter().enumerate() {
            let g = got[r * width + c];
            assert_eq!(
                g.to_bits(),
                f16::from_f32(*w).to_bits(),
                "rope row {r} (pos {pos}) elem {c}: got {g}, reference {w}"
            );
        }
    }
}

/// SwiGLU: `expf` within 2 ulp on the device, the rest correctly rounded.
pub fn assert_swiglu(gate: &[f16], up: &[f16], out: &[f16]) {
    let mut want = f32s(gate);
    cpu::swiglu(&mut want, &f32s(up));
    for (i, w) in want.iter().enumerate() {
        let w = f64::from(*w);
        assert_within(out[i], w, 2.0 * U16 * w.abs() + FP16_TINY, "swiglu", || {
            format!("[{i}]")
        });
    }
}

/// The embedding gather is exact: row r is `table[tokens[r]]` widened.
pub fn assert_embed(table: &[f16], hidden: usize, tokens: &[u32], h: &[f32]) {
    for (r, &t) in tokens.iter().enumerate() {
        let want = f32s(&table[t as usize * hidden..][..hidden]);
        assert_eq!(
            &h[r * hidden..][..hidden],
            &want[..],
            "embed row {r} token {t}"
        );
    }
}

/// The residual add is one exact-as-the-reference f32 add per element.
pub fn assert_add_residual(before: &[f32], y: &[f16], h: &[f32]) {
    for i in 0..h.len() {
        assert_eq!(
            h[i].to_bits(),
            (before[i] + y[i].to_f32()).to_bits(),
            "add_residual [{i}]"
        );
    }
}
