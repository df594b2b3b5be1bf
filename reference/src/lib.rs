//! meswitch-reference: the pure-Rust CPU reference of meswitch.
//!
//! - [`layout`]: the packed delta layout (the single definition of the format).
//! - [`quant`], [`salient`], [`delta`]: ME-Switch compression of one matrix.
//! - [`gemv`]: batched multi-expert GEMV and friends, the oracle of the kernels.
//! - [`layers`]: RMSNorm, RoPE, SwiGLU, attention in f32, the oracle of the layer kernels.
//!
//! Clear rather than clever: this crate is what every kernel is checked against.

pub mod container;
pub mod delta;
pub mod error;
pub mod gemv;
pub mod layers;
pub mod layout;
pub mod measure;
pub mod quant;
pub mod salient;

pub use delta::{compress_matrix, CompressSettings, DeltaView, PackedDelta};
pub use error::{DeltaError, LayoutError, ShapeError};
pub use gemv::{
    delta_gemv_accumulate, dequantize_f16, multi_expert_gemv, multi_expert_gemv_f32, BaseView,
};
pub use layout::{Bits, DeltaLayout};
pub use quant::GroupParams;
pub use salient::SalientSpec;
