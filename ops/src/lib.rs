//! meswitch-ops: the Rust API over meswitch's CUDA kernels, layered like
//! cudarc:
//!
//! - [`device`]: finding a device without panicking ([`Gpu`], [`OpsError::NoDevice`]);
//! - [`buffers`]: device-resident base and packed deltas;
//! - `launch` (private): ABI param structs and the unsafe launches;
//! - [`gemv`]: the safe API, with the reference's signatures (host slices)
//!   and device-resident variants for the runtime;
//! - [`backend`]: one signature over the reference or CUDA, falling back to
//!   the reference when there is no device;
//! - [`layers`]: RMSNorm, RoPE, SwiGLU, residual, embedding, KV cache and
//!   attention kernels (layout of the device KV cache there);
//! - [`blas`], [`timing`]: cuBLAS products and event timing (runtime, benches).

pub mod backend;
pub mod blas;
pub mod buffers;
pub mod device;
pub mod error;
pub mod gemv;
mod launch;
mod launch_layers;
pub mod layers;
mod plan;
pub mod timing;

pub use meswitch_reference as reference;

pub use backend::Backend;
pub use buffers::{DeviceBase, DeviceDelta};
pub use device::Gpu;
pub use error::OpsError;
pub use gemv::{
    delta_gemv_accumulate, delta_gemv_accumulate_device, dequantize_device, dequantize_f16,
    download, multi_expert_gemv, multi_expert_gemv_device, upload, DeviceExperts, DeviceRows,
    DeviceSlice, ExpertTableCache,
};
pub use gemv::{
    delta_gemv_accumulate_device_with, delta_gemv_accumulate_with, multi_expert_gemv_device_with,
    multi_expert_gemv_with, GemvKernel,
};
pub use launch::NO_EXPERT;
