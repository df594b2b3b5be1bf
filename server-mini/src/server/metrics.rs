//! Prometheus metrics: counters and latency histograms kept by the HTTP
//! layer, rendered in the text exposition format (version 0.0.4) together
//! with the engine's gauges at scrape time.
//!
//! ```text
//!   # HELP meswitch_http_requests_total HTTP requests by endpoint and status.
//!   # TYPE meswitch_http_requests_total counter
//!   meswitch_http_requests_total{endpoint="/v1/chat/completions",status="200"} 12
//!   meswitch_time_to_first_token_seconds_bucket{le="0.01"} 3
//!   ...
//! ```

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token and request-duration
/// buckets: 1 ms (tiny CPU models) to 60 s (a long queue on a real model).
pub const LATENCY_BUCKETS_S: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];
/// Upper bounds (seconds) of the inter-token buckets: decode steps run from
/// well under a millisecond (tiny CPU model) to ~100 ms (7B on CPU, large batch).
pub const INTER_TOKEN_BUCKETS_S: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A cumulative histogram with fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default, Clone)]
struct HistogramState {
    /// Observations ≤ bounds[i] and > bounds[i-1] (not cumulative; summed at render).
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len()],
                ..Default::default()
            }),
        }
    }

    pub fn observe(&self, d: Duration) {
        let x = d.as_secs_f64();
        let mut s = lock(&self.state);
        if let Some(i) = self.bounds.iter().position(|&b| x <= b) {
            s.counts[i] += 1;
        }
        s.count += 1;
        s.sum += x;
    }

    pub fn count(&self) -> u64 {
        lock(&self.state).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = lock(&self.state).clone();
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (bound, c) in self.bounds.iter().zip(&s.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}", s.sum);
        let _ = writeln!(out, "{name}_count {}", s.count);
    }
}

/// A poisoned lock only means another request panicked mid-update of a
/// counter; the numbers are still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counters keyed by label values.
#[derive(Debug, Default)]
pub struct LabelledCounter {
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl LabelledCounter {
    pub fn add(&self, labels: &[&str], n: u64) {
        let key = labels.iter().map(|s| s.to_string()).collect();
        *lock(&self.values).entry(key).or_default() += n;
    }

    pub fn get(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        lock(&self.values).get(&key).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label_names: &[&str]) {
        header(out, name, help, "counter");
        for (labels, v) in lock(&self.values).iter() {
            sample(
                out,
                name,
                &label_names
                    .iter()
                    .copied()
                    .zip(labels.iter().map(String::as_str))
                    .collect::<Vec<_>>(),
                *v as f64,
            );
        }
    }
}

/// What the HTTP layer measures.
#[derive(Debug)]
pub struct Metrics {
    /// endpoint, status.
    pub requests: LabelledCounter,
    /// model served (expert or base name).
    pub prompt_tokens: LabelledCounter,
    pub completion_tokens: LabelledCounter,
    /// Requests whose client went away before the response was complete.
    pub disconnects: LabelledCounter,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub request_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: LabelledCounter::default(),
            prompt_tokens: LabelledCounter::default(),
            completion_tokens: LabelledCounter::default(),
            disconnects: LabelledCounter::default(),
            time_to_first_token: Histogram::new(&LATENCY_BUCKETS_S),
            inter_token: Histogram::new(&INTER_TOKEN_BUCKETS_S),
            request_duration: Histogram::new(&LATENCY_BUCKETS_S),
        }
    }
}

impl Metrics {
    pub fn render(&self, out: &mut String) {
        self.requests.render(
            out,
            "meswitch_http_requests_total",
            "HTTP requests by endpoint and status.",
            &["endpoint", "status"],
        );
        self.prompt_tokens.render(
            out,
            "meswitch_prompt_tokens_total",
            "Prompt tokens of accepted generation requests, by the model that served them.",
            &["model"],
        );
        self.completion_tokens.render(
            out,
            "meswitch_completion_tokens_total",
            "Generated tokens, by the model that served them.",
            &["model"],
        );
        self.disconnects.render(
            out,
            "meswitch_client_disconnects_total",
            "Generation requests whose client went away before the end (their slot is freed).",
            &["endpoint"],
        );
        self.time_to_first_token.render(
            out,
            "meswitch_time_to_first_token_seconds",
            "From the request's arrival to its first generated text.",
        );
        self.inter_token.render(
            out,
            "meswitch_inter_token_latency_seconds",
            "Between consecutive pieces of generated text of one request.",
        );
        self.request_duration.render(
            out,
            "meswitch_request_duration_seconds",
            "From a generation request's arrival to its last byte.",
        );
    }
}

/// `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line, label values escaped as the format requires.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let escaped = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(out, "{k}=\"{escaped}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A single unlabelled gauge or counter.
pub fn scalar(out: &mut String, name: &str, help: &str, kind: &str, value: f64) {
    header(out, name, help, kind);
    sample(out, name, &[], value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&LATENCY_BUCKETS_S);
        for ms in [0.5, 3.0, 3.0, 700.0, 90_000.0] {
            h.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        let bucket = |le: &str| -> u64 {
            let prefix = format!("x_bucket{{le=\"{le}\"}} ");
            out.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(bucket("0.001"), 1);
        assert_eq!(bucket("0.005"), 3);
        assert_eq!(bucket("1"), 4);
        assert_eq!(bucket("60"), 4);
        assert_eq!(bucket("+Inf"), 5);
        assert!(out.contains("x_count 5"));
        assert!(out.contains("# TYPE x histogram"));
    }

    #[test]
    fn labels_are_escaped_and_counted() {
        let m = Metrics::default();
        m.requests.add(&["/v1/completions", "200"], 2);
        m.requests.add(&["/v1/completions", "200"], 1);
        m.completion_tokens.add(&["we\"ird"], 4);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "meswitch_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 3"
        ));
        assert!(out.contains("meswitch_completion_tokens_total{model=\"we\\\"ird\"} 4"));
        assert_eq!(m.requests.get(&["/v1/completions", "200"]), 3);
    }
}
