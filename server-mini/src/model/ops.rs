//! The non-linear pieces of the decoder on CPU, in f32: RMSNorm, RoPE,
//! causal grouped-query attention over a KV cache, SwiGLU. They live in
//! `meswitch_reference::layers`, the one oracle the CUDA kernels are checked
//! against; the CPU runtime runs exactly that code.

pub use meswitch_reference::layers::*;
