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
//! The KV cache ([`DeviceKv`]), a step's attention rows ([`AttnRows`]),
//! append and attention live in `layers_kv.rs` (re-exported here).

use cudarc::driver::CudaSlice;
use half::f16;
use meswitch_reference::layers::{rope_tables, AttnShape};
use meswitch_reference::ShapeError;
use thiserror::Error;

use crate::device::Gpu;
use crate::error::OpsError;
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
/// [`rope_tables`] (angles in f64, one rounding to f32): the GPU rotates by
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
        let (cos, sin) = rope_tables(head_dim, theta, max_positions);
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

// ---- KV cache and attention (layers_kv.rs) ---------------------------------

#[path = "layers_kv.rs"]
mod kv;
pub(crate) use kv::check_attn_shape;
pub use kv::{attention_device, kv_append_device, AttnRows, DeviceKv};

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
