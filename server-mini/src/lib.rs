//! meswitch-server: checkpoints, the compression pipeline, the model runtime,
//! the router and (later) the HTTP server.
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod compress;
pub mod engine;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod router;
pub mod sampling;
pub mod server;
pub mod synth;
pub mod testdata;
pub mod tokenizer;
