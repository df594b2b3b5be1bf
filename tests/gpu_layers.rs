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

#[allow(dead_code)]
mod layer_support;

use layer_support::*;
use meswitch::ops::layers::{self, AttnRows, DeviceKv, LayerError, RopeTable};
use meswitch::ops::OpsError;

// ---- one attention step over several sequences --------------------------------

/// Runs `case` on the device (history appended at every layer in a first
/// step, then this step's rows appended and attended at `case.layer`) and
/// checks the caches and the output against the reference.
fn check_step(gpu: &Gpu, case: &StepCase) {
    let plan = StepPlan::new(case);
    let s = case.shape;
    let caches: Vec<DeviceKv> = (0..case.sequences.len())
        .map(|i| DeviceKv::new(gpu, case.n_layers, s.kv_dim(), plan.capacity(i)).unwrap())
        .collect();
    let refs: Vec<&DeviceKv> = caches.iter().collect();
    if !plan.history.is_empty() {
        let step = AttnRows::upload(gpu, &refs, &plan.history).unwrap();
        for layer in 0..case.n_layers {
            let (k, v) = plan.gather(&plan.history, layer);
            let (k, v) = (ops::upload(gpu, &k).unwrap(), ops::upload(gpu, &v).unwrap());
            layers::kv_append_device(gpu, layer, &k, &v, &step).unwrap();
        }
    }
    let step = AttnRows::upload(gpu, &refs, &plan.rows).unwrap();
    let (k, v) = plan.gather(&plan.rows, case.layer);
    let (k, v) = (ops::upload(gpu, &k).unwrap(), ops::upload(gpu, &v).unwrap());
    layers::kv_append_device(gpu, case.layer, &k, &v, &step).unwrap();
    let d_q = ops::upload(gpu, &plan.q).unwrap();
    let mut d_out = ops::upload(gpu, &vec![POISON; plan.q.len()]).unwrap();
    layers::attention_device(gpu, s, case.layer, &d_q, &step, &mut d_out).unwrap();
    let out = download(gpu, &d_out);
    for (i, cache) in caches.iter().enumerate() {
        let (k, v) = cache.download_layer(gpu, case.layer).unwrap();
        plan.assert_cache(i, &k, &v);
    }
    plan.assert_output(&out);
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
        assert_rms_norm(&x, &w, eps, rows, &y);
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
        assert_rope(&x, &got, head_dim, &positions, theta);
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
        assert_swiglu(&gate, &up, &out);
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
        assert_embed(&table, hidden, &tokens, &h);
        let y = uniform_f16(&mut rng, rows * hidden, 1.0);
        let before = h.clone();
        layers::add_residual(gpu, &mut h, &y).unwrap();
        assert_add_residual(&before, &y, &h);
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
    for case in named_steps() {
        check_step(gpu, &case);
    }

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
