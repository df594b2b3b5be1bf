//! The forward pass on one CUDA device: [`CudaBackend`], the same step as
//! [`CpuBackend`](super::CpuBackend) with device-resident weights, experts,
//! KV caches and activations.
//!
//! A step flattens the new tokens of every sequence into rows; each linear
//! is one multi-expert product over all rows, only attention looks at
//! sequences separately (through [`AttnRows`], each row's cache and
//! position). Device buffers of a step, `rows` = all new tokens:
//!
//! ```text
//!   h     f32 [rows, hidden]   residual stream          embed_device (+ host rows of expert embeddings)
//!   per layer l:
//!     x     f16 [rows, hidden]   rms_norm(h)              per-expert norm weights patched in by row runs
//!     q     f16 [rows, q_dim]    linear, RoPE in place
//!     k, v  f16 [rows, kv_dim]   linear, RoPE on k, appended at (l, pos(r)) of row r's cache
//!     attn  f16 [rows, q_dim]    causal GQA over positions lo..=pos(r)
//!     o     f16 [rows, hidden]   linear(attn);  h += o
//!     x = rms_norm(h);  gate, up f16 [rows, ffn];  act = silu(gate)·up;  h += linear(act)
//!   logits: rows asked for, copied out of h → final norm → lm_head
//!           f16 [picked, vocab] → host f32
//! ```
//!
//! Numerics differ from the CPU backend in one place by design: every
//! linear reads FP16 activations and writes FP16 (the kernels' contract),
//! the residual stream and all reductions (norm, softmax, dot products) are
//! f32. `tests/cuda_backend.rs` states the resulting tolerance.
//!
//! Expert upload can fail (device memory) but [`Backend::add_expert`] is
//! infallible: a failed expert is kept with its error and any step that
//! uses it returns that error ([`ModelError::Expert`]).

mod cache;
mod decoder;
mod linear;
mod weights;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use meswitch_ops::layers::RopeTable;
use meswitch_ops::{Gpu, OpsError};
use meswitch_reference::container::BaseIdentity;

pub use cache::CudaCache;
use cache::KvGeometry;
use linear::StepTables;
use weights::{DeviceExpert, DeviceWeights};

use super::experts::{Expert, ExpertParser};
use super::weights::{WeightSource, Weights};
use super::{Backend, ExpertId, ModelConfig, ModelError, SeqStep};

/// Context limit when the config names none (as the CPU backend).
const DEFAULT_MAX_CONTEXT: usize = 4096;

/// An ops error in the runtime's terms: no device is [`ModelError::NoDevice`]
/// (callers fall back to the CPU), anything else [`ModelError::Device`]
/// with what was being done.
pub(crate) fn device_err(during: &str, e: OpsError) -> ModelError {
    match e {
        OpsError::NoDevice(why) => ModelError::NoDevice(why),
        OpsError::Shape(s) => ModelError::Shape(s),
        e => ModelError::Device(format!("{during}: {e}")),
    }
}

/// One loaded expert: the host copy (returned by `remove_expert`, and the
/// source of embedding rows) and its device copy or why there is none.
struct Slot {
    host: Expert,
    device: Result<DeviceExpert, String>,
}

pub struct CudaBackend {
    gpu: Gpu,
    config: ModelConfig,
    weights: DeviceWeights,
    /// Indexed by [`ExpertId`]; `None` = removed (ids are never reused).
    experts: Vec<Option<Slot>>,
    identity: BaseIdentity,
    shapes: BTreeMap<String, Vec<usize>>,
    /// cos/sin of every (position, frequency) up to `max_context`.
    rope: RopeTable,
    max_context: usize,
    /// Expert tables and row maps kept across steps (see `linear.rs`);
    /// locked for a whole step, which `forward`'s `&self` otherwise allows
    /// to overlap.
    tables: Mutex<StepTables>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("max_context", &self.max_context)
            .field("experts", &self.expert_names())
            .finish()
    }
}

impl CudaBackend {
    /// Loads the base model onto `gpu` (host weights are read, checked and
    /// uploaded one by one).
    pub fn load(src: &dyn WeightSource, gpu: Gpu) -> Result<CudaBackend, ModelError> {
        let config = ModelConfig::from_hf(&src.hf_config())?;
        let host = Weights::load(src, &config)?;
        let weights = DeviceWeights::upload(&gpu, host, &config)?;
        let max_context = config
            .max_position_embeddings
            .unwrap_or(DEFAULT_MAX_CONTEXT);
        let rope = Self::rope_table(&gpu, &config, max_context)?;
        Ok(CudaBackend {
            gpu,
            identity: src.identity(),
            shapes: src.shapes(),
            config,
            weights,
            experts: Vec::new(),
            rope,
            max_context,
            tables: Mutex::new(StepTables::default()),
        })
    }

    /// The kept tables, for one step. A step that panicked left them
    /// consistent (entries are reused by content only), so poisoning is
    /// ignored.
    fn step_tables(&self) -> MutexGuard<'_, StepTables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`CudaBackend::load`] on device 0; no usable device is
    /// [`ModelError::NoDevice`].
    pub fn load_detect(src: &dyn WeightSource) -> Result<CudaBackend, ModelError> {
        let gpu = Gpu::detect().map_err(|e| device_err("opening the device", e))?;
        CudaBackend::load(src, gpu)
    }

    fn rope_table(gpu: &Gpu, c: &ModelConfig, max_context: usize) -> Result<RopeTable, ModelError> {
        RopeTable::new(gpu, c.head_dim, c.rope_theta, max_context)
            .map_err(|e| device_err("building the RoPE table", e))
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn identity(&self) -> &BaseIdentity {
        &self.identity
    }

    pub fn base_shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Changes the context limit (rebuilds the RoPE table for it). Caches
    /// keep their allocations; they grow up to the new limit.
    pub fn set_max_context(&mut self, n: usize) -> Result<(), ModelError> {
        self.rope = Self::rope_table(&self.gpu, &self.config, n)?;
        self.max_context = n;
        Ok(())
    }

    /// Device bytes of the base weights.
    pub fn base_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// Device bytes of expert `id` (None if unknown or not on the device).
    pub fn expert_bytes(&self, id: ExpertId) -> Option<usize> {
        let slot = self.experts.get(id)?.as_ref()?;
        slot.device.as_ref().ok().map(DeviceExpert::bytes)
    }

    /// Reads an expert file, checks it against this base and adds it; an
    /// expert that cannot be placed on the device is an error here (and
    /// not kept).
    pub fn load_expert(&mut self, path: &Path) -> Result<ExpertId, ModelError> {
        let e = Expert::open(path, &self.config, &self.identity, &self.shapes)?;
        let id = self.add_expert(e);
        if let Some(Some(Slot { device: Err(e), .. })) = self.experts.get(id) {
            let e = ModelError::Expert(e.clone());
            self.experts[id] = None;
            return Err(e);
        }
        Ok(id)
    }

    pub fn expert_id(&self, name: &str) -> Option<ExpertId> {
        self.experts
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.host.name == name))
    }

    fn geometry(&self) -> KvGeometry {
        KvGeometry {
            n_layers: self.config.num_layers,
            kv_dim: self.config.kv_dim(),
            max_context: self.max_context,
            sliding_window: self.config.sliding_window,
        }
    }

    /// The step's checks, before anything touches the device: the same as
    /// the CPU backend's, plus experts whose upload failed.
    fn validate(&self, batch: &[SeqStep<'_, CudaCache>]) -> Result<(), ModelError> {
        for s in batch {
            s.check(s.cache.len(), self.config.vocab_size, self.max_context)?;
            s.cache.check_usable()?;
            if let Some(id) = s.expert {
                match self.experts.get(id) {
                    Some(Some(Slot { device: Ok(_), .. })) => {}
                    Some(Some(Slot { device: Err(e), .. })) => {
                        return Err(ModelError::Expert(e.clone()))
                    }
                    _ => return Err(ModelError::UnknownExpert(id)),
                }
            }
        }
        Ok(())
    }

    /// A validated expert's host and device copies.
    fn slot(&self, id: ExpertId) -> Result<(&Expert, &DeviceExpert), ModelError> {
        match self.experts.get(id) {
            Some(Some(Slot {
                host,
                device: Ok(d),
            })) => Ok((host, d)),
            Some(Some(Slot { device: Err(e), .. })) => Err(ModelError::Expert(e.clone())),
            _ => Err(ModelError::UnknownExpert(id)),
        }
    }
}

impl Backend for CudaBackend {
    type Cache = CudaCache;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_cache(&self) -> CudaCache {
        CudaCache::default()
    }

    fn add_expert(&mut self, expert: Expert) -> ExpertId {
        let device = DeviceExpert::upload(&self.gpu, &expert, &self.config).map_err(|e| {
            format!(
                "expert {} could not be placed on the device: {e}",
                expert.name
            )
        });
        self.experts.push(Some(Slot {
            host: expert,
            device,
        }));
        self.experts.len() - 1
    }

    fn expert_names(&self) -> Vec<String> {
        self.experts
            .iter()
            .flatten()
            .map(|e| e.host.name.clone())
            .collect()
    }

    fn remove_expert(&mut self, id: ExpertId) -> Result<Expert, ModelError> {
        self.experts
            .get_mut(id)
            .and_then(Option::take)
            .map(|slot| slot.host)
            .ok_or(ModelError::UnknownExpert(id))
    }

    fn expert_parser(&self) -> ExpertParser {
        ExpertParser {
            config: self.config.clone(),
            identity: self.identity.clone(),
            shapes: self.shapes.clone(),
        }
    }

    fn hidden_states(&self, tokens: &[u32], layer: usize) -> Result<Vec<f32>, ModelError> {
        self.hidden_states_base(tokens, layer)
    }

    fn forward(&self, batch: &mut [SeqStep<'_, CudaCache>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.validate(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let g = self.geometry();
        for s in batch.iter_mut() {
            s.cache.prepare(&self.gpu, g, s.tokens.len())?;
        }
        let logits = self.forward_step(batch)?;
        // Only a step that fully succeeded moves the caches on.
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        Ok(logits)
    }
}
