//! One sequence's KV cache on the device ([`DeviceKv`]), a step's rows
//! over many caches ([`AttnRows`]), the K/V append and attention; part of
//! [`super`] (`layers`), whose checks-before-launch rules hold here too.
//!
//! KV cache of one sequence, all layers in one allocation:
//!
//! ```text
//!   data: [n_layers][2 (K, V)][capacity][kv_dim] f16      kv_dim = n_kv_heads · head_dim
//!   key of layer l, slot p:    ((l·2 + 0)·capacity + p)·kv_dim
//!   value of layer l, slot p:  ((l·2 + 1)·capacity + p)·kv_dim
//! ```
//!
//! Keys are stored after RoPE. Slot p holds absolute position `start + p`
//! (`start` = 0 unless a sliding-window cache dropped its oldest positions,
//! [`DeviceKv::shift_front`]). A step's rows ([`AttnRows`]) may belong to
//! different sequences, some prefilling many positions and some decoding one;
//! the table of (cache address, capacity, slot) per row is uploaded once per
//! step and used by every layer's `kv_append` and `attention`.

use std::collections::HashMap;
use std::marker::PhantomData;

use cudarc::driver::CudaSlice;
use half::f16;
use meswitch_reference::layers::AttnShape;
use meswitch_reference::ShapeError;

use super::{u32_of, LayerError};
use crate::device::Gpu;
use crate::error::{DriverContext, OpsError};
use crate::gemv::{download, upload};
use crate::launch_layers as launch;

/// One sequence's KV cache on the device, all layers (layout in the module
/// docs), zero-initialised.
pub struct DeviceKv {
    data: CudaSlice<f16>,
    n_layers: usize,
    kv_dim: usize,
    capacity: usize,
}

impl DeviceKv {
    pub fn new(
        gpu: &Gpu,
        n_layers: usize,
        kv_dim: usize,
        capacity: usize,
    ) -> Result<DeviceKv, OpsError> {
        if n_layers == 0 || kv_dim == 0 || capacity == 0 {
            return Err(LayerError::Empty("KV cache (n_layers, kv_dim and capacity)").into());
        }
        u32_of("cache capacity", capacity)?;
        u32_of("kv_dim", kv_dim)?;
        let data = gpu
            .stream()
            .alloc_zeros(n_layers * 2 * capacity * kv_dim)
            .during("allocating a KV cache")?;
        Ok(DeviceKv {
            data,
            n_layers,
            kv_dim,
            capacity,
        })
    }

    /// Positions each layer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Device bytes of the cache.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f16>()
    }

    /// Reallocates for `new_capacity` positions and copies every layer's K
    /// and V over (positions `0..capacity`; the new tail is zero). A
    /// `new_capacity` not above the current one changes nothing.
    pub fn grow(&mut self, gpu: &Gpu, new_capacity: usize) -> Result<(), OpsError> {
        if new_capacity <= self.capacity {
            return Ok(());
        }
        u32_of("cache capacity", new_capacity)?;
        let mut data: CudaSlice<f16> = gpu
            .stream()
            .alloc_zeros(self.n_layers * 2 * new_capacity * self.kv_dim)
            .during("allocating a grown KV cache")?;
        // One copy per (layer, K|V) block: the block stride changes with the
        // capacity, the block's first `capacity · kv_dim` elements do not.
        let (old_block, new_block) = (self.capacity * self.kv_dim, new_capacity * self.kv_dim);
        for b in 0..self.n_layers * 2 {
            let src = self.data.slice(b * old_block..(b + 1) * old_block);
            let mut dst = data.slice_mut(b * new_block..b * new_block + old_block);
            gpu.stream()
                .memcpy_dtod(&src, &mut dst)
                .during("copying a KV cache into its grown allocation")?;
        }
        self.data = data;
        self.capacity = new_capacity;
        Ok(())
    }

    /// Moves positions `from .. from + count` of every layer's K and V to
    /// `0 .. count` (what a sliding-window cache does when it drops its
    /// oldest positions); positions `count..` keep stale data the caller
    /// treats as free. Device-to-device copies on the stream, cut in pieces
    /// so no copy overlaps itself (`shift_copies`).
    pub fn shift_front(&mut self, gpu: &Gpu, from: usize, count: usize) -> Result<(), OpsError> {
        let end = from.saturating_add(count);
        if end > self.capacity {
            return Err(LayerError::ShiftRange {
                from,
                end,
                capacity: self.capacity,
            }
            .into());
        }
        let (kv, block) = (self.kv_dim, self.capacity * self.kv_dim);
        for b in 0..self.n_layers * 2 {
            for (src, dst, n) in shift_copies(from, count) {
                // dst + n ≤ src: the two views are disjoint halves of the block.
                let mut whole = self.data.slice_mut(b * block..(b + 1) * block);
                let (mut front, back) = whole.split_at_mut(src * kv);
                let source = back.slice(..n * kv);
                let mut target = front.slice_mut(dst * kv..(dst + n) * kv);
                gpu.stream()
                    .memcpy_dtod(&source, &mut target)
                    .during("moving a KV cache's kept positions to its front")?;
            }
        }
        Ok(())
    }

    /// Layer `layer`'s keys and values, each `[capacity, kv_dim]` (tests,
    /// debugging; waits for the stream).
    pub fn download_layer(
        &self,
        gpu: &Gpu,
        layer: usize,
    ) -> Result<(Vec<f16>, Vec<f16>), OpsError> {
        if layer >= self.n_layers {
            return Err(LayerError::LayerOutOfRange {
                layer,
                n_layers: self.n_layers,
            }
            .into());
        }
        let block = self.capacity * self.kv_dim;
        let all = download(gpu, &self.data)?;
        let k = all[layer * 2 * block..][..block].to_vec();
        let v = all[(layer * 2 + 1) * block..][..block].to_vec();
        Ok((k, v))
    }

    pub(crate) fn data(&self) -> &CudaSlice<f16> {
        &self.data
    }
}

/// The copies that move positions `from .. from + count` to `0 .. count`,
/// as (source position, target position, positions). Disjoint ranges
/// (`from ≥ count`, the sliding-window case) are one copy; overlapping ones
/// go front to back in pieces of at most `from` positions, so each piece's
/// target ends where its source starts and only overwrites positions whose
/// data an earlier piece has already moved:
///
/// ```text
///   from = 2, count = 5:   [2,4)→[0,2)   [4,6)→[2,4)   [6,7)→[4,5)
/// ```
fn shift_copies(from: usize, count: usize) -> Vec<(usize, usize, usize)> {
    let mut copies = Vec::new();
    if from == 0 {
        return copies;
    }
    let mut done = 0;
    while done < count {
        let n = from.min(count - done);
        copies.push((from + done, done, n));
        done += n;
    }
    copies
}

/// The step's rows on the device: for row r, its sequence's cache (an index
/// into the `caches` given to [`AttnRows::upload`]) and its position.
/// Uploaded once per step, used by every layer. It borrows the caches, so
/// none can grow (reallocate) while the table holds their addresses.
///
/// SAFETY invariant (device-side interior mutability): [`kv_append_device`]
/// writes into the caches through this table although it holds them by
/// shared reference. That is sound because all launches go to the one
/// stream of [`Gpu`] and execute in order, and because the caller must not
/// read or write these caches by other means (another stream, a host copy
/// not ordered on that stream) while the step runs — the runtime is
/// single-stream and owns its caches. Two rows never write the same
/// (cache, position): [`AttnRows::upload`] rejects that.
pub struct AttnRows<'a> {
    table: CudaSlice<u8>,
    positions: CudaSlice<u32>,
    rows: Vec<(usize, usize)>,
    n_layers: usize,
    kv_dim: usize,
    _caches: PhantomData<&'a DeviceKv>,
}

impl<'a> AttnRows<'a> {
    /// Checks every row (cache index, position < that cache's capacity, no
    /// two rows on one (cache, position), all caches of one geometry) and
    /// uploads the table and the positions.
    pub fn upload(
        gpu: &Gpu,
        caches: &[&'a DeviceKv],
        rows: &[(usize, usize)],
    ) -> Result<AttnRows<'a>, OpsError> {
        AttnRows::upload_windowed(gpu, caches, &vec![0; caches.len()], rows)
    }

    /// [`AttnRows::upload`] for caches whose slot 0 holds absolute position
    /// `starts[c]` (a sliding-window cache that dropped its oldest
    /// positions, see [`DeviceKv::shift_front`]). Rows name absolute
    /// positions: RoPE gets those ([`AttnRows::positions`]); append and
    /// attention use the slot `pos − starts[c]`, which must be below the
    /// capacity.
    ///
    /// ```text
    ///   absolute:  0 ..... start ........ pos ...
    ///   slot:              0 ............ pos − start  < capacity
    /// ```
    ///
    /// The attention kernel's window start `max(slot + 1 − window, 0)` is
    /// the absolute one minus `start` whenever `start ≤ pos + 1 − window`,
    /// i.e. when the cache dropped nothing the window can see (the rule in
    /// the runtime's `kv_window` guarantees it).
    pub fn upload_windowed(
        gpu: &Gpu,
        caches: &[&'a DeviceKv],
        starts: &[usize],
        rows: &[(usize, usize)],
    ) -> Result<AttnRows<'a>, OpsError> {
        ShapeError::check_len("attention cache starts", caches.len(), starts.len())?;
        let geometry = caches.first().map_or((0, 0), |c| (c.n_layers, c.kv_dim));
        for (cache, c) in caches.iter().enumerate() {
            if (c.n_layers, c.kv_dim) != geometry {
                return Err(LayerError::CacheGeometry {
                    cache,
                    expected: geometry,
                    found: (c.n_layers, c.kv_dim),
                }
                .into());
            }
        }
        if rows.len() > launch::MAX_ROWS {
            return Err(LayerError::TooLarge {
                what: "rows of one step",
                value: rows.len(),
            }
            .into());
        }
        let mut seen = HashMap::new();
        let mut descriptors = Vec::with_capacity(rows.len());
        for (row, &(cache, pos)) in rows.iter().enumerate() {
            let c = caches.get(cache).ok_or(LayerError::UnknownCache {
                row,
                cache,
                n_caches: caches.len(),
            })?;
            let start = starts[cache];
            let slot =
                pos.checked_sub(start)
                    .ok_or(LayerError::PositionDropped { row, pos, start })?;
            if slot >= c.capacity {
                return Err(LayerError::PositionOutOfRange {
                    row,
                    pos: slot,
                    capacity: c.capacity,
                }
                .into());
            }
            if let Some(first) = seen.insert((cache, pos), row) {
                return Err(LayerError::DuplicatePosition {
                    first,
                    second: row,
                    cache,
                    pos,
                }
                .into());
            }
            descriptors.push(launch::attn_row(gpu, c, slot));
        }
        let positions: Vec<u32> = rows
            .iter()
            .map(|&(_, p)| u32_of("position", p))
            .collect::<Result<_, _>>()?;
        Ok(AttnRows {
            table: launch::upload_attn_rows(gpu, &descriptors)?,
            positions: upload(gpu, &positions)?,
            rows: rows.to_vec(),
            n_layers: geometry.0,
            kv_dim: geometry.1,
            _caches: PhantomData,
        })
    }

    /// Rows of the step.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows as given: (cache index, position).
    pub fn rows(&self) -> &[(usize, usize)] {
        &self.rows
    }

    /// The rows' positions, u32 `[len]` on the device: what [`super::rope_device`]
    /// takes. (One element, unread, when there are no rows.)
    pub fn positions(&self) -> &CudaSlice<u32> {
        &self.positions
    }

    pub(crate) fn table(&self) -> &CudaSlice<u8> {
        &self.table
    }

    fn check_layer(&self, layer: usize) -> Result<(), LayerError> {
        if layer < self.n_layers {
            Ok(())
        } else {
            Err(LayerError::LayerOutOfRange {
                layer,
                n_layers: self.n_layers,
            })
        }
    }
}

/// Writes row r's key `k[r,:]` and value `v[r,:]` (f16 `[rows, kv_dim]`,
/// keys after RoPE) at (layer, pos(r)) of its cache.
pub fn kv_append_device(
    gpu: &Gpu,
    layer: usize,
    k: &CudaSlice<f16>,
    v: &CudaSlice<f16>,
    rows: &AttnRows,
) -> Result<(), OpsError> {
    if rows.is_empty() {
        return Ok(());
    }
    rows.check_layer(layer)?;
    ShapeError::check_len("kv_append k", rows.len() * rows.kv_dim, k.len())?;
    ShapeError::check_len("kv_append v", rows.len() * rows.kv_dim, v.len())?;
    launch::kv_append(gpu, layer, k, v, rows, rows.kv_dim)
}

/// Checks what the attention kernel needs of a shape beyond the reference's
/// own requirements.
pub(crate) fn check_attn_shape(s: AttnShape) -> Result<(), LayerError> {
    let bad = |why| Err(LayerError::AttnShape(s, why));
    if s.n_heads == 0 || s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
        return bad("n_kv_heads must divide n_heads (both positive)");
    }
    if s.head_dim == 0 || s.head_dim % 2 != 0 || s.head_dim > launch::MAX_HEAD_DIM {
        return bad("head_dim must be even, positive and at most MESWITCH_ATTN_MAX_HEAD_DIM");
    }
    if s.sliding_window == Some(0) {
        return bad("a sliding window of 0 positions attends to nothing");
    }
    Ok(())
}

/// Causal GQA attention of the step's rows at `layer`: `q` f16 `[rows,
/// n_heads · head_dim]` (after RoPE), `out` f16 the same shape. Row r attends
/// to positions `lo ..= pos(r)` of its cache (its own key must already be
/// appended), `lo` from the sliding window as
/// `meswitch_reference::layers::attention_window_start`; online softmax in
/// f32, scale `1/sqrt(head_dim)`.
pub fn attention_device(
    gpu: &Gpu,
    shape: AttnShape,
    layer: usize,
    q: &CudaSlice<f16>,
    rows: &AttnRows,
    out: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    check_attn_shape(shape)?;
    ShapeError::check_len("attention q", rows.len() * shape.q_dim(), q.len())?;
    ShapeError::check_len("attention out", rows.len() * shape.q_dim(), out.len())?;
    if rows.is_empty() {
        return Ok(());
    }
    rows.check_layer(layer)?;
    ShapeError::check_len("attention kv_dim", rows.kv_dim, shape.kv_dim())?;
    launch::attention(gpu, shape, layer, q, rows, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the copies on a host array: the moved positions arrive
    /// intact whatever the overlap, and no copy overlaps itself.
    #[test]
    fn shift_copies_move_every_kept_position_once() {
        for from in 0..9 {
            for count in 0..12 {
                let mut cache: Vec<usize> = (0..from + count).collect();
                let copies = shift_copies(from, count);
                for &(src, dst, n) in &copies {
                    assert!(n > 0 && dst + n <= src, "{from} {count}: {copies:?}");
                    cache.copy_within(src..src + n, dst);
                }
                if from > 0 {
                    let moved: Vec<usize> = (from..from + count).collect();
                    assert_eq!(&cache[..count], &moved[..], "{from} {count}");
                    assert_eq!(copies.iter().map(|c| c.2).sum::<usize>(), count);
                } else {
                    assert!(copies.is_empty());
                }
            }
        }
        assert_eq!(shift_copies(2, 5), vec![(2, 0, 2), (4, 2, 2), (6, 4, 1)]);
        assert_eq!(shift_copies(8, 4), vec![(8, 0, 4)]);
    }
}
