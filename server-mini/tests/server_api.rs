//! The HTTP server end to end on a loopback port: every endpoint, streaming,
//! `auto` routing, unknown experts, malformed and oversized requests,
//! back-pressure, mid-stream disconnects, admin load/unload.
//!
//! `auto` routes with a keyword stand-in for the domain classifier (the
//! routing policy and the HTTP path are the real ones).

mod server_support;

use std::time::{Duration, Instant};

use server_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn chat_body(model: &str, content: &str, extra: &str) -> String {
    let msg = serde_json::json!([{"role": "user", "content": content}]);
    format!(r#"{{"model":"{model}","messages":{msg}{extra}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_and_routing_of_paths() {
    let s = start(Setup::default()).await;
    let models = get(s.addr, "/v1/models").await;
    assert_eq!(models.status, 200);
    let ids: Vec<String> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let mut want = vec![BASE_NAME.to_string()];
    want.extend(family().experts.iter().map(|e| e.name.clone()));
    want.push("auto".into());
    assert_eq!(ids, want);

    let health = get(s.addr, "/health").await;
    assert_eq!(
        (health.status, health.json()["status"].as_str()),
        (200, Some("ok"))
    );

    let r = post(
        s.addr,
        "/v1/completions",
        r#"{"model":"expert-01","prompt":"Hello","max_tokens":3}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = get(s.addr, "/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let text = m.text();
    for family in [
        "meswitch_http_requests_total",
        "meswitch_time_to_first_token_seconds",
        "meswitch_inter_token_latency_seconds",
        "meswitch_queue_depth",
        "meswitch_expert_requests_total",
        "meswitch_expert_loads_total",
        "meswitch_expert_evictions_total",
        "meswitch_expert_bytes",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no {family} in\n{text}"
        );
    }
    assert_eq!(
        metric(
            &text,
            "meswitch_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "meswitch_completion_tokens_total{model=\"expert-01\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "meswitch_time_to_first_token_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "meswitch_inter_token_latency_seconds_count"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            "meswitch_expert_requests_total{expert=\"expert-01\"}"
        ),
        Some(1.0)
    );

    assert_eq!(get(s.addr, "/nope").await.status, 404);
    let wrong = get(s.addr, "/v1/chat/completions").await;
    assert_eq!(wrong.status, 405);
    wrong.error();
    assert_eq!(post(s.addr, "/health", "{}").await.status, 405);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_streaming_and_not_agree() {
    let s = start(Setup::default()).await;
    for expert in ["expert-02", BASE_NAME] {
        let body = chat_body(
            expert,
            "Give me a short summary of risotto.",
            r#","max_tokens":12,"temperature":0"#,
        );
        let whole = post(s.addr, "/v1/chat/completions", &body).await;
        assert_eq!(whole.status, 200, "{}", whole.text());
        assert_eq!(whole.header("x-meswitch-expert"), Some(expert));
        assert!(whole.header("x-meswitch-route-confidence").is_none());
        let v = whole.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], expert);
        let usage = &v["usage"];
        let (prompt, completion) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        assert!(
            prompt > 30,
            "byte-level prompt of a templated message: {prompt}"
        );
        assert!((1..=12).contains(&completion));
        assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
        let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
        assert_eq!(finish == "length", completion == 12, "{v}");
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();

        let streamed = post(
            s.addr,
            "/v1/chat/completions",
            &body.replace(
                r#""max_tokens""#,
                r#""stream":true,"stream_options":{"include_usage":true},"max_tokens""#,
            ),
        )
        .await;
        assert_eq!(streamed.status, 200);
        assert_eq!(streamed.header("content-type"), Some("text/event-stream"));
        assert_eq!(streamed.header("x-meswitch-expert"), Some(expert));
        let events = streamed.sse_data();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == expert));
        let joined: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(joined, text, "greedy: streamed text = whole text");
        let (usage_chunk, rest) = chunks.split_last().unwrap();
        assert_eq!(usage_chunk["choices"], serde_json::json!([]));
        assert_eq!(
            usage_chunk["usage"], *usage,
            "include_usage: one last chunk"
        );
        let finish_chunk = rest.last().unwrap();
        assert_eq!(
            finish_chunk["choices"][0]["finish_reason"].as_str(),
            Some(finish)
        );
        assert!(rest.iter().all(|c| c.get("usage").is_none()));
    }
    // /v1/completions: text and token-id prompts.
    let r = post(
        s.addr,
        "/v1/completions",
        r#"{"model":"expert-00","prompt":"Hi","max_tokens":4,"temperature":0}"#,
    )
    .await;
    let v = r.json();
    assert_eq!(
        (v["object"].as_str(), v["usage"]["prompt_tokens"].as_u64()),
        (Some("text_completion"), Some(3)),
        "BOS + 2 bytes: {v}"
    );
    let ids = post(
        s.addr,
        "/v1/completions",
        r#"{"model":"expert-00","prompt":[1,75,108],"max_tokens":4,"temperature":0}"#,
    )
    .await;
    assert_eq!(
        ids.json()["choices"][0]["text"],
        v["choices"][0]["text"],
        "ids of <s>Hi give the same text"
    );
    let sse = post(
        s.addr,
        "/v1/completions",
        r#"{"model":"expert-00","prompt":"Hi","max_tokens":4,"temperature":0,"stream":true}"#,
    )
    .await;
    let events = sse.sse_data();
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| !e.contains("usage")),
        "no usage without stream_options.include_usage"
    );
    let joined: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_routes_by_domain_and_reports_confidence() {
    let s = start(Setup::default()).await;
    let fam = family();
    for (i, (expert, domain)) in fam.domains.iter().enumerate() {
        let topic = meswitch_server::server::demo::DEMO_DOMAINS[i].1[0];
        for stream in [false, true] {
            let extra = format!(r#","max_tokens":2,"stream":{stream}"#);
            let r = post(
                s.addr,
                "/v1/chat/completions",
                &chat_body("auto", &format!("Can you explain {topic} to me?"), &extra),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-meswitch-expert"), Some(expert.as_str()));
            assert_eq!(r.header("x-meswitch-route-domain"), Some(domain.as_str()));
            let conf: f32 = r
                .header("x-meswitch-route-confidence")
                .unwrap()
                .parse()
                .unwrap();
            assert!((conf - KEYWORD_CONFIDENCE).abs() < 1e-3);
            let first = if stream {
                serde_json::from_str(&r.sse_data()[0]).unwrap()
            } else {
                r.json()
            };
            assert_eq!(first["model"], expert.as_str());
            assert_eq!(first["meswitch_route"]["domain"], domain.as_str());
        }
    }
    // No topic word: every class equally likely, under the threshold → the base model.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body("auto", "zzz", r#","max_tokens":2"#),
    )
    .await;
    assert_eq!(r.header("x-meswitch-expert"), Some(BASE_NAME));
    assert_eq!(r.json()["meswitch_route"]["expert"], BASE_NAME);
    s.shutdown().await;

    // Without a router `auto` is a 400.
    let s = start(Setup {
        router: RouterKind::None,
        ..Setup::default()
    })
    .await;
    let r = post(s.addr, "/v1/chat/completions", &chat_body("auto", "hi", "")).await;
    assert_eq!(
        (r.status, r.error()["param"].as_str()),
        (400, Some("model"))
    );
    assert!(!get(s.addr, "/v1/models").await.text().contains("\"auto\""));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_openai_errors_and_disturb_nothing() {
    let s = start(Setup::default()).await;
    let long = "x".repeat(600);
    let cases: Vec<(String, u16, Option<&str>, Option<&str>)> = vec![
        ("{not json".into(), 400, None, None),
        ("[]".into(), 400, None, None),
        (
            r#"{"messages":[{"role":"user","content":"x"}]}"#.into(),
            400,
            Some("model"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","max_tokens":"5""#),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","temperature":"hot""#),
            400,
            Some("temperature"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","stream":1"#),
            400,
            Some("stream"),
            None,
        ),
        (
            r#"{"model":"expert-01","messages":[{"role":"user"}]}"#.into(),
            400,
            Some("messages[0].content"),
            None,
        ),
        (
            chat_body("no-such-expert", "x", ""),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            chat_body("expert-01", &long, ""),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            chat_body("expert-01", "x", r#","max_tokens":0"#),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","max_tokens":401"#),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat_body("expert-01", &"y".repeat(300), r#","max_tokens":300"#),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            chat_body("expert-01", "x", r#","n":9"#),
            400,
            Some("n"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","n":0"#),
            400,
            Some("n"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","n":true"#),
            400,
            Some("n"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","logprobs":"yes""#),
            400,
            Some("logprobs"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","logprobs":true,"top_logprobs":21"#),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","logprobs":true,"top_logprobs":"2""#),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            chat_body("expert-01", "x", r#","top_logprobs":2"#),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            chat_body(
                "expert-01",
                "x",
                r#","stream_options":{"include_usage":true}"#,
            ),
            400,
            Some("stream_options"),
            None,
        ),
        (
            chat_body(
                "expert-01",
                "x",
                r#","stream":true,"stream_options":[true]"#,
            ),
            400,
            Some("stream_options"),
            None,
        ),
        (
            chat_body(
                "expert-01",
                "x",
                r#","stream":true,"stream_options":{"include_usage":1}"#,
            ),
            400,
            Some("stream_options.include_usage"),
            None,
        ),
    ];
    for (body, status, param, code) in &cases {
        let r = post(s.addr, "/v1/chat/completions", body).await;
        assert_eq!(r.status, *status, "{body}: {}", r.text());
        let e = r.error();
        assert_eq!(e["param"].as_str(), *param, "{body}: {e}");
        assert_eq!(e["code"].as_str(), *code, "{body}: {e}");
        // OpenAI answers an unknown model with 404 and type invalid_request_error too.
        assert_eq!(e["type"], "invalid_request_error");
    }
    let r = post(
        s.addr,
        "/v1/completions",
        r#"{"model":"expert-01","prompt":[1,99999]}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.error()["param"].as_str()),
        (400, Some("prompt"))
    );
    for bad in [r#""logprobs":6"#, r#""logprobs":true"#, r#""logprobs":-1"#] {
        let body = format!(r#"{{"model":"expert-01","prompt":"x",{bad}}}"#);
        let r = post(s.addr, "/v1/completions", &body).await;
        assert_eq!(
            (r.status, r.error()["param"].as_str()),
            (400, Some("logprobs")),
            "{bad}"
        );
    }

    // Oversized bodies: declared by Content-Length (refused before reading), and chunked.
    let big = format!(
        r#"{{"model":"expert-01","prompt":"{}"}}"#,
        "a".repeat(70 * 1024)
    );
    let r = post(s.addr, "/v1/completions", &big).await;
    assert_eq!(
        (r.status, r.error()["code"].as_str()),
        (413, Some("request_too_large"))
    );
    let mut chunked = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in big.as_bytes().chunks(8192) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw(s.addr, &chunked).await.status, 413);
    // Garbage that is not HTTP at all: the connection is refused by hyper, the server lives on.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink).await;

    // Every error was answered and a good request still works.
    let ok = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body("expert-01", "x", r#","max_tokens":2"#),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let stats = s.state.engine.stats();
    assert_eq!(stats.failed_requests, 0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_frees_its_slot() {
    let s = start(Setup::default()).await;
    let max_tokens = 400;
    let body = serde_json::json!({"model": "expert-03", "prompt": "Once", "max_tokens": max_tokens,
                                  "stream": true, "temperature": 0})
    .to_string();
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(&request("POST", "/v1/completions", &[], body.as_bytes()))
        .await
        .unwrap();
    // Read until the first SSE event has arrived, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == b"data: ") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before any event");
        got.extend_from_slice(&buf[..n]);
    }
    drop(c);
    let left = Instant::now();
    loop {
        let st = s.state.engine.stats();
        if st.running == 0 && st.queued == 0 {
            break;
        }
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "slot still held: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let st = s.state.engine.stats();
    assert!(
        st.generated_tokens < max_tokens as u64,
        "the request ran to the end ({} tokens) instead of being cancelled",
        st.generated_tokens
    );
    let m = get(s.addr, "/metrics").await.text();
    assert_eq!(
        metric(
            &m,
            "meswitch_client_disconnects_total{endpoint=\"/v1/completions\"}"
        ),
        Some(1.0)
    );

    // Not streaming: the client hangs up while the whole reply is being generated.
    let before = s.state.engine.stats().generated_tokens;
    let body = body.replace(r#""stream":true"#, r#""stream":false"#);
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(&request("POST", "/v1/completions", &[], body.as_bytes()))
        .await
        .unwrap();
    let admitted = Instant::now();
    while s.state.engine.stats().running == 0 {
        assert!(
            admitted.elapsed() < Duration::from_secs(10),
            "never admitted"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(c);
    let left = Instant::now();
    while s.state.engine.stats().running > 0 {
        assert!(left.elapsed() < Duration::from_secs(10), "slot still held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let generated = s.state.engine.stats().generated_tokens - before;
    println!("non-streaming request cancelled after {generated} of {max_tokens} tokens");
    assert!(generated < max_tokens as u64, "ran to the end: {generated}");
    let m = get(s.addr, "/metrics").await.text();
    assert_eq!(
        metric(
            &m,
            "meswitch_client_disconnects_total{endpoint=\"/v1/completions\"}"
        ),
        Some(2.0)
    );
    assert_eq!(metric(&m, "meswitch_running_sequences"), Some(0.0));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_and_shutdown_is_503_with_retry_after() {
    let mut setup = Setup::default();
    setup.engine.max_running = 1;
    setup.engine.max_queued = 1;
    setup.engine.max_kv_tokens = 512;
    let s = start(setup).await;
    let body = r#"{"model":"expert-00","prompt":"Once","max_tokens":400,"temperature":0}"#;
    let replies = futures_join(s.addr, body, 4).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().filter(|&&x| x == 200).count() >= 1,
        "{statuses:?}"
    );
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        !limited.is_empty(),
        "4 long requests for 1 slot + 1 queue place: {statuses:?}"
    );
    for r in limited {
        assert!(r.header("retry-after").unwrap().parse::<u32>().unwrap() >= 1);
        assert_eq!(r.error()["type"], "rate_limit_error");
    }
    // n = 3 with one slot and one queue place: the third choice is refused,
    // the whole request with it, and its first two choices leave the engine.
    let three = body.replace(r#""max_tokens""#, r#""n":3,"max_tokens""#);
    let r = post(s.addr, "/v1/completions", &three).await;
    assert_eq!(r.status, 429, "{}", r.text());
    wait_idle(s.addr).await;
    s.state.begin_shutdown();
    let r = post(s.addr, "/v1/completions", body).await;
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert_eq!(get(s.addr, "/health").await.status, 503);
    s.shutdown().await;
}

fn chunks_of(r: &Reply) -> Vec<serde_json::Value> {
    let events = r.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// `n` choices are independent sequences seeded seed+i, indexed 0..n, with
/// the prompt counted once in usage; streamed, each chunk names its choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_seeded_sequences_with_summed_usage() {
    let s = start(Setup::default()).await;
    let sampled = |extra: &str| {
        chat_body(
            "expert-03",
            "Tell me about rivers.",
            &format!(r#","max_tokens":8,"temperature":1.0,"seed":40{extra}"#),
        )
    };
    let whole = post(s.addr, "/v1/chat/completions", &sampled(r#","n":3"#)).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    let v = whole.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let texts: Vec<&str> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["message"]["content"].as_str().unwrap()
        })
        .collect();
    let single = post(
        s.addr,
        "/v1/chat/completions",
        &sampled("").replace(r#""seed":40"#, r#""seed":41"#),
    )
    .await
    .json();
    assert_eq!(
        single["choices"][0]["message"]["content"], texts[1],
        "choice 1 is seed + 1"
    );
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"], single["usage"]["prompt_tokens"]);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((3..=24).contains(&completion), "{usage}");
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");

    let streamed = post(
        s.addr,
        "/v1/chat/completions",
        &sampled(r#","n":3,"stream":true,"stream_options":{"include_usage":true}"#),
    )
    .await;
    let chunks = chunks_of(&streamed);
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["usage"], *usage);
    for (i, text) in texts.iter().enumerate() {
        let of_i: Vec<&serde_json::Value> = rest
            .iter()
            .map(|c| &c["choices"][0])
            .filter(|c| c["index"] == i)
            .collect();
        assert_eq!(of_i[0]["delta"]["role"], "assistant");
        let joined: String = of_i
            .iter()
            .filter_map(|c| c["delta"]["content"].as_str())
            .collect();
        assert_eq!(joined, *text, "choice {i}");
        assert_eq!(
            of_i.iter()
                .filter(|c| !c["finish_reason"].is_null())
                .count(),
            1
        );
    }

    // `auto` routes once; every choice is served by the routed expert.
    let auto = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(
            "auto",
            "Can you explain integrals to me?",
            r#","max_tokens":4,"n":2"#,
        ),
    )
    .await;
    assert_eq!(auto.status, 200, "{}", auto.text());
    let v = auto.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["meswitch_route"]["expert"], v["model"]);
    assert_eq!(auto.header("x-meswitch-expert"), v["model"].as_str());
    s.shutdown().await;
}

/// Logprobs in both endpoints' shapes, streamed and not; greedy, so the
/// sampled token is the most likely and streaming repeats the whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_in_openai_shapes_streamed_and_not() {
    let s = start(Setup::default()).await;
    let body = chat_body(
        "expert-01",
        "What is an integral?",
        r#","max_tokens":6,"temperature":0,"logprobs":true,"top_logprobs":3"#,
    );
    let v = post(s.addr, "/v1/chat/completions", &body).await.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    assert!(content.len() <= v["usage"]["completion_tokens"].as_u64().unwrap() as usize);
    let mut all_bytes = Vec::new();
    for t in content {
        let token = t["token"].as_str().unwrap();
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        // The token's own bytes: its text's, unless it is a piece of a
        // character (shown as U+FFFD).
        if !token.contains('\u{FFFD}') {
            assert_eq!(bytes, token.as_bytes());
        }
        all_bytes.extend(bytes);
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["logprob"].as_f64().unwrap(), lp, "greedy: the best");
        assert!(top
            .windows(2)
            .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
    }
    assert_eq!(
        String::from_utf8_lossy(&all_bytes),
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        "the tokens' bytes end to end are the answer"
    );
    let streamed = post(
        s.addr,
        "/v1/chat/completions",
        &body.replace(r#""max_tokens""#, r#""stream":true,"max_tokens""#),
    )
    .await;
    let streamed_content: Vec<serde_json::Value> = chunks_of(&streamed)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed_content, *content);
    let without = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(
            "expert-01",
            "What is an integral?",
            r#","max_tokens":6,"temperature":0"#,
        ),
    )
    .await
    .json();
    assert_eq!(without["choices"][0]["logprobs"], serde_json::Value::Null);
    assert_eq!(
        without["choices"][0]["message"], v["choices"][0]["message"],
        "logprobs change no token"
    );

    let c = post(
        s.addr,
        "/v1/completions",
        r#"{"model":"expert-01","prompt":"Once","max_tokens":5,"temperature":0,"logprobs":2}"#,
    )
    .await
    .json();
    let lp = &c["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    let n = tokens.len();
    assert!(n >= 1);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), n);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    for k in 1..n {
        let prev = tokens[k - 1].as_str().unwrap().chars().count() as u64;
        assert_eq!(offsets[k], offsets[k - 1] + prev);
    }
    for (k, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!((1..=2).contains(&top.len()));
        let best = top
            .values()
            .map(|l| l.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(best, lp["token_logprobs"][k].as_f64().unwrap());
    }
    s.shutdown().await;
}

/// Waits until the engine has nothing queued or running.
async fn wait_idle(addr: std::net::SocketAddr) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let h = get(addr, "/health").await.json();
        if h["queued"] == 0 && h["running"] == 0 {
            return;
        }
        assert!(Instant::now() < until, "the engine stays busy: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn futures_join(addr: std::net::SocketAddr, body: &'static str, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(post(addr, "/v1/completions", body)))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_the_trained_hidden_state_router() {
    // The shipped path: the demo's HiddenRouter trained on the demo's labelled queries.
    let s = start(Setup {
        router: RouterKind::DemoHidden,
        ..Setup::default()
    })
    .await;
    let fam = family();
    let expert_of = |domain: &str| {
        fam.domains
            .iter()
            .find(|(_, d)| d == domain)
            .map(|(e, _)| e.clone())
    };
    let mut right = 0;
    for q in &fam.train {
        let r = post(
            s.addr,
            "/v1/chat/completions",
            &chat_body("auto", &q.text, r#","max_tokens":1"#),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let domain = r.header("x-meswitch-route-domain").unwrap().to_string();
        let conf: f32 = r
            .header("x-meswitch-route-confidence")
            .unwrap()
            .parse()
            .unwrap();
        assert!((0.0..=1.0).contains(&conf));
        let expert = r.header("x-meswitch-expert").unwrap();
        // Confident → the domain's expert; unsure (under the 0.5 threshold) → the base.
        let want = if conf >= 0.5 {
            expert_of(&domain).unwrap()
        } else {
            BASE_NAME.to_string()
        };
        assert_eq!(expert, want, "{}", q.text);
        right += usize::from(domain == q.domain);
    }
    let accuracy = right as f64 / fam.train.len() as f64;
    println!("demo router, training queries routed to their domain: {accuracy:.3}");
    assert!(accuracy >= 0.9, "training accuracy {accuracy}");
    let probe = chat_body("auto", &fam.train[0].text, r#","max_tokens":1"#);
    let first = post(s.addr, "/v1/chat/completions", &probe).await;
    s.shutdown().await;

    // The next start loads the router the first one saved instead of retraining.
    let saved = std::fs::metadata(&fam.router_file)
        .unwrap()
        .modified()
        .unwrap();
    let s = start(Setup {
        router: RouterKind::DemoHidden,
        ..Setup::default()
    })
    .await;
    assert_eq!(
        std::fs::metadata(&fam.router_file)
            .unwrap()
            .modified()
            .unwrap(),
        saved
    );
    let again = post(s.addr, "/v1/chat/completions", &probe).await;
    for h in [
        "x-meswitch-route-domain",
        "x-meswitch-route-confidence",
        "x-meswitch-expert",
    ] {
        assert_eq!(again.header(h), first.header(h), "{h}");
    }
    s.shutdown().await;
}

/// The demo tokenizer spells byte b as token id `DEMO_FIRST_BYTE_ID + b`
/// (synth/tokenizer.rs), so a logprob's `bytes` name its token.
const DEMO_FIRST_BYTE_ID: u32 = 3;

/// A chat answer's token ids (from its logprobs' bytes) and content.
async fn greedy_ids(addr: std::net::SocketAddr, extra: &str) -> (Vec<u32>, String) {
    let body = chat_body(
        "expert-02",
        "Tell me about rivers and lakes.",
        &format!(r#","max_tokens":24,"temperature":0,"logprobs":true{extra}"#),
    );
    let r = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let ids = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let bytes = t["bytes"].as_array().unwrap();
            assert_eq!(bytes.len(), 1, "one byte per demo token: {t}");
            DEMO_FIRST_BYTE_ID + bytes[0].as_u64().unwrap() as u32
        })
        .collect();
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    (ids, content)
}

/// `logit_bias` −100 bans tokens from a greedy answer, +100 forces one even
/// when sampling; a forced piece of a UTF-8 character reports its real byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_bans_and_forces_tokens() {
    let s = start(Setup::default()).await;
    let (greedy, _) = greedy_ids(s.addr, "").await;
    assert!(!greedy.is_empty());
    let mut banned = greedy.clone();
    banned.sort_unstable();
    banned.dedup();
    let bias: Vec<String> = banned.iter().map(|id| format!(r#""{id}":-100"#)).collect();
    let (without, _) =
        greedy_ids(s.addr, &format!(r#","logit_bias":{{{}}}"#, bias.join(","))).await;
    assert!(!without.is_empty());
    assert!(
        without.iter().all(|id| !banned.contains(id)),
        "banned {banned:?}, got {without:?}"
    );

    // '~' forced: every token, greedy or sampled.
    let tilde = DEMO_FIRST_BYTE_ID + u32::from(b'~');
    let (forced, content) =
        greedy_ids(s.addr, &format!(r#","logit_bias":{{"{tilde}":100}}"#)).await;
    assert_eq!(forced, vec![tilde; 24]);
    assert_eq!(content, "~".repeat(24));
    let sampled = post(
        s.addr,
        "/v1/completions",
        &format!(
            r#"{{"model":"expert-02","prompt":"Rivers","max_tokens":16,"temperature":2,"seed":3,"logit_bias":{{"{tilde}":100}}}}"#
        ),
    )
    .await
    .json();
    assert_eq!(sampled["choices"][0]["text"], "~".repeat(16));

    // The first byte of "é" (C3) alone: the text shows U+FFFD, bytes the byte.
    let c3 = DEMO_FIRST_BYTE_ID + 0xC3;
    let body = chat_body(
        "expert-02",
        "Hi",
        &format!(r#","max_tokens":2,"temperature":0,"logprobs":true,"logit_bias":{{"{c3}":100}}"#),
    );
    let v = post(s.addr, "/v1/chat/completions", &body).await.json();
    for t in v["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        assert_eq!(t["token"], "\u{FFFD}");
        assert_eq!(t["bytes"], serde_json::json!([0xC3]), "{t}");
    }
    s.shutdown().await;
}

/// OpenAI's frequency penalty counts generated tokens: a greedy answer is
/// unchanged up to its first repeated token, and changes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_penalty_changes_a_repeating_greedy_answer() {
    let s = start(Setup::default()).await;
    let (plain, _) = greedy_ids(s.addr, "").await;
    let first_repeat = (1..plain.len())
        .find(|&k| plain[..k].contains(&plain[k]))
        .expect("a 24-token greedy answer over a tiny model repeats a token");
    let (penalised, _) = greedy_ids(s.addr, r#","frequency_penalty":2"#).await;
    assert_eq!(
        penalised[..first_repeat],
        plain[..first_repeat],
        "before any repeat the penalty touches no winner"
    );
    assert_ne!(penalised, plain);
    // Zero penalties are the plain answer (no longer refused).
    let (zero, _) = greedy_ids(s.addr, r#","frequency_penalty":0,"presence_penalty":0"#).await;
    assert_eq!(zero, plain);
    s.shutdown().await;
}

/// Out-of-range penalties and malformed or out-of-vocabulary `logit_bias`
/// are 400s naming their field; the server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_field_errors_name_their_param() {
    let s = start(Setup::default()).await;
    let cases = [
        (r#","frequency_penalty":2.5"#, "frequency_penalty"),
        (r#","presence_penalty":-2.5"#, "presence_penalty"),
        (r#","presence_penalty":"high""#, "presence_penalty"),
        (r#","logit_bias":[5]"#, "logit_bias"),
        (r#","logit_bias":{"five":1}"#, "logit_bias"),
        (r#","logit_bias":{"5":101}"#, "logit_bias"),
        // Past the demo tokenizer's 259 ids (the model's 512 rows included).
        (r#","logit_bias":{"300":1}"#, "logit_bias"),
        (r#","logit_bias":{"99999":-5}"#, "logit_bias"),
    ];
    for (extra, param) in cases {
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let body = match path {
                "/v1/completions" => format!(r#"{{"model":"expert-01","prompt":"x"{extra}}}"#),
                _ => chat_body("expert-01", "x", extra),
            };
            let r = post(s.addr, path, &body).await;
            assert_eq!(r.status, 400, "{path} {extra}: {}", r.text());
            assert_eq!(r.error()["param"].as_str(), Some(param), "{path} {extra}");
        }
    }
    let ok = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(
            "expert-01",
            "x",
            r#","max_tokens":2,"logit_bias":{"258":-100}"#,
        ),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    s.shutdown().await;
}
