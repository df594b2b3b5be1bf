//! The unsafe layer of [`crate::layers`]: ABI param structs
//! (`ptx/include/meswitch_abi.h`) filled from buffers the safe layer has
//! checked, launch configurations from the header's constants, and the
//! launches. Nothing here checks lengths again: callers did.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;
use meswitch_ptx::abi;
use meswitch_reference::layers::AttnShape;

use crate::device::Gpu;
use crate::error::{DriverContext, OpsError};
use crate::gemv::upload;
use crate::launch::{addr, addr_mut};
use crate::layers::{AttnRows, DeviceKv, LayerError, RopeTable};

/// Rows one step may have: attention's grid y (one block row per query row).
pub(crate) const MAX_ROWS: usize = abi::MESWITCH_MAX_GRID_Y as usize;
/// Largest head_dim the attention kernel holds in registers.
pub(crate) const MAX_HEAD_DIM: usize = abi::MESWITCH_ATTN_MAX_HEAD_DIM as usize;

/// A param struct passed by value as a kernel's single argument;
/// `repr(transparent)`, so cudarc hands cuLaunchKernel the C struct's bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Param<T>(T);
// SAFETY: the structs are #[repr(C)] bindgen output of plain C structs of
// u64/u32/f32 fields, 8-byte aligned with explicit `reserved` padding (the
// layout assertions in meswitch_ptx::abi hold them to the C declaration).
unsafe impl DeviceRepr for Param<abi::MeswitchRmsNormParams> {}
unsafe impl DeviceRepr for Param<abi::MeswitchRopeParams> {}
unsafe impl DeviceRepr for Param<abi::MeswitchElementwiseParams> {}
unsafe impl DeviceRepr for Param<abi::MeswitchEmbedParams> {}
unsafe impl DeviceRepr for Param<abi::MeswitchKvAppendParams> {}
unsafe impl DeviceRepr for Param<abi::MeswitchAttentionParams> {}

fn u32_of(what: &'static str, value: usize) -> Result<u32, OpsError> {
    u32::try_from(value).map_err(|_| LayerError::TooLarge { what, value }.into())
}

/// One block of `MESWITCH_ROW_THREADS` per row.
fn per_row(rows: usize) -> Result<LaunchConfig, OpsError> {
    Ok(LaunchConfig {
        grid_dim: (u32_of("rows", rows)?, 1, 1),
        block_dim: (abi::MESWITCH_ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Enough blocks for one element per thread, capped (the kernels loop).
fn elementwise(n: usize) -> LaunchConfig {
    let (blocks, threads) = meswitch_ptx::elementwise_launch_dims(n);
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

macro_rules! launch {
    ($gpu:expr, $kernel:literal, $cfg:expr, $params:expr) => {{
        let func = $gpu.function($kernel)?;
        let params = Param($params);
        // SAFETY: the safe layer checked every length the kernel derives
        // from these params, so every address covers what the kernel reads
        // and writes; see the kernel's param struct in meswitch_abi.h.
        unsafe {
            $gpu.stream()
                .launch_builder(&func)
                .arg(&params)
                .launch($cfg)
        }
        .map(|_| ())
        .during(concat!($kernel, " launch"))
    }};
}

pub(crate) fn rms_norm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    eps: f32,
    rows: usize,
    n: usize,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let params = abi::MeswitchRmsNormParams {
        x: addr(gpu, x),
        weight: addr(gpu, weight),
        y: addr_mut(gpu, y),
        rows: u32_of("rows", rows)?,
        n: u32_of("rms_norm width", n)?,
        eps,
        reserved: 0,
    };
    launch!(gpu, "meswitch_rms_norm", per_row(rows)?, params)
}

pub(crate) fn rope(
    gpu: &Gpu,
    table: &RopeTable,
    x: &mut CudaSlice<f16>,
    rows: usize,
    n_heads: usize,
    positions: &CudaSlice<u32>,
) -> Result<(), OpsError> {
    let params = abi::MeswitchRopeParams {
        x: addr_mut(gpu, x),
        positions: addr(gpu, positions),
        cos: addr(gpu, table.cos()),
        sin: addr(gpu, table.sin()),
        rows: u32_of("rows", rows)?,
        n_heads: u32_of("n_heads", n_heads)?,
        head_dim: u32_of("head_dim", table.head_dim())?,
        max_positions: u32_of("max_positions", table.max_positions())?,
    };
    launch!(gpu, "meswitch_rope", per_row(rows)?, params)
}

pub(crate) fn swiglu(
    gpu: &Gpu,
    gate: &CudaSlice<f16>,
    up: &CudaSlice<f16>,
    out: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let n = gate.len();
    let params = abi::MeswitchElementwiseParams {
        a: addr(gpu, gate),
        b: addr(gpu, up),
        out: addr_mut(gpu, out),
        n: u32_of("swiglu length", n)?,
        reserved: 0,
    };
    launch!(gpu, "meswitch_swiglu", elementwise(n), params)
}

pub(crate) fn add_residual(
    gpu: &Gpu,
    h: &mut CudaSlice<f32>,
    y: &CudaSlice<f16>,
) -> Result<(), OpsError> {
    let n = h.len();
    let params = abi::MeswitchElementwiseParams {
        a: addr_mut(gpu, h),
        b: addr(gpu, y),
        out: 0,
        n: u32_of("add_residual length", n)?,
        reserved: 0,
    };
    launch!(gpu, "meswitch_add_residual", elementwise(n), params)
}

pub(crate) fn embed(
    gpu: &Gpu,
    table: &CudaSlice<f16>,
    vocab: usize,
    hidden: usize,
    tokens: &CudaSlice<u32>,
    rows: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), OpsError> {
    let params = abi::MeswitchEmbedParams {
        table: addr(gpu, table),
        tokens: addr(gpu, tokens),
        out: addr_mut(gpu, out),
        rows: u32_of("rows", rows)?,
        hidden: u32_of("hidden", hidden)?,
        vocab: u32_of("vocab", vocab)?,
        reserved: 0,
    };
    launch!(gpu, "meswitch_embed", per_row(rows)?, params)
}

/// Row descriptor of cache slot `slot` of `cache` (see `MeswitchAttnRow`;
/// the kernels' `pos` is the slot: the absolute position minus the cache's
/// first stored one, see `AttnRows::upload_windowed`).
pub(crate) fn attn_row(gpu: &Gpu, cache: &DeviceKv, slot: usize) -> abi::MeswitchAttnRow {
    abi::MeswitchAttnRow {
        kv: addr(gpu, cache.data()),
        // DeviceKv::new/grow checked the capacity fits u32; slot < capacity.
        capacity: cache.capacity() as u32,
        pos: slot as u32,
    }
}

/// `MeswitchAttnRow[n]` on the device, as bytes (the struct is no cudarc type).
pub(crate) fn upload_attn_rows(
    gpu: &Gpu,
    rows: &[abi::MeswitchAttnRow],
) -> Result<CudaSlice<u8>, OpsError> {
    // SAFETY: MeswitchAttnRow is a #[repr(C)] struct of integers with no
    // padding (u64 + 2×u32); viewing it as bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(rows.as_ptr().cast::<u8>(), std::mem::size_of_val(rows))
    };
    upload(gpu, bytes)
}

pub(crate) fn kv_append(
    gpu: &Gpu,
    layer: usize,
    k: &CudaSlice<f16>,
    v: &CudaSlice<f16>,
    rows: &AttnRows,
    kv_dim: usize,
) -> Result<(), OpsError> {
    let params = abi::MeswitchKvAppendParams {
        k: addr(gpu, k),
        v: addr(gpu, v),
        rows: addr(gpu, rows.table()),
        n_rows: u32_of("rows", rows.len())?,
        kv_dim: u32_of("kv_dim", kv_dim)?,
        layer: u32_of("layer", layer)?,
        reserved: 0,
    };
    // The kernel writes through the caches' addresses in the row table: see
    // the SAFETY invariant on AttnRows.
    launch!(gpu, "meswitch_kv_append", per_row(rows.len())?, params)
}

pub(crate) fn attention(
    gpu: &Gpu,
    s: AttnShape,
    layer: usize,
    q: &CudaSlice<f16>,
    rows: &AttnRows,
    out: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let params = abi::MeswitchAttentionParams {
        q: addr(gpu, q),
        rows: addr(gpu, rows.table()),
        out: addr_mut(gpu, out),
        n_rows: u32_of("rows", rows.len())?,
        n_heads: u32_of("n_heads", s.n_heads)?,
        n_kv_heads: u32_of("n_kv_heads", s.n_kv_heads)?,
        head_dim: u32_of("head_dim", s.head_dim)?,
        layer: u32_of("layer", layer)?,
        sliding_window: meswitch_ptx::attention_window(s.sliding_window),
        scale: meswitch_ptx::attention_scale(s.head_dim),
        reserved: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (
            u32_of("n_heads", s.n_heads)?,
            u32_of("rows", rows.len())?,
            1,
        ),
        block_dim: (abi::MESWITCH_ATTN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(gpu, "meswitch_attention", cfg, params)
}
