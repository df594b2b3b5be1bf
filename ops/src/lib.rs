//! meswitch-ops: the Rust API over the CUDA kernels (filled by the kernels issue).
pub use meswitch_reference as reference;
