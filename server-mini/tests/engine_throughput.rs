//! Decode throughput of the engine on CPU with continuous batching against
//! one request at a time, on the "small" synthetic family (32 requests over
//! 4 experts and the base), and what asking for logprobs costs. A
//! measurement, not a check: `#[ignore]`d, run with
//! `cargo test --release -p meswitch-server --test engine_throughput -- --ignored --nocapture`.

mod engine_support;

use std::time::Instant;

use engine_support::{collect, family_of, greedy};
use meswitch_server::engine::{EngineConfig, ExpertChoice};

const REQUESTS: usize = 32;
const PROMPT_TOKENS: usize = 32;
const MAX_TOKENS: usize = 64;

/// Top alternatives per token when the run asks for logprobs (the
/// completions API's maximum).
const TOP_LOGPROBS: usize = 5;

fn run(
    fam: &engine_support::Family,
    max_running: usize,
    logprobs: Option<usize>,
) -> (f64, usize, u64) {
    let engine = fam.start_engine(EngineConfig {
        max_running,
        ..Default::default()
    });
    let started = Instant::now();
    let mut handles: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let choice = match i % 5 {
                4 => ExpertChoice::Base,
                e => ExpertChoice::Named(format!("e{e}")),
            };
            let prompt = (0..PROMPT_TOKENS)
                .map(|t| ((i * 31 + t * 7) % 500) as u32)
                .collect();
            let mut req = greedy(prompt, choice, MAX_TOKENS);
            req.logprobs = logprobs;
            engine.submit(req).unwrap()
        })
        .collect();
    let tokens: usize = handles
        .iter_mut()
        .map(|h| collect(h).completion_tokens)
        .sum();
    (
        started.elapsed().as_secs_f64(),
        tokens,
        engine.stats().steps,
    )
}

#[test]
#[ignore = "a measurement; run by hand"]
fn batched_decode_throughput() {
    let fam = family_of("small", 4, 1);
    let runs = [(1, None), (8, None), (32, None), (32, Some(TOP_LOGPROBS))];
    for (max_running, logprobs) in runs {
        let (secs, tokens, steps) = run(&fam, max_running, logprobs);
        println!(
            "max_running {max_running:>2}, logprobs {logprobs:?}: {tokens} tokens in {secs:.2} s = {:.0} tokens/s, {steps} steps, {:.1} ms/step",
            tokens as f64 / secs,
            secs * 1e3 / steps as f64
        );
    }
}
