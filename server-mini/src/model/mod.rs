//! The model runtime: a Llama/Mistral decoder whose every linear layer is a
//! multi-expert product, so one forward step serves sequences of different
//! experts (and of none) together.
//!
//! - [`config`]: hyper-parameters from an HF-style config JSON.
//! - [`weights`]: [`WeightSource`] (checkpoint, GGUF, memory) and the FP16
//!   base weights.
//! - [`experts`]: experts placed in the decoder structure.
//! - [`linear`] + [`kernels`]: the multi-expert linear op on CPU.
//! - [`cpu`]: [`CpuBackend`], the forward pass on CPU with rayon.
//!
//! A step ([`Backend::forward`]) takes several sequences, each with its own
//! KV cache, expert and new tokens: a prefill is one sequence with many
//! tokens, a decode step is many sequences with one token each, and any mix
//! of the two is allowed.

pub mod config;
pub mod cpu;
pub mod cuda;
pub mod experts;
mod kernels;
pub mod kv_window;
pub mod linear;
pub mod load;
pub mod numerics;
mod ops;
pub mod weights;

use thiserror::Error;

pub use config::ModelConfig;
pub use cpu::{CpuBackend, KvCache};
pub use experts::{Expert, ExpertParser};
pub use load::{load_cpu, load_cpu_with, LoadedModel};
pub use numerics::Numerics;
pub use weights::{GgufSource, MemorySource, WeightSource, Weights};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("model config: {0}")]
    Config(String),
    #[error("model weights: {0}")]
    Source(String),
    #[error("model weights: missing tensor {0}")]
    MissingTensor(String),
    #[error("model weights: tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("expert: {0}")]
    Expert(String),
    #[error("unknown expert id {0}")]
    UnknownExpert(usize),
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    Token { token: u32, vocab: usize },
    #[error("sequence would reach {len} tokens, over the context limit of {limit}")]
    ContextFull { len: usize, limit: usize },
    #[error("a sequence in the batch has no new tokens")]
    EmptyStep,
    #[error("logits requested from token {from} of a {len}-token step")]
    LogitsRange { from: usize, len: usize },
    #[error(
        "hidden state after layer {layer} requested from a {n_layers}-layer model (0..={n_layers})"
    )]
    LayerRange { layer: usize, n_layers: usize },
    #[error("linear op: {0}")]
    Shape(#[from] meswitch_reference::ShapeError),
    /// No usable CUDA device (the CUDA backend cannot start; fall back to CPU).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver, cuBLAS or kernel failure after the device was found.
    #[error("CUDA backend: {0}")]
    Device(String),
}

/// Index of an expert loaded into a backend.
pub type ExpertId = usize;

/// Which positions of a step produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only the last new token (generation).
    Last,
    /// Every new token from this index of the step's tokens on (perplexity).
    From(usize),
}

/// One sequence's part of a step.
pub struct SeqStep<'a, C> {
    /// Tokens appended to the sequence in this step (at least one).
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
    pub expert: Option<ExpertId>,
    pub logits: LogitsWanted,
}

impl<C> SeqStep<'_, C> {
    /// The checks every backend makes before a step touches anything, given
    /// the cache's current length: new tokens present and inside the
    /// vocabulary, context limit kept, logits range inside the step. (Whether
    /// the expert exists is the backend's to check.)
    pub fn check(
        &self,
        cache_len: usize,
        vocab: usize,
        max_context: usize,
    ) -> Result<(), ModelError> {
        if self.tokens.is_empty() {
            return Err(ModelError::EmptyStep);
        }
        if let Some(&token) = self.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Token { token, vocab });
        }
        let len = cache_len + self.tokens.len();
        if len > max_context {
            return Err(ModelError::ContextFull {
                len,
                limit: max_context,
            });
        }
        if let LogitsWanted::From(from) = self.logits {
            if from >= self.tokens.len() {
                return Err(ModelError::LogitsRange {
                    from,
                    len: self.tokens.len(),
                });
            }
        }
        Ok(())
    }
}

/// What a compute backend provides. Only [`CpuBackend`] exists now; a CUDA
/// backend keeps the same shape with device-resident weights and caches.
pub trait Backend {
    /// A sequence's KV cache, resident where the backend computes.
    type Cache;

    fn config(&self) -> &ModelConfig;
    fn new_cache(&self) -> Self::Cache;
    /// Adds an expert; the returned id names it in [`SeqStep::expert`].
    fn add_expert(&mut self, expert: Expert) -> ExpertId;
    /// Names of the experts loaded now (removed ones left out).
    fn expert_names(&self) -> Vec<String>;
    /// engine helper. Drops an expert's weights; its id is never reused and
    /// using it afterwards is [`ModelError::UnknownExpert`]. Ids of other
    /// experts stay valid.
    fn remove_expert(&mut self, id: ExpertId) -> Result<Expert, ModelError>;
    /// engine helper. Checks expert files against this base off the
    /// backend's thread (see [`ExpertParser`]).
    fn expert_parser(&self) -> ExpertParser;
    /// router helper. Runs `tokens` through the base model only (no expert,
    /// no cache kept) and returns the hidden state after decoder layer
    /// `layer` (0-based; `layer == n_layers` = after the final RMSNorm),
    /// row-major `[tokens.len(), hidden_size]`.
    fn hidden_states(&self, tokens: &[u32], layer: usize) -> Result<Vec<f32>, ModelError>;
    /// Runs the new tokens of every sequence, appends them to the caches
    /// and returns, per sequence, the logits asked for
    /// (`[n_positions, vocab]` row-major).
    fn forward(&self, batch: &mut [SeqStep<'_, Self::Cache>]) -> Result<Vec<Vec<f32>>, ModelError>;
}
