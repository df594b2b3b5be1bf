//! The GEMV kernels' CUDA C source, run on the CPU by the host emulation
//! (`meswitch_ptx::emu`, design in `ptx/emu/simt.h`), against the CPU
//! reference: the same random problems and the same tolerance as the GPU
//! tests (`tests/gpu_kernels.rs`, whose module docs derive it). The
//! emulation forms each weight with the kernel's own FP16 operations and
//! sums in f64 per mma, so the bound that covers a GPU covers it too.
//!
//! This runs on every machine, so every kernel change is checked without a
//! GPU: the item walks, the fragment assembly, the x masking, the salient
//! items and the epilogue of both kernel families (the 128-column one and the
//! wide one), with the launch geometry and entry points `meswitch_ptx` names
//! for the GPU launcher. It does not check the PTX the GPU runs (the
//! inline-PTX spellings take their portable twins) nor timing.

#[allow(dead_code, unused_imports)]
mod gpu_support;

use gpu_support::*;
use meswitch::ops::GemvKernel;
use meswitch_ptx::abi;
use meswitch_ptx::emu::{self, EmuError, Region};

fn descriptor(d: &DeltaView) -> abi::MeswitchExpertDelta {
    abi::MeswitchExpertDelta {
        codes: emu::addr(d.codes),
        scales: emu::addr(d.scales),
        offsets: emu::addr(d.offsets),
        salient_index: emu::addr(d.salient_index),
        salient_values: emu::addr(d.salient_values),
        n_salient: d.layout.salient as u32,
        reserved: 0,
    }
}

/// The entry family a single-variant call launches under `kernel`, as the
/// GPU launcher picks it (`ops::plan`): the wide family only where the input
/// width is whole wide items; the 4-bit group-128 variant when no row has an
/// expert (any variant computes the base the same way).
fn family(case: &Case, kernel: GemvKernel, with_base: bool) -> String {
    let (bits, group, inf) = match case.experts.first() {
        Some(e) => (
            e.layout().bits.count(),
            e.layout().group_size,
            case.in_features,
        ),
        None => (4, 128, case.in_features),
    };
    let wide = match (kernel, with_base) {
        (GemvKernel::Wide, true) => meswitch_ptx::multi_expert_gemv_wide_entry(bits, group, inf),
        (GemvKernel::Wide, false) => meswitch_ptx::delta_gemv_wide_entry(bits, group, inf),
        (GemvKernel::Chunk128, _) => None,
    };
    let narrow = if with_base {
        meswitch_ptx::multi_expert_gemv_entry(bits, group, inf)
    } else {
        meswitch_ptx::delta_gemv_entry(bits, group, inf)
    };
    wide.or(narrow)
        .expect("every test layout has a GEMV variant")
}

/// What a launch reads beside the params: which buffers the checked loads
/// may touch. `drop_base` leaves the base out (to show the check fires).
struct Launchable<'a> {
    case: &'a Case,
    descriptors: Vec<abi::MeswitchExpertDelta>,
    row_ids: Vec<u32>,
    regions: Vec<Region>,
}

impl<'a> Launchable<'a> {
    fn new(case: &'a Case, drop_base: bool) -> Launchable<'a> {
        let views = case.views();
        let descriptors: Vec<_> = views.iter().map(descriptor).collect();
        let row_ids: Vec<u32> = case
            .rows
            .iter()
            .map(|r| r.unwrap_or(abi::MESWITCH_NO_EXPERT))
            .collect();
        let mut regions = vec![Region::of(&case.x), Region::of(&descriptors)];
        if !drop_base {
            regions.push(Region::of(&case.base));
        }
        for v in &views {
            regions.extend([
                Region::of(v.codes),
                Region::of(v.scales),
                Region::of(v.offsets),
                Region::of(v.salient_index),
                Region::of(v.salient_values),
            ]);
        }
        Launchable {
            case,
            descriptors,
            row_ids,
            regions,
        }
    }

    /// One launch per `MESWITCH_MAX_BATCH` rows, as the GPU launcher splits a
    /// single-variant batch (global row ids, every expert in one table).
    fn run(&self, entry_family: &str, y: &mut [f16]) -> Result<(), EmuError> {
        let c = self.case;
        let (o, i, batch) = (c.out_features, c.in_features, c.batch());
        assert_eq!(y.len(), batch * o);
        let (grid, block) = meswitch_ptx::gemv_launch_dims(o).expect("grid");
        let max = abi::MESWITCH_MAX_BATCH as usize;
        let mut regions = self.regions.clone();
        regions.push(Region::of(y));
        for b0 in (0..batch).step_by(max) {
            let rows_here = max.min(batch - b0);
            let entry = meswitch_ptx::gemv_entry_for_batch(entry_family, rows_here).expect("tiles");
            let params = abi::MeswitchGemvParams {
                base: emu::addr(&c.base),
                experts: emu::addr(&self.descriptors),
                row_expert: emu::addr(&self.row_ids[b0..]),
                x: emu::addr(&c.x[b0 * i..]),
                y: emu::addr_mut(&mut y[b0 * o..]),
                out_features: o as u32,
                in_features: i as u32,
                batch: rows_here as u32,
                n_experts: self.descriptors.len() as u32,
            };
            // SAFETY: base is [o][i], x [batch][i], y [batch][o], the row ids
            // and descriptors cover the batch and the experts, and every
            // descriptor points into the case's live packed arrays (the
            // kernel's contract in meswitch_abi.h); nothing else touches them.
            unsafe { emu::launch(&entry, (grid, 1, 1), (block, 1, 1), &params, &regions)? };
        }
        Ok(())
    }
}

/// The fused kernel and the delta-only kernel of `kernel`'s family on one
/// case, each against the reference.
fn check_case(case: &Case, kernel: GemvKernel) {
    let what = format!("{} kernel", kernel.name());
    let launch = Launchable::new(case, false);
    let mut y = vec![POISON; case.batch() * case.out_features];
    launch
        .run(&family(case, kernel, true), &mut y)
        .unwrap_or_else(|e| panic!("{what}, fused: {e}"));
    case.assert_close(&y, None, &format!("{what}, fused"));

    // The delta-only kernel adds into an existing y (nonzero, so a kernel
    // that overwrites instead of adding fails).
    let mut rng = StdRng::seed_from_u64(case.batch() as u64);
    let initial: Vec<f16> = (0..y.len()).map(|_| value(&mut rng, 0.01, 1.0)).collect();
    let mut y = initial.clone();
    launch
        .run(&family(case, kernel, false), &mut y)
        .unwrap_or_else(|e| panic!("{what}, delta only: {e}"));
    case.assert_close(&y, Some(&initial), &format!("{what}, delta only"));
}

fn check_both(case: &Case) {
    for kernel in GemvKernel::ALL {
        check_case(case, kernel);
    }
}

/// Cases per proptest here: `MESWITCH_EMU_PROPTEST_CASES`, default 24 (each
/// case runs four emulated launch families and the reference).
fn emu_cases() -> u32 {
    std::env::var("MESWITCH_EMU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

/// Output rows on and off the 16-row tile, input widths the GEMV kernels
/// take (multiples of 128 up to 1024, so every wide width — 256 at INT2, 512
/// at INT1 — and its fallback occur), every group size.
fn emu_shape() -> impl Strategy<Value = (usize, usize, usize)> {
    (
        prop_oneof![Just(1usize), 1usize..=80, Just(16usize), Just(33usize)],
        (1usize..=8).prop_map(|k| k * K_CHUNK),
        prop_oneof![
            Just(GROUP_SIZES[0]),
            Just(GROUP_SIZES[1]),
            Just(GROUP_SIZES[2]),
            Just(usize::MAX)
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(emu_cases()))]

    #[test]
    fn emulated_gemv_matches_reference(
        (out_features, in_features, group) in emu_shape(),
        bits in bits(),
        n_experts in 0usize..=MAX_TEST_EXPERTS,
        batch in 1usize..=MAX_TEST_BATCH,
        mix in row_mix(),
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let case = Case::random(&mut rng, out_features, in_features, bits, group, n_experts, batch, mix);
        check_both(&case);
    }
}

/// (name, out, in, bits, group, experts, batch, row mix)
type EdgeCase = (
    &'static str,
    usize,
    usize,
    Bits,
    usize,
    usize,
    usize,
    RowMix,
);

/// The dequantize kernel on a case's first expert, with or without the base.
fn emu_dequantize(case: &Case, with_base: bool) -> Vec<f16> {
    let d = case.experts[0].view();
    let l = d.layout;
    let mut out = vec![POISON; l.out_features * l.in_features];
    let entry = meswitch_ptx::dequantize_entry(l.bits.count()).expect("entry");
    let (grid, block) = meswitch_ptx::dequantize_launch_dims(l.out_features).expect("grid");
    let params = abi::MeswitchDequantParams {
        delta: descriptor(&d),
        base: if with_base { emu::addr(&case.base) } else { 0 },
        out: emu::addr_mut(&mut out),
        out_features: l.out_features as u32,
        in_features: l.in_features as u32,
        group_size: l.group_size as u32,
        reserved: 0,
    };
    // SAFETY: the delta's arrays are live and valid for its layout; base and
    // out hold out·in elements.
    unsafe { emu::launch(&entry, (grid, 1, 1), (block, 1, 1), &params, &[]) }
        .unwrap_or_else(|e| panic!("dequantize: {e}"));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(emu_cases()))]

    /// Bit-identical, as the header promises and `gpu_kernels.rs` checks on
    /// a device; any input width (this kernel has no K-chunk requirement).
    #[test]
    fn emulated_dequantize_is_bit_exact(
        (out_features, in_features, group) in shape(),
        bits in bits(),
        with_base in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let case = Case::random(&mut rng, out_features, in_features, bits, group, 1, 1, RowMix::Random);
        assert_dequantize_exact(&case, with_base, &emu_dequantize(&case, with_base));
    }
}

#[test]
fn emulated_gemv_edge_cases() {
    let mut rng = StdRng::seed_from_u64(41);
    #[rustfmt::skip]
    let cases: &[EdgeCase] = &[
        // name,                       out, in,   bits,       group, experts, batch, mix
        ("one output row",              1,  256, Bits::Two,  128,   2,  3, RowMix::Random),
        ("one batch row",              37,  512, Bits::One,   64,   1,  1, RowMix::AllOneExpert),
        ("odd rows, every row its own", 17, 384, Bits::Four,  32,  16, 16, RowMix::EveryRowDifferent),
        ("no row has an expert",       24,  256, Bits::Two,   64,   3,  9, RowMix::NoExpert),
        ("no experts at all",          16,  128, Bits::Four, 128,   0,  5, RowMix::Random),
        ("full batch, 16 experts",     16, 1024, Bits::Two,  128,  16, 64, RowMix::EveryRowDifferent),
        ("two launches (65 rows)",     20,  512, Bits::One,  128,   4, 65, RowMix::Random),
        ("one group per row",          18,  768, Bits::Two, usize::MAX, 5, 12, RowMix::Random),
        ("wide INT1 item, 512 columns", 32, 512, Bits::One,   32,   3, 24, RowMix::Random),
    ];
    for &(name, out, inf, bits, group, experts, batch, mix) in cases {
        let case = Case::random(&mut rng, out, inf, bits, group, experts, batch, mix);
        eprintln!("case: {name}");
        check_both(&case);
    }
}

/// Salient counts the random draw rarely hits: none, one, one short of and
/// exactly an mma item (16), and every column.
#[test]
fn emulated_gemv_salient_counts() {
    let mut rng = StdRng::seed_from_u64(43);
    for k in [0usize, 1, 15, 16, 17, 256] {
        let layout = DeltaLayout::new(24, 256, Bits::Two, 64, k).expect("layout");
        let mut case = Case::random(&mut rng, 24, 256, Bits::Two, 64, 0, 10, RowMix::Random);
        case.experts = (0..3).map(|_| random_delta(&mut rng, layout)).collect();
        case.rows = (0..10u32).map(|b| (b % 4 < 3).then_some(b % 4)).collect();
        eprintln!("salient columns: {k}");
        check_both(&case);
    }
}

/// True when `f` panics. Run on a thread with a large stack: with
/// RUST_BACKTRACE set, symbolizing the expected panic's backtrace in this
/// large test binary overflows a test thread's default 2 MiB.
fn panics(f: impl FnOnce() + Send) -> bool {
    const STACK_BYTES: usize = 64 << 20;
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(STACK_BYTES)
            .spawn_scoped(s, f)
            .expect("spawn")
            .join()
            .is_err()
    })
}

/// The checks can fail: a launch whose rows claim other experts than the
/// reference is given misses the tolerance, and a load from a buffer the
/// launch did not declare is an error, not a silent read.
#[test]
fn emulated_gemv_checks_reject_wrong_work() {
    let mut rng = StdRng::seed_from_u64(47);
    let case = Case::random(
        &mut rng,
        16,
        256,
        Bits::Four,
        128,
        2,
        4,
        RowMix::EveryRowDifferent,
    );
    let mut wrong = Launchable::new(&case, false);
    wrong.row_ids.swap(0, 1);
    let mut y = vec![POISON; case.batch() * case.out_features];
    wrong
        .run(&family(&case, GemvKernel::Chunk128, true), &mut y)
        .expect("runs");
    assert!(
        panics(|| case.assert_close(&y, None, "swapped experts")),
        "rows on the wrong expert must fail the comparison"
    );

    let undeclared = Launchable::new(&case, true);
    let err = undeclared
        .run(&family(&case, GemvKernel::Chunk128, true), &mut y)
        .expect_err("the base was not declared");
    assert!(
        matches!(&err, EmuError::Kernel(m) if m.contains("outside every buffer")),
        "unexpected: {err}"
    );
    let err = Launchable::new(&case, false)
        .run("meswitch_multi_expert_gemv_b3_g128", &mut y)
        .expect_err("no such entry");
    assert!(matches!(err, EmuError::Launch(_)), "unexpected: {err}");
}

/// Mistral-7B's shapes at a serving batch (32 rows over 16 INT2 g128
/// experts with 1% salient channels), both kernel families, fused and
/// delta-only. About 12 minutes here for the four shapes (84 s, 21 s, 306 s,
/// 329 s, measured 2026-12-08), so ignored by default:
/// `cargo test --release --test emu_gemv -- --ignored`; `MESWITCH_EMU_SHAPES`
/// picks shapes (`OUTxIN,...`).
#[test]
#[ignore]
fn emulated_gemv_at_mistral_shapes() {
    let mut rng = StdRng::seed_from_u64(53);
    let shapes = std::env::var("MESWITCH_EMU_SHAPES")
        .unwrap_or_else(|_| "4096x4096,1024x4096,14336x4096,4096x14336".into());
    for shape in shapes.split(',') {
        let (out, inf) = shape.split_once('x').expect("shape as OUTxIN");
        let (out, inf): (usize, usize) =
            (out.parse().expect("rows"), inf.parse().expect("columns"));
        let layout = DeltaLayout::new(out, inf, Bits::Two, 128, inf / 100).expect("layout");
        let mut case = Case::random(&mut rng, out, inf, Bits::Two, 128, 0, 32, RowMix::Random);
        case.experts = (0..16).map(|_| random_delta(&mut rng, layout)).collect();
        case.rows = (0..32u32).map(|b| Some(b % 16)).collect();
        let start = std::time::Instant::now();
        check_both(&case);
        eprintln!(
            "{out}x{inf}: both kernels, fused and delta-only, {:.1?}",
            start.elapsed()
        );
    }
}
