//! The generation engine: continuous batching across experts with tiered
//! expert residency, on its own thread, fed by [`Engine::submit`].
//!
//! Skeleton of the public API (server contract, issue 5); the loop lands
//! next.

use std::path::PathBuf;
use std::sync::Arc;

use crate::generate::{Detokenize, StopReason};
use crate::model::{Backend, ModelError};
use crate::sampling::SamplingParams;

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
    /// Always first: who serves the request (after routing / expert load).
    Started {
        expert: Option<String>,
        route: Option<RouteDecision>,
        prompt_tokens: usize,
    },
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

/// Handle to the engine thread; clones share it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<()>,
}

impl Engine {
    pub fn start<B: Backend + Send + 'static>(
        backend: B,
        detok: Box<dyn Detokenize + Send>,
        eos: Vec<u32>,
        experts: Vec<ExpertSource>,
        router: Option<Box<dyn Router<B>>>,
        config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let _ = (backend, detok, eos, experts, router, config);
        Ok(Engine {
            inner: Arc::new(()),
        })
    }

    /// Validates and queues a request; never blocks on generation.
    pub fn submit(&self, req: GenRequest) -> Result<RequestHandle, SubmitError> {
        let _ = (&self.inner, req);
        Err(SubmitError::ShuttingDown)
    }

    pub fn experts(&self) -> Vec<ExpertStatus> {
        Vec::new()
    }

    /// Admin: registers an expert (and loads it to the device if the budget
    /// allows).
    pub fn load_expert(&self, src: ExpertSource) -> Result<(), EngineError> {
        let _ = src;
        Err(EngineError::ShuttingDown)
    }

    /// Admin: forgets an expert; an error while a running sequence uses it.
    pub fn unload_expert(&self, name: &str) -> Result<(), EngineError> {
        Err(EngineError::UnknownExpert(name.to_string()))
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    /// Stops accepting requests, ends the running ones and joins the thread.
    pub fn shutdown(&self) {}
}
