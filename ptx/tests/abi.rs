//! The ABI header's constants agree with the packed layout defined in
//! meswitch-reference (the single source), and the embedded PTX holds every
//! entry point the naming functions produce.

use meswitch_ptx::abi::*;
use meswitch_ptx::{
    delta_gemv_entry, delta_gemv_wide_entry, dequantize_entry, dequantize_launch_dims,
    gemv_batch_tiles, gemv_entry_for_batch, gemv_launch_dims, gemv_supports_in_features,
    gemv_wide_item_columns, gemv_wide_supports_in_features, multi_expert_gemv_entry,
    multi_expert_gemv_wide_entry, MODULES,
};
use meswitch_reference::layout::{Bits, GROUP_SIZES};

#[test]
fn bit_widths_and_codes_per_word_match_reference() {
    let header = [MESWITCH_BITS_1, MESWITCH_BITS_2, MESWITCH_BITS_4];
    for (bits, h) in Bits::ALL.into_iter().zip(header) {
        assert_eq!(bits.count(), h);
        assert_eq!(bits.codes_per_word(), (MESWITCH_WORD_BITS / h) as usize);
    }
}

#[test]
fn group_sizes_match_reference() {
    assert_eq!(
        GROUP_SIZES.to_vec(),
        vec![
            MESWITCH_GROUP_32 as usize,
            MESWITCH_GROUP_64 as usize,
            MESWITCH_GROUP_128 as usize
        ]
    );
    // The "whole row" tag can never be mistaken for a real group size.
    assert!(!GROUP_SIZES.contains(&(MESWITCH_GROUP_ROW as usize)));
}

#[test]
fn gemv_tiling_is_consistent() {
    assert_eq!(MESWITCH_NO_EXPERT, u32::MAX);
    assert_eq!(MESWITCH_MAX_BATCH, 64);
    // A block is one m16n8k16 M tile; batch rows fill whole n-tiles of 8 and
    // one u64 row mask per expert (so at most 64).
    assert_eq!(MESWITCH_GEMV_ROWS_PER_BLOCK, 16);
    assert_eq!(MESWITCH_GEMV_BATCH_TILE, 8);
    assert_eq!(MESWITCH_MAX_BATCH % MESWITCH_GEMV_BATCH_TILE, 0);
    assert_eq!(MESWITCH_GEMV_THREADS, 32 * MESWITCH_GEMV_WARPS);
    // A K chunk is 4 lanes x 32 columns; 32 columns are whole words for every
    // bit width and never straddle a group.
    assert_eq!(MESWITCH_GEMV_K_CHUNK, 4 * 32);
    for g in GROUP_SIZES {
        assert_eq!(g % 32, 0);
    }
    for bits in Bits::ALL {
        assert_eq!((32 * bits.count()) % MESWITCH_WORD_BITS, 0);
    }
}

#[test]
fn every_entry_point_is_in_its_module() {
    let module = |name: &str| MODULES.iter().find(|m| m.name == name).unwrap().ptx;
    let has_entry = |ptx: &str, entry: &str| ptx.contains(&format!(".entry {entry}("));
    for bits in [1, 2, 4] {
        for (group, in_features) in [(32, 4096), (64, 4096), (128, 4096), (4096, 4096)] {
            for batch in [1, 8, 9, 16, 17, 32, 33, 64] {
                let family = multi_expert_gemv_entry(bits, group, in_features).unwrap();
                let e = gemv_entry_for_batch(&family, batch).unwrap();
                assert!(has_entry(module("multi_expert_gemv"), &e), "{e}");
                let family = delta_gemv_entry(bits, group, in_features).unwrap();
                let e = gemv_entry_for_batch(&family, batch).unwrap();
                assert!(has_entry(module("delta_gemv"), &e), "{e}");
            }
        }
        let e = dequantize_entry(bits).unwrap();
        assert!(has_entry(module("dequantize"), &e), "{e}");
    }
    assert_eq!(multi_expert_gemv_entry(3, 128, 4096), None);
    assert_eq!(multi_expert_gemv_entry(4, 96, 4096), None);
    assert_eq!(dequantize_entry(8), None);
    let names: Vec<&str> = MODULES.iter().map(|m| m.name).collect();
    let c_str = |n: &'static [u8]| std::str::from_utf8(&n[..n.len() - 1]).unwrap();
    let header_names = [
        c_str(MESWITCH_MODULE_MULTI_EXPERT_GEMV),
        c_str(MESWITCH_MODULE_DELTA_GEMV),
        c_str(MESWITCH_MODULE_MULTI_EXPERT_GEMV_WIDE),
        c_str(MESWITCH_MODULE_DELTA_GEMV_WIDE),
        c_str(MESWITCH_MODULE_DEQUANTIZE),
        c_str(MESWITCH_MODULE_NORM),
        c_str(MESWITCH_MODULE_ROPE),
        c_str(MESWITCH_MODULE_ACTIVATION),
        c_str(MESWITCH_MODULE_ATTENTION),
    ];
    assert_eq!(names, header_names);
}

/// Every wide entry point a supported (bits, group, width, batch) names is in
/// the wide modules; widths that are not whole wide items have none.
#[test]
fn every_wide_entry_point_is_in_its_module() {
    let module = |name: &str| MODULES.iter().find(|m| m.name == name).unwrap().ptx;
    let has_entry = |ptx: &str, entry: &str| ptx.contains(&format!(".entry {entry}("));
    for bits in [1, 2, 4] {
        for (group, in_features) in [(32, 4096), (64, 14336), (128, 4096), (4096, 4096)] {
            for batch in [1, 9, 17, 33] {
                let family = multi_expert_gemv_wide_entry(bits, group, in_features).unwrap();
                let e = gemv_entry_for_batch(&family, batch).unwrap();
                assert!(has_entry(module("multi_expert_gemv_wide"), &e), "{e}");
                assert!(!has_entry(module("multi_expert_gemv"), &e), "{e}");
                let family = delta_gemv_wide_entry(bits, group, in_features).unwrap();
                let e = gemv_entry_for_batch(&family, batch).unwrap();
                assert!(has_entry(module("delta_gemv_wide"), &e), "{e}");
            }
        }
    }
    assert_eq!(
        multi_expert_gemv_wide_entry(2, 128, 4096).as_deref(),
        Some("meswitch_multi_expert_gemv_wide_b2_g128")
    );
    // 384 columns: whole 128-column items (INT4) but not 256 or 512.
    assert!(multi_expert_gemv_wide_entry(4, 128, 384).is_some());
    assert_eq!(multi_expert_gemv_wide_entry(2, 128, 384), None);
    assert_eq!(delta_gemv_wide_entry(1, 128, 768), None);
    assert!(delta_gemv_wide_entry(1, 128, 1024).is_some());
    assert_eq!(multi_expert_gemv_wide_entry(3, 128, 4096), None);
    assert_eq!(multi_expert_gemv_wide_entry(2, 96, 4096), None);
}

#[test]
fn wide_items_are_sixteen_code_bytes_per_lane_row() {
    for bits in [1u32, 2, 4] {
        let item = gemv_wide_item_columns(bits).unwrap();
        let lanes = MESWITCH_WIDE_LANES_PER_ROW as usize;
        assert_eq!(item * bits as usize, lanes * 16 * 8);
        // Whole 128-column chunks, so the base and salient passes (shared
        // with the 128-column kernel) see the widths they require.
        assert_eq!(item % MESWITCH_GEMV_K_CHUNK as usize, 0);
        assert!(gemv_wide_supports_in_features(item * 3, bits));
        assert!(!gemv_wide_supports_in_features(item * 3 + 128, bits) || bits == 4);
        assert!(!gemv_wide_supports_in_features(0, bits));
    }
    assert_eq!(gemv_wide_item_columns(3), None);
    assert!(!gemv_wide_supports_in_features(4096, 3));
}

#[test]
fn batch_picks_the_smallest_tile_variant_that_holds_it() {
    let tiles: Vec<Option<u32>> = [0, 1, 8, 9, 16, 17, 32, 33, 64, 65]
        .into_iter()
        .map(gemv_batch_tiles)
        .collect();
    let want = [
        None,
        Some(1),
        Some(1),
        Some(2),
        Some(2),
        Some(4),
        Some(4),
        Some(8),
        Some(8),
        None,
    ];
    assert_eq!(tiles, want);
    assert_eq!(
        gemv_entry_for_batch("meswitch_delta_gemv_b2_g128", 12).as_deref(),
        Some("meswitch_delta_gemv_b2_g128_t2")
    );
    assert_eq!(
        MESWITCH_GEMV_MAX_TILES * MESWITCH_GEMV_BATCH_TILE,
        MESWITCH_MAX_BATCH
    );
}

#[test]
fn ptx_targets_compute_80() {
    for m in MODULES {
        assert!(m.ptx.contains(".target sm_80"), "{}", m.name);
        assert!(m.ptx.contains(".version 8.8"), "{}", m.name);
    }
}

#[test]
fn launch_dims_cover_every_row() {
    for out in [1usize, 15, 16, 17, 4096, 14336] {
        let (blocks, threads) = gemv_launch_dims(out).unwrap();
        assert!(
            blocks as usize * 16 >= out && (blocks as usize - 1) * 16 < out,
            "{out}"
        );
        assert_eq!(threads, 32 * MESWITCH_GEMV_WARPS);
        assert_eq!(dequantize_launch_dims(out), Some((out as u32, 256)));
    }
    assert_eq!(gemv_launch_dims(0), None);
    assert!(gemv_supports_in_features(4096) && gemv_supports_in_features(896));
    assert!(!gemv_supports_in_features(100) && !gemv_supports_in_features(0));
}
