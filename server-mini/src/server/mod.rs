//! The HTTP server: OpenAI-compatible generation over the [`crate::engine`],
//! with routing, metrics and admin endpoints, on hyper 1 + tokio.
//!
//! - [`app`]: routes and handlers; [`openai`]: request parsing; [`responses`]: response bodies;
//!   [`stream`]: SSE; [`error`]: OpenAI-style errors; [`metrics`]: Prometheus text.
//! - [`admin`]: bearer token and the models-folder confinement of admin loads.
//! - [`policy`]: domain → expert routing over a classifier of hidden states.
//! - [`prompt`]: chat template + tokenizer; [`serving`]: building a server from
//!   paths; [`demo`]: the synthetic demo family `meswitch serve` builds itself.

pub mod admin;
pub mod app;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod prompt;
pub mod responses;
pub mod sampling_fields;
pub mod serving;
pub mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use app::{AppState, Limits};

/// A client has this long to send its request headers (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A server accepting connections on a tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl RunningServer {
    /// Starts accepting on `listener` (on the current tokio runtime).
    pub fn start(listener: TcpListener, state: Arc<AppState>) -> std::io::Result<RunningServer> {
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let accept_state = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = stopped.changed() => break,
                };
                let Ok((stream, _peer)) = conn else {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = accept_state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| app::handle(state.clone(), req));
                    // Errors here are the client's connection failing; nothing to answer.
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(RunningServer {
            addr,
            state,
            stop,
            accept,
        })
    }

    /// Binds `addr` and starts.
    pub async fn bind(addr: SocketAddr, state: Arc<AppState>) -> std::io::Result<RunningServer> {
        RunningServer::start(TcpListener::bind(addr).await?, state)
    }

    /// Stops accepting, answers 503 to new generation requests on open
    /// connections, and stops the engine (its thread is joined).
    pub async fn shutdown(self) {
        self.state.begin_shutdown();
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        let engine = self.state.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    }
}
