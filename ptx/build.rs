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
}
