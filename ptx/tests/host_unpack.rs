//! The kernels' shared helpers (kernels/delta_unpack.cuh), built as host C++
//! by build.rs, against meswitch-reference: the no-GPU check of the kernels'
//! arithmetic. `meswitch_host_gemv` also emulates the GEMV's lane geometry and
//! mma fragment assembly (see host/unpack_host.cpp for what it cannot check).

use half::f16;
use meswitch_ptx::abi::{MeswitchExpertDelta, MeswitchGemvParams, MESWITCH_NO_EXPERT};
use meswitch_reference::layout::{unpack_code, words_per_row, Bits, DeltaLayout};
use meswitch_reference::{multi_expert_gemv_f32, BaseView, DeltaView};
use proptest::prelude::*;

extern "C" {
    fn meswitch_host_unpack_code(row_words: *const u32, col: u32, bits: u32) -> u32;
    fn meswitch_host_words_per_row(in_features: u32, bits: u32) -> u32;
    fn meswitch_host_octet_spread(lane_words: *const u32, q: u32, bits: u32) -> u32;
    fn meswitch_host_octet_pair(spread: u32, j: u32, bits: u32, out: *mut u32);
    fn meswitch_host_pair_x_octet(x: *const u32, out: *mut u32);
    fn meswitch_host_prmt(a: u32, b: u32, sel: u32) -> u32;
    fn meswitch_host_float_to_half(f: f32) -> u16;
    fn meswitch_host_dequantize_row(
        d: *const MeswitchExpertDelta,
        r: u32,
        in_features: u32,
        bits: u32,
        group_size: u32,
        out: *mut f32,
    );
    fn meswitch_host_gemv_variant(
        p: *const MeswitchGemvParams,
        bits: u32,
        group: u32,
        with_base: i32,
        wide: i32,
    ) -> i32;
}

fn bits_strategy() -> impl Strategy<Value = Bits> {
    prop::sample::select(Bits::ALL.to_vec())
}

/// Random delta arrays for a layout, padding bits zero, scales > 0.
struct Arrays {
    codes: Vec<u32>,
    scales: Vec<f16>,
    offsets: Vec<f16>,
    salient_index: Vec<u32>,
    salient_values: Vec<f16>,
}

fn random_arrays(layout: &DeltaLayout, seed: u64) -> Arrays {
    // Small LCG: proptest supplies the seed, so failures still shrink/replay.
    let mut s = seed | 1;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let wpr = layout.words_per_row();
    let mut codes = vec![0u32; layout.code_words()];
    for r in 0..layout.out_features {
        for c in 0..layout.in_features {
            let (w, shift) = meswitch_reference::layout::code_position(c, layout.bits);
            codes[r * wpr + w] |= (next() & layout.bits.max_code()) << shift;
        }
    }
    let unit = |v: u32| (v % 2001) as f32 / 1000.0 - 1.0;
    let scales = (0..layout.group_params())
        .map(|_| f16::from_f32(0.001 + 0.05 * (unit(next()) + 1.0)))
        .collect();
    let offsets = (0..layout.group_params())
        .map(|_| f16::from_f32(0.2 * unit(next())))
        .collect();
    let mut salient_index: Vec<u32> = (0..layout.in_features as u32)
        .filter(|_| next() % 7 == 0)
        .collect();
    salient_index.truncate(layout.salient);
    let salient_values = (0..layout.out_features * salient_index.len())
        .map(|_| f16::from_f32(0.5 * unit(next())))
        .collect();
    Arrays {
        codes,
        scales,
        offsets,
        salient_index,
        salient_values,
    }
}

impl Arrays {
    fn view(&self, layout: DeltaLayout) -> DeltaView<'_> {
        let layout = DeltaLayout {
            salient: self.salient_index.len(),
            ..layout
        };
        DeltaView {
            layout,
            codes: &self.codes,
            scales: &self.scales,
            offsets: &self.offsets,
            salient_index: &self.salient_index,
            salient_values: &self.salient_values,
        }
    }

    /// The ABI descriptor with host addresses (the host shim dereferences them).
    fn abi(&self) -> MeswitchExpertDelta {
        MeswitchExpertDelta {
            codes: self.codes.as_ptr() as u64,
            scales: self.scales.as_ptr() as u64,
            offsets: self.offsets.as_ptr() as u64,
            salient_index: self.salient_index.as_ptr() as u64,
            salient_values: self.salient_values.as_ptr() as u64,
            n_salient: self.salient_index.len() as u32,
            reserved: 0,
        }
    }
}

proptest! {
    #[test]
    fn unpack_code_matches_reference(bits in bits_strategy(), in_features in 1usize..300,
                                     words in prop::collection::vec(any::<u32>(), 10), col_frac in 0.0f64..1.0) {
        let wpr = words_per_row(in_features, bits);
        prop_assert_eq!(unsafe { meswitch_host_words_per_row(in_features as u32, bits.count()) } as usize, wpr);
        let row: Vec<u32> = words.iter().cycle().take(wpr).copied().collect();
        let col = ((in_features as f64 * col_frac) as usize).min(in_features - 1);
        let host = unsafe { meswitch_host_unpack_code(row.as_ptr(), col as u32, bits.count()) };
        prop_assert_eq!(host, unpack_code(&row, col, bits));
    }

    /// Octet q of a lane's words holds columns 8q..8q+7, and the shift-free
    /// conversion yields (1024 + 2^p·c_j, 1024 + 2^p·c_{j+4}) (exhaustive
    /// exactness: tests/code_conversion.rs).
    #[test]
    fn octet_conversion_matches_reference(bits in bits_strategy(), words in prop::collection::vec(any::<u32>(), 4), q in 0u32..4) {
        let lane_words: Vec<u32> = words[..bits.count() as usize].to_vec();
        let spread = unsafe { meswitch_host_octet_spread(lane_words.as_ptr(), q, bits.count()) };
        for j in 0..4u32 {
            let mut out = [0u32; 4];
            unsafe { meswitch_host_octet_pair(spread, j, bits.count(), out.as_mut_ptr()) };
            let (pair, scale) = (out[0], (1u32 << out[1]) as f32);
            let cj = unpack_code(&lane_words, (8 * q + j) as usize, bits);
            let cj4 = unpack_code(&lane_words, (8 * q + j + 4) as usize, bits);
            let lo = f16::from_bits((pair & 0xFFFF) as u16).to_f32();
            let hi = f16::from_bits((pair >> 16) as u16).to_f32();
            prop_assert_eq!(lo, 1024.0 + scale * cj as f32, "pair {} low", j);
            prop_assert_eq!(hi, 1024.0 + scale * cj4 as f32, "pair {} high", j);
        }
    }

    #[test]
    fn x_pairing_matches_code_pairing(x in prop::collection::vec(any::<u16>(), 8)) {
        let packed: Vec<u32> = x.chunks(2).map(|p| p[0] as u32 | (p[1] as u32) << 16).collect();
        let mut out = [0u32; 4];
        unsafe { meswitch_host_pair_x_octet(packed.as_ptr(), out.as_mut_ptr()) };
        for j in 0..4 {
            prop_assert_eq!(out[j], x[j] as u32 | (x[j + 4] as u32) << 16);
        }
    }

    #[test]
    fn prmt_twin_selects_bytes(a in any::<u32>(), b in any::<u32>(), sel in any::<u32>()) {
        let bytes: Vec<u8> = a.to_le_bytes().into_iter().chain(b.to_le_bytes()).collect();
        let expect = (0..4).fold(0u32, |d, i| d | (bytes[((sel >> (4 * i)) & 7) as usize] as u32) << (8 * i));
        prop_assert_eq!(unsafe { meswitch_host_prmt(a, b, sel) }, expect);
    }

    #[test]
    fn float_to_half_matches_half_crate(v in any::<f32>()) {
        let host = unsafe { meswitch_host_float_to_half(v) };
        let want = f16::from_f32(v);
        if want.is_nan() { prop_assert!(f16::from_bits(host).is_nan()); } else { prop_assert_eq!(host, want.to_bits()); }
    }

    /// The dequantize kernel's per-element arithmetic is bit-identical to the
    /// reference's dequantize_row.
    #[test]
    fn dequantize_row_bit_exact(bits in bits_strategy(), out in 1usize..6, in_features in 1usize..400,
                                g in 0usize..4, salient in 0usize..20, seed in any::<u64>()) {
        let group = [32, 64, 128, in_features][g];
        let layout = DeltaLayout::new(out, in_features, bits, group, salient.min(in_features)).unwrap();
        let arrays = random_arrays(&layout, seed);
        let view = arrays.view(layout);
        let abi = arrays.abi();
        for r in 0..out {
            let mut want = vec![0f32; in_features];
            view.dequantize_row(r, &mut want);
            let mut host = vec![0f32; in_features];
            unsafe { meswitch_host_dequantize_row(&abi, r as u32, in_features as u32, bits.count(), group as u32, host.as_mut_ptr()) };
            for c in 0..in_features {
                prop_assert_eq!(host[c].to_bits(), want[c].to_bits(), "row {} col {}", r, c);
            }
        }
    }
}

/// Runs the host emulation of the GEMV kernel and the reference on the same
/// random problem; returns (emulated y, reference y, per-element error bound).
/// One random GEMV problem: `group_pick` 0..3 = group 32/64/128/whole row,
/// in_features = 128·chunks.
struct GemvCase {
    bits: Bits,
    group_pick: usize,
    out: usize,
    chunks: usize,
    batch: usize,
    n_experts: usize,
    with_base: bool,
    /// The wide kernel's delta items (gemv_wide.cuh) instead of the
    /// 128-column ones; `chunks` must then make whole wide items.
    wide: bool,
    seed: u64,
}

fn gemv_case(case: GemvCase) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let GemvCase {
        bits,
        group_pick,
        out,
        chunks,
        batch,
        n_experts,
        with_base,
        wide,
        seed,
    } = case;
    let in_features = 128 * chunks;
    let group = [32, 64, 128, in_features][group_pick];
    let group_tag = if group_pick == 3 { 0 } else { group as u32 };
    let layout = DeltaLayout::new(out, in_features, bits, group, in_features / 20).unwrap();
    let experts: Vec<Arrays> = (0..n_experts)
        .map(|e| random_arrays(&layout, seed ^ ((e as u64 + 1) * 0x9E37_79B9)))
        .collect();
    let mut s = seed | 1;
    let mut unit = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) % 2001) as f32 / 1000.0 - 1.0
    };
    let base: Vec<f16> = (0..out * in_features)
        .map(|_| f16::from_f32(0.1 * unit()))
        .collect();
    let x: Vec<f16> = (0..batch * in_features)
        .map(|_| f16::from_f32(unit()))
        .collect();
    let row_expert: Vec<Option<u32>> = (0..batch)
        .map(|_| {
            let v = ((unit() + 1.0) * 0.5 * (n_experts as f32 + 0.99)) as u32;
            (v < n_experts as u32).then_some(v)
        })
        .collect();
    let ids: Vec<u32> = row_expert
        .iter()
        .map(|e| e.unwrap_or(MESWITCH_NO_EXPERT))
        .collect();
    let table: Vec<MeswitchExpertDelta> = experts.iter().map(Arrays::abi).collect();
    let y_init: Vec<f16> = (0..batch * out).map(|_| f16::from_f32(unit())).collect();
    let mut y = y_init.clone();
    let params = MeswitchGemvParams {
        base: base.as_ptr() as u64,
        experts: table.as_ptr() as u64,
        row_expert: ids.as_ptr() as u64,
        x: x.as_ptr() as u64,
        y: y.as_mut_ptr() as u64,
        out_features: out as u32,
        in_features: in_features as u32,
        batch: batch as u32,
        n_experts: n_experts as u32,
    };
    let rc = unsafe {
        meswitch_host_gemv_variant(
            &params,
            bits.count(),
            group_tag,
            with_base as i32,
            wide as i32,
        )
    };
    assert_eq!(rc, 0);

    let views: Vec<DeltaView> = experts.iter().map(|a| a.view(layout)).collect();
    let zero = vec![f16::ZERO; out * in_features];
    let bview = BaseView {
        out_features: out,
        in_features,
        weights: if with_base { &base } else { &zero },
    };
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let mut want = vec![0f32; batch * out];
    multi_expert_gemv_f32(&bview, &views, &xf, &row_expert, &mut want).unwrap();
    // Error bound: FP16 rounding of each dequantized weight (2^-11 relative)
    // summed over |x|·|w|, plus the final FP16 rounding of y.
    let dense: Vec<Vec<f32>> = views.iter().map(|v| v.dequantize()).collect();
    let mut bound = vec![0f32; batch * out];
    for b in 0..batch {
        for r in 0..out {
            let mut mag = 0f32;
            for c in 0..in_features {
                let w = row_expert[b].map_or(0.0, |e| dense[e as usize][r * in_features + c].abs());
                mag += xf[b * in_features + c].abs()
                    * (w + bview.weights[r * in_features + c].to_f32().abs());
            }
            let i = b * out + r;
            if !with_base {
                if row_expert[b].is_some() {
                    want[i] += y_init[i].to_f32();
                } else {
                    want[i] = y_init[i].to_f32();
                }
            }
            bound[i] = mag * 2f32.powi(-10) + want[i].abs() * 2f32.powi(-10) + 1e-6;
        }
    }
    (y.iter().map(|v| v.to_f32()).collect(), want, bound)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Emulated kernel == reference within the FP16 error bound, for the fused
    /// (base + deltas) and the delta-only variants.
    #[test]
    fn emulated_gemv_matches_reference(bits in bits_strategy(), g in 0usize..4, out in 1usize..40,
                                       chunks in 1usize..4, batch in 1usize..=64, n_experts in 0usize..=16,
                                       with_base in any::<bool>(), seed in any::<u64>()) {
        let (got, want, bound) = gemv_case(GemvCase { bits, group_pick: g, out, chunks, batch, n_experts, with_base, wide: false, seed });
        for i in 0..got.len() {
            prop_assert!((got[i] - want[i]).abs() <= bound[i], "elem {}: got {} want {} bound {}", i, got[i], want[i], bound[i]);
        }
    }
}

/// The full batch (64 rows, all 8 mma n-tiles) with many experts.
#[test]
fn emulated_gemv_full_batch() {
    for bits in Bits::ALL {
        let (got, want, bound) = gemv_case(GemvCase {
            bits,
            group_pick: 2,
            out: 20,
            chunks: 2,
            batch: 64,
            n_experts: 5,
            with_base: true,
            wide: false,
            seed: 42,
        });
        for i in 0..got.len() {
            assert!(
                (got[i] - want[i]).abs() <= bound[i],
                "{bits:?} elem {i}: {} vs {}",
                got[i],
                want[i]
            );
        }
    }
}

/// Chunks of 128 columns in one wide item (gemv_wide_geometry.cuh).
fn wide_item_chunks(bits: Bits) -> usize {
    meswitch_ptx::gemv_wide_item_columns(bits.count()).unwrap() / 128
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The wide kernel's delta items (256/512-column items, grouped
    /// scale/offset loads, sub-blocks), emulated, == reference within the same
    /// bound, fused and delta-only; 1 to 3 wide items per row.
    #[test]
    fn emulated_wide_gemv_matches_reference(bits in bits_strategy(), g in 0usize..4, out in 1usize..40,
                                            items in 1usize..4, batch in 1usize..=64, n_experts in 0usize..=16,
                                            with_base in any::<bool>(), seed in any::<u64>()) {
        let chunks = items * wide_item_chunks(bits);
        let (got, want, bound) = gemv_case(GemvCase { bits, group_pick: g, out, chunks, batch, n_experts, with_base, wide: true, seed });
        for i in 0..got.len() {
            prop_assert!((got[i] - want[i]).abs() <= bound[i], "elem {}: got {} want {} bound {}", i, got[i], want[i], bound[i]);
        }
    }
}

/// Every (bits, group) of the wide kernel once, with two experts in every
/// n-tile, so a wrong group index or sub-block word cannot hide in a lucky draw.
#[test]
fn emulated_wide_gemv_every_group() {
    for bits in Bits::ALL {
        for group_pick in 0..4 {
            let (got, want, bound) = gemv_case(GemvCase {
                bits,
                group_pick,
                out: 17,
                chunks: 2 * wide_item_chunks(bits),
                batch: 24,
                n_experts: 3,
                with_base: group_pick % 2 == 0,
                wide: true,
                seed: 7 + group_pick as u64,
            });
            for i in 0..got.len() {
                assert!(
                    (got[i] - want[i]).abs() <= bound[i],
                    "{bits:?} group {group_pick} elem {i}: {} vs {}",
                    got[i],
                    want[i]
                );
            }
        }
    }
}

/// The wide emulation refuses widths that are not whole wide items, as the
/// kernel's host plan does (it routes them to the 128-column kernel).
#[test]
fn emulated_wide_gemv_rejects_partial_items() {
    let params = MeswitchGemvParams {
        base: 0,
        experts: 0,
        row_expert: 0,
        x: 0,
        y: 0,
        out_features: 4,
        in_features: 384,
        batch: 1,
        n_experts: 0,
    };
    for (bits, rc) in [(1, 1), (2, 1)] {
        assert_eq!(
            unsafe { meswitch_host_gemv_variant(&params, bits, 128, 1, 1) },
            rc
        );
    }
}
