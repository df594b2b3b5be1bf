//! The CUDA kernels against the CPU reference (the oracle), on random shapes
//! and values. Without a device every GPU test prints "skipped: no CUDA
//! device" and passes; with `MESWITCH_REQUIRE_GPU=1` a missing device fails
//! the run instead, so a GPU session cannot silently test nothing.
//!
//! # Tolerance
//!
//! Kernel and reference see the same FP16 inputs and both accumulate in f32,
//! but they may legitimately differ in three ways:
//!
//! 1. Weight formation. The reference forms each Δ̂ entry in f32
//!    (`offset + scale·q`, plus the salient residual). A kernel feeding
//!    tensor cores forms it in FP16 (half2 fma, then adding the salient
//!    residual or the base weight), at most `WEIGHT_ROUNDINGS` roundings, each
//!    off by at most u₁₆ = 2⁻¹¹ of a value bounded by
//!    `a = |W| + |offset| + |scale|·q + |s|`.
//! 2. Summation order. An f32 sum of `n` products is within n·u₃₂·Σ|xᵢ·aᵢ|
//!    of the exact sum (u₃₂ = 2⁻²⁴, the standard γₙ bound). Tensor-core mma
//!    accumulation truncates instead of rounding (Fasi et al., "Numerical
//!    behavior of NVIDIA tensor cores", 2021), doubling the kernel's side to
//!    2·n·u₃₂; with the reference's n·u₃₂ and a factor for margin the test
//!    allows `SUM_ORDER`·n·u₃₂·Σ|xᵢ·aᵢ|.
//! 3. Output rounding. Both round the f32 sum to FP16 once; two values within
//!    the bounds above can round to neighbours, one FP16 ulp ≤ 2·u₁₆·|y| apart.
//!
//! So per output element
//! `tol = Σᵢ |xᵢ|·aᵢ · (WEIGHT_ROUNDINGS·u₁₆ + SUM_ORDER·n·u₃₂) + 2·u₁₆·|y_ref| + FP16_TINY`,
//! with `FP16_TINY` the smallest FP16 subnormal (an ulp near zero). The test
//! data keeps Δ̂ the same size as the base (not the ~1% of real deltas), so a
//! wrong code, group, salient column or expert moves the output by far more
//! than this bound and fails.
//!
//! # Kernel families
//!
//! Every GEMV check runs once per [`GemvKernel`]: the 128-column kernel
//! (verified on an H100) and the wide one (unverified on a GPU until this
//! file passes on one). Both form each weight with the same FP16 roundings,
//! so one tolerance serves both; the wide kernel falls back to the
//! 128-column one for widths that are not whole wide items (256 columns at
//! INT2, 512 at INT1), which the random widths also draw.

mod gpu_support;

use gpu_support::*;
use meswitch::ops::GemvKernel;

#[test]
fn skip_policy_without_a_device() {
    assert_eq!(skip_or_fail(Ok(3), false), Some(3));
    assert_eq!(skip_or_fail::<u8>(Err("none".into()), false), None);
    let required = std::panic::catch_unwind(|| skip_or_fail::<u8>(Err("none".into()), true));
    assert!(
        required.is_err(),
        "a required GPU that is missing must fail the test"
    );
}

#[test]
fn missing_device_is_an_error_not_a_panic() {
    // No machine has this many devices: NoDevice everywhere, GPU or not.
    let err = Gpu::new(1 << 20).unwrap_err();
    assert!(err.is_no_device(), "expected NoDevice, got: {err}");
    // Detection either finds a device or says why not; it never panics.
    if let Err(err) = Gpu::detect() {
        assert!(
            err.is_no_device() || !gpu_required(),
            "unexpected detection failure: {err}"
        );
    }
}

#[test]
fn backend_falls_back_to_the_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    let case = Case::random(&mut rng, 37, 96, Bits::Two, 32, 3, 5, RowMix::Random);
    let (backend, reason) = Backend::detect();
    if !backend.is_cuda() {
        assert!(reason.is_some(), "a fallback must say why there is no GPU");
    }
    let mut y = vec![POISON; case.batch() * case.out_features];
    backend
        .multi_expert_gemv(&case.base(), &case.views(), &case.x, &case.rows, &mut y)
        .unwrap();
    let mut expected = vec![f16::ZERO; y.len()];
    reference::multi_expert_gemv(
        &case.base(),
        &case.views(),
        &case.x,
        &case.rows,
        &mut expected,
    )
    .unwrap();
    if backend.is_cuda() {
        case.assert_close(&y, None, "Backend::detect (CUDA)");
    } else {
        assert_eq!(y, expected, "the fallback must be the reference itself");
    }
    // Bad shapes are errors on either backend.
    let mut short = vec![f16::ZERO; 3];
    assert!(backend
        .multi_expert_gemv(&case.base(), &case.views(), &case.x, &case.rows, &mut short)
        .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: proptest_cases(), ..ProptestConfig::default() })]

    #[test]
    fn fused_multi_expert_gemv_matches_reference(
        (out_features, in_features, group) in shape(),
        bits in bits(),
        n_experts in 0usize..=MAX_TEST_EXPERTS,
        batch in 1usize..=MAX_TEST_BATCH,
        mix in row_mix(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let case = Case::random(&mut rng, out_features, in_features, bits, group, n_experts, batch, mix);
        let (base, experts) = upload_case(gpu, &case);
        let table = DeviceExperts::new(gpu, &experts.iter().collect::<Vec<_>>()).unwrap();
        let rows = DeviceRows::upload(gpu, &case.rows, experts.len()).unwrap();
        let x = ops::upload(gpu, &case.x).unwrap();
        for kernel in GemvKernel::ALL {
            let mut y = ops::upload(gpu, &vec![POISON; batch * out_features]).unwrap();
            ops::multi_expert_gemv_device_with(gpu, kernel, &base, &table, &x, &rows, &mut y).unwrap();
            case.assert_close(&download(gpu, &y), None, &format!("multi_expert_gemv ({})", kernel.name()));
        }
    }

    #[test]
    fn wide_kernel_on_whole_wide_items_matches_reference(
        out_features in prop_oneof![1usize..=64, Just(333usize)],
        items in 1usize..=10,
        group in prop::sample::select(vec![32usize, 64, 128, usize::MAX]),
        bits in bits(),
        n_experts in 0usize..=MAX_TEST_EXPERTS,
        batch in 1usize..=MAX_TEST_BATCH,
        mix in row_mix(),
        seed in any::<u64>(),
    ) {
        // Widths the wide items cover exactly (no fallback), with few items
        // per row (fewer than the 8 warps: the kernel's item walk carries
        // across experts) as well as many.
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let in_features = items * GemvKernel::Wide.item_columns(bits);
        let mut rng = StdRng::seed_from_u64(seed);
        let case = Case::random(&mut rng, out_features, in_features, bits, group, n_experts, batch, mix);
        let mut y = vec![POISON; batch * out_features];
        ops::multi_expert_gemv_with(gpu, GemvKernel::Wide, &case.base(), &case.views(), &case.x, &case.rows, &mut y).unwrap();
        case.assert_close(&y, None, "multi_expert_gemv (wide, whole items)");
        let initial: Vec<f16> = (0..y.len()).map(|_| value(&mut rng, 0.01, 4.0)).collect();
        let mut y = initial.clone();
        ops::delta_gemv_accumulate_with(gpu, GemvKernel::Wide, out_features, in_features, &case.views(), &case.x, &case.rows, &mut y).unwrap();
        case.assert_close(&y, Some(&initial), "delta_gemv_accumulate (wide, whole items)");
    }

    #[test]
    fn host_slice_api_matches_reference(
        (out_features, in_features, group) in shape(),
        bits in bits(),
        n_experts in 0usize..=4,
        batch in 1usize..=3 * MAX_TEST_BATCH,
        seed in any::<u64>(),
    ) {
        // Also covers batches past one launch's maximum: base from cuBLAS +
        // delta-only kernel (or split fused launches without cuBLAS).
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let case = Case::random(&mut rng, out_features, in_features, bits, group, n_experts, batch, RowMix::Random);
        fused_matches_with_every_kernel(gpu, &case, "multi_expert_gemv (host slices)");
    }

    #[test]
    fn delta_only_accumulate_matches_reference(
        (out_features, in_features, group) in shape(),
        bits in bits(),
        n_experts in 0usize..=MAX_TEST_EXPERTS,
        batch in 1usize..=MAX_TEST_BATCH,
        mix in row_mix(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let case = Case::random(&mut rng, out_features, in_features, bits, group, n_experts, batch, mix);
        // The existing output is random, not zero, so a kernel that
        // overwrites instead of adding fails.
        let initial: Vec<f16> = (0..batch * out_features).map(|_| value(&mut rng, 0.01, 4.0)).collect();
        let (_, experts) = upload_case(gpu, &case);
        let table = DeviceExperts::new(gpu, &experts.iter().collect::<Vec<_>>()).unwrap();
        let rows = DeviceRows::upload(gpu, &case.rows, experts.len()).unwrap();
        let x = ops::upload(gpu, &case.x).unwrap();
        for kernel in GemvKernel::ALL {
            let mut y = ops::upload(gpu, &initial).unwrap();
            ops::delta_gemv_accumulate_device_with(gpu, kernel, out_features, in_features, &table, &x, &rows, &mut y).unwrap();
            case.assert_close(&download(gpu, &y), Some(&initial), &format!("delta_gemv_accumulate ({})", kernel.name()));
        }
    }

    #[test]
    fn dequantize_matches_reference(
        (out_features, in_features, group) in shape(),
        bits in bits(),
        with_base in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu_or_skip() else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let case = Case::random(&mut rng, out_features, in_features, bits, group, 1, 1, RowMix::Random);
        let (base, experts) = upload_case(gpu, &case);
        let mut out = ops::upload(gpu, &vec![POISON; out_features * in_features]).unwrap();
        ops::dequantize_device(gpu, &experts[0], with_base.then_some(&base), &mut out).unwrap();
        assert_dequantize_exact(&case, with_base, &download(gpu, &out));
    }
}

/// Exactly the edge cases the issue names, once each, with fixed seeds (the
/// proptests reach them only by chance).
#[test]
fn named_edge_cases() {
    let Some(gpu) = gpu_or_skip() else { return };
    let cases = [
        // (out, in, bits, group, experts, batch, mix)
        (1, 128, Bits::One, 32, 1, 1, RowMix::AllOneExpert),
        (4096, 4096, Bits::Two, 128, 1, 1, RowMix::AllOneExpert),
        (333, 4224, Bits::Four, 64, 16, 64, RowMix::EveryRowDifferent),
        (257, 384, Bits::One, usize::MAX, 16, 64, RowMix::NoExpert),
        (65, 640, Bits::Two, 32, 0, 7, RowMix::Random),
        (1024, 4096, Bits::Four, 128, 16, 16, RowMix::Random),
        (
            14336 / 16,
            4096,
            Bits::One,
            128,
            4,
            32,
            RowMix::EveryRowDifferent,
        ),
        // Whole wide items with fewer items per row than warps (3 at INT1,
        // 1 at INT1 with a whole-row group; 9 at INT2), so the wide kernel's
        // item walk carries across experts.
        (45, 1536, Bits::One, 64, 5, 40, RowMix::Random),
        (
            17,
            512,
            Bits::One,
            usize::MAX,
            16,
            64,
            RowMix::EveryRowDifferent,
        ),
        (130, 2304, Bits::Two, 32, 3, 9, RowMix::AllOneExpert),
        // Not multiples of the K chunk: the cuBLAS fallback (576 = SmolLM2's hidden size).
        (17, 576, Bits::Two, 64, 3, 5, RowMix::Random),
        (9, 1, Bits::One, 32, 1, 1, RowMix::AllOneExpert),
    ];
    for (i, &(o, n, bits, g, e, b, mix)) in cases.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(1000 + i as u64);
        let case = Case::random(&mut rng, o, n, bits, g, e, b, mix);
        fused_matches_with_every_kernel(gpu, &case, &format!("edge case {i}"));
    }
}

/// Wrong shapes are typed errors before anything is launched.
#[test]
fn bad_shapes_are_errors() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(5);
    let case = Case::random(&mut rng, 8, 64, Bits::Four, 32, 2, 2, RowMix::Random);
    let mut y = vec![f16::ZERO; 2 * 8];
    let bad_rows = [Some(0), Some(7)];
    assert!(
        ops::multi_expert_gemv(gpu, &case.base(), &case.views(), &case.x, &bad_rows, &mut y)
            .is_err()
    );
    let mut short = vec![f16::ZERO; 5];
    assert!(ops::multi_expert_gemv(
        gpu,
        &case.base(),
        &case.views(),
        &case.x,
        &case.rows,
        &mut short
    )
    .is_err());
    assert!(ops::multi_expert_gemv(
        gpu,
        &case.base(),
        &case.views(),
        &case.x[1..],
        &case.rows,
        &mut y
    )
    .is_err());
}

/// Experts of different bit widths and group sizes in one batch: the ops
/// split the work into one pass per kernel variant and must still match.
#[test]
fn mixed_variants_in_one_batch() {
    let Some(gpu) = gpu_or_skip() else { return };
    for (seed, in_features) in [(21u64, 512usize), (22, 576)] {
        let mut rng = StdRng::seed_from_u64(seed);
        let out_features = 45;
        let mut case = Case::random(
            &mut rng,
            out_features,
            in_features,
            Bits::Two,
            128,
            6,
            40,
            RowMix::Random,
        );
        let variants = [
            (Bits::Four, 32),
            (Bits::One, usize::MAX),
            (Bits::Two, 64),
            (Bits::Four, 128),
        ];
        for (e, &(bits, group)) in variants.iter().enumerate() {
            let group = group.min(in_features);
            let layout = DeltaLayout::new(out_features, in_features, bits, group, 3).unwrap();
            case.experts[e + 1] = random_delta(&mut rng, layout);
        }
        let initial: Vec<f16> = (0..case.batch() * out_features)
            .map(|_| value(&mut rng, 0.01, 4.0))
            .collect();
        fused_matches_with_every_kernel(gpu, &case, "mixed variants (fused)");
        for kernel in GemvKernel::ALL {
            let mut y = initial.clone();
            ops::delta_gemv_accumulate_with(
                gpu,
                kernel,
                out_features,
                in_features,
                &case.views(),
                &case.x,
                &case.rows,
                &mut y,
            )
            .unwrap();
            case.assert_close(
                &y,
                Some(&initial),
                &format!("mixed variants (delta only, {})", kernel.name()),
            );
        }
    }
}

/// Cached expert tables (`DeviceExperts::new_cached`): the same experts
/// reuse one table, other sets or other layouts get their own, a full cache
/// starts over, and every cached table computes what a fresh one does
/// (mixed variants, so the per-variant grouping is part of what is cached).
#[test]
fn cached_expert_tables_match_fresh_ones() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(31);
    let (out_features, in_features) = (40, 256);
    let mut case = Case::random(
        &mut rng,
        out_features,
        in_features,
        Bits::Two,
        64,
        4,
        24,
        RowMix::Random,
    );
    let layout = DeltaLayout::new(out_features, in_features, Bits::Four, 128, 5).unwrap();
    case.experts[2] = random_delta(&mut rng, layout);
    let (base, experts) = upload_case(gpu, &case);
    let all: Vec<_> = experts.iter().collect();
    let x = ops::upload(gpu, &case.x).unwrap();
    let run = |table: &DeviceExperts| {
        let rows = DeviceRows::upload(gpu, &case.rows, table.len()).unwrap();
        let mut y = ops::upload(gpu, &vec![POISON; case.batch() * out_features]).unwrap();
        ops::multi_expert_gemv_device(gpu, &base, table, &x, &rows, &mut y).unwrap();
        download(gpu, &y)
    };
    let fresh = run(&DeviceExperts::new(gpu, &all).unwrap());
    case.assert_close(&fresh, None, "fresh table");

    let mut cache = ExpertTableCache::new(2);
    for round in 0..3 {
        let cached = DeviceExperts::new_cached(gpu, &all, &mut cache).unwrap();
        assert_eq!(cache.len(), 1, "round {round}: one set, one table");
        assert_eq!(run(&cached), fresh, "round {round}: cached table differs");
    }
    // The same experts in another order are another table (row ids differ).
    let reversed: Vec<_> = experts.iter().rev().collect();
    DeviceExperts::new_cached(gpu, &reversed, &mut cache).unwrap();
    assert_eq!(cache.len(), 2);
    // Full: a third set starts the cache over, and still computes right.
    let first_two = &all[..2];
    let t = DeviceExperts::new_cached(gpu, first_two, &mut cache).unwrap();
    assert_eq!(cache.len(), 1);
    assert_eq!(t.len(), 2);
    let again = DeviceExperts::new_cached(gpu, &all, &mut cache).unwrap();
    assert_eq!(run(&again), fresh, "rebuilt after the cache started over");
}

/// What a kernel is allowed to do, emulated on the CPU: form each weight in
/// FP16 (`W_base + Δ̂` rounded once), then sum in f32 in a different order
/// (backwards). Used to check the tolerance is wide enough for legitimate
/// kernels.
fn emulated_kernel(case: &Case) -> Vec<f16> {
    let (o, n) = (case.out_features, case.in_features);
    let dense: Vec<Vec<f16>> = case
        .experts
        .iter()
        .map(|d| {
            let mut w = vec![f16::ZERO; o * n];
            reference::dequantize_f16(&d.view(), Some(&case.base()), &mut w).unwrap();
            w
        })
        .collect();
    let mut y = vec![f16::ZERO; case.batch() * o];
    for (b, e) in case.rows.iter().enumerate() {
        let w = e.map_or(&case.base, |e| &dense[e as usize]);
        for r in 0..o {
            let acc: f32 = (0..n)
                .rev()
                .map(|c| case.x[b * n + c].to_f32() * w[r * n + c].to_f32())
                .sum();
            y[b * o + r] = f16::from_f32(acc);
        }
    }
    y
}

fn rejects(case: &Case, y: &[f16]) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        case.assert_close(y, None, "probe")
    }))
    .is_err()
}

/// The comparison itself, checked without a GPU: it accepts the reference
/// and a legitimately different (FP16-weight, reordered) kernel, and rejects
/// the bugs it exists to catch: a wrong expert, a wrong code, an unwritten
/// (poisoned) element.
#[test]
fn tolerance_accepts_legitimate_kernels_and_rejects_bugs() {
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let bits = Bits::ALL[seed as usize % 3];
        let case = Case::random(&mut rng, 23, 256, bits, 64, 3, 9, RowMix::EveryRowDifferent);
        let mut exact = vec![f16::ZERO; case.batch() * case.out_features];
        reference::multi_expert_gemv(&case.base(), &case.views(), &case.x, &case.rows, &mut exact)
            .unwrap();
        assert!(
            !rejects(&case, &exact),
            "seed {seed}: the reference itself must pass"
        );
        assert!(
            !rejects(&case, &emulated_kernel(&case)),
            "seed {seed}: FP16 weights + reordered sums must pass"
        );

        // Every row served by the next expert instead of its own.
        let mut wrong = Case {
            rows: case.rows.iter().map(|e| e.map(|e| (e + 1) % 3)).collect(),
            ..case_clone(&case)
        };
        let mut y = vec![f16::ZERO; exact.len()];
        reference::multi_expert_gemv(&wrong.base(), &wrong.views(), &wrong.x, &wrong.rows, &mut y)
            .unwrap();
        assert!(rejects(&case, &y), "seed {seed}: a wrong expert must fail");

        // The top bit of every code in row 0 of expert 0 flipped: an
        // unpacking mask or shift bug confined to one output row. (A single
        // wrong code is below the worst-case rounding bound; a kernel bug
        // never is that selective.)
        wrong.rows = case.rows.clone();
        let d = &case.experts[0];
        let top_bits = match bits {
            Bits::One => u32::MAX,
            Bits::Two => 0xAAAA_AAAA,
            Bits::Four => 0x8888_8888,
        };
        let mut codes = d.codes().to_vec();
        for w in &mut codes[..d.layout().words_per_row()] {
            *w ^= top_bits;
        }
        wrong.experts[0] = PackedDelta::new(
            *d.layout(),
            codes,
            d.scales().to_vec(),
            d.offsets().to_vec(),
            d.salient_index().to_vec(),
            d.salient_values().to_vec(),
        )
        .unwrap();
        reference::multi_expert_gemv(&wrong.base(), &wrong.views(), &wrong.x, &wrong.rows, &mut y)
            .unwrap();
        assert!(
            rejects(&case, &y),
            "seed {seed}: a code unpacking bug in one row must fail"
        );

        let mut poisoned = exact.clone();
        poisoned[seed as usize % exact.len()] = POISON;
        assert!(
            rejects(&case, &poisoned),
            "seed {seed}: an unwritten element must fail"
        );
    }
}

fn case_clone(case: &Case) -> Case {
    Case {
        out_features: case.out_features,
        in_features: case.in_features,
        base: case.base.clone(),
        experts: case.experts.clone(),
        x: case.x.clone(),
        rows: case.rows.clone(),
    }
}

/// The heaviest proptest case's CPU side (generation, reference, bound),
/// so a GPU session's time can be planned; also exercises the harness on
/// the largest shapes without a device.
#[test]
fn harness_on_the_largest_case() {
    let mut rng = StdRng::seed_from_u64(77);
    let case = Case::random(
        &mut rng,
        333,
        4096,
        Bits::Four,
        32,
        MAX_TEST_EXPERTS,
        MAX_TEST_BATCH,
        RowMix::EveryRowDifferent,
    );
    let mut y = vec![f16::ZERO; case.batch() * case.out_features];
    reference::multi_expert_gemv(&case.base(), &case.views(), &case.x, &case.rows, &mut y).unwrap();
    case.assert_close(&y, None, "reference vs itself");
    assert!(rejects(&case, &{
        let mut bad = y.clone();
        bad[case.out_features * 5 + 7] = POISON;
        bad
    }));
}

/// Batches past one launch's maximum without cuBLAS: one fused launch per
/// `MESWITCH_MAX_BATCH` rows (with cuBLAS the proptest above takes the
/// cuBLAS + delta-kernel path instead).
#[test]
fn large_batch_without_cublas_splits_fused_launches() {
    if gpu_or_skip().is_none() {
        return;
    }
    let gpu = Gpu::detect()
        .expect("a second handle on the device")
        .without_blas();
    let mut rng = StdRng::seed_from_u64(31);
    let case = Case::random(
        &mut rng,
        70,
        384,
        Bits::Two,
        64,
        5,
        3 * MAX_TEST_BATCH + 5,
        RowMix::Random,
    );
    fused_matches_with_every_kernel(&gpu, &case, "batch > MAX_BATCH, no cuBLAS");
}

/// The host-slice fused product of `case` with every kernel variant, each
/// checked against the reference.
fn fused_matches_with_every_kernel(gpu: &Gpu, case: &Case, what: &str) {
    for kernel in GemvKernel::ALL {
        let mut y = vec![POISON; case.batch() * case.out_features];
        ops::multi_expert_gemv_with(
            gpu,
            kernel,
            &case.base(),
            &case.views(),
            &case.x,
            &case.rows,
            &mut y,
        )
        .unwrap();
        case.assert_close(&y, None, &format!("{what} ({})", kernel.name()));
    }
}
