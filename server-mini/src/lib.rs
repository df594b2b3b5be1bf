//! meswitch-server: checkpoints, the compression pipeline, and (later) the
//! model runtime, router and HTTP server.
pub mod router;
pub mod checkpoint;
pub mod cli;
pub mod compress;
pub mod synth;
pub mod gguf;
pub mod testdata;
pub mod model;
pub mod tokenizer;
pub mod chat;
pub mod sampling;
pub mod generate;
