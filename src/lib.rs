//! meswitch: one FP16 base model, many experts stored as compressed deltas
//! (the ME-Switch method), served from one GPU.
//!
//! This root crate only re-exports the workspace's crates so that integration
//! tests and benchmarks have one import path.
pub use meswitch_ops as ops;
pub use meswitch_reference as reference;
pub use meswitch_server as server;
