//! A sequence's KV cache on the device: [`ops::layers::DeviceKv`] (all
//! layers in one allocation) plus the number of positions filled.
//!
//! ```text
//!   DeviceKv data  [n_layers][2 (K, V)][capacity][kv_dim] f16, keys post-RoPE
//!   len            positions 0..len hold this sequence's tokens; len..capacity is scratch
//! ```
//!
//! The allocation is made on the first step (so [`Backend::new_cache`]
//! stays infallible and free) and doubled when a step would overrun it,
//! never past the backend's context limit. `len` advances only when a step
//! succeeds: a failed step leaves the cache as it was, whatever the kernels
//! wrote past `len`.
//!
//! [`Backend::new_cache`]: crate::model::Backend::new_cache

use meswitch_ops::layers::DeviceKv;
use meswitch_ops::Gpu;

use super::device_err;
use crate::model::ModelError;

/// Positions of the first allocation: a chat turn's prompt usually fits,
/// and a 7B-shaped cache of this size is 32 MiB (32 layers · 2 · 1024 ·
/// 2 bytes per position), small next to the weights.
const INITIAL_CAPACITY: usize = 256;

/// Where a cache lives and how big a position is; fixed per backend.
#[derive(Clone, Copy, Debug)]
pub(super) struct KvGeometry {
    pub n_layers: usize,
    pub kv_dim: usize,
    pub max_context: usize,
}

#[derive(Default)]
pub struct CudaCache {
    kv: Option<DeviceKv>,
    len: usize,
}

impl std::fmt::Debug for CudaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaCache")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl CudaCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions allocated on the device (0 before the first step).
    pub fn capacity(&self) -> usize {
        self.kv.as_ref().map_or(0, DeviceKv::capacity)
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, DeviceKv::bytes)
    }

    /// Forgets everything (the sequence restarts at position 0); the
    /// allocation is kept for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `len` positions (no-op when `len ≥ self.len()`).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// The device cache; present after [`CudaCache::reserve`].
    pub(super) fn device(&self) -> Result<&DeviceKv, ModelError> {
        self.kv
            .as_ref()
            .ok_or_else(|| ModelError::Device("KV cache used before allocation".into()))
    }

    /// Makes room for `need` positions (`need ≤ geometry.max_context`,
    /// checked by the step's validation): allocates on first use, else
    /// doubles, keeping the contents.
    pub(super) fn reserve(
        &mut self,
        gpu: &Gpu,
        g: KvGeometry,
        need: usize,
    ) -> Result<(), ModelError> {
        if need > g.max_context {
            return Err(ModelError::ContextFull {
                len: need,
                limit: g.max_context,
            });
        }
        let grown = |from: usize| from.max(1).saturating_mul(2).max(need).min(g.max_context);
        match &mut self.kv {
            None => {
                let capacity = INITIAL_CAPACITY.max(need).min(g.max_context);
                self.kv = Some(
                    DeviceKv::new(gpu, g.n_layers, g.kv_dim, capacity)
                        .map_err(|e| device_err("allocating a KV cache", e))?,
                );
            }
            Some(kv) if kv.capacity() < need => {
                let capacity = grown(kv.capacity());
                kv.grow(gpu, capacity)
                    .map_err(|e| device_err("growing a KV cache", e))?;
            }
            Some(_) => {}
        }
        Ok(())
    }
}
