//! The server over cleartext HTTP/2 with prior knowledge (h2c) on the same
//! port as HTTP/1.1: whole and streamed completions, streams multiplexed on
//! one connection, the per-connection stream bound, and a reset stream (or a
//! dropped connection) freeing its engine slot as an HTTP/1.1 disconnect does.
//!
//! The client is hyper's `client::conn::http2` over a `TcpStream`; replies are
//! the shared [`Reply`] so the assertions read like those of `server_api.rs`.

mod server_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meswitch_server::server::{RunningServer, MAX_CONCURRENT_STREAMS};
use server_support::*;
use tokio::task::JoinHandle;

/// One h2c connection: the request handle, the task driving the socket, and
/// a second handle on the socket to cut it (hyper's client keeps the
/// connection open while any response body lives, so dropping handles or
/// aborting the task does not close it).
struct H2 {
    send: SendRequest<Full<Bytes>>,
    conn: JoinHandle<()>,
    socket: std::net::TcpStream,
}

async fn connect_h2(addr: SocketAddr) -> H2 {
    let std_tcp = std::net::TcpStream::connect(addr).unwrap();
    std_tcp.set_nonblocking(true).unwrap();
    let socket = std_tcp.try_clone().unwrap();
    let tcp = tokio::net::TcpStream::from_std(std_tcp).unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake (prior knowledge)");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    H2 { send, conn, socket }
}

impl H2 {
    /// Closes the TCP connection under hyper's feet (FIN both ways, no
    /// RST_STREAM or GOAWAY first), as a client that dies does.
    fn cut(&self) {
        self.socket.shutdown(std::net::Shutdown::Both).unwrap();
    }

    /// Sends a request and returns the response head with its body unread.
    async fn start(&self, method: &str, path: &str, body: &str) -> Response<Incoming> {
        h2_request(self.send.clone(), method, path, body).await
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> Reply {
        reply(self.start(method, path, body).await).await
    }
}

/// One request on a handle of a connection (handles clone cheaply; each
/// request is its own stream).
async fn h2_request(
    mut send: SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &str,
) -> Response<Incoming> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send.ready().await.unwrap();
    let response = send.send_request(req).await.unwrap();
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    response
}

async fn reply(response: Response<Incoming>) -> Reply {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: body.to_vec(),
    }
}

/// Reads data frames until one holds an SSE event; returns what was read.
async fn first_event(body: &mut Incoming) -> Vec<u8> {
    let mut got = Vec::new();
    while !got.windows(6).any(|w| w == b"data: ") {
        let frame = body
            .frame()
            .await
            .expect("the stream ended before any event")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    got
}

/// A streaming completion on `h2` whose first event has arrived; the body
/// is handed back so the caller decides how the stream ends.
async fn streaming_after_first_event(h2: &H2, max_tokens: usize) -> Incoming {
    let mut body = h2
        .start(
            "POST",
            "/v1/completions",
            &completion("expert-03", max_tokens, true),
        )
        .await
        .into_body();
    first_event(&mut body).await;
    body
}

fn completion(expert: &str, max_tokens: usize, stream: bool) -> String {
    serde_json::json!({"model": expert, "prompt": "Once", "max_tokens": max_tokens,
                       "stream": stream, "temperature": 0})
    .to_string()
}

fn chat(expert: &str, max_tokens: usize, stream: bool) -> String {
    serde_json::json!({"model": expert, "max_tokens": max_tokens, "stream": stream,
                       "temperature": 0,
                       "messages": [{"role": "user", "content": "A short summary of risotto."}]})
    .to_string()
}

/// Waits until the engine holds nothing, failing after 10 s.
async fn wait_slots_freed(s: &RunningServer, what: &str) {
    let left = Instant::now();
    loop {
        let st = s.state.engine.stats();
        if st.running == 0 && st.queued == 0 {
            return;
        }
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "{what}: slot still held: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the engine runs at least `n` sequences, failing after 10 s.
async fn wait_running(s: &RunningServer, n: usize) {
    let since = Instant::now();
    while s.state.engine.stats().running < n {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "never {n} running"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn disconnects(metrics: &str) -> Option<f64> {
    metric(
        metrics,
        "meswitch_client_disconnects_total{endpoint=\"/v1/completions\"}",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_http1_answer_alike_on_one_port() {
    let s = start(Setup::default()).await;
    let h2 = connect_h2(s.addr).await;

    let whole = h2
        .call(
            "POST",
            "/v1/chat/completions",
            &chat("expert-02", 12, false),
        )
        .await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(whole.header("x-meswitch-expert"), Some("expert-02"));
    assert!(whole
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "expert-02");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let completion_tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion_tokens), "{v}");

    // HTTP/1.1 on the same port, greedy: the same answer.
    let h1 = post(
        s.addr,
        "/v1/chat/completions",
        &chat("expert-02", 12, false),
    )
    .await;
    assert_eq!(h1.status, 200, "{}", h1.text());
    assert_eq!(h1.json()["choices"][0]["message"]["content"], text);
    assert_eq!(get(s.addr, "/health").await.status, 200);

    // Errors keep their OpenAI shape over h2.
    let unknown = h2
        .call("POST", "/v1/completions", &completion("nope", 4, false))
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert_eq!(unknown.error()["param"], "model");
    let models = h2.call("GET", "/v1/models", "").await;
    assert_eq!(models.status, 200);
    assert!(models.json()["data"].as_array().unwrap().len() > 1);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_sse_chunk_by_chunk_ending_in_done() {
    let s = start(Setup::default()).await;
    let h2 = connect_h2(s.addr).await;
    let max_tokens = 12;
    let whole = h2
        .call(
            "POST",
            "/v1/chat/completions",
            &chat("expert-01", max_tokens, false),
        )
        .await;
    let want = whole.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    let response = h2
        .start(
            "POST",
            "/v1/chat/completions",
            &chat("expert-01", max_tokens, true),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-meswitch-expert"].to_str().unwrap(),
        "expert-01"
    );
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // The events come as separate DATA frames, not one body at the end.
    let mut body = response.into_body();
    let mut frames = 0;
    let mut sse = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames += 1;
            sse.extend_from_slice(&data);
        }
    }
    let streamed = Reply {
        status: 200,
        headers: Vec::new(),
        body: sse,
    };
    let events = streamed.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        frames > 2,
        "{frames} DATA frames for {} events",
        events.len()
    );
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let chunk: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    assert_eq!(text, want, "streamed and whole greedy answers differ");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_on_one_connection_run_together() {
    let s = start(Setup::default()).await;
    let h2 = connect_h2(s.addr).await;
    let body = completion("expert-03", 40, true);
    let (a, b) = tokio::join!(
        h2.start("POST", "/v1/completions", &body),
        h2.start("POST", "/v1/completions", &body)
    );
    let (mut a, mut b) = (a.into_body(), b.into_body());
    let (head_a, head_b) = tokio::join!(first_event(&mut a), first_event(&mut b));
    // Both have produced an event and neither body is finished: both were
    // admitted at once over the one connection.
    let st = s.state.engine.stats();
    assert_eq!(st.running + st.queued, 2, "{st:?}");
    let rest = |head: Vec<u8>, body: Incoming| async move {
        let tail = body.collect().await.unwrap().to_bytes();
        Reply {
            status: 200,
            headers: Vec::new(),
            body: [head, tail.to_vec()].concat(),
        }
    };
    let (a, b) = tokio::join!(rest(head_a, a), rest(head_b, b));
    let (a, b) = (a.sse_data(), b.sse_data());
    assert_eq!(a.last().map(String::as_str), Some("[DONE]"));
    // Greedy, same prompt: the same stream (up to the per-request id).
    let text = |events: &[String]| -> String {
        events[..events.len() - 1]
            .iter()
            .filter_map(|e| {
                let v: serde_json::Value = serde_json::from_str(e).unwrap();
                v["choices"][0]["text"].as_str().map(str::to_string)
            })
            .collect()
    };
    assert!(!text(&a).is_empty());
    assert_eq!(text(&a), text(&b));
    wait_slots_freed(&s, "after both streams").await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_at_most_max_concurrent_streams() {
    let limit = MAX_CONCURRENT_STREAMS as usize;
    let mut setup = Setup::default();
    // Room for more than one connection's worth, so the engine is not the bound.
    setup.engine.max_running = limit + 8;
    setup.engine.max_kv_tokens = (limit + 8) * 512;
    let s = start(setup).await;
    let h2 = connect_h2(s.addr).await;
    let body = completion("expert-00", 400, true);
    let mut pending: Vec<JoinHandle<Response<Incoming>>> = Vec::new();
    for _ in 0..limit + 1 {
        let (send, body) = (h2.send.clone(), body.clone());
        pending.push(tokio::spawn(async move {
            h2_request(send, "POST", "/v1/completions", &body).await
        }));
    }
    wait_running(&s, limit).await;
    // Hold a while: the extra stream must not reach the engine.
    let mut most = 0;
    for _ in 0..40 {
        let st = s.state.engine.stats();
        most = most.max(st.running + st.queued);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(most, limit, "one connection ran more than its stream bound");
    // The extra request is cancelled before it is sent; the others' bodies
    // stay alive (in their tasks' outputs) until the cut frees their slots.
    for p in &pending {
        p.abort();
    }
    h2.cut();
    wait_slots_freed(&s, "after the connection closed").await;
    drop(pending);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_frees_its_slot_and_the_connection_lives_on() {
    let s = start(Setup::default()).await;
    let max_tokens = 400;
    let h2 = connect_h2(s.addr).await;

    // Streaming: read the first event, then drop the body: the client resets
    // the stream (RST_STREAM CANCEL) while the connection stays open.
    let body = streaming_after_first_event(&h2, max_tokens).await;
    drop(body);
    wait_slots_freed(&s, "streaming, after RST_STREAM").await;
    let st = s.state.engine.stats();
    assert!(
        st.generated_tokens < max_tokens as u64,
        "the request ran to the end ({} tokens) instead of being cancelled",
        st.generated_tokens
    );
    assert!(!h2.conn.is_finished(), "the reset closed the connection");
    let m = h2.call("GET", "/metrics", "").await.text();
    assert_eq!(disconnects(&m), Some(1.0));

    // Not streaming: reset while the whole reply is being generated.
    let before = s.state.engine.stats().generated_tokens;
    let body = completion("expert-03", max_tokens, false);
    let send = h2.send.clone();
    let waiting =
        tokio::spawn(async move { h2_request(send, "POST", "/v1/completions", &body).await });
    wait_running(&s, 1).await;
    waiting.abort(); // drops the response future: RST_STREAM
    let _ = waiting.await;
    wait_slots_freed(&s, "not streaming, after RST_STREAM").await;
    let generated = s.state.engine.stats().generated_tokens - before;
    assert!(generated < max_tokens as u64, "ran to the end: {generated}");
    let m = h2.call("GET", "/metrics", "").await.text();
    assert_eq!(disconnects(&m), Some(2.0));
    assert_eq!(metric(&m, "meswitch_running_sequences"), Some(0.0));

    // The whole connection going away mid-stream frees the slot too.
    let body = streaming_after_first_event(&h2, max_tokens).await;
    // The body is kept, so nothing resets the stream itself.
    let before = s.state.engine.stats().generated_tokens;
    h2.cut();
    wait_slots_freed(&s, "after the connection closed").await;
    let generated = s.state.engine.stats().generated_tokens - before;
    assert!(generated < max_tokens as u64, "ran to the end: {generated}");
    drop(body);
    let m = get(s.addr, "/metrics").await.text();
    assert_eq!(disconnects(&m), Some(3.0));
    s.shutdown().await;
}
