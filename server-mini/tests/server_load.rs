//! Load test: N concurrent keep-alive clients for D seconds on loopback,
//! mixed experts (every expert, the base and `auto`), streaming and not.
//! Every request must succeed; prints throughput and latency percentiles.
//!
//! Short by default (CI): `MESWITCH_LOAD_SECS` (default 3),
//! `MESWITCH_LOAD_CLIENTS` (default 64), `MESWITCH_TEST_EXPERTS` (4 to 16,
//! default 4) and `MESWITCH_LOAD_DEVICE_EXPERTS` (a device budget of that many
//! experts' bytes, so the run loads and evicts; default: all fit) set the
//! run, e.g. the full one:
//!
//! ```text
//! MESWITCH_LOAD_SECS=60 MESWITCH_TEST_EXPERTS=16 cargo test -p meswitch-server --test server_load -- --nocapture
//! ```

mod server_support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use meswitch_server::engine::EngineConfig;
use server_support::*;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct ClientLog {
    /// Whole-request latency of each successful request.
    latencies: Vec<Duration>,
    /// Time to the first content chunk of streaming requests.
    ttfts: Vec<Duration>,
    completion_tokens: u64,
    failures: Vec<String>,
}

/// One request on a kept-alive connection; checks the reply fully.
async fn one_request(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    body: String,
    stream: bool,
    log: &mut ClientLog,
) -> Result<(), String> {
    let req = Request::post("/v1/chat/completions")
        .header("host", "load")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    if resp.headers().get("x-meswitch-expert").is_none() && status.is_success() {
        return Err("no x-meswitch-expert header".into());
    }
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    let mut first_content = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        if let Some(d) = frame.data_ref() {
            if first_content.is_none() && d.windows(11).any(|w| w == b"\"content\":\"") {
                first_content = Some(t0.elapsed());
            }
            bytes.extend_from_slice(d);
        }
    }
    let latency = t0.elapsed();
    let text = String::from_utf8_lossy(&bytes);
    if !status.is_success() {
        return Err(format!("{status}: {text}"));
    }
    let usage = if stream {
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        if events.last() != Some(&"data: [DONE]") {
            return Err(format!("stream did not end with [DONE]: {text}"));
        }
        let last: serde_json::Value =
            serde_json::from_str(&events[events.len() - 2][6..]).map_err(|e| e.to_string())?;
        if let Some(t) = first_content {
            log.ttfts.push(t);
        }
        last["usage"].clone()
    } else {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        v["usage"].clone()
    };
    let completion = usage["completion_tokens"].as_u64().ok_or("no usage")?;
    log.completion_tokens += completion;
    log.latencies.push(latency);
    Ok(())
}

async fn client(
    addr: std::net::SocketAddr,
    id: usize,
    deadline: Instant,
    models: Vec<String>,
) -> ClientLog {
    let mut log = ClientLog::default();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let topics = meswitch_server::server::demo::DEMO_DOMAINS;
    let mut n = 0usize;
    while Instant::now() < deadline {
        let k = id * 7919 + n;
        let model = &models[k % models.len()];
        let stream = (k / models.len()) % 2 == 0;
        let topic = topics[k % family().domains.len()].1[k % 6];
        // 8..=39 new tokens: a mix of short and longer generations.
        let max_tokens = 8 + (k * 13) % 32;
        let mut body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("Tell me something surprising about {topic}.")}],
            "max_tokens": max_tokens, "stream": stream, "temperature": 0.7, "seed": k,
        });
        if stream {
            // Streamed usage comes only when asked, in the chunk before [DONE].
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let body = body.to_string();
        if let Err(e) = one_request(&mut sender, body, stream, &mut log).await {
            log.failures.push(format!(
                "client {id} request {n} ({model}, stream {stream}): {e}"
            ));
            break;
        }
        n += 1;
    }
    log
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_clients_mixed_experts_zero_failures() {
    let secs = env_or("MESWITCH_LOAD_SECS", 3);
    let clients = env_or("MESWITCH_LOAD_CLIENTS", 64) as usize;
    let mut setup = Setup {
        engine: EngineConfig {
            max_running: 32,
            max_queued: 256,
            max_context: 512,
            max_kv_tokens: 32 * 512,
            ..EngineConfig::default()
        },
        ..Setup::default()
    };
    if let Ok(n) = std::env::var("MESWITCH_LOAD_DEVICE_EXPERTS") {
        let n: u64 = n.parse().expect("MESWITCH_LOAD_DEVICE_EXPERTS is a count");
        let largest = family()
            .experts
            .iter()
            .map(|e| std::fs::metadata(&e.path).unwrap().len())
            .max()
            .unwrap();
        setup.engine.device_budget_bytes = n * largest;
    }
    let s = start(setup).await;
    let mut models: Vec<String> = family().experts.iter().map(|e| e.name.clone()).collect();
    models.push(BASE_NAME.into());
    models.push("auto".into());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|id| tokio::spawn(client(s.addr, id, deadline, models.clone())))
        .collect();
    let mut all = ClientLog::default();
    for t in tasks {
        let log = t.await.unwrap();
        all.latencies.extend(log.latencies);
        all.ttfts.extend(log.ttfts);
        all.completion_tokens += log.completion_tokens;
        all.failures.extend(log.failures);
    }
    let wall = started.elapsed().as_secs_f64();
    all.latencies.sort();
    all.ttfts.sort();
    let n = all.latencies.len();
    println!(
        "load: {} experts + base + auto; {clients} clients, {secs} s requested, {wall:.1} s wall; {n} requests OK, {} failed; \
         {:.1} req/s, {:.0} generated tokens/s; latency p50 {:.1} ms p99 {:.1} ms; \
         streaming time to first content p50 {:.1} ms p99 {:.1} ms",
        family().experts.len(),
        all.failures.len(),
        n as f64 / wall,
        all.completion_tokens as f64 / wall,
        percentile(&all.latencies, 0.5),
        percentile(&all.latencies, 0.99),
        percentile(&all.ttfts, 0.5),
        percentile(&all.ttfts, 0.99),
    );
    let stats = s.state.engine.stats();
    println!(
        "engine: {} steps, {} generated tokens, {} finished, {} failed, {} expert loads, {} evictions",
        stats.steps, stats.generated_tokens, stats.finished_requests, stats.failed_requests,
        stats.expert_loads, stats.expert_evictions
    );
    assert!(
        all.failures.is_empty(),
        "{} failures, first: {}",
        all.failures.len(),
        all.failures[0]
    );
    assert!(
        n >= clients,
        "every client finished at least one request: {n}"
    );
    assert_eq!(stats.failed_requests, 0);
    assert_eq!(stats.finished_requests, n as u64);
    s.shutdown().await;
}
