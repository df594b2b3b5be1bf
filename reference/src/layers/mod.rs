//! The non-linear pieces of a Llama/Mistral decoder layer in f32: the
//! oracle every CUDA layer kernel (meswitch-ops `layers`) is checked
//! against, and what the CPU runtime itself runs.
//!
//! - RMSNorm ([`norm`]),
//! - rotary position embedding, Hugging Face rotate-half pairing ([`rope`]),
//! - SwiGLU ([`activation`]),
//! - causal grouped-query attention with a sliding window ([`attention`]).

pub mod activation;
pub mod attention;
pub mod norm;
pub mod rope;

pub use activation::swiglu;
pub use attention::{attention, attention_window_start, for_each_head, AttnShape, HeadTask, Query};
pub use norm::rms_norm;
pub use rope::{rope, rope_angles, rope_inv_freq, rope_tables};
