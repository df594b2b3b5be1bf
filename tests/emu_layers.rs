//! The layer kernels' CUDA C source (`ptx/kernels/{norm,rope,activation,
//! attention}.cu`), run on the CPU by the host emulation
//! (`meswitch_ptx::emu`), against `meswitch_reference::layers`: the same
//! random problems and the same comparisons as `tests/gpu_layers.rs`, whose
//! module docs derive the tolerances (shared in `tests/layer_support`).
//!
//! The emulation keeps the kernels' f32 operations and their order (shuffle
//! butterflies, per-warp online softmax, the shared-memory merge) and
//! compiles them without FMA contraction; NVRTC contracts `a·b + c` into an
//! FMA. Both are within the tolerances, which allow for the summation order
//! and for `expf` to 2 ulp. RoPE, the embedding gather, the residual add and
//! the KV append stay bit-exact.

#[allow(dead_code, unused_imports)]
mod gpu_support;
#[allow(dead_code)]
mod layer_support;

use layer_support::*;
use meswitch_ptx::abi;
use meswitch_ptx::emu::{self, Dim3, EmuError, KernelParams};

fn row_grid(rows: usize) -> (Dim3, Dim3) {
    ((rows as u32, 1, 1), (abi::MESWITCH_ROW_THREADS, 1, 1))
}

fn elementwise_grid(n: usize) -> (Dim3, Dim3) {
    let (blocks, threads) = meswitch_ptx::elementwise_launch_dims(n);
    ((blocks, 1, 1), (threads, 1, 1))
}

/// Launches a layer kernel. These kernels make no checked loads, so no
/// regions are declared.
///
/// # Safety
/// As `emu::launch`: every address in `params` points into live host memory
/// of the size the kernel's contract (meswitch_abi.h) gives for them.
unsafe fn run<P: KernelParams>(entry: &str, (grid, block): (Dim3, Dim3), params: &P) {
    unsafe { emu::launch(entry, grid, block, params, &[]) }
        .unwrap_or_else(|e: EmuError| panic!("{entry}: {e}"));
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, rows: usize) -> Vec<f16> {
    let mut y = vec![POISON; x.len()];
    let p = abi::MeswitchRmsNormParams {
        x: emu::addr(x),
        weight: emu::addr(w),
        y: emu::addr_mut(&mut y),
        rows: rows as u32,
        n: w.len() as u32,
        eps,
        reserved: 0,
    };
    // SAFETY: x and y hold rows·n elements, w holds n.
    unsafe { run("meswitch_rms_norm", row_grid(rows), &p) };
    y
}

/// RoPE in place with the tables of `max_positions` positions that
/// `ops::layers::RopeTable` uploads (the reference's `rope_tables`).
fn rope(
    x: &mut [f16],
    head_dim: usize,
    n_heads: usize,
    positions: &[u32],
    theta: f64,
    max_positions: usize,
) {
    let (cos, sin) = cpu::rope_tables(head_dim, theta, max_positions);
    let p = abi::MeswitchRopeParams {
        x: emu::addr_mut(x),
        positions: emu::addr(positions),
        cos: emu::addr(&cos),
        sin: emu::addr(&sin),
        rows: positions.len() as u32,
        n_heads: n_heads as u32,
        head_dim: head_dim as u32,
        max_positions: max_positions as u32,
    };
    // SAFETY: x holds rows·n_heads·head_dim elements, the tables
    // max_positions·head_dim/2 each, positions one per row.
    unsafe { run("meswitch_rope", row_grid(positions.len()), &p) };
}

fn swiglu(gate: &[f16], up: &[f16]) -> Vec<f16> {
    let mut out = vec![POISON; gate.len()];
    let p = abi::MeswitchElementwiseParams {
        a: emu::addr(gate),
        b: emu::addr(up),
        out: emu::addr_mut(&mut out),
        n: gate.len() as u32,
        reserved: 0,
    };
    // SAFETY: gate, up and out hold n elements.
    unsafe { run("meswitch_swiglu", elementwise_grid(gate.len()), &p) };
    out
}

fn add_residual(h: &mut [f32], y: &[f16]) {
    let n = h.len();
    let p = abi::MeswitchElementwiseParams {
        a: emu::addr_mut(h),
        b: emu::addr(y),
        out: 0,
        n: n as u32,
        reserved: 0,
    };
    // SAFETY: h and y hold n elements.
    unsafe { run("meswitch_add_residual", elementwise_grid(n), &p) };
}

fn embed(table: &[f16], vocab: usize, hidden: usize, tokens: &[u32]) -> Vec<f32> {
    let mut out = vec![POISON_F32; tokens.len() * hidden];
    let p = abi::MeswitchEmbedParams {
        table: emu::addr(table),
        tokens: emu::addr(tokens),
        out: emu::addr_mut(&mut out),
        rows: tokens.len() as u32,
        hidden: hidden as u32,
        vocab: vocab as u32,
        reserved: 0,
    };
    // SAFETY: table is vocab·hidden, out rows·hidden, one token per row.
    unsafe { run("meswitch_embed", row_grid(tokens.len()), &p) };
    out
}

/// Host KV caches in the device layout `[n_layers][2][capacity][kv_dim]`.
struct HostKv {
    data: Vec<f16>,
    capacity: usize,
    kv_dim: usize,
}

impl HostKv {
    fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> HostKv {
        HostKv {
            data: vec![f16::ZERO; n_layers * 2 * capacity * kv_dim],
            capacity,
            kv_dim,
        }
    }

    /// Layer `layer`'s keys and values, `capacity·kv_dim` each.
    fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        let n = self.capacity * self.kv_dim;
        (
            &self.data[2 * layer * n..][..n],
            &self.data[(2 * layer + 1) * n..][..n],
        )
    }
}

/// The kernels' row table for (cache, position) rows.
fn attn_rows(caches: &mut [HostKv], rows: &[(usize, usize)]) -> Vec<abi::MeswitchAttnRow> {
    rows.iter()
        .map(|&(i, pos)| abi::MeswitchAttnRow {
            kv: emu::addr_mut(&mut caches[i].data),
            capacity: caches[i].capacity as u32,
            pos: pos as u32,
        })
        .collect()
}

fn kv_append(layer: usize, kv_dim: usize, k: &[f16], v: &[f16], rows: &[abi::MeswitchAttnRow]) {
    let p = abi::MeswitchKvAppendParams {
        k: emu::addr(k),
        v: emu::addr(v),
        rows: emu::addr(rows),
        n_rows: rows.len() as u32,
        kv_dim: kv_dim as u32,
        layer: layer as u32,
        reserved: 0,
    };
    // SAFETY: k and v hold n_rows·kv_dim elements; each row's cache is a
    // live HostKv of the step's geometry with pos < capacity.
    unsafe { run("meswitch_kv_append", row_grid(rows.len()), &p) };
}

fn attention(s: AttnShape, layer: usize, q: &[f16], rows: &[abi::MeswitchAttnRow]) -> Vec<f16> {
    let mut out = vec![POISON; q.len()];
    let p = abi::MeswitchAttentionParams {
        q: emu::addr(q),
        rows: emu::addr(rows),
        out: emu::addr_mut(&mut out),
        n_rows: rows.len() as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        head_dim: s.head_dim as u32,
        layer: layer as u32,
        sliding_window: meswitch_ptx::attention_window(s.sliding_window),
        scale: meswitch_ptx::attention_scale(s.head_dim),
        reserved: 0,
    };
    let grid = (
        (s.n_heads as u32, rows.len() as u32, 1),
        (abi::MESWITCH_ATTN_THREADS, 1, 1),
    );
    // SAFETY: q and out hold n_rows·q_dim elements; every row's cache is a
    // live HostKv with the shape's kv_dim.
    unsafe { run("meswitch_attention", grid, &p) };
    out
}

/// `gpu_layers.rs`'s step on host caches: history appended at every layer,
/// this step's rows appended and attended at the tested layer.
fn check_step(case: &StepCase) {
    let plan = StepPlan::new(case);
    let (s, kv_dim) = (case.shape, case.shape.kv_dim());
    let mut caches: Vec<HostKv> = (0..case.sequences.len())
        .map(|i| HostKv::new(case.n_layers, kv_dim, plan.capacity(i)))
        .collect();
    if !plan.history.is_empty() {
        let rows = attn_rows(&mut caches, &plan.history);
        for layer in 0..case.n_layers {
            let (k, v) = plan.gather(&plan.history, layer);
            kv_append(layer, kv_dim, &k, &v, &rows);
        }
    }
    let rows = attn_rows(&mut caches, &plan.rows);
    let (k, v) = plan.gather(&plan.rows, case.layer);
    kv_append(case.layer, kv_dim, &k, &v, &rows);
    let out = attention(s, case.layer, &plan.q, &rows);
    for (i, cache) in caches.iter().enumerate() {
        let (k, v) = cache.layer(case.layer);
        plan.assert_cache(i, k, v);
    }
    plan.assert_output(&out);
}

/// Cases per proptest: `MESWITCH_EMU_PROPTEST_CASES`, default 24.
fn emu_cases() -> u32 {
    std::env::var("MESWITCH_EMU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(emu_cases()))]

    #[test]
    fn emulated_rms_norm_matches_reference(rows in 1usize..=9, n in width(), eps in prop_oneof![Just(1e-5f32), Just(1e-6f32), Just(0.0f32)], seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = uniform(&mut rng, rows * n, 4.0);
        let w = uniform(&mut rng, n, 2.0);
        let y = rms_norm(&x, &w, eps, rows);
        assert_rms_norm(&x, &w, eps, rows, &y);
    }

    #[test]
    fn emulated_rope_is_bit_exact(
        rows in 1usize..=9,
        n_heads in 1usize..=8,
        head_dim in head_dim(),
        theta in prop_oneof![Just(10_000.0f64), Just(1_000_000.0f64), Just(100.0f64)],
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = uniform_f16(&mut rng, rows * n_heads * head_dim, 2.0);
        let positions: Vec<usize> = (0..rows).map(|_| rng.random_range(0..5000)).collect();
        let ids: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let max_positions = positions.iter().max().unwrap() + 1;
        let mut got = x.clone();
        rope(&mut got, head_dim, n_heads, &ids, theta, max_positions);
        assert_rope(&x, &got, head_dim, &positions, theta);
    }

    #[test]
    fn emulated_swiglu_matches_reference(n in width(), seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        // Gates up to ±20 cover silu's saturation on both sides.
        let gate = uniform_f16(&mut rng, n, 20.0);
        let up = uniform_f16(&mut rng, n, 3.0);
        assert_swiglu(&gate, &up, &swiglu(&gate, &up));
    }

    #[test]
    fn emulated_add_residual_and_embed_are_exact(
        rows in 1usize..=9,
        hidden in width(),
        vocab in 1usize..=300,
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let table = uniform_f16(&mut rng, vocab * hidden, 1.0);
        let tokens: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
        let mut h = embed(&table, vocab, hidden, &tokens);
        assert_embed(&table, hidden, &tokens, &h);
        let y = uniform_f16(&mut rng, rows * hidden, 1.0);
        let before = h.clone();
        add_residual(&mut h, &y);
        assert_add_residual(&before, &y, &h);
    }

    #[test]
    fn emulated_attention_over_mixed_prefill_and_decode_rows(case in step_case()) {
        check_step(&case);
    }
}

/// `gpu_layers.rs`'s named attention steps (`layer_support::named_steps`).
#[test]
fn emulated_attention_edge_cases() {
    for case in named_steps() {
        check_step(&case);
    }
}

/// What the kernels do with inputs the launcher rejects (never reached in
/// serving, but a bad launch must not read or write out of bounds): a
/// position past the RoPE table or past a cache, a token past the vocabulary.
#[test]
fn emulated_kernels_poison_rejected_rows() {
    let mut x = vec![f16::ONE; 8];
    rope(&mut x, 2, 2, &[3, 4], 10_000.0, 4);
    assert!(x[..4].iter().all(|v| v.is_finite()));
    assert!(
        x[4..].iter().all(|v| v.is_nan()),
        "row past the table: {x:?}"
    );

    let h = embed(&[f16::ONE; 6], 3, 2, &[1, 3]);
    assert_eq!(&h[..2], &[1.0, 1.0]);
    assert!(
        h[2..].iter().all(|v| v.is_nan()),
        "token past the vocabulary"
    );

    let s = AttnShape {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        sliding_window: None,
    };
    let mut caches = vec![HostKv::new(1, s.kv_dim(), 2)];
    let rows = attn_rows(&mut caches, &[(0, 1), (0, 2)]);
    let out = attention(s, 0, &[f16::ONE; 16], &rows);
    assert!(out[..8].iter().all(|v| v.is_finite()));
    assert!(
        out[8..].iter().all(|v| v.is_nan()),
        "position past the cache"
    );
}
