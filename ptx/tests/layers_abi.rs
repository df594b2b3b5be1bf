//! The layer modules' ABI: every entry point is in the module that
//! `LAYER_ENTRIES` names (and only there, since `Gpu::function` asks the
//! module whose PTX declares it), and the attention constants fit together.

use meswitch_ptx::abi::*;
use meswitch_ptx::{LAYER_ENTRIES, MODULES};

#[test]
fn every_layer_entry_is_in_exactly_its_module() {
    for &(module, entry) in LAYER_ENTRIES {
        let decl = format!(".entry {entry}(");
        let owners: Vec<&str> = MODULES
            .iter()
            .filter(|m| m.ptx.contains(&decl))
            .map(|m| m.name)
            .collect();
        assert_eq!(owners, [module], "{entry}");
    }
}

#[test]
fn attention_constants_fit_together() {
    // Each lane holds whole half2 pairs: MAX_HEAD_DIM must split evenly into
    // 2 elements × 32 lanes.
    assert_eq!(MESWITCH_ATTN_MAX_HEAD_DIM % 64, 0);
    assert_eq!(MESWITCH_ATTN_THREADS, MESWITCH_ATTN_WARPS * 32);
    // Static shared memory of the merge (acc + max + denominator per warp)
    // stays far below the 48 KiB a block may have without opting in.
    let smem = MESWITCH_ATTN_WARPS * (MESWITCH_ATTN_MAX_HEAD_DIM + 2) * 4;
    assert!(smem <= 48 * 1024);
    assert_eq!(MESWITCH_ROW_THREADS % 32, 0);
    assert_eq!(MESWITCH_ELEMENTWISE_THREADS % 32, 0);
}

#[test]
fn layer_param_structs_are_8_byte_aligned_plain_data() {
    // Passed by value as the kernel's one parameter: sizes are multiples of 8
    // (explicit `reserved` fields, no implicit tail padding).
    for (name, size) in [
        ("rms_norm", std::mem::size_of::<MeswitchRmsNormParams>()),
        ("rope", std::mem::size_of::<MeswitchRopeParams>()),
        (
            "elementwise",
            std::mem::size_of::<MeswitchElementwiseParams>(),
        ),
        ("embed", std::mem::size_of::<MeswitchEmbedParams>()),
        ("attn_row", std::mem::size_of::<MeswitchAttnRow>()),
        ("kv_append", std::mem::size_of::<MeswitchKvAppendParams>()),
        ("attention", std::mem::size_of::<MeswitchAttentionParams>()),
    ] {
        assert_eq!(size % 8, 0, "{name}: {size}");
    }
    assert_eq!(std::mem::size_of::<MeswitchAttnRow>(), 16);
}
