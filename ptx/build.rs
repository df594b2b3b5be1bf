//! Compiles the host-side twin of the kernels' unpack helpers
//! (host/unpack_host.cpp, which includes kernels/delta_unpack.cuh as plain
//! C++) so the tests can compare it with meswitch-reference.

fn main() {
    println!("cargo:rerun-if-changed=host/unpack_host.cpp");
    println!("cargo:rerun-if-changed=kernels/delta_unpack.cuh");
    println!("cargo:rerun-if-changed=kernels/gemv_wide_geometry.cuh");
    println!("cargo:rerun-if-changed=include/meswitch_abi.h");
    cc::Build::new()
        .cpp(true)
        .file("host/unpack_host.cpp")
        .include("include")
        .include("kernels")
        .flag_if_supported("-std=c++17")
        // The reference computes offset + scale*q as a rounded multiply then a
        // rounded add; contraction into an FMA would change low bits.
        .flag_if_supported("-ffp-contract=off")
        .warnings(true)
        .compile("meswitch_unpack_host");
    if std::env::var_os("CARGO_FEATURE_EMU").is_some() {
        build_emulation();
    }
}

/// The host emulation of the kernels (emu/, feature `emu`): the kernel
/// sources compiled unchanged as C++ against emu/include/cuda_fp16.h, one
/// translation unit per module as NVRTC compiles one program per .cu.
fn build_emulation() {
    // Every emu/module_*.cpp (the registry in emu/simt.h names the same set).
    let mut modules: Vec<_> = std::fs::read_dir("emu")
        .expect("ptx/emu")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("module_") && n.ends_with(".cpp"))
        })
        .collect();
    modules.sort();
    println!("cargo:rerun-if-changed=emu");
    println!("cargo:rerun-if-changed=kernels");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("emu/simt.cpp")
        .files(&modules)
        // emu/include first: its cuda_fp16.h stands in for CUDA's.
        .include("emu/include")
        .include("emu")
        .include("include")
        .include("kernels")
        .flag_if_supported("-std=c++17")
        .opt_level(2)
        // The kernels' arithmetic as written: no FMA contraction the source
        // does not ask for, and their type puns (half2 <-> u32) well defined.
        .flag_if_supported("-ffp-contract=off")
        .flag_if_supported("-fno-strict-aliasing")
        // `#pragma unroll` is for NVRTC.
        .flag_if_supported("-Wno-unknown-pragmas")
        // SUB_UNROLL in gemv_wide.cuh is read only by a pragma.
        .flag_if_supported("-Wno-unused-variable")
        .warnings(true);
    build.compile("meswitch_emu");
}
