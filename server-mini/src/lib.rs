//! meswitch-server: checkpoints, the compression pipeline, and (later) the
//! model runtime, router and HTTP server.
pub mod router;
