//! The HTTP server: OpenAI-compatible generation over the [`crate::engine`],
//! with routing, metrics and admin endpoints, on hyper 1 + tokio. One port
//! speaks HTTP/1.1 and cleartext HTTP/2 with prior knowledge (h2c).
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

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use app::{AppState, Limits};

/// A client has this long to send its request headers (slow-loris guard).
/// It also bounds the protocol sniff below: the first bytes of a connection
/// are the start of its first request's headers, whichever protocol.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTP/2 streams (requests) one connection may have open at once.
///
/// An HTTP/1.1 connection carries one request at a time; an h2 connection
/// multiplexes, so without a bound one client could hold as many requests as
/// hyper's default allows (200) on a single socket. Every stream still goes
/// through the engine's admission (`max_running`, `max_queued`, 429 beyond),
/// so this is about fairness and memory, not correctness: 16 is half the
/// engine's default `max_running` (32), so one connection alone cannot fill the
/// batch; a load tool that wants more concurrency opens more connections, as
/// it would with HTTP/1.1. Streams beyond it wait in the client (the limit is
/// announced in SETTINGS), never in our queue.
pub const MAX_CONCURRENT_STREAMS: u32 = 16;

/// How often an h2 connection pings its peer, and how long it waits for the
/// answer before closing. A peer that vanished without a FIN would otherwise
/// hold up to [`MAX_CONCURRENT_STREAMS`] engine slots until TCP gives up
/// (minutes); HTTP/1.1 risks one slot the same way, h2 up to 16.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The client connection preface of HTTP/2 with prior knowledge (RFC 9113
/// §3.4): an h2c client sends exactly these bytes first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A server accepting connections on a tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl RunningServer {
    /// Starts accepting on `listener` (on the current tokio runtime). Every
    /// connection speaks HTTP/1.1 or cleartext HTTP/2 with prior knowledge
    /// (h2c), told apart by its first bytes.
    pub fn start(listener: TcpListener, state: Arc<AppState>) -> std::io::Result<RunningServer> {
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let accept_state = state.clone();
        let builder = Arc::new(connection_builder());
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
                tokio::spawn(serve_connection(
                    stream,
                    accept_state.clone(),
                    builder.clone(),
                ));
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

/// One builder for both protocols. HTTP/2 answers a reset stream by dropping
/// its handler future or response body, which is what frees the engine slot
/// (see [`stream`]), the same path as an HTTP/1.1 disconnect.
fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(H2_KEEP_ALIVE);
    builder
}

async fn serve_connection(
    mut stream: TcpStream,
    state: Arc<AppState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
) {
    // hyper-util's own sniff has no deadline, and hyper's HTTP/1.1 header
    // timer only starts after it: a client that connects and sends nothing
    // would be held forever. So the sniff's bytes are read here, under the
    // header timeout, and replayed to the builder (which then decides at once).
    // An HTTP/1.1 client's headers thus get at most twice the timeout.
    let head =
        match tokio::time::timeout(HEADER_READ_TIMEOUT, read_protocol_head(&mut stream)).await {
            Ok(Ok(head)) if !head.is_empty() => head,
            // Silent, closed or failing before a decision: nothing to answer.
            _ => return,
        };
    let io = TokioIo::new(Replay {
        head,
        replayed: 0,
        inner: stream,
    });
    let service = service_fn(move |req| app::handle(state.clone(), req));
    // Errors here are the client's connection failing; nothing to answer.
    let _ = builder.serve_connection(io, service).await;
}

/// Reads a connection's first bytes until they decide the protocol: the whole
/// h2 preface, or a byte that departs from it (HTTP/1.1). Empty at EOF.
///
/// ```text
///   PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n   24 bytes equal to H2_PREFACE  -> h2
///   POST /v1/chat...          'O' != 'R' at byte 1         -> HTTP/1.1
/// ```
///
/// Reads at most the preface's length (24 bytes), and stops waiting as soon
/// as what it has departs from the preface: an HTTP/1.1 client that sent "P"
/// and stalls waits here under the deadline, one that sent "PO" does not.
async fn read_protocol_head<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Vec<u8>> {
    let mut head = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < head.len() && head[..filled] == H2_PREFACE[..filled] {
        let n = io.read(&mut head[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(head[..filled].to_vec())
}

/// A stream that first yields `head` (bytes already read from `inner`), then
/// reads `inner`; writes go straight to `inner`.
struct Replay<S> {
    head: Vec<u8>,
    replayed: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let rest = &me.head[me.replayed..];
        if rest.is_empty() {
            return Pin::new(&mut me.inner).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        me.replayed += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// What `read_protocol_head` keeps of `sent` (written in `pieces`).
    async fn head_of(sent: &[u8], pieces: usize) -> Vec<u8> {
        let (mut client, mut server) = tokio::io::duplex(64);
        let step = sent.len().div_ceil(pieces).max(1);
        let sent = sent.to_vec();
        // The writer hangs up when done (EOF), so a short `sent` cannot stall.
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(step) {
                client.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let head = read_protocol_head(&mut server).await.unwrap();
        writer.await.unwrap();
        head
    }

    #[tokio::test]
    async fn the_sniff_reads_the_whole_preface_and_no_further() {
        let mut sent = H2_PREFACE.to_vec();
        sent.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0"); // an empty SETTINGS frame
        for pieces in [1, 3, 24] {
            assert_eq!(head_of(&sent, pieces).await, H2_PREFACE, "{pieces} pieces");
        }
    }

    /// `sent` is written and the writer then stalls (no EOF): the sniff must
    /// return on what it has.
    async fn head_of_stalled(sent: &[u8]) -> Vec<u8> {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(sent).await.unwrap();
        let head = tokio::time::timeout(Duration::from_secs(5), read_protocol_head(&mut server))
            .await
            .expect("the sniff waited for more after a departure from the preface");
        drop(client);
        head.unwrap()
    }

    #[tokio::test]
    async fn the_sniff_decides_http1_without_waiting_for_more() {
        assert_eq!(head_of_stalled(b"G").await, b"G");
        // "POST" shares the preface's "P": the "O" decides.
        assert_eq!(head_of_stalled(b"PO").await, b"PO");
        // A whole request at once: at most the preface's length is taken.
        let get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(head_of(get, 1).await, &get[..H2_PREFACE.len()]);
        // The preface but one byte, then EOF: what was read, undecided.
        assert_eq!(head_of(&H2_PREFACE[..23], 5).await, &H2_PREFACE[..23]);
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_the_sniff() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PRI * HT").await.unwrap();
        let waited =
            tokio::time::timeout(Duration::from_millis(50), read_protocol_head(&mut server)).await;
        assert!(waited.is_err(), "returned {waited:?} on a stalled preface");
    }

    #[tokio::test]
    async fn replay_yields_the_head_then_the_rest_and_writes_through() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut replay = Replay {
            head: b"PO".to_vec(),
            replayed: 0,
            inner: server,
        };
        client.write_all(b"ST / HTTP/1.1").await.unwrap();
        client.shutdown().await.unwrap();
        let mut one = [0u8; 1];
        replay.read_exact(&mut one).await.unwrap(); // a short read buffer
        let mut rest = Vec::new();
        let mut probe = [0u8; 4];
        loop {
            let n = replay.read(&mut probe).await.unwrap();
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&probe[..n]);
        }
        assert_eq!([&one[..], &rest].concat(), b"POST / HTTP/1.1");
        replay.write_all(b"HTTP/1.1 200 OK").await.unwrap();
        let mut back = [0u8; 15];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"HTTP/1.1 200 OK");
    }
}
