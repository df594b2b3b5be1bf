//! `meswitch serve` as a user runs it: the demo family built in a cache
//! folder, the URL printed, requests served, SIGTERM stops it cleanly; and a
//! second start reuses the cache.
#![cfg(unix)]

mod server_support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use server_support::{get, post};

/// Starts the demo server on a free port; returns it and its address.
fn spawn_demo(cache: &std::path::Path) -> (Child, SocketAddr, Duration) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meswitch"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--demo-experts",
            "2",
            "--cache-dir",
        ])
        .arg(cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("exited before serving").unwrap();
        if let Some(rest) = line.split(" on http://").nth(1) {
            break rest.trim().parse::<SocketAddr>().unwrap();
        }
    };
    let ready = started.elapsed();
    // Keep reading stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr, ready)
}

fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "exit status {exit}");
            return;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_arguments_builds_and_serves_the_demo() {
    let cache = tempfile::tempdir().unwrap();
    let (child, addr, first) = spawn_demo(cache.path());
    assert!(addr.ip().is_loopback());
    assert_eq!(get(addr, "/health").await.status, 200);
    let models = get(addr, "/v1/models").await.text();
    for id in ["demo-base", "expert-00", "expert-01", "auto"] {
        assert!(
            models.contains(&format!("\"{id}\"")),
            "{id} missing: {models}"
        );
    }
    let r = post(
        addr,
        "/v1/chat/completions",
        r#"{"model":"auto","messages":[{"role":"user","content":"Can you explain integrals to me?"}],"max_tokens":4}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-meswitch-route-confidence").is_some());
    terminate(child);

    let (child, addr, second) = spawn_demo(cache.path());
    println!("demo start: {first:?} building, {second:?} from the cache");
    assert_eq!(get(addr, "/health").await.status, 200);
    terminate(child);
    assert_eq!(
        std::fs::read_dir(cache.path()).unwrap().count(),
        1,
        "one complete demo folder, no partial build left"
    );
}
