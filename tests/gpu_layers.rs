//! The transformer layer kernels (meswitch-ops `layers`) against the CPU
//! reference (`meswitch_reference::layers`), on random shapes and values.
//! Without a device every GPU test prints "skipped: no CUDA device" and
//! passes; with `MESWITCH_REQUIRE_GPU=1` a missing device fails the run.
//!
//! # Tolerances
//!
//! The kernels read the same f16 (or f32) inputs the reference gets widened
//! to f32, compute in f32, and round the result to f16 once (u₁₆ = 2⁻¹¹).
//! Two f32 results a few u₃₂ apart can round to neighbouring f16 values, one
//! f16 ulp ≤ 2·u₁₆·|y| apart; that, plus `FP16_TINY` near zero, is the
//! floor of every bound below.
//!
//! - `rope`, `add_residual`, `embed`, `kv_append`: **bit-exact**. RoPE reads
//!   cos/sin computed by the reference's own `rope_angles` and evaluates
//!   `a·c − b·s` as separately rounded f32 operations (no FMA), exactly the
//!   reference's expression; the others copy or do one f32 add.
//! - `swiglu`: CUDA's `expf` is within 2 ulp, Rust's `exp` within 1; the
//!   rest is correctly rounded. The f32 results differ by a few u₃₂, so the
//!   f16 outputs are equal or neighbours: `2·u₁₆·|y| + FP16_TINY`.
//! - `rms_norm`: the sum of squares is reduced in another order (the γₙ
//!   bound: n·u₃₂ relative, all terms positive), which moves `1/rms` by at
//!   most about that much: `SUM_ORDER·n·u₃₂·|y| + 2·u₁₆·|y| + FP16_TINY`.
//! - `attention`: each score `s = q·k/√d` sums d products in another order,
//!   `|Δs| ≤ SUM_ORDER·d·u₃₂·Σ|qᵢkᵢ|/√d`. A softmax weight pⱼ ∝ e^{sⱼ} moves
//!   relatively by at most 2·max|Δs| (its own score and the normaliser's),
//!   plus the online form's rescalings and the L-term sums (L positions) in
//!   f32, on both sides: per output element
//!   `tol = Σⱼ pⱼ|vⱼ| · (2·max|Δs| + 2·SUM_ORDER·(L + 8)·u₃₂) + 2·u₁₆·|y| + FP16_TINY`,
//!   with `Σⱼ pⱼ|vⱼ|` computed in f64 from the reference's probabilities.
//!   A wrong position, KV head, window edge or layer moves the output by
//!   about |v| (values are ~±1), far beyond this bound.

#[allow(dead_code, unused_imports)]
mod gpu_support;

use gpu_support::*;
use meswitch::ops::layers::{self, AttnRows, DeviceKv, LayerError, RopeTable};
use meswitch::ops::OpsError;
use meswitch::reference::layers as cpu;
use meswitch::reference::layers::AttnShape;

/// An f32 NaN poison for f32 outputs (embed), like `POISON` for f16.
const POISON_F32: f32 = f32::NAN;

fn f32s(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn uniform(rng: &mut StdRng, n: usize, lim: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-lim..lim)).collect()
}

fn uniform_f16(rng: &mut StdRng, n: usize, lim: f32) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.random_range(-lim..lim)))
        .collect()
}

/// `|got − want| ≤ tol`, with a message naming the element.
fn assert_within(got: f16, want: f64, tol: f64, what: &str, at: impl FnOnce() -> String) {
    let g = f64::from(got.to_f32());
    assert!(
        got.is_finite() && (g - want).abs() <= tol,
        "{what}{}: got {g} (bits {:#06x}), reference {want}, tolerance {tol:.3e}",
        at(),
        got.to_bits()
    );
}

/// Widths: one element, odd, small, and model sizes (576 SmolLM2, 4096 Mistral).
fn width() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), 1usize..=700, Just(576usize), Just(4096usize)]
}

// ---- one attention step over several sequences --------------------------------

/// A step: sequences with `history` positions already cached and `new`
/// positions in this step (a prefill when many, a decode when one), rows of
/// all sequences shuffled together.
#[derive(Debug, Clone)]
struct StepCase {
    shape: AttnShape,
    /// (history, new, spare capacity) per sequence.
    sequences: Vec<(usize, usize, usize)>,
    n_layers: usize,
    layer: usize,
    seed: u64,
}

fn head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(2usize),
        (1usize..=40).prop_map(|h| 2 * h),
        Just(64usize),
        Just(128usize),
        Just(256usize)
    ]
}

fn step_case() -> impl Strategy<Value = StepCase> {
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

struct SeqData {
    keys: Vec<f16>,
    values: Vec<f16>,
}

/// Runs `case` on the device (history appended at every layer in a first
/// step, then this step's rows appended and attended at `case.layer`) and
/// checks the caches and the output against the reference.
fn check_step(gpu: &Gpu, case: &StepCase) {
    let s = case.shape;
    let (kv_dim, q_dim) = (s.kv_dim(), s.q_dim());
    let mut rng = StdRng::seed_from_u64(case.seed);
    let data: Vec<SeqData> = case
        .sequences
        .iter()
        .map(|&(history, new, _)| SeqData {
            keys: uniform_f16(&mut rng, (history + new) * kv_dim, 1.0),
            values: uniform_f16(&mut rng, (history + new) * kv_dim, 1.0),
        })
        .collect();
    let caches: Vec<DeviceKv> = case
        .sequences
        .iter()
        .map(|&(h, n, spare)| DeviceKv::new(gpu, case.n_layers, kv_dim, h + n + spare).unwrap())
        .collect();
    let refs: Vec<&DeviceKv> = caches.iter().collect();

    // History: one earlier step writing positions 0..history of every
    // sequence at every layer (other layers get other data, so reading the
    // wrong layer fails).
    let history_rows: Vec<(usize, usize)> = case
        .sequences
        .iter()
        .enumerate()
        .flat_map(|(i, &(h, _, _))| (0..h).map(move |p| (i, p)))
        .collect();
    let gather = |rows: &[(usize, usize)], layer: usize| -> (Vec<f16>, Vec<f16>) {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for &(i, p) in rows {
            let (keys, values) = layer_data(&data[i], layer, case.layer);
            k.extend_from_slice(&keys[p * kv_dim..][..kv_dim]);
            v.extend_from_slice(&values[p * kv_dim..][..kv_dim]);
        }
        (k, v)
    };
    if !history_rows.is_empty() {
        let step = AttnRows::upload(gpu, &refs, &history_rows).unwrap();
        for layer in 0..case.n_layers {
            let (k, v) = gather(&history_rows, layer);
            let (k, v) = (ops::upload(gpu, &k).unwrap(), ops::upload(gpu, &v).unwrap());
            layers::kv_append_device(gpu, layer, &k, &v, &step).unwrap();
        }
    }

    // This step: every sequence's new positions, shuffled together.
    let mut rows: Vec<(usize, usize)> = case
        .sequences
        .iter()
        .enumerate()
        .flat_map(|(i, &(h, n, _))| (h..h + n).map(move |p| (i, p)))
        .collect();
    for i in (1..rows.len()).rev() {
        rows.swap(i, rng.random_range(0..=i));
    }
    let step = AttnRows::upload(gpu, &refs, &rows).unwrap();
    let (k, v) = gather(&rows, case.layer);
    let (k, v) = (ops::upload(gpu, &k).unwrap(), ops::upload(gpu, &v).unwrap());
    layers::kv_append_device(gpu, case.layer, &k, &v, &step).unwrap();
    let q = uniform_f16(&mut rng, rows.len() * q_dim, 1.0);
    let d_q = ops::upload(gpu, &q).unwrap();
    let mut d_out = ops::upload(gpu, &vec![POISON; q.len()]).unwrap();
    layers::attention_device(gpu, s, case.layer, &d_q, &step, &mut d_out).unwrap();
    let out = download(gpu, &d_out);

    // The caches hold exactly what was appended at `case.layer`, zeros past it.
    for (i, cache) in caches.iter().enumerate() {
        let (k, v) = cache.download_layer(gpu, case.layer).unwrap();
        let len = data[i].keys.len();
        assert_eq!(&k[..len], &data[i].keys[..], "cache {i} keys");
        assert_eq!(&v[..len], &data[i].values[..], "cache {i} values");
        assert!(k[len..].iter().chain(&v[len..]).all(|x| x.to_bits() == 0));
    }

    // Reference: each row against its sequence's full f32 cache.
    let keys: Vec<Vec<f32>> = data.iter().map(|d| f32s(&d.keys)).collect();
    let values: Vec<Vec<f32>> = data.iter().map(|d| f32s(&d.values)).collect();
    let queries: Vec<cpu::Query> = rows
        .iter()
        .map(|&(i, pos)| cpu::Query {
            pos,
            keys: &keys[i],
            values: &values[i],
        })
        .collect();
    let mut expected = vec![0f32; q.len()];
    cpu::attention(s, &f32s(&q), &queries, &mut expected);
    assert_attention_close(s, &q, &queries, &out, &expected);
}

/// Layer `layer`'s data of a sequence: the sequence's own keys at the tested
/// layer, a transformed copy (negated) at the others.
fn layer_data(d: &SeqData, layer: usize, tested: usize) -> (Vec<f16>, Vec<f16>) {
    if layer == tested {
        (d.keys.clone(), d.values.clone())
    } else {
        let neg = |v: &[f16]| v.iter().map(|x| -*x).collect();
        (neg(&d.keys), neg(&d.values))
    }
}

fn assert_attention_close(
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

proptest! {
    #![proptest_config(ProptestConfig { cases: proptest_cases(), ..ProptestConfig::default() })]

    #[test]
    fn rms_norm_matches_reference(rows in 1usize..=9, n in width(), eps in prop_oneof![Just(1e-5f32), Just(1e-6f32), Just(0.0f32)], seed in any::<u64>()) {
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let x = uniform(&mut rng, rows * n, 4.0);
        let w = uniform(&mut rng, n, 2.0);
        let (d_x, d_w) = (ops::upload(gpu, &x).unwrap(), ops::upload(gpu, &w).unwrap());
        let mut d_y = ops::upload(gpu, &vec![POISON; rows * n]).unwrap();
        layers::rms_norm_device(gpu, &d_x, &d_w, eps, rows, &mut d_y).unwrap();
        let y = download(gpu, &d_y);
        let mut want = vec![0f32; n];
        for r in 0..rows {
            cpu::rms_norm(&x[r * n..][..n], &w, eps, &mut want);
            for c in 0..n {
                let want = f64::from(want[c]);
                let tol = SUM_ORDER * n as f64 * U32 * want.abs() + 2.0 * U16 * want.abs() + FP16_TINY;
                assert_within(y[r * n + c], want, tol, "rms_norm", || format!(" y[{r},{c}], n {n}"));
            }
        }
    }

    #[test]
    fn rope_is_bit_exact(
        rows in 1usize..=9,
        n_heads in 1usize..=8,
        head_dim in head_dim(),
        theta in prop_oneof![Just(10_000.0f64), Just(1_000_000.0f64), Just(100.0f64)],
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let width = n_heads * head_dim;
        let x = uniform_f16(&mut rng, rows * width, 2.0);
        let positions: Vec<usize> = (0..rows).map(|_| rng.random_range(0..5000)).collect();
        let mut got = x.clone();
        layers::rope(gpu, &mut got, head_dim, n_heads, &positions, theta).unwrap();
        let inv_freq = cpu::rope_inv_freq(head_dim, theta);
        for (r, &pos) in positions.iter().enumerate() {
            let mut want = f32s(&x[r * width..][..width]);
            cpu::rope(&mut want, head_dim, pos, &inv_freq);
            for (c, w) in want.iter().enumerate() {
                let g = got[r * width + c];
                prop_assert_eq!(g.to_bits(), f16::from_f32(*w).to_bits(),
                    "rope row {} (pos {}) elem {}: got {}, reference {}", r, pos, c, g, w);
            }
        }
    }

    #[test]
    fn swiglu_matches_reference(n in width(), seed in any::<u64>()) {
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        // Gates up to ±20 cover silu's saturation on both sides.
        let gate = uniform_f16(&mut rng, n, 20.0);
        let up = uniform_f16(&mut rng, n, 3.0);
        let mut out = vec![POISON; n];
        layers::swiglu(gpu, &gate, &up, &mut out).unwrap();
        let mut want = f32s(&gate);
        cpu::swiglu(&mut want, &f32s(&up));
        for (i, w) in want.iter().enumerate() {
            let w = f64::from(*w);
            assert_within(out[i], w, 2.0 * U16 * w.abs() + FP16_TINY, "swiglu", || format!("[{i}]"));
        }
    }

    #[test]
    fn add_residual_and_embed_are_exact(
        rows in 1usize..=9,
        hidden in width(),
        vocab in 1usize..=300,
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let table = uniform_f16(&mut rng, vocab * hidden, 1.0);
        let tokens: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
        let mut h = vec![POISON_F32; rows * hidden];
        layers::embed(gpu, &table, vocab, hidden, &tokens, &mut h).unwrap();
        for (r, &t) in tokens.iter().enumerate() {
            let want = f32s(&table[t as usize * hidden..][..hidden]);
            prop_assert_eq!(&h[r * hidden..][..hidden], &want[..], "embed row {} token {}", r, t);
        }
        let y = uniform_f16(&mut rng, rows * hidden, 1.0);
        let before = h.clone();
        layers::add_residual(gpu, &mut h, &y).unwrap();
        for i in 0..h.len() {
            prop_assert_eq!(h[i].to_bits(), (before[i] + y[i].to_f32()).to_bits(), "add_residual [{}]", i);
        }
    }

    #[test]
    fn attention_over_mixed_prefill_and_decode_rows_matches_reference(case in step_case()) {
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        check_step(gpu, &case);
    }
}

/// The host-slice attention (one-layer caches filled by the append kernel)
/// agrees with the reference too; positions straddle a window edge.
#[test]
fn host_attention_at_the_window_edge() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    let s = AttnShape {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 64,
        sliding_window: Some(16),
    };
    let len = 40;
    let keys = uniform_f16(&mut rng, len * s.kv_dim(), 1.0);
    let values = uniform_f16(&mut rng, len * s.kv_dim(), 1.0);
    // Positions just inside, at and past the window's first full span.
    let rows: Vec<(usize, usize)> = [0, 14, 15, 16, 17, 39].iter().map(|&p| (0, p)).collect();
    let q = uniform_f16(&mut rng, rows.len() * s.q_dim(), 1.0);
    let mut out = vec![POISON; q.len()];
    let seq = layers::HostSequence {
        keys: &keys,
        values: &values,
    };
    layers::attention(gpu, s, &q, &[seq], &rows, &mut out).unwrap();
    let (k32, v32) = (f32s(&keys), f32s(&values));
    let queries: Vec<cpu::Query> = rows
        .iter()
        .map(|&(_, pos)| cpu::Query {
            pos,
            keys: &k32,
            values: &v32,
        })
        .collect();
    let mut expected = vec![0f32; q.len()];
    cpu::attention(s, &f32s(&q), &queries, &mut expected);
    assert_attention_close(s, &q, &queries, &out, &expected);
}

/// Small named cases (also what compute-sanitizer runs): the smallest
/// shapes, the largest head, a grown cache, and every rejected input.
#[test]
fn named_layer_edge_cases() {
    let Some(gpu) = gpu_or_skip() else { return };
    let one =
        |head_dim, n_kv_heads, group, window, seqs: Vec<(usize, usize, usize)>, seed| StepCase {
            shape: AttnShape {
                n_heads: n_kv_heads * group,
                n_kv_heads,
                head_dim,
                sliding_window: window,
            },
            sequences: seqs,
            n_layers: 2,
            layer: 1,
            seed,
        };
    // One row at position 0, the smallest head; window 1 (only itself).
    check_step(gpu, &one(2, 1, 1, Some(1), vec![(0, 1, 0)], 1));
    // Largest head, GQA 8, a decode row next to a long prefill.
    check_step(gpu, &one(256, 1, 8, None, vec![(300, 1, 0), (0, 37, 3)], 2));
    // SmolLM2-like head (64, 9 heads over 3 KV heads), window cutting both.
    check_step(gpu, &one(64, 3, 3, Some(5), vec![(7, 2, 1), (4, 1, 0)], 3));

    // Growing keeps every layer's contents.
    let mut cache = DeviceKv::new(gpu, 2, 4, 3).unwrap();
    let k: Vec<f16> = (0..12).map(|i| f16::from_f32(i as f32)).collect();
    let d_k = ops::upload(gpu, &k).unwrap();
    {
        let step = AttnRows::upload(gpu, &[&cache], &[(0, 0), (0, 1), (0, 2)]).unwrap();
        layers::kv_append_device(gpu, 1, &d_k, &d_k, &step).unwrap();
    }
    cache.grow(gpu, 8).unwrap();
    assert_eq!(cache.capacity(), 8);
    assert_eq!(cache.bytes(), 2 * 2 * 8 * 4 * 2);
    let (gk, gv) = cache.download_layer(gpu, 1).unwrap();
    assert_eq!(&gk[..12], &k[..]);
    assert_eq!(&gv[..12], &k[..]);
    assert!(gk[12..].iter().all(|x| x.to_bits() == 0));
    let (k0, _) = cache.download_layer(gpu, 0).unwrap();
    assert!(k0.iter().all(|x| x.to_bits() == 0));

    // Rejected inputs: typed errors, no launch.
    let layer_err = |e: OpsError| match e {
        OpsError::Layer(l) => l,
        other => panic!("expected a LayerError, got {other}"),
    };
    let err = AttnRows::upload(gpu, &[&cache], &[(0, 8)]).err().unwrap();
    assert!(matches!(
        layer_err(err),
        LayerError::PositionOutOfRange {
            pos: 8,
            capacity: 8,
            ..
        }
    ));
    let err = AttnRows::upload(gpu, &[&cache], &[(1, 0)]).err().unwrap();
    assert!(matches!(
        layer_err(err),
        LayerError::UnknownCache { cache: 1, .. }
    ));
    let err = AttnRows::upload(gpu, &[&cache], &[(0, 2), (0, 2)])
        .err()
        .unwrap();
    assert!(matches!(
        layer_err(err),
        LayerError::DuplicatePosition {
            first: 0,
            second: 1,
            ..
        }
    ));
    let other = DeviceKv::new(gpu, 3, 4, 8).unwrap();
    let err = AttnRows::upload(gpu, &[&cache, &other], &[(0, 0)])
        .err()
        .unwrap();
    assert!(matches!(
        layer_err(err),
        LayerError::CacheGeometry { cache: 1, .. }
    ));
    let step = AttnRows::upload(gpu, &[&cache], &[(0, 3)]).unwrap();
    let four = ops::upload(gpu, &k[..4]).unwrap();
    let err = layers::kv_append_device(gpu, 2, &four, &four, &step).unwrap_err();
    assert!(matches!(
        layer_err(err),
        LayerError::LayerOutOfRange {
            layer: 2,
            n_layers: 2
        }
    ));
    let bad_shape = AttnShape {
        n_heads: 3,
        n_kv_heads: 2,
        head_dim: 2,
        sliding_window: None,
    };
    let mut out = ops::upload(gpu, &[POISON; 6]).unwrap();
    let q6 = ops::upload(gpu, &[f16::ONE; 6]).unwrap();
    let err = layers::attention_device(gpu, bad_shape, 0, &q6, &step, &mut out).unwrap_err();
    assert!(matches!(layer_err(err), LayerError::AttnShape(..)));
    let mut h = vec![0f32; 2];
    let err = layers::embed(gpu, &[f16::ONE; 6], 3, 2, &[3], &mut h).unwrap_err();
    assert!(matches!(
        layer_err(err),
        LayerError::TokenOutOfRange {
            row: 0,
            token: 3,
            vocab: 3
        }
    ));
    assert!(RopeTable::new(gpu, 7, 10_000.0, 4).is_err());

    // RoPE past its table: the row becomes NaN, nothing is read out of bounds.
    let table = RopeTable::new(gpu, 4, 10_000.0, 4).unwrap();
    let mut x = ops::upload(gpu, &[f16::ONE; 8]).unwrap();
    let positions = ops::upload(gpu, &[3u32, 4]).unwrap();
    layers::rope_device(gpu, &table, &mut x, 2, 1, &positions).unwrap();
    let x = download(gpu, &x);
    assert!(x[..4].iter().all(|v| v.is_finite()));
    assert!(x[4..].iter().all(|v| v.is_nan()));
}

/// A sliding-window cache's cut: `shift_front` moves positions to the
/// front of every layer's K and V (disjoint and overlapping ranges), and
/// attention over a cut cache, addressed by absolute positions through
/// `upload_windowed`, is bit-identical to attention over the uncut cache
/// (the kernel walks the same keys in the same order, only the slots differ).
#[test]
fn cut_cache_moves_positions_and_attends_like_the_uncut_one() {
    let Some(gpu) = gpu_or_skip() else { return };
    let (n_layers, kv_dim, capacity) = (2, 4, 12);
    let values =
        |layer: usize, p: usize, c: usize| f16::from_f32((layer * 1000 + p * 10 + c) as f32);
    let fill = |cache: &DeviceKv, len: usize| {
        let rows: Vec<(usize, usize)> = (0..len).map(|p| (0, p)).collect();
        let step = AttnRows::upload(gpu, &[cache], &rows).unwrap();
        for layer in 0..n_layers {
            let k: Vec<f16> = (0..len * kv_dim)
                .map(|i| values(layer, i / kv_dim, i % kv_dim))
                .collect();
            let v: Vec<f16> = k.iter().map(|x| -*x).collect();
            let (d_k, d_v) = (ops::upload(gpu, &k).unwrap(), ops::upload(gpu, &v).unwrap());
            layers::kv_append_device(gpu, layer, &d_k, &d_v, &step).unwrap();
        }
    };
    for (from, count) in [(7usize, 3usize), (2, 5), (0, 4)] {
        let mut cache = DeviceKv::new(gpu, n_layers, kv_dim, capacity).unwrap();
        fill(&cache, from + count);
        cache.shift_front(gpu, from, count).unwrap();
        for layer in 0..n_layers {
            let (k, v) = cache.download_layer(gpu, layer).unwrap();
            for slot in 0..count {
                for c in 0..kv_dim {
                    let want = values(layer, from + slot, c);
                    assert_eq!(
                        k[slot * kv_dim + c],
                        want,
                        "from {from} count {count} layer {layer} slot {slot}"
                    );
                    assert_eq!(v[slot * kv_dim + c], -want);
                }
            }
        }
    }
    let layer_err = |e: OpsError| match e {
        OpsError::Layer(l) => l,
        other => panic!("expected a LayerError, got {other}"),
    };
    let mut cache = DeviceKv::new(gpu, n_layers, kv_dim, capacity).unwrap();
    let err = cache.shift_front(gpu, 10, 3).unwrap_err();
    assert!(matches!(
        layer_err(err),
        LayerError::ShiftRange {
            from: 10,
            end: 13,
            capacity: 12
        }
    ));

    // Attention at absolute position 11 under a window of 4 (sees 8..=11):
    // the uncut cache holds 0..=11, the cut one holds 7..=11 from slot 0.
    let shape = AttnShape {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        sliding_window: Some(4),
    };
    let mut rng = StdRng::seed_from_u64(5);
    let uncut = DeviceKv::new(gpu, n_layers, kv_dim, capacity).unwrap();
    fill(&uncut, 12);
    fill(&cache, 12);
    cache.shift_front(gpu, 7, 5).unwrap();
    let q = ops::upload(gpu, &uniform_f16(&mut rng, shape.q_dim(), 1.0)).unwrap();
    let attend = |kv: &DeviceKv, start: usize| {
        let step = AttnRows::upload_windowed(gpu, &[kv], &[start], &[(0, 11)]).unwrap();
        let mut out = ops::upload(gpu, &[POISON; 8]).unwrap();
        layers::attention_device(gpu, shape, 1, &q, &step, &mut out).unwrap();
        download(gpu, &out)
    };
    let (want, got) = (attend(&uncut, 0), attend(&cache, 7));
    assert!(want.iter().all(|x| x.is_finite()));
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    // A position before the cache's start, and one past its capacity.
    let err = AttnRows::upload_windowed(gpu, &[&cache], &[7], &[(0, 6)])
        .err()
        .unwrap();
    assert!(matches!(
        layer_err(err),
        LayerError::PositionDropped {
            row: 0,
            pos: 6,
            start: 7
        }
    ));
    let err = AttnRows::upload_windowed(gpu, &[&cache], &[7], &[(0, 19)])
        .err()
        .unwrap();
    assert!(matches!(
        layer_err(err),
        LayerError::PositionOutOfRange {
            pos: 12,
            capacity: 12,
            ..
        }
    ));
}

/// The attention check itself, without a device: it accepts the reference's
/// own output rounded to f16, and rejects the output of a neighbouring
/// window or of the wrong KV head (so the GPU comparison cannot pass
/// vacuously).
#[test]
fn attention_check_accepts_the_reference_and_rejects_neighbours() {
    let mut rng = StdRng::seed_from_u64(5);
    let s = AttnShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        sliding_window: Some(8),
    };
    let len = 30;
    let keys = uniform(&mut rng, len * s.kv_dim(), 1.0);
    let values = uniform(&mut rng, len * s.kv_dim(), 1.0);
    let queries: Vec<cpu::Query> = [3usize, 8, 9, 29]
        .iter()
        .map(|&pos| cpu::Query {
            pos,
            keys: &keys,
            values: &values,
        })
        .collect();
    let q = uniform_f16(&mut rng, queries.len() * s.q_dim(), 1.0);
    let mut expected = vec![0f32; q.len()];
    cpu::attention(s, &f32s(&q), &queries, &mut expected);
    let rounded: Vec<f16> = expected.iter().map(|&v| f16::from_f32(v)).collect();
    assert_attention_close(s, &q, &queries, &rounded, &expected);

    let wrong = |shape: AttnShape| {
        let mut out = vec![0f32; q.len()];
        cpu::attention(shape, &f32s(&q), &queries, &mut out);
        let out: Vec<f16> = out.iter().map(|&v| f16::from_f32(v)).collect();
        std::panic::catch_unwind(|| assert_attention_close(s, &q, &queries, &out, &expected))
    };
    let window_9 = AttnShape {
        sliding_window: Some(9),
        ..s
    };
    assert!(wrong(window_9).is_err(), "a window one wider must fail");
    // Every head reading KV head 0 (as if n_kv_heads were 1 with group 4).
    let one_kv_head = |_: ()| {
        let (d, kv_dim) = (s.head_dim, s.kv_dim());
        let k0: Vec<f32> = keys.chunks(kv_dim).flat_map(|r| r[..d].to_vec()).collect();
        let v0: Vec<f32> = values
            .chunks(kv_dim)
            .flat_map(|r| r[..d].to_vec())
            .collect();
        let qs: Vec<cpu::Query> = queries
            .iter()
            .map(|x| cpu::Query {
                pos: x.pos,
                keys: &k0,
                values: &v0,
            })
            .collect();
        let shape = AttnShape { n_kv_heads: 1, ..s };
        let mut out = vec![0f32; q.len()];
        cpu::attention(shape, &f32s(&q), &qs, &mut out);
        out.iter().map(|&v| f16::from_f32(v)).collect::<Vec<f16>>()
    };
    let out = one_kv_head(());
    let caught =
        std::panic::catch_unwind(|| assert_attention_close(s, &q, &queries, &out, &expected));
    assert!(caught.is_err(), "reading the wrong KV head must fail");
}

/// An f32 model of `meswitch_attention`'s arithmetic (warp round-robin over
/// positions, per-lane half2 partial dots, butterfly shuffle sums, online
/// softmax, the shared-memory merge), rounded to f16: the tolerance above
/// must accept it on long contexts and the largest head, or the first GPU run
/// would fail on rounding alone. (It models the kernel's order of
/// operations; the kernel itself is checked by the GPU tests.)
fn attention_kernel_model(s: AttnShape, q: &[f16], queries: &[cpu::Query]) -> Vec<f16> {
    const WARPS: usize = 4;
    const LANES: usize = 32;
    let (d, kv_dim) = (s.head_dim, s.kv_dim());
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![f16::ZERO; q.len()];
    for (t, query) in queries.iter().enumerate() {
        let lo = cpu::attention_window_start(query.pos, s.sliding_window);
        for h in 0..s.n_heads {
            let off = (h / s.group()) * d;
            let qh = f32s(&q[(t * s.n_heads + h) * d..][..d]);
            let mut states = Vec::new();
            for w in 0..WARPS {
                let (mut m, mut l, mut acc) = (f32::NEG_INFINITY, 0f32, vec![0f32; d]);
                for j in (lo + w..=query.pos).step_by(WARPS) {
                    let k = &query.keys[j * kv_dim + off..][..d];
                    let mut lanes = [0f32; LANES];
                    for (i, pair) in (0..d / 2).map(|i| (i, 2 * i)) {
                        let lane = &mut lanes[i % LANES];
                        *lane = qh[pair + 1].mul_add(k[pair + 1], qh[pair].mul_add(k[pair], *lane));
                    }
                    for o in [16, 8, 4, 2, 1] {
                        let prev = lanes;
                        for (l, v) in lanes.iter_mut().enumerate() {
                            *v = prev[l] + prev[l ^ o];
                        }
                    }
                    let sc = lanes[0] * scale;
                    let m_new = m.max(sc);
                    let (corr, p) = ((m - m_new).exp(), (sc - m_new).exp());
                    l = l * corr + p;
                    let v = &query.values[j * kv_dim + off..][..d];
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a = p.mul_add(*v, *a * corr);
                    }
                    m = m_new;
                }
                states.push((m, l, acc));
            }
            let max_all = states.iter().fold(f32::NEG_INFINITY, |a, s| a.max(s.0));
            let sw: Vec<f32> = states.iter().map(|s| (s.0 - max_all).exp()).collect();
            let den: f32 = states.iter().zip(&sw).map(|(s, w)| s.1 * w).sum();
            for c in 0..d {
                let o: f32 = states.iter().zip(&sw).map(|(s, w)| s.2[c] * w).sum();
                out[(t * s.n_heads + h) * d + c] = f16::from_f32(o / den);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn attention_tolerance_covers_the_kernels_arithmetic(
        head_dim in prop_oneof![Just(2usize), Just(64), Just(128), Just(256)],
        group in prop_oneof![Just(1usize), Just(4)],
        len in prop_oneof![1usize..=8, 200usize..=400],
        window in prop_oneof![Just(None), (1usize..=64).prop_map(Some)],
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let s = AttnShape { n_heads: 2 * group, n_kv_heads: 2, head_dim, sliding_window: window };
        let keys = f32s(&uniform_f16(&mut rng, len * s.kv_dim(), 1.0));
        let values = f32s(&uniform_f16(&mut rng, len * s.kv_dim(), 1.0));
        let queries: Vec<cpu::Query> = [0, len / 2, len - 1]
            .iter()
            .map(|&pos| cpu::Query { pos, keys: &keys, values: &values })
            .collect();
        // Queries up to ±2 make peaked softmaxes at d = 256 too.
        let q = uniform_f16(&mut rng, queries.len() * s.q_dim(), 2.0);
        let mut expected = vec![0f32; q.len()];
        cpu::attention(s, &f32s(&q), &queries, &mut expected);
        let modelled = attention_kernel_model(s, &q, &queries);
        assert_attention_close(s, &q, &queries, &modelled, &expected);
    }
}
