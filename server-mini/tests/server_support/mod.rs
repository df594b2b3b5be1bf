//! Shared by the server tests: the demo family (built once per test binary),
//! servers on free loopback ports, a raw HTTP/1.1 client (for malformed
//! requests and disconnects) and a keyword stand-in for the domain classifier.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use meswitch_server::engine::{EngineConfig, ExpertSource, Router};
use meswitch_server::model::CpuBackend;
use meswitch_server::server::admin::AdminConfig;
use meswitch_server::server::demo::{build_demo_family, DemoFamily, DEMO_DOMAINS};
use meswitch_server::server::policy::{train_demo_router, DomainClassifier, RoutingPolicy};
use meswitch_server::server::serving::{build_state, ServeConfig};
use meswitch_server::server::{Limits, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Experts in the test family: `MESWITCH_TEST_EXPERTS` (4 to 16), default 4
/// (fewer than the demo's 16: faster to build).
pub fn test_experts() -> usize {
    std::env::var("MESWITCH_TEST_EXPERTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4usize)
        .clamp(4, DEMO_DOMAINS.len())
}

pub fn family() -> &'static DemoFamily {
    static FAMILY: OnceLock<(tempfile::TempDir, DemoFamily)> = OnceLock::new();
    &FAMILY
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let f = build_demo_family(dir.path(), test_experts(), |_| {}).unwrap();
            (dir, f)
        })
        .1
}

/// The synthetic tokenizer's byte ids back to text (id = 3 + byte).
fn synth_text(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .filter(|&&i| (3..259).contains(&i))
        .map(|&i| (i - 3) as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Stand-in domain classifier: the demo domain whose topic words the prompt
/// contains gets `KEYWORD_CONFIDENCE`, the rest share the remainder.
pub struct KeywordClassifier {
    domains: Vec<String>,
}

pub const KEYWORD_CONFIDENCE: f32 = 0.9;

impl DomainClassifier<CpuBackend> for KeywordClassifier {
    fn domains(&self) -> &[String] {
        &self.domains
    }
    fn probabilities(&self, _: &CpuBackend, prompt: &[u32]) -> Result<Vec<f32>, String> {
        let text = synth_text(prompt);
        let n = self.domains.len();
        let hit = DEMO_DOMAINS[..n]
            .iter()
            .position(|(_, topics)| topics.iter().any(|t| text.contains(t)));
        Ok(match hit {
            Some(h) => {
                let mut p = vec![(1.0 - KEYWORD_CONFIDENCE) / (n - 1) as f32; n];
                p[h] = KEYWORD_CONFIDENCE;
                p
            }
            None => vec![1.0 / n as f32; n],
        })
    }
}

pub fn keyword_router(threshold: f32) -> Box<dyn Router<CpuBackend>> {
    let fam = family();
    let domains: Vec<String> = fam.domains.iter().map(|(_, d)| d.clone()).collect();
    let map: BTreeMap<String, Option<String>> = fam
        .domains
        .iter()
        .map(|(e, d)| (d.clone(), Some(e.clone())))
        .collect();
    Box::new(RoutingPolicy {
        classifier: KeywordClassifier { domains },
        domain_to_expert: map,
        threshold,
        default: None,
    })
}

pub struct Setup {
    pub experts: Vec<ExpertSource>,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub admin: Option<AdminConfig>,
    pub router: RouterKind,
}

/// Which classifier `auto` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterKind {
    None,
    /// The keyword stand-in (deterministic routes).
    Keyword,
    /// The demo's HiddenRouter, trained at start (the shipped path).
    DemoHidden,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            experts: family().experts.clone(),
            engine: EngineConfig {
                max_running: 8,
                max_queued: 64,
                max_context: 512,
                max_kv_tokens: 8 * 512,
                ..EngineConfig::default()
            },
            limits: Limits {
                max_body_bytes: 64 * 1024,
                max_context: 512,
                max_tokens: 400,
                default_max_tokens: 16,
            },
            admin: None,
            router: RouterKind::Keyword,
        }
    }
}

pub const BASE_NAME: &str = "demo-base";

pub async fn start(setup: Setup) -> RunningServer {
    let cfg = ServeConfig {
        base: family().base.clone(),
        base_name: Some(BASE_NAME.into()),
        experts: setup.experts,
        engine: setup.engine,
        limits: setup.limits,
        admin: setup.admin,
    };
    let router = setup.router;
    let state = tokio::task::spawn_blocking(move || {
        build_state(
            cfg,
            Box::new(move |backend, tokenizer| match router {
                RouterKind::None => Ok(None),
                RouterKind::Keyword => Ok(Some(keyword_router(0.5))),
                RouterKind::DemoHidden => train_demo_router(backend, tokenizer, family(), 0.5),
            }),
        )
    })
    .await
    .unwrap()
    .unwrap();
    RunningServer::bind("127.0.0.1:0".parse().unwrap(), state)
        .await
        .unwrap()
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not SSE: {e:?}"))
                    .to_string()
            })
            .collect()
    }
    /// The OpenAI error object of an error reply.
    pub fn error(&self) -> serde_json::Value {
        let v = self.json();
        let e = v["error"].clone();
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error body lacks {k}: {v}");
        }
        e
    }
}

/// Sends raw bytes, reads until the server closes (requests carry `Connection: close`).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    parse_reply(&buf)
}

pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    raw(addr, &request("GET", path, &[], b"")).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
    raw(
        addr,
        &request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        ),
    )
    .await
}

pub async fn post_auth(addr: SocketAddr, path: &str, token: &str, body: &str) -> Reply {
    let auth = format!("Bearer {token}");
    raw(
        addr,
        &request("POST", path, &[("Authorization", &auth)], body.as_bytes()),
    )
    .await
}

pub fn parse_reply(buf: &[u8]) -> Reply {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end")
        + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(&buf[end..])
    } else {
        buf[end..].to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// A value of an unlabelled sample in Prometheus text.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|r| r.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

pub fn models_dir_with(files: &[&ExpertSource]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    for f in files {
        std::fs::copy(&f.path, models.join(f.path.file_name().unwrap())).unwrap();
    }
    (dir, models)
}
