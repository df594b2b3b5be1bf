//! The generation engine: continuous batching across experts with tiered
//! expert residency, on its own thread, fed by [`Engine::submit`].
//!
//! - `sequence`: one request's prefill chunks, sampling, stop handling.
//! - `residency`: expert tiers (disk → host → device), budgets, LRU.
//! - `worker`: the engine thread's loop (admission, one forward per step).
//! - `shared`: the hand-off between threads, and the loader thread.
//! - `logprobs`: per-token log-probabilities, for requests that ask.
//!
//! The engine thread owns the backend; other threads talk to it through a
//! shared queue ([`Engine::submit`]), admin commands, and per-request event
//! channels.

mod logprobs;
mod residency;
mod sequence;
mod shared;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::generate::{Detokenize, StopReason};
use crate::model::{Backend, ExpertParser, ModelError};
use crate::sampling::SamplingParams;
use residency::Residency;
use shared::{Command, Pending, Shared};
use worker::Worker;

pub use logprobs::{Candidate, TokenLogprob, MAX_TOP_LOGPROBS};

/// Engine limits and budgets.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Concurrent sequences in the decode batch.
    pub max_running: usize,
    /// Waiting requests beyond the running ones; more is
    /// [`SubmitError::QueueFull`].
    pub max_queued: usize,
    /// Sum of context tokens (prompt + max_tokens, reserved at admission)
    /// over running sequences: the KV memory limit.
    pub max_kv_tokens: usize,
    /// Prompt tokens per step per sequence (chunked prefill).
    pub prefill_chunk: usize,
    /// Prompt + max_tokens must fit.
    pub max_context: usize,
    /// Bytes of experts resident in the backend ("GPU tier"; on CPU: loaded
    /// in the CpuBackend).
    pub device_budget_bytes: u64,
    /// Bytes of experts held in host memory (host tier).
    pub host_budget_bytes: u64,
    /// Expert names never evicted from the device tier.
    pub pinned: Vec<String>,
}

/// Defaults sized for the synthetic demo family on CPU.
impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_running: 32,
            max_queued: 256,
            max_kv_tokens: 32 * 2048,
            prefill_chunk: 64,
            max_context: 2048,
            device_budget_bytes: 8 << 30,
            host_budget_bytes: 16 << 30,
            pinned: Vec::new(),
        }
    }
}

/// An expert file on disk (the disk tier).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertSource {
    pub name: String,
    pub path: PathBuf,
}

/// Who should serve a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertChoice {
    Base,
    Named(String),
    /// The router decides.
    Auto,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenRequest {
    /// Token ids (the HTTP layer tokenizes and applies the chat template).
    pub prompt: Vec<u32>,
    pub choice: ExpertChoice,
    /// max_tokens and stop strings live here.
    pub params: SamplingParams,
    /// `Some(n)`: send each generated token's logprob and the `n` (at most
    /// [`MAX_TOP_LOGPROBS`]) most likely tokens ([`Event::Logprob`]);
    /// `None`: none are computed.
    pub logprobs: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteDecision {
    /// `None` = the base model.
    pub expert: Option<String>,
    pub domain: String,
    pub confidence: f32,
}

/// Routing runs on the engine thread with the backend (hidden states of the
/// base model).
pub trait Router<B: Backend>: Send {
    fn route(&self, backend: &B, prompt: &[u32]) -> Result<RouteDecision, String>;
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// First: who serves the request (after routing / expert load). A
    /// request that fails before it starts (routing, expert load, unload)
    /// gets only [`Event::Error`].
    Started {
        expert: Option<String>,
        route: Option<RouteDecision>,
        prompt_tokens: usize,
    },
    /// The token just sampled, for a request that asked for logprobs: sent
    /// before the step's [`Event::Text`]. One per generated token but an
    /// end-of-sequence one; tokens whose text a stop string cuts included.
    Logprob(TokenLogprob),
    /// Newly final text (stop strings and partial UTF-8 held back, as
    /// `generate` does).
    Text(String),
    Done {
        stop: StopReason,
        completion_tokens: usize,
    },
    /// The request failed after acceptance; other requests are unaffected.
    Error(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full; retry in {retry_after_s} s")]
    QueueFull { retry_after_s: u32 },
    #[error("unknown expert {0:?}")]
    UnknownExpert(String),
    #[error("the prompt has {tokens} tokens; with max_tokens it must fit in {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid engine config: {0}")]
    Config(String),
    #[error("unknown expert {0:?}")]
    UnknownExpert(String),
    #[error("expert {0:?} is already registered")]
    DuplicateExpert(String),
    #[error("expert {0:?} is in use by a running request")]
    ExpertInUse(String),
    #[error("expert {0:?} is pinned")]
    ExpertPinned(String),
    #[error("expert {name:?}: {why}")]
    ExpertLoad { name: String, why: String },
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// One request's handle: its events, in order. Dropping `events` (client
/// gone) cancels: the engine sees the closed channel at its next step and
/// frees the slot and KV cache.
#[derive(Debug)]
pub struct RequestHandle {
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    pub id: u64,
}

/// Where an expert lives now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Only its file.
    Disk,
    /// Read and checked, in host memory.
    Host,
    /// Added to the backend: requests can use it.
    Device,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertStatus {
    pub name: String,
    pub tier: Tier,
    pub pinned: bool,
    /// Size of the expert file.
    pub bytes: u64,
    /// Running sequences that use it.
    pub in_use: usize,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub queued: usize,
    pub running: usize,
    /// Context tokens held in KV caches of running sequences.
    pub kv_tokens: usize,
    pub steps: u64,
    /// Expert loads into the device tier.
    pub expert_loads: u64,
    /// Expert evictions from the device tier.
    pub expert_evictions: u64,
    /// Loads from disk into the host tier.
    pub host_loads: u64,
    /// Evictions from the host tier.
    pub host_evictions: u64,
    pub disk_bytes: u64,
    pub host_bytes: u64,
    pub device_bytes: u64,
    /// Requests admitted per expert name (`None` = base).
    pub requests_per_expert: std::collections::BTreeMap<Option<String>, u64>,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub finished_requests: u64,
    pub failed_requests: u64,
}

/// Handle to the engine thread; clones share it. The thread stops when the
/// last clone is dropped or [`Engine::shutdown`] is called.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    config: EngineConfig,
    vocab_size: usize,
    has_router: bool,
    parser: ExpertParser,
    next_id: AtomicU64,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    fn stop(&self) {
        self.shared.lock().shutting_down = true;
        self.shared.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            // A panicked thread has already marked the engine shut down.
            let _ = t.join();
        }
    }
}

/// Longest Retry-After the engine suggests.
const MAX_RETRY_AFTER_S: f64 = 60.0;

impl Engine {
    /// Registers `experts` (pinned ones must fit the device budget and are
    /// loaded now; the others are loaded now while they fit without
    /// eviction, the rest on demand) and starts the engine and loader
    /// threads.
    pub fn start<B: Backend + Send + 'static>(
        mut backend: B,
        detok: Box<dyn Detokenize + Send>,
        eos: Vec<u32>,
        experts: Vec<ExpertSource>,
        router: Option<Box<dyn Router<B>>>,
        mut config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        if config.max_running == 0 || config.prefill_chunk == 0 || config.max_kv_tokens == 0 {
            return Err(EngineError::Config(
                "max_running, prefill_chunk and max_kv_tokens must be ≥ 1".to_string(),
            ));
        }
        if let Some(model_limit) = backend.config().max_position_embeddings {
            config.max_context = config.max_context.min(model_limit);
        }
        let parser = backend.expert_parser();
        let mut residency = Residency::new(config.device_budget_bytes, config.host_budget_bytes);
        for name in &config.pinned {
            if !experts.iter().any(|e| &e.name == name) {
                return Err(EngineError::UnknownExpert(name.clone()));
            }
        }
        // Pinned first: they must fit; then the rest while they fit.
        let pinned = experts.iter().filter(|e| config.pinned.contains(&e.name));
        let others = experts.iter().filter(|e| !config.pinned.contains(&e.name));
        let ordered: Vec<&ExpertSource> = pinned.chain(others).collect();
        for src in &ordered {
            residency.register(src, config.pinned.contains(&src.name))?;
        }
        for src in &ordered {
            residency.load_now(&src.name, &parser, &mut backend)?;
        }

        let shared = Arc::new(Shared::default());
        {
            // Visible to `submit` before the engine thread runs.
            let mut st = shared.lock();
            st.mean_request_s = 1.0;
            st.experts = residency.statuses();
        }
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
        let loader = {
            let (parser, shared) = (parser.clone(), shared.clone());
            std::thread::Builder::new()
                .name("meswitch-loader".to_string())
                .spawn(move || shared::loader_thread(parser, jobs_rx, shared))
                .map_err(|e| EngineError::Config(format!("cannot start a thread: {e}")))?
        };
        let inner = Inner {
            shared: shared.clone(),
            vocab_size: backend.config().vocab_size,
            has_router: router.is_some(),
            config: config.clone(),
            parser,
            next_id: AtomicU64::new(0),
            threads: Mutex::new(vec![loader]),
        };
        // Built on its thread: the worker's caches (`B::Cache`) need not be
        // `Send`.
        let engine = std::thread::Builder::new()
            .name("meswitch-engine".to_string())
            .spawn(move || {
                Worker::new(
                    backend, detok, eos, router, config, shared, residency, jobs_tx,
                )
                .run()
            })
            .map_err(|e| EngineError::Config(format!("cannot start a thread: {e}")))?;
        inner
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(engine);
        Ok(Engine {
            inner: Arc::new(inner),
        })
    }

    /// Validates and queues a request; never blocks on generation.
    pub fn submit(&self, req: GenRequest) -> Result<RequestHandle, SubmitError> {
        let inner = &self.inner;
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        req.params
            .validate()
            .map_err(|e| SubmitError::InvalidParams(e.to_string()))?;
        if req.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(SubmitError::InvalidParams(format!(
                "at most {MAX_TOP_LOGPROBS} top logprobs per token"
            )));
        }
        if req.params.max_tokens == 0 {
            return Err(SubmitError::InvalidParams(
                "max_tokens must be ≥ 1".to_string(),
            ));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= inner.vocab_size) {
            return Err(SubmitError::InvalidParams(format!(
                "token id {t} is outside the vocabulary of {} tokens",
                inner.vocab_size
            )));
        }
        let limit = inner.config.max_context.min(inner.config.max_kv_tokens);
        let tokens = req.prompt.len() + req.params.max_tokens;
        if tokens > limit {
            return Err(SubmitError::PromptTooLong { tokens, limit });
        }
        let mut st = inner.shared.lock();
        if st.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        match &req.choice {
            ExpertChoice::Named(name) if !st.experts.iter().any(|e| &e.name == name) => {
                return Err(SubmitError::UnknownExpert(name.clone()));
            }
            ExpertChoice::Auto if !inner.has_router => {
                return Err(SubmitError::UnknownExpert("auto".to_string()));
            }
            _ => {}
        }
        if st.queued >= inner.config.max_queued {
            let wait = (st.queued as f64 * st.mean_request_s / inner.config.max_running as f64)
                .ceil()
                .clamp(1.0, MAX_RETRY_AFTER_S);
            return Err(SubmitError::QueueFull {
                retry_after_s: wait as u32,
            });
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        st.incoming.push_back(Pending { req, events: tx });
        st.queued += 1;
        drop(st);
        inner.shared.wake.notify_all();
        Ok(RequestHandle { events: rx, id })
    }

    pub fn experts(&self) -> Vec<ExpertStatus> {
        self.inner.shared.lock().experts.clone()
    }

    /// Admin: reads and checks an expert file (on the calling thread, so
    /// a bad file is reported here), registers it on the host tier and
    /// moves it to the device if that has room without evicting.
    pub fn load_expert(&self, src: ExpertSource) -> Result<(), EngineError> {
        let expert = self
            .inner
            .parser
            .open(&src.path)
            .map_err(|e| EngineError::ExpertLoad {
                name: src.name.clone(),
                why: e.to_string(),
            })?;
        self.command(|reply| Command::Register {
            src,
            expert: Box::new(expert),
            reply,
        })
    }

    /// Admin: forgets an expert; an error while a running sequence uses it.
    /// Queued requests for it end with [`Event::Error`].
    pub fn unload_expert(&self, name: &str) -> Result<(), EngineError> {
        let name = name.to_string();
        self.command(|reply| Command::Unregister { name, reply })
    }

    fn command(
        &self,
        make: impl FnOnce(std::sync::mpsc::Sender<Result<(), EngineError>>) -> Command,
    ) -> Result<(), EngineError> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut st = self.inner.shared.lock();
            if st.shutting_down {
                return Err(EngineError::ShuttingDown);
            }
            st.commands.push_back(make(tx));
        }
        self.inner.shared.wake.notify_all();
        // The engine thread drops the command (and `tx`) if it stops first.
        rx.recv().unwrap_or(Err(EngineError::ShuttingDown))
    }

    pub fn stats(&self) -> EngineStats {
        let st = self.inner.shared.lock();
        let mut stats = st.stats.clone();
        stats.queued = st.queued;
        stats
    }

    /// Stops accepting requests, ends queued and running ones with
    /// [`Event::Error`] and joins the threads.
    pub fn shutdown(&self) {
        self.inner.stop();
    }
}
