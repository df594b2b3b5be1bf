//! Properties of the reference: packing, quantizer, salient channels, GEMV.

use half::f16;
use meswitch_reference::gemv::BaseView;
use meswitch_reference::layout::{pack_row, unpack_row, words_per_row};
use meswitch_reference::quant::{fit_group, fit_min_max, GroupData};
use meswitch_reference::{
    compress_matrix, delta_gemv_accumulate, dequantize_f16, multi_expert_gemv,
    multi_expert_gemv_f32, Bits, CompressSettings, DeltaLayout, DeltaView, PackedDelta,
    SalientSpec,
};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn bits_strategy() -> impl Strategy<Value = Bits> {
    prop_oneof![Just(Bits::One), Just(Bits::Two), Just(Bits::Four)]
}

/// Group sizes including "one group per row" (usize::MAX resolves to `in`).
fn group_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![Just(32usize), Just(64), Just(128), Just(usize::MAX)]
}

/// A delta with fine-tune-like structure: small Gaussian-ish values, a few
/// outlier input channels. Never all zero.
fn random_delta(rng: &mut StdRng, out: usize, inp: usize) -> Vec<f32> {
    let outliers: Vec<usize> = (0..(inp / 50).max(1))
        .map(|_| rng.random_range(0..inp))
        .collect();
    let mut d: Vec<f32> = (0..out * inp)
        .map(|_| (rng.random::<f32>() - 0.5) * 0.02 + (rng.random::<f32>() - 0.5) * 0.005)
        .collect();
    for r in 0..out {
        for &c in &outliers {
            d[r * inp + c] *= 20.0;
        }
    }
    d
}

fn settings(bits: Bits, group: usize, salient: SalientSpec) -> CompressSettings {
    CompressSettings::new(bits, group, salient)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pack_unpack_round_trip(bits in bits_strategy(), n in 1usize..300, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let codes: Vec<u8> = (0..n).map(|_| rng.random_range(0..=bits.max_code()) as u8).collect();
        let mut words = vec![0u32; words_per_row(n, bits)];
        pack_row(&codes, bits, &mut words);
        prop_assert_eq!(unpack_row(&words, n, bits), codes);
        // Padding bits past the last column stay zero.
        prop_assert!(meswitch_reference::layout::row_padding_is_zero(&words, n, bits));
    }

    /// Inside a group's fitted range, every non-salient entry is within half a
    /// step of its reconstruction; salient columns equal Δ up to FP16 rounding
    /// of the stored residual.
    #[test]
    fn quantization_error_bounds(
        bits in bits_strategy(),
        group in group_strategy(),
        out in 1usize..12,
        inp in 1usize..300,
        salient_fraction in prop_oneof![Just(0.0), Just(1.0), 0.0f64..0.2],
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let delta = random_delta(&mut rng, out, inp);
        let packed = compress_matrix(&delta, out, inp, &settings(bits, group, SalientSpec::Fraction(salient_fraction)), None).unwrap();
        let view = packed.view();
        let l = *packed.layout();
        let approx = packed.dequantize();
        let salient: std::collections::BTreeSet<usize> = packed.salient_index().iter().map(|&j| j as usize).collect();
        prop_assert_eq!(salient.len(), l.salient);
        for r in 0..out {
            for c in 0..inp {
                let (d, a) = (delta[r * inp + c], approx[r * inp + c]);
                if salient.contains(&c) {
                    let k = packed.salient_index().iter().position(|&j| j as usize == c).unwrap();
                    let residual = packed.salient_values()[r * l.salient + k].to_f32();
                    // FP16 rounding of the residual (half ulp, 2^-11 relative; 2^-25
                    // absolute in the subnormal range) plus f32 rounding of the sum.
                    let tol = residual.abs() * 2f32.powi(-11) + 2f32.powi(-25) + d.abs() * 2f32.powi(-22);
                    prop_assert!((d - a).abs() <= tol, "salient ({r},{c}): {d} vs {a}");
                } else {
                    let p = view.group(r, c / l.group_size);
                    let (lo, step) = (p.offset.to_f32(), p.scale.to_f32());
                    let hi = lo + step * bits.max_code() as f32;
                    if d >= lo && d <= hi {
                        let tol = 0.5 * step * (1.0 + 1e-5) + (d.abs() + lo.abs()) * 2f32.powi(-22);
                        prop_assert!((d - a).abs() <= tol, "({r},{c}): {d} vs {a}, step {step}");
                    }
                }
            }
        }
    }

    /// The fitted quantizer never does worse than min/max round-to-nearest.
    #[test]
    fn fitted_step_beats_min_max(bits in bits_strategy(), n in 2usize..200, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f32> = random_delta(&mut rng, 1, n);
        let data = GroupData { values: &values, weights: None, include: None };
        let fitted = fit_group(&data, bits);
        let rtn = fit_min_max(&data, bits);
        prop_assert!(data.error(&fitted, bits) <= data.error(&rtn, bits) * (1.0 + 1e-9));
    }

    /// The target-bits spec picks the largest salient count whose stored size
    /// stays within the target.
    #[test]
    fn target_bits_is_largest_fitting_count(
        bits in bits_strategy(), out in 1usize..4096, inp in 32usize..4096, extra in 0.0f64..3.0,
    ) {
        let target = bits.count() as f64 + extra;
        let k = SalientSpec::TargetBits(target).resolve(out, inp, bits, 128.min(inp));
        let group = meswitch_reference::salient::group_size_for(128, inp);
        let bpw = |k| DeltaLayout::new(out, inp, bits, group, k).unwrap().bits_per_weight();
        if k > 0 {
            prop_assert!(bpw(k) <= target);
        }
        if k < inp && bpw(0) <= target {
            prop_assert!(bpw(k + 1) > target);
        }
    }
}

/// Naive f64 `y[b, r] = Σ_c x[b, c]·(W[r, c] + Δ̂_e[r, c])` from dense matrices.
fn naive(
    base: &[f16],
    dense: &[Vec<f32>],
    x: &[f32],
    rows: &[Option<u32>],
    out: usize,
    inp: usize,
) -> Vec<f64> {
    let mut y = vec![0f64; rows.len() * out];
    for (b, e) in rows.iter().enumerate() {
        for r in 0..out {
            let mut acc = 0f64;
            for c in 0..inp {
                let mut w = f64::from(base[r * inp + c].to_f32());
                if let Some(e) = e {
                    w += f64::from(dense[*e as usize][r * inp + c]);
                }
                acc += f64::from(x[b * inp + c]) * w;
            }
            y[b * out + r] = acc;
        }
    }
    y
}

/// f32 accumulation error bound for a dot product of length n: n·u·Σ|x||w|,
/// u = 2^-24, doubled for the separate base and delta sums.
fn dot_tolerance(
    x: &[f32],
    base: &[f16],
    dense: Option<&[f32]>,
    b: usize,
    r: usize,
    inp: usize,
) -> f64 {
    let mut mag = 0f64;
    for c in 0..inp {
        let w = f64::from(base[r * inp + c].to_f32()).abs()
            + dense.map_or(0.0, |d| f64::from(d[r * inp + c]).abs());
        mag += f64::from(x[b * inp + c]).abs() * w;
    }
    2.0 * inp as f64 * 2f64.powi(-24) * mag + 1e-30
}

struct Batch {
    out: usize,
    inp: usize,
    base: Vec<f16>,
    experts: Vec<PackedDelta>,
    dense: Vec<Vec<f32>>,
    x: Vec<f32>,
    rows: Vec<Option<u32>>,
}

fn batch(
    seed: u64,
    out: usize,
    inp: usize,
    n_experts: usize,
    rows: Vec<Option<u32>>,
    bits: Bits,
    k: usize,
) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let base: Vec<f16> = (0..out * inp)
        .map(|_| f16::from_f32((rng.random::<f32>() - 0.5) * 0.2))
        .collect();
    let experts: Vec<PackedDelta> = (0..n_experts)
        .map(|_| {
            let d = random_delta(&mut rng, out, inp);
            compress_matrix(
                &d,
                out,
                inp,
                &settings(bits, 64, SalientSpec::Count(k)),
                None,
            )
            .unwrap()
        })
        .collect();
    let dense = experts.iter().map(|e| e.dequantize()).collect();
    let x = (0..rows.len() * inp)
        .map(|_| f16::from_f32(rng.random::<f32>() * 2.0 - 1.0).to_f32())
        .collect();
    Batch {
        out,
        inp,
        base,
        experts,
        dense,
        x,
        rows,
    }
}

fn check_gemv(t: &Batch) {
    let views: Vec<DeltaView> = t.experts.iter().map(|e| e.view()).collect();
    let base = BaseView {
        out_features: t.out,
        in_features: t.inp,
        weights: &t.base,
    };
    let mut y = vec![f32::NAN; t.rows.len() * t.out];
    multi_expert_gemv_f32(&base, &views, &t.x, &t.rows, &mut y).unwrap();
    let want = naive(&t.base, &t.dense, &t.x, &t.rows, t.out, t.inp);
    let x16: Vec<f16> = t.x.iter().map(|&v| f16::from_f32(v)).collect();
    let mut y16 = vec![f16::NAN; t.rows.len() * t.out];
    multi_expert_gemv(&base, &views, &x16, &t.rows, &mut y16).unwrap();
    for (b, e) in t.rows.iter().enumerate() {
        for r in 0..t.out {
            let dense = e.map(|e| t.dense[e as usize].as_slice());
            let tol = dot_tolerance(&t.x, &t.base, dense, b, r, t.inp);
            let got = f64::from(y[b * t.out + r]);
            let w = want[b * t.out + r];
            assert!(
                (got - w).abs() <= tol,
                "row {b} out {r}: {got} vs {w} (tol {tol})"
            );
            // FP16 output: one more rounding, half an ulp (2^-11 relative).
            let got16 = f64::from(y16[b * t.out + r].to_f32());
            assert!(
                (got16 - w).abs() <= tol + w.abs() * 2f64.powi(-11) + 2f64.powi(-25),
                "f16 row {b} out {r}: {got16} vs {w}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn gemv_matches_naive_f64(
        out in 1usize..40, inp in 1usize..200, n_experts in 0usize..5, batch_rows in 1usize..10,
        bits in bits_strategy(), k in 0usize..6, seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let rows = (0..batch_rows)
            .map(|_| if n_experts == 0 || rng.random_bool(0.25) { None } else { Some(rng.random_range(0..n_experts as u32)) })
            .collect();
        check_gemv(&batch(seed, out, inp, n_experts, rows, bits, k.min(inp)));
    }
}

#[test]
fn gemv_every_row_a_different_expert() {
    let rows = (0..8).map(Some).collect();
    check_gemv(&batch(1, 33, 130, 8, rows, Bits::Two, 3));
}

#[test]
fn gemv_all_rows_one_expert() {
    check_gemv(&batch(2, 17, 97, 3, vec![Some(2); 6], Bits::Four, 1));
}

#[test]
fn gemv_rows_with_no_expert_equal_base_product() {
    let t = batch(3, 9, 64, 2, vec![None, Some(1), None], Bits::One, 0);
    check_gemv(&t);
    // And the no-expert rows are exactly the base-only product.
    let views: Vec<DeltaView> = t.experts.iter().map(|e| e.view()).collect();
    let base = BaseView {
        out_features: t.out,
        in_features: t.inp,
        weights: &t.base,
    };
    let mut with = vec![0f32; 3 * t.out];
    multi_expert_gemv_f32(&base, &views, &t.x, &t.rows, &mut with).unwrap();
    let mut without = vec![0f32; 3 * t.out];
    multi_expert_gemv_f32(&base, &[], &t.x, &[None, None, None], &mut without).unwrap();
    assert_eq!(with[..t.out], without[..t.out]);
    assert_ne!(with[t.out..2 * t.out], without[t.out..2 * t.out]);
}

#[test]
fn delta_only_and_dequantize_agree_with_full_gemv() {
    let t = batch(4, 21, 100, 2, vec![Some(0), None, Some(1)], Bits::Two, 2);
    let views: Vec<DeltaView> = t.experts.iter().map(|e| e.view()).collect();
    let base = BaseView {
        out_features: t.out,
        in_features: t.inp,
        weights: &t.base,
    };
    let x16: Vec<f16> = t.x.iter().map(|&v| f16::from_f32(v)).collect();
    // Base part through a plain GEMV, then the delta added.
    let mut y = vec![f16::ZERO; 3 * t.out];
    multi_expert_gemv(&base, &[], &x16, &[None, None, None], &mut y).unwrap();
    let before = y.clone();
    delta_gemv_accumulate(t.out, t.inp, &views, &x16, &t.rows, &mut y).unwrap();
    assert_eq!(
        y[t.out..2 * t.out],
        before[t.out..2 * t.out],
        "row without expert untouched"
    );
    let want = naive(&t.base, &t.dense, &t.x, &t.rows, t.out, t.inp);
    for (i, (g, w)) in y.iter().zip(&want).enumerate() {
        // Two FP16 roundings (base product, then sum) plus accumulation error.
        let tol = w.abs() * 2f64.powi(-10) + 1e-3;
        assert!((f64::from(g.to_f32()) - w).abs() <= tol, "{i}: {g} vs {w}");
    }
    // W_base + Δ̂ in FP16 equals base + dequantized delta, rounded once.
    let mut full = vec![f16::ZERO; t.out * t.inp];
    dequantize_f16(&views[1], Some(&base), &mut full).unwrap();
    for (i, v) in full.iter().enumerate() {
        assert_eq!(*v, f16::from_f32(t.base[i].to_f32() + t.dense[1][i]));
    }
}

#[test]
fn gemv_rejects_bad_shapes_and_unknown_experts() {
    let t = batch(5, 4, 8, 1, vec![Some(0)], Bits::Two, 0);
    let views: Vec<DeltaView> = t.experts.iter().map(|e| e.view()).collect();
    let base = BaseView {
        out_features: 4,
        in_features: 8,
        weights: &t.base,
    };
    let mut y = vec![0f32; 4];
    assert!(multi_expert_gemv_f32(&base, &views, &t.x, &[Some(1)], &mut y).is_err());
    assert!(multi_expert_gemv_f32(&base, &views, &t.x[..7], &[Some(0)], &mut y).is_err());
    assert!(multi_expert_gemv_f32(&base, &views, &t.x, &[Some(0)], &mut y[..3]).is_err());
    let wrong = BaseView {
        out_features: 8,
        in_features: 4,
        weights: &t.base,
    };
    assert!(multi_expert_gemv_f32(&wrong, &views, &t.x[..4], &[Some(0)], &mut [0f32; 8]).is_err());
}

#[test]
fn packed_delta_rejects_broken_invariants() {
    let l = DeltaLayout::new(2, 40, Bits::Two, 32, 2).unwrap();
    let ok = || {
        (
            vec![0u32; l.code_words()],
            vec![f16::ONE; 4],
            vec![f16::ZERO; 4],
            vec![1u32, 7],
            vec![f16::ZERO; 4],
        )
    };
    let (c, s, o, i, v) = ok();
    assert!(PackedDelta::new(l, c, s, o, i, v).is_ok());
    let (mut c, s, o, i, v) = ok();
    c[2] = 1 << 30; // padding bits of row 0's last word (40 cols · 2 bits = 80 bits → 16 used in word 2)
    assert!(PackedDelta::new(l, c, s, o, i, v).is_err());
    let (c, s, o, _, v) = ok();
    assert!(
        PackedDelta::new(l, c, s, o, vec![7, 1], v).is_err(),
        "unsorted indices"
    );
    let (c, s, o, _, v) = ok();
    assert!(
        PackedDelta::new(l, c, s, o, vec![1, 40], v).is_err(),
        "index out of range"
    );
    let (c, mut s, o, i, v) = ok();
    s[0] = f16::NAN;
    assert!(PackedDelta::new(l, c, s, o, i, v).is_err());
    let (c, s, o, i, _) = ok();
    assert!(PackedDelta::new(l, c, s, o, i, vec![f16::ZERO; 3]).is_err());
    assert!(DeltaLayout::new(2, 40, Bits::Two, 48, 0).is_err());
    assert!(DeltaLayout::new(0, 40, Bits::Two, 32, 0).is_err());
    assert!(DeltaLayout::new(2, 40, Bits::Two, 32, 41).is_err());
    assert!(Bits::from_count(3).is_err());
}
