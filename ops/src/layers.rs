//! The transformer layer kernels' safe API (RMSNorm, RoPE, SwiGLU, residual
//! add, embedding gather, KV cache append, attention), checked against
//! `meswitch_reference::layers`. FP16 storage, f32 math; the residual stream
//! is f32.
//!
//! Two layers, as in [`crate::gemv`]:
//! - device-resident (`*_device`): what the CUDA runtime calls every step;
//! - host-slice functions (same names without `_device`): upload, launch,
//!   download; for the tests and one-off use.
//!
//! Every length, index and position is checked here, before a launch; the
//! kernels trust their params. Rows whose position or token a kernel cannot
//! serve are still never read out of bounds: the kernels write NaN there.
//!
//! KV cache of one sequence ([`DeviceKv`]), all layers in one allocation:
//!
//! ```text
//!   data: [n_layers][2 (K, V)][capacity][kv_dim] f16      kv_dim = n_kv_heads · head_dim
//!   key of layer l, position p:    ((l·2 + 0)·capacity + p)·kv_dim
//!   value of layer l, position p:  ((l·2 + 1)·capacity + p)·kv_dim
//! ```
//!
//! Keys are stored after RoPE. A step's rows ([`AttnRows`]) may belong to
//! different sequences, some prefilling many positions and some decoding one;
//! the table of (cache address, capacity, position) per row is uploaded once
//! per step and used by every layer's `kv_append` and `attention`.

use std::collections::HashMap;
use std::marker::PhantomData;

use cudarc::driver::CudaSlice;
use half::f16;
use meswitch_reference::layers::{rope_angles, rope_inv_freq, AttnShape};
use meswitch_reference::ShapeError;
use thiserror::Error;

use crate::device::Gpu;
use crate::error::{DriverContext, OpsError};
use crate::gemv::{download, upload};
use crate::launch_layers as launch;

/// Inputs the layer kernels reject (valid Rust values that are not a valid
/// layer call).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayerError {
    #[error("token {token} (row {row}) is not below the vocabulary size {vocab}")]
    TokenOutOfRange {
        row: usize,
        token: u32,
        vocab: usize,
    },
    #[error("row {row}: cache slot {pos} (position − the cache's first stored position) is not below the capacity {capacity} of its cache")]
    PositionOutOfRange {
        row: usize,
        pos: usize,
        capacity: usize,
    },
    #[error("row {row} names cache {cache}, but only {n_caches} caches were given")]
    UnknownCache {
        row: usize,
        cache: usize,
        n_caches: usize,
    },
    #[error("rows {first} and {second} both write position {pos} of cache {cache}")]
    DuplicatePosition {
        first: usize,
        second: usize,
        cache: usize,
        pos: usize,
    },
    #[error("row {row}: position {pos} is before the first stored position {start} of its cache (dropped under the sliding window)")]
    PositionDropped {
        row: usize,
        pos: usize,
        start: usize,
    },
    #[error("cannot move positions {from}..{end} of a cache with capacity {capacity}")]
    ShiftRange {
        from: usize,
        end: usize,
        capacity: usize,
    },
    #[error("layer {layer} of a cache with {n_layers} layers")]
    LayerOutOfRange { layer: usize, n_layers: usize },
    #[error("caches of one step must share their geometry: cache {cache} has {found:?} (layers, kv_dim), cache 0 has {expected:?}")]
    CacheGeometry {
        cache: usize,
        expected: (usize, usize),
        found: (usize, usize),
    },
    #[error("attention shape {0:?} is not supported: {1}")]
    AttnShape(AttnShape, &'static str),
    #[error("head_dim {0} must be even and positive")]
    HeadDim(usize),
    #[error("{0} must be positive")]
    Empty(&'static str),
    #[error("{what} = {value} does not fit the kernel's 32-bit or grid limits")]
    TooLarge { what: &'static str, value: usize },
}

fn u32_of(what: &'static str, value: usize) -> Result<u32, LayerError> {
    u32::try_from(value).map_err(|_| LayerError::TooLarge { what, value })
}

// ---- RMSNorm, SwiGLU, residual add, embedding ------------------------------

/// `y[r,:] = x[r,:] / sqrt(mean(x[r,:]²) + eps) · weight` for `rows` rows:
/// `x` f32 `[rows, n]` (the residual stream), `weight` f32 `[n]`, `y` f16
/// `[rows, n]` (the input of the next linear).
pub fn rms_norm_device(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    eps: f32,
    rows: usize,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let n = weight.len();
    ShapeError::check_len("rms_norm x", rows * n, x.len())?;
    ShapeError::check_len("rms_norm y", rows * n, y.len())?;
    if rows == 0 {
        return Ok(());
    }
    launch::rms_norm(gpu, x, weight, eps, rows, n, y)
}

/// `out = silu(gate) · up` elementwise, f16 in and out, f32 math.
pub fn swiglu_device(
    gpu: &Gpu,
    gate: &CudaSlice<f16>,
    up: &CudaSlice<f16>,
    out: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    ShapeError::check_len("swiglu up", gate.len(), up.len())?;
    ShapeError::check_len("swiglu out", gate.len(), out.len())?;
    launch::swiglu(gpu, gate, up, out)
}

/// `h += y` elementwise: the residual stream `h` (f32) takes a sublayer's
/// f16 output.
pub fn add_residual_device(
    gpu: &Gpu,
    h: &mut CudaSlice<f32>,
    y: &CudaSlice<f16>,
) -> Result<(), OpsError> {
    ShapeError::check_len("add_residual y", h.len(), y.len())?;
    launch::add_residual(gpu, h, y)
}

/// `out[r,:] = table[tokens[r],:]` widened to f32: `table` f16
/// `[vocab, hidden]`, `out` f32 `[tokens.len(), hidden]`. Tokens ≥ vocab are
/// rejected before the launch.
pub fn embed_device(
    gpu: &Gpu,
    table: &CudaSlice<f16>,
    vocab: usize,
    hidden: usize,
    tokens: &[u32],
    out: &mut CudaSlice<f32>,
) -> Result<(), OpsError> {
    ShapeError::check_len("embed table", vocab * hidden, table.len())?;
    ShapeError::check_len("embed out", tokens.len() * hidden, out.len())?;
    check_tokens(tokens, vocab)?;
    if tokens.is_empty() {
        return Ok(());
    }
    let d_tokens = upload(gpu, tokens)?;
    launch::embed(gpu, table, vocab, hidden, &d_tokens, tokens.len(), out)
}

// ---- RoPE -------------------------------------------------------------------

/// RoPE's cos/sin for positions `0..max_positions`, each `[max_positions,
/// head_dim/2]` f32 on the device, filled on the host by the reference's
/// [`rope_angles`] (angles in f64, one rounding to f32): the GPU rotates by
/// exactly the CPU's cos/sin.
pub struct RopeTable {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    max_positions: usize,
    head_dim: usize,
}

impl RopeTable {
    /// The tables for rotary base `theta` (`rope_theta` of the config).
    pub fn new(
        gpu: &Gpu,
        head_dim: usize,
        theta: f64,
        max_positions: usize,
    ) -> Result<RopeTable, OpsError> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(LayerError::HeadDim(head_dim).into());
        }
        if max_positions == 0 {
            return Err(LayerError::Empty("max_positions").into());
        }
        u32_of("max_positions", max_positions)?;
        let inv_freq = rope_inv_freq(head_dim, theta);
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            let (c, s) = rope_angles(pos, &inv_freq);
            cos.extend(c);
            sin.extend(s);
        }
        Ok(RopeTable {
            cos: upload(gpu, &cos)?,
            sin: upload(gpu, &sin)?,
            max_positions,
            head_dim,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub(crate) fn cos(&self) -> &CudaSlice<f32> {
        &self.cos
    }

    pub(crate) fn sin(&self) -> &CudaSlice<f32> {
        &self.sin
    }
}

/// Rotates every head of `rows` rows of `x` (f16 `[rows, n_heads ·
/// head_dim]`, in place) by the row's position in `positions` (u32 `[rows]`
/// on the device), Hugging Face pairing (i, i + head_dim/2) as
/// `meswitch_reference::layers::rope`.
///
/// Positions live on the device, so this function cannot check them without
/// a synchronisation: a position ≥ `table.max_positions()` turns its row
/// into NaN (the tables are never read out of bounds). Build positions with
/// [`AttnRows::upload`] (its [`AttnRows::positions`]), which checks them
/// against the caches' capacity, and size the table to the longest context.
pub fn rope_device(
    gpu: &Gpu,
    table: &RopeTable,
    x: &mut CudaSlice<f16>,
    rows: usize,
    n_heads: usize,
    positions: &CudaSlice<u32>,
) -> Result<(), OpsError> {
    ShapeError::check_len("rope x", rows * n_heads * table.head_dim, x.len())?;
    if rows == 0 || n_heads == 0 {
        return Ok(());
    }
    ShapeError::check_len("rope positions", rows, positions.len())?;
    launch::rope(gpu, table, x, rows, n_heads, positions)
}

// ---- KV cache and attention -------------------------------------------------

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

    /// The rows' positions, u32 `[len]` on the device: what [`rope_device`]
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
fn check_attn_shape(s: AttnShape) -> Result<(), LayerError> {
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

// ---- host-slice variants (tests, one-off use) ----------------------------------

/// Poison for host-API outputs (an f16 NaN): an element a kernel fails to
/// write reaches the caller as NaN.
const UNWRITTEN_F16: f16 = f16::from_bits(0x7E00);

/// [`rms_norm_device`] on host slices; rows = `x.len() / weight.len()`.
pub fn rms_norm(
    gpu: &Gpu,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    y: &mut [f16],
) -> Result<(), OpsError> {
    let rows = x.len().checked_div(weight.len()).unwrap_or(0);
    ShapeError::check_len("rms_norm x", rows * weight.len(), x.len())?;
    ShapeError::check_len("rms_norm y", x.len(), y.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let (d_x, d_w) = (upload(gpu, x)?, upload(gpu, weight)?);
    let mut d_y = upload(gpu, &vec![UNWRITTEN_F16; y.len()])?;
    rms_norm_device(gpu, &d_x, &d_w, eps, rows, &mut d_y)?;
    y.copy_from_slice(&download(gpu, &d_y)?);
    Ok(())
}

/// [`rope_device`] on host slices: `x` f16 `[positions.len(), n_heads ·
/// head_dim]` in place, table for `theta` up to the largest position.
pub fn rope(
    gpu: &Gpu,
    x: &mut [f16],
    head_dim: usize,
    n_heads: usize,
    positions: &[usize],
    theta: f64,
) -> Result<(), OpsError> {
    ShapeError::check_len("rope x", positions.len() * n_heads * head_dim, x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let max_positions = positions.iter().max().map_or(1, |p| p + 1);
    let table = RopeTable::new(gpu, head_dim, theta, max_positions)?;
    let pos: Vec<u32> = positions
        .iter()
        .map(|&p| u32_of("position", p))
        .collect::<Result<_, _>>()?;
    let d_pos = upload(gpu, &pos)?;
    let mut d_x = upload(gpu, x)?;
    rope_device(gpu, &table, &mut d_x, positions.len(), n_heads, &d_pos)?;
    x.copy_from_slice(&download(gpu, &d_x)?);
    Ok(())
}

/// [`swiglu_device`] on host slices.
pub fn swiglu(gpu: &Gpu, gate: &[f16], up: &[f16], out: &mut [f16]) -> Result<(), OpsError> {
    ShapeError::check_len("swiglu up", gate.len(), up.len())?;
    ShapeError::check_len("swiglu out", gate.len(), out.len())?;
    if gate.is_empty() {
        return Ok(());
    }
    let (d_gate, d_up) = (upload(gpu, gate)?, upload(gpu, up)?);
    let mut d_out = upload(gpu, &vec![UNWRITTEN_F16; out.len()])?;
    swiglu_device(gpu, &d_gate, &d_up, &mut d_out)?;
    out.copy_from_slice(&download(gpu, &d_out)?);
    Ok(())
}

/// [`add_residual_device`] on host slices.
pub fn add_residual(gpu: &Gpu, h: &mut [f32], y: &[f16]) -> Result<(), OpsError> {
    ShapeError::check_len("add_residual y", h.len(), y.len())?;
    if h.is_empty() {
        return Ok(());
    }
    let mut d_h = upload(gpu, h)?;
    let d_y = upload(gpu, y)?;
    add_residual_device(gpu, &mut d_h, &d_y)?;
    h.copy_from_slice(&download(gpu, &d_h)?);
    Ok(())
}

/// [`embed_device`] on host slices.
pub fn embed(
    gpu: &Gpu,
    table: &[f16],
    vocab: usize,
    hidden: usize,
    tokens: &[u32],
    out: &mut [f32],
) -> Result<(), OpsError> {
    ShapeError::check_len("embed table", vocab * hidden, table.len())?;
    ShapeError::check_len("embed out", tokens.len() * hidden, out.len())?;
    check_tokens(tokens, vocab)?;
    if out.is_empty() {
        return Ok(());
    }
    let d_table = upload(gpu, table)?;
    let mut d_out = upload(gpu, &vec![f32::NAN; out.len()])?;
    embed_device(gpu, &d_table, vocab, hidden, tokens, &mut d_out)?;
    out.copy_from_slice(&download(gpu, &d_out)?);
    Ok(())
}

fn check_tokens(tokens: &[u32], vocab: usize) -> Result<(), OpsError> {
    match tokens.iter().position(|&t| t as usize >= vocab) {
        Some(row) => Err(LayerError::TokenOutOfRange {
            row,
            token: tokens[row],
            vocab,
        }
        .into()),
        None => Ok(()),
    }
}

/// One sequence for [`attention`]: its cached keys and values of one layer
/// (f16 `[len, kv_dim]`, keys after RoPE), the positions `0..len`.
pub struct HostSequence<'a> {
    pub keys: &'a [f16],
    pub values: &'a [f16],
}

/// Attention on host slices, the GPU twin of
/// `meswitch_reference::layers::attention`: row r of `q` (f16 `[rows,
/// n_heads · head_dim]`) is (sequence `rows[r].0`, position `rows[r].1`) and
/// attends to that sequence's cached positions. Each sequence becomes a
/// one-layer [`DeviceKv`] filled by [`kv_append_device`] (so this exercises
/// the append too); `out` f16 like `q`.
pub fn attention(
    gpu: &Gpu,
    shape: AttnShape,
    q: &[f16],
    sequences: &[HostSequence],
    rows: &[(usize, usize)],
    out: &mut [f16],
) -> Result<(), OpsError> {
    check_attn_shape(shape)?;
    let kv_dim = shape.kv_dim();
    ShapeError::check_len("attention q", rows.len() * shape.q_dim(), q.len())?;
    ShapeError::check_len("attention out", q.len(), out.len())?;
    let mut caches = Vec::with_capacity(sequences.len());
    for s in sequences {
        let len = s.keys.len() / kv_dim;
        ShapeError::check_len("attention keys", len * kv_dim, s.keys.len())?;
        ShapeError::check_len("attention values", s.keys.len(), s.values.len())?;
        let mut cache = DeviceKv::new(gpu, 1, kv_dim, len.max(1))?;
        if len > 0 {
            fill_layer(gpu, &mut cache, s.keys, s.values, len)?;
        }
        caches.push(cache);
    }
    let refs: Vec<&DeviceKv> = caches.iter().collect();
    let step = AttnRows::upload(gpu, &refs, rows)?;
    if rows.is_empty() {
        return Ok(());
    }
    let d_q = upload(gpu, q)?;
    let mut d_out = upload(gpu, &vec![UNWRITTEN_F16; out.len()])?;
    attention_device(gpu, shape, 0, &d_q, &step, &mut d_out)?;
    out.copy_from_slice(&download(gpu, &d_out)?);
    Ok(())
}

/// Appends positions `0..len` of one layer-0 cache through the kernel.
fn fill_layer(
    gpu: &Gpu,
    cache: &mut DeviceKv,
    keys: &[f16],
    values: &[f16],
    len: usize,
) -> Result<(), OpsError> {
    let rows: Vec<(usize, usize)> = (0..len).map(|p| (0, p)).collect();
    let step = AttnRows::upload(gpu, &[&*cache], &rows)?;
    let (d_k, d_v) = (upload(gpu, keys)?, upload(gpu, values)?);
    kv_append_device(gpu, 0, &d_k, &d_v, &step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n_heads: usize, n_kv_heads: usize, head_dim: usize, w: Option<usize>) -> AttnShape {
        AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
            sliding_window: w,
        }
    }

    #[test]
    fn attention_shapes_the_kernel_cannot_take_are_rejected() {
        for ok in [
            shape(32, 8, 128, None),
            shape(9, 3, 64, Some(4096)),
            shape(1, 1, 2, Some(1)),
            shape(8, 1, launch::MAX_HEAD_DIM, None),
        ] {
            assert_eq!(check_attn_shape(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            shape(3, 2, 64, None),
            shape(0, 0, 64, None),
            shape(4, 0, 64, None),
            shape(4, 4, 0, None),
            shape(4, 4, 63, None),
            shape(4, 4, launch::MAX_HEAD_DIM + 2, None),
            shape(4, 4, 64, Some(0)),
        ] {
            assert!(
                matches!(check_attn_shape(bad), Err(LayerError::AttnShape(..))),
                "{bad:?}"
            );
        }
    }

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

    #[test]
    fn bad_tokens_are_found_with_their_row() {
        assert!(check_tokens(&[0, 4, 2], 5).is_ok());
        match check_tokens(&[0, 5, 9], 5) {
            Err(OpsError::Layer(LayerError::TokenOutOfRange { row, token, vocab })) => {
                assert_eq!((row, token, vocab), (1, 5, 5))
            }
            other => panic!("{other:?}"),
        }
    }
}
