//! A sequence's KV cache on the device: [`ops::layers::DeviceKv`] (all
//! layers in one allocation) plus which positions it holds.
//!
//! ```text
//!   DeviceKv data  [n_layers][2 (K, V)][capacity][kv_dim] f16, keys post-RoPE
//!   absolute:      0 ...... start ................. len
//!   slot:                   0 ..................... len − start   (stored)  ..capacity: scratch
//! ```
//!
//! Without a sliding window `start` stays 0. Under a window of `w` the
//! cache follows the CPU's rule ([`kv_window::cut_start`]): once `2·w`
//! positions are stored, the last `w` move to slot 0 (one device-to-device
//! copy per layer and K/V, [`DeviceKv::shift_front`]) and `start` moves to
//! the first of them. The CPU cuts right after a step; here the cut is made
//! at the start of the next step, before anything is written: it changes
//! which slot holds a position, never which positions a query sees, so the
//! step's attention is the CPU's, and a step that fails has nothing of its
//! own to undo. (Stored positions between steps therefore read up to one
//! step larger than the CPU's `stored_positions`.)
//!
//! The allocation is made on the first step (so [`Backend::new_cache`]
//! stays infallible and free) and doubled when a step would overrun it,
//! never past [`kv_window::capacity_bound`] (`2·w`, or the context limit
//! without a window) unless one step's rows need more. `len` advances only
//! when a step succeeds: a failed step leaves the cache as it was, whatever
//! the kernels wrote past `len`. A cut whose copy fails leaves the cache
//! unusable (slots partly moved): it is marked lost, and every later step
//! on it is an error until [`CudaCache::clear`].
//!
//! [`Backend::new_cache`]: crate::model::Backend::new_cache
//! [`ops::layers::DeviceKv`]: meswitch_ops::layers::DeviceKv

use meswitch_ops::layers::DeviceKv;
use meswitch_ops::Gpu;

use super::device_err;
use crate::model::{kv_window, ModelError};

/// Positions of the first allocation: a chat turn's prompt usually fits,
/// and a 7B-shaped cache of this size is 32 MiB (32 layers · 2 · 1024 ·
/// 2 bytes per position), small next to the weights.
const INITIAL_CAPACITY: usize = 256;

/// Where a cache lives, how big a position is and what it may hold; fixed
/// per backend.
#[derive(Clone, Copy, Debug)]
pub(super) struct KvGeometry {
    pub n_layers: usize,
    pub kv_dim: usize,
    pub max_context: usize,
    pub sliding_window: Option<usize>,
}

#[derive(Default)]
pub struct CudaCache {
    kv: Option<DeviceKv>,
    /// Positions of the sequence so far (absolute).
    len: usize,
    /// Absolute position held in slot 0 (> 0 only under a sliding window).
    start: usize,
    /// Why the cache cannot be used (a cut's copy failed), until cleared.
    lost: Option<String>,
}

impl std::fmt::Debug for CudaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaCache")
            .field("len", &self.len)
            .field("start", &self.start)
            .field("capacity", &self.capacity())
            .field("lost", &self.lost)
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

    /// Absolute position of the first stored entry (slot 0).
    pub fn start(&self) -> usize {
        self.start
    }

    /// Positions held in device memory, `len − start`.
    pub fn stored_positions(&self) -> usize {
        self.len - self.start
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
        self.start = 0;
        self.lost = None;
    }

    /// Keeps the positions before `len` (no-op when `len ≥ self.len()`),
    /// never below [`CudaCache::start`]: positions dropped under the
    /// sliding window do not come back.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len).max(self.start);
    }

    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// The step's checks of the cache itself: one whose cut failed is
    /// unusable.
    pub(super) fn check_usable(&self) -> Result<(), ModelError> {
        match &self.lost {
            None => Ok(()),
            Some(why) => Err(ModelError::Device(format!(
                "KV cache lost ({why}); clear it to restart the sequence"
            ))),
        }
    }

    /// The device cache; present after [`CudaCache::prepare`].
    pub(super) fn device(&self) -> Result<&DeviceKv, ModelError> {
        self.kv
            .as_ref()
            .ok_or_else(|| ModelError::Device("KV cache used before allocation".into()))
    }

    /// Readies the cache for a step of `new_tokens` (validated: `len +
    /// new_tokens ≤ max_context`): drops what the window no longer sees
    /// (the cut the CPU makes after the previous step), then makes room for
    /// the stored positions plus the step's.
    pub(super) fn prepare(
        &mut self,
        gpu: &Gpu,
        g: KvGeometry,
        new_tokens: usize,
    ) -> Result<(), ModelError> {
        self.check_usable()?;
        if let Some(new_start) = kv_window::cut_start(self.start, self.len, g.sliding_window) {
            self.cut(gpu, new_start)?;
        }
        self.reserve(gpu, g, self.stored_positions() + new_tokens)
    }

    /// Moves positions `new_start..len` to slot 0.
    fn cut(&mut self, gpu: &Gpu, new_start: usize) -> Result<(), ModelError> {
        let (from, count) = (new_start - self.start, self.len - new_start);
        if let Some(kv) = &mut self.kv {
            if let Err(e) = kv.shift_front(gpu, from, count) {
                let e = device_err("dropping KV positions outside the sliding window", e);
                self.lost = Some(e.to_string());
                return Err(e);
            }
        }
        self.start = new_start;
        Ok(())
    }

    /// Makes room for `need` stored positions: allocates on first use, else
    /// doubles (up to [`kv_window::capacity_bound`]), keeping the contents.
    fn reserve(&mut self, gpu: &Gpu, g: KvGeometry, need: usize) -> Result<(), ModelError> {
        let need = need.max(1);
        let bound = kv_window::capacity_bound(g.sliding_window, g.max_context);
        let capacity = next_capacity(self.capacity(), need, bound);
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

/// Positions to allocate for `need` stored positions given `current` (0 =
/// none yet): the first allocation is [`INITIAL_CAPACITY`] or more, later
/// ones double, never past `bound` unless `need` itself is larger; always
/// at least `need`.
fn next_capacity(current: usize, need: usize, bound: usize) -> usize {
    if current >= need {
        return current;
    }
    let wanted = if current == 0 {
        INITIAL_CAPACITY
    } else {
        current.saturating_mul(2)
    };
    wanted.min(bound).max(need)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_starts_small_doubles_and_stops_at_the_bound() {
        assert_eq!(next_capacity(0, 1, 4096), INITIAL_CAPACITY);
        assert_eq!(next_capacity(0, 1000, 4096), 1000);
        assert_eq!(next_capacity(0, 10, 100), 100);
        assert_eq!(next_capacity(256, 257, 4096), 512);
        assert_eq!(next_capacity(256, 2000, 4096), 2000);
        assert_eq!(next_capacity(3000, 3001, 4096), 4096);
        assert_eq!(next_capacity(512, 300, 4096), 512);
        // A step larger than the bound gets exactly what it needs.
        assert_eq!(next_capacity(8, 40, 16), 40);
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
        assert!(c.check_usable().is_ok());
        c.advance(3);
        c.truncate(5);
        assert_eq!(c.len(), 3);
        c.truncate(1);
        assert_eq!(c.len(), 1);
        c.clear();
        assert!(c.is_empty());
    }

    /// The device cache's bookkeeping, replayed without a device: every
    /// step runs the cut the CPU made after the previous one, so the CPU's
    /// and this cache's `start` agree at every step's attention, and the
    /// capacity `prepare` asks for stays within `2·window + step rows`.
    #[test]
    fn window_bookkeeping_follows_the_cpu_rule_and_bounds_capacity() {
        use proptest::prelude::*;
        use proptest::test_runner::TestRunner;
        let steps = prop::collection::vec(1usize..70, 1..60);
        TestRunner::default()
            .run(&(1usize..40, steps), |(w, steps)| {
                let window = Some(w);
                let max_step = *steps.iter().max().unwrap_or(&1);
                // The CPU: cut after each step.
                let (mut cpu_start, mut cpu_len) = (0usize, 0usize);
                // This cache: cut before each step; capacity as reserve grows it.
                let (mut start, mut len, mut capacity) = (0usize, 0usize, 0usize);
                for n in steps {
                    if let Some(s) = kv_window::cut_start(start, len, window) {
                        start = s;
                    }
                    let need = len - start + n;
                    capacity =
                        next_capacity(capacity, need, kv_window::capacity_bound(window, 1 << 20));
                    prop_assert!(capacity >= need);
                    prop_assert!(capacity <= 2 * w + max_step);
                    // Both attend with positions relative to the same start.
                    prop_assert_eq!(start, cpu_start);
                    len += n;
                    cpu_len += n;
                    if let Some(s) = kv_window::cut_start(cpu_start, cpu_len, window) {
                        cpu_start = s;
                    }
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
