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
        let need = need.max(1);
        let capacity = next_capacity(self.capacity(), need, g.max_context);
        match &mut self.kv {
            None => {
                self.kv = Some(
                    DeviceKv::new(gpu, g.n_layers, g.kv_dim, capacity)
                        .map_err(|e| device_err("allocating a KV cache", e))?,
                );
            }
            Some(kv) if kv.capacity() < need => {
                kv.grow(gpu, capacity)
                    .map_err(|e| device_err("growing a KV cache", e))?;
            }
            Some(_) => {}
        }
        Ok(())
    }
}

/// Positions to allocate for `need` (≤ `max_context`) given `current`
/// (0 = none yet): the first allocation is [`INITIAL_CAPACITY`] or more,
/// later ones double, never past `max_context`, always at least `need`.
fn next_capacity(current: usize, need: usize, max_context: usize) -> usize {
    if current >= need {
        return current;
    }
    let wanted = if current == 0 {
        INITIAL_CAPACITY
    } else {
        current.saturating_mul(2)
    };
    wanted.max(need).min(max_context).max(need)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_starts_small_doubles_and_stops_at_the_limit() {
        assert_eq!(next_capacity(0, 1, 4096), INITIAL_CAPACITY);
        assert_eq!(next_capacity(0, 1000, 4096), 1000);
        assert_eq!(next_capacity(0, 10, 100), 100);
        assert_eq!(next_capacity(256, 257, 4096), 512);
        assert_eq!(next_capacity(256, 2000, 4096), 2000);
        assert_eq!(next_capacity(3000, 3001, 4096), 4096);
        assert_eq!(next_capacity(512, 300, 4096), 512);
        for (cur, need, max) in [(0, 5, 5), (7, 9, 9), (100, 4096, 4096)] {
            let c = next_capacity(cur, need, max);
            assert!(c >= need && c <= max, "{cur} {need} {max} -> {c}");
        }
    }

    #[test]
    fn a_new_cache_is_empty_and_unallocated() {
        let mut c = CudaCache::default();
        assert!(c.is_empty());
        assert_eq!((c.capacity(), c.bytes()), (0, 0));
        assert!(c.device().is_err());
        c.advance(3);
        c.truncate(5);
        assert_eq!(c.len(), 3);
        c.truncate(1);
        assert_eq!(c.len(), 1);
        c.clear();
        assert!(c.is_empty());
    }
}
