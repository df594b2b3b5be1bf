//! The unsafe layer: ABI param structs (`ptx/include/meswitch_abi.h`, via the
//! bindgen output `meswitch_ptx::abi`) filled from checked device buffers,
//! launch configurations computed from the ABI's constants, and launches.
//! Callers ([`crate::gemv`]) have already checked every length and expert
//! index; this module checks what only the kernels require (K alignment,
//! batch per launch) and picks kernel variants.
//!
//! Variants. A kernel is compiled per (bits, group) variant and all experts
//! of one launch must share it. [`ExpertTable`] groups a call's experts by
//! variant, one device descriptor table per variant:
//!
//! ```text
//!   experts (global index)   0:int2/g128  1:int4/g128  2:int2/g128
//!   variant tables           int2/g128 -> [0, 2]   int4/g128 -> [1]
//!   row_expert (global)      [2, NONE, 1, 0]
//!   per-variant rows         int2/g128: [1, NONE, NONE, 0]   int4/g128: [NONE, NONE, 0, NONE]
//! ```
//!
//! The first variant with active rows goes through the fused kernel (base +
//! its deltas); each other variant adds its rows' deltas with the delta-only
//! kernel (so those rows are rounded to FP16 twice). With one variant, the
//! common case, the global row ids are used as they are: one launch per
//! `MESWITCH_MAX_BATCH` rows and no host copies.
//!
//! Every pass runs the kernel family the caller picks ([`GemvKernel`]:
//! the 128-column kernel by default, or the wide one, unverified on a GPU),
//! where the variant's input width allows it (see `plan.rs`).
//!
//! Batches larger than `MESWITCH_MAX_BATCH` (prefill) take the base product
//! from one cuBLAS GEMM and add the deltas with the delta-only kernel, when
//! cuBLAS is present (else: one fused launch per `MESWITCH_MAX_BATCH` rows).
//!
//! `in_features` not a multiple of `MESWITCH_GEMV_K_CHUNK` (e.g. SmolLM2's
//! 576) cannot use the GEMV kernels; those calls go through cuBLAS for the
//! base and dequantize + cuBLAS per expert (correct, slower; documented in
//! [`unaligned_gemv`]).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;
use meswitch_ptx::abi;
use meswitch_reference::DeltaLayout;

use crate::blas::linear_f16;
use crate::buffers::{DeviceBase, DeviceDelta};
use crate::device::Gpu;
use crate::error::{DriverContext, OpsError};
use crate::gemv::{upload, DeviceExperts, DeviceRows};
use crate::plan::{dequant_kernel, group_by_variant, plan, GemvKernel, Place, Variant};

/// Row marker for "no expert, base only".
pub const NO_EXPERT: u32 = abi::MESWITCH_NO_EXPERT;
/// Rows one GEMV launch accepts; larger batches are split.
pub const MAX_BATCH: usize = abi::MESWITCH_MAX_BATCH as usize;
const F16_BYTES: u64 = 2;
const U32_BYTES: u64 = 4;

pub(crate) fn row_id(e: Option<u32>) -> u32 {
    e.unwrap_or(NO_EXPERT)
}

/// A param struct passed by value as a kernel's single argument.
/// `repr(transparent)`: the bytes cudarc hands to cuLaunchKernel are exactly
/// the C struct's.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Param<T>(T);
// SAFETY: both structs are #[repr(C)] bindgen output of plain C structs made
// of u64/u32 fields (no pointers the host dereferences, no padding issues:
// the header keeps them 8-byte aligned with explicit `reserved` fields).
unsafe impl DeviceRepr for Param<abi::MeswitchGemvParams> {}
unsafe impl DeviceRepr for Param<abi::MeswitchDequantParams> {}

/// Grid and block of a GEMV launch, from `meswitch_ptx` (which derives them
/// from the header's tiling constants).
fn gemv_config(out_features: usize) -> Result<LaunchConfig, OpsError> {
    let (grid, block) = meswitch_ptx::gemv_launch_dims(out_features).ok_or_else(|| {
        OpsError::Unsupported(format!("{out_features} output rows do not fit a GEMV grid"))
    })?;
    Ok(LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Grid and block of a dequantize launch (one block per output row).
fn dequant_config(out_features: usize) -> Result<LaunchConfig, OpsError> {
    let (grid, block) = meswitch_ptx::dequantize_launch_dims(out_features).ok_or_else(|| {
        OpsError::Unsupported(format!(
            "{out_features} output rows do not fit a dequantize grid"
        ))
    })?;
    Ok(LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Raw device address of a buffer. The buffers outlive every launch that
/// uses the address (they are borrowed by the caller for the whole call), and
/// all work is on one stream, so no cross-stream event is needed.
pub(crate) fn addr<T>(gpu: &Gpu, buf: &CudaSlice<T>) -> u64 {
    let (ptr, _sync) = buf.device_ptr(gpu.stream());
    ptr
}

pub(crate) fn addr_mut<T>(gpu: &Gpu, buf: &mut CudaSlice<T>) -> u64 {
    let (ptr, _sync) = buf.device_ptr_mut(gpu.stream());
    ptr
}

fn descriptor(gpu: &Gpu, d: &DeviceDelta) -> abi::MeswitchExpertDelta {
    abi::MeswitchExpertDelta {
        codes: addr(gpu, &d.codes),
        scales: addr(gpu, &d.scales),
        offsets: addr(gpu, &d.offsets),
        salient_index: addr(gpu, &d.salient_index),
        salient_values: addr(gpu, &d.salient_values),
        n_salient: d.layout.salient as u32,
        reserved: 0,
    }
}

/// The descriptors of one variant's experts on the device.
struct VariantTable {
    variant: Variant,
    /// `MeswitchExpertDelta[n]` as bytes (the struct is not a cudarc type).
    descriptors: CudaSlice<u8>,
    n: u32,
}

/// What an [`ExpertTable`] is built from, as integers: per expert its layout
/// (which decides the variant grouping) and its descriptor (device
/// addresses and salient count). Equal keys give byte-identical tables.
pub(crate) fn table_key(gpu: &Gpu, experts: &[&DeviceDelta]) -> Vec<u64> {
    const WORDS_PER_EXPERT: usize = 11;
    let mut key = Vec::with_capacity(experts.len() * WORDS_PER_EXPERT);
    for e in experts {
        let (l, d) = (&e.layout, descriptor(gpu, e));
        key.extend([
            l.out_features as u64,
            l.in_features as u64,
            u64::from(l.bits.count()),
            l.group_size as u64,
            l.salient as u64,
            d.codes,
            d.scales,
            d.offsets,
            d.salient_index,
            d.salient_values,
            u64::from(d.n_salient),
        ]);
    }
    key
}

/// A call's experts grouped by kernel variant (see the module docs).
pub(crate) struct ExpertTable {
    tables: Vec<VariantTable>,
    /// Global expert index → (index into `tables`, index within that table).
    place: Vec<Place>,
}

impl ExpertTable {
    pub(crate) fn new(gpu: &Gpu, experts: &[&DeviceDelta]) -> Result<ExpertTable, OpsError> {
        let layouts: Vec<DeltaLayout> = experts.iter().map(|e| e.layout).collect();
        let (variants, place) = group_by_variant(&layouts)?;
        let mut lists = vec![Vec::new(); variants.len()];
        for (e, &(t, _)) in experts.iter().zip(&place) {
            lists[t].push(descriptor(gpu, e));
        }
        let tables = variants
            .into_iter()
            .zip(lists)
            .map(
                |(variant, list): (Variant, Vec<abi::MeswitchExpertDelta>)| {
                    // SAFETY: MeswitchExpertDelta is a #[repr(C)] struct of
                    // integers; viewing it as bytes is sound.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            list.as_ptr().cast::<u8>(),
                            std::mem::size_of_val(list.as_slice()),
                        )
                    };
                    Ok(VariantTable {
                        variant,
                        descriptors: upload(gpu, bytes)?,
                        n: list.len() as u32,
                    })
                },
            )
            .collect::<Result<_, OpsError>>()?;
        Ok(ExpertTable { tables, place })
    }
}

/// One kernel's worth of work: a variant, its descriptor table and the row
/// ids in that table's numbering.
struct Pass<'t> {
    variant: Variant,
    table: Option<&'t VariantTable>,
    rows: RowIds<'t>,
}

enum RowIds<'t> {
    Global(&'t CudaSlice<u32>),
    Local(CudaSlice<u32>),
}

/// Splits a batch into passes, one per variant with active rows; the first
/// pass is the fused one (see the module docs).
fn passes<'t>(
    gpu: &Gpu,
    table: &'t ExpertTable,
    rows: &'t DeviceRows,
) -> Result<Vec<Pass<'t>>, OpsError> {
    plan(&table.place, table.tables.len(), rows.rows())
        .into_iter()
        .map(|(t, ids)| {
            let t = t.map(|t| &table.tables[t]);
            Ok(Pass {
                variant: t.map_or_else(Variant::base_only, |t| t.variant.clone()),
                table: t,
                rows: match ids {
                    None => RowIds::Global(rows.ids()),
                    Some(ids) => RowIds::Local(upload(gpu, &ids)?),
                },
            })
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn launch_gemv(
    gpu: &Gpu,
    kernel: &str,
    base: u64,
    pass: &Pass,
    x: u64,
    y: u64,
    out_features: usize,
    in_features: usize,
    batch: usize,
) -> Result<(), OpsError> {
    let cfg = gemv_config(out_features)?;
    let rows = match &pass.rows {
        RowIds::Global(ids) => addr(gpu, ids),
        RowIds::Local(ids) => addr(gpu, ids),
    };
    // No table (no row has an expert): the header lets `experts` be anything
    // when n_experts = 0, since every row is then treated as NO_EXPERT.
    let (experts, n_experts) = pass
        .table
        .map_or((0, 0), |t| (addr(gpu, &t.descriptors), t.n));
    for b0 in (0..batch).step_by(MAX_BATCH) {
        let rows_here = MAX_BATCH.min(batch - b0);
        let entry = meswitch_ptx::gemv_entry_for_batch(kernel, rows_here).ok_or_else(|| {
            OpsError::Unsupported(format!("no GEMV variant for {rows_here} rows"))
        })?;
        let func = gpu.function(&entry)?;
        let params = Param(abi::MeswitchGemvParams {
            base,
            experts,
            row_expert: rows + b0 as u64 * U32_BYTES,
            x: x + (b0 * in_features) as u64 * F16_BYTES,
            y: y + (b0 * out_features) as u64 * F16_BYTES,
            out_features: out_features as u32,
            in_features: in_features as u32,
            batch: rows_here as u32,
            n_experts,
        });
        // SAFETY: every address points into a live allocation of the length
        // the kernel derives from these dims (checked by the caller), row ids
        // are < n_experts or NO_EXPERT, in_features % MESWITCH_GEMV_K_CHUNK == 0 and
        // 1 <= batch <= MAX_BATCH as the header requires.
        unsafe { gpu.stream().launch_builder(&func).arg(&params).launch(cfg) }
            .during("GEMV kernel launch")?;
    }
    Ok(())
}

pub(crate) fn multi_expert_gemv(
    gpu: &Gpu,
    kernel: GemvKernel,
    base: &DeviceBase,
    experts: &DeviceExperts,
    x: &CudaSlice<f16>,
    rows: &DeviceRows,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let (o, i) = (base.out_features, base.in_features);
    if !meswitch_ptx::gemv_supports_in_features(i) {
        return unaligned_gemv(gpu, Some(base), o, i, experts, x, rows, y);
    }
    // Prefill-sized batches: the fused kernel would re-read the base once
    // per MAX_BATCH rows, while one cuBLAS GEMM reads it once at tensor-core
    // rate; the deltas then go through the delta-only kernel.
    let base_by_cublas = rows.batch() > MAX_BATCH && gpu.blas().is_ok();
    if base_by_cublas {
        linear_f16(gpu, &base.weights, o, i, x, rows.batch(), y, false)?;
    }
    let (base_ptr, x_ptr, y_ptr) = (addr(gpu, &base.weights), addr(gpu, x), addr_mut(gpu, y));
    for (k, pass) in passes(gpu, experts.table(), rows)?.iter().enumerate() {
        if base_by_cublas && pass.table.is_none() {
            continue;
        }
        let entry = pass.variant.pass_kernel(kernel, k == 0 && !base_by_cublas);
        launch_gemv(gpu, entry, base_ptr, pass, x_ptr, y_ptr, o, i, rows.batch())?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn delta_gemv_accumulate(
    gpu: &Gpu,
    kernel: GemvKernel,
    out_features: usize,
    in_features: usize,
    experts: &DeviceExperts,
    x: &CudaSlice<f16>,
    rows: &DeviceRows,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    if !meswitch_ptx::gemv_supports_in_features(in_features) {
        return unaligned_gemv(gpu, None, out_features, in_features, experts, x, rows, y);
    }
    let (x_ptr, y_ptr) = (addr(gpu, x), addr_mut(gpu, y));
    for pass in passes(gpu, experts.table(), rows)?
        .iter()
        .filter(|p| p.table.is_some())
    {
        let entry = pass.variant.delta_kernel(kernel);
        // The delta kernel ignores `base` (the header allows 0).
        launch_gemv(
            gpu,
            entry,
            0,
            pass,
            x_ptr,
            y_ptr,
            out_features,
            in_features,
            rows.batch(),
        )?;
    }
    Ok(())
}

/// Dense Δ̂ or `W_base + Δ̂` of one delta into `out` (one launch).
pub(crate) fn dequantize(
    gpu: &Gpu,
    delta: &DeviceDelta,
    base: Option<&DeviceBase>,
    out: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let l = &delta.layout;
    let func = gpu.function(&dequant_kernel(l.bits)?)?;
    let cfg = dequant_config(l.out_features)?;
    let params = Param(abi::MeswitchDequantParams {
        delta: descriptor(gpu, delta),
        base: base.map_or(0, |b| addr(gpu, &b.weights)),
        out: addr_mut(gpu, out),
        out_features: l.out_features as u32,
        in_features: l.in_features as u32,
        group_size: l.group_size as u32,
        reserved: 0,
    });
    // SAFETY: the delta was validated at upload, `out` (and `base`) hold
    // out·in elements (checked by the caller).
    unsafe { gpu.stream().launch_builder(&func).arg(&params).launch(cfg) }
        .map(|_| ())
        .during("dequantize kernel launch")
}

/// GEMV for `in_features` that the GEMV kernels cannot take (not a multiple
/// of `MESWITCH_GEMV_K_CHUNK`): cuBLAS for the base over the whole batch, then per active
/// expert one dequantize launch into a scratch matrix and one cuBLAS GEMM
/// accumulating into each run of consecutive rows that use it. Needs cuBLAS.
/// Rows with an expert are rounded to FP16 twice (after the base and after
/// the delta), within the tolerance the tests state.
#[allow(clippy::too_many_arguments)]
fn unaligned_gemv(
    gpu: &Gpu,
    base: Option<&DeviceBase>,
    o: usize,
    i: usize,
    experts: &DeviceExperts,
    x: &CudaSlice<f16>,
    rows: &DeviceRows,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    gpu.blas()?;
    let batch = rows.batch();
    if let Some(base) = base {
        linear_f16(gpu, &base.weights, o, i, x, batch, y, false)?;
    }
    let active = rows.active_experts();
    if active.is_empty() {
        return Ok(());
    }
    let mut scratch: CudaSlice<f16> = gpu
        .stream()
        .alloc_zeros(o * i)
        .during("allocating dequantize scratch")?;
    for e in active {
        dequantize(gpu, experts.delta(e as usize), None, &mut scratch)?;
        let mut b = 0;
        while b < batch {
            if rows.rows()[b] != Some(e) {
                b += 1;
                continue;
            }
            let start = b;
            while b < batch && rows.rows()[b] == Some(e) {
                b += 1;
            }
            linear_f16(
                gpu,
                &scratch,
                o,
                i,
                &x.slice(start * i..b * i),
                b - start,
                &mut y.slice_mut(start * o..b * o),
                true,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_grids_cover_every_output_row() {
        let rows = abi::MESWITCH_GEMV_ROWS_PER_BLOCK as usize;
        for out in [1usize, 15, 16, 17, 4096, 14336] {
            let g = gemv_config(out).unwrap();
            assert!(g.grid_dim.0 as usize * rows >= out);
            assert!((g.grid_dim.0 as usize - 1) * rows < out);
            assert_eq!(g.block_dim.0, abi::MESWITCH_GEMV_THREADS);
            assert_eq!(dequant_config(out).unwrap().grid_dim.0 as usize, out);
        }
        assert!(gemv_config(0).is_err());
    }
}
