//! The kernels' safe API, in two layers:
//!
//! - device-resident (`*_device`): device buffers in, device buffers out, no
//!   host copies; what the runtime calls every decode step;
//! - host-slice functions with exactly the reference's parameter lists plus a
//!   leading `&Gpu` (`multi_expert_gemv`, `delta_gemv_accumulate`,
//!   `dequantize_f16`): upload, launch, download; for tests and one-off use.
//!
//! Every shape is checked here, before a launch: a kernel trusts its params.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr};
use half::f16;
use meswitch_reference::{BaseView, DeltaLayout, DeltaView, ShapeError};

use crate::buffers::{upload as upload_padded, DeviceBase, DeviceDelta};
use crate::device::Gpu;
use crate::error::{DriverContext, OpsError};
use crate::launch;
pub use crate::plan::GemvKernel;

/// A device array (re-exported so callers need not name cudarc).
pub type DeviceSlice<T> = CudaSlice<T>;

/// Copies a host slice to a new device array.
pub fn upload<T: DeviceRepr + Default + Clone>(
    gpu: &Gpu,
    data: &[T],
) -> Result<CudaSlice<T>, OpsError> {
    upload_padded(gpu, data, "host to device copy")
}

/// Copies a device array back (waits for the stream).
pub fn download<T: DeviceRepr + Default + Clone>(
    gpu: &Gpu,
    data: &CudaSlice<T>,
) -> Result<Vec<T>, OpsError> {
    gpu.stream().clone_dtoh(data).during("device to host copy")
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), ShapeError> {
    if expected == found {
        Ok(())
    } else {
        Err(ShapeError::Length {
            what,
            expected,
            found,
        })
    }
}

/// The experts of one call as the kernels see them: a device table of
/// descriptors (pointers into each [`DeviceDelta`], which it borrows so they
/// outlive every launch that uses the table).
pub struct DeviceExperts<'a> {
    experts: Vec<&'a DeviceDelta>,
    table: Arc<launch::ExpertTable>,
}

impl<'a> DeviceExperts<'a> {
    pub fn new(gpu: &Gpu, experts: &[&'a DeviceDelta]) -> Result<DeviceExperts<'a>, OpsError> {
        if let Some(first) = experts.first() {
            for (i, e) in experts.iter().enumerate() {
                let (a, b) = (&first.layout, &e.layout);
                ShapeError::check_expert_shape(
                    i,
                    (b.out_features, b.in_features),
                    (a.out_features, a.in_features),
                )?;
            }
        }
        Ok(DeviceExperts {
            table: Arc::new(launch::ExpertTable::new(gpu, experts)?),
            experts: experts.to_vec(),
        })
    }

    /// As [`DeviceExperts::new`], but the device table comes from `cache`
    /// when an earlier call built it from the same experts (same layouts,
    /// same device addresses), so a decode loop over a steady set of experts
    /// uploads no table after its first step.
    pub fn new_cached(
        gpu: &Gpu,
        experts: &[&'a DeviceDelta],
        cache: &mut ExpertTableCache,
    ) -> Result<DeviceExperts<'a>, OpsError> {
        let key = launch::table_key(gpu, experts);
        if let Some(table) = cache.tables.get(&key) {
            return Ok(DeviceExperts {
                table: table.clone(),
                experts: experts.to_vec(),
            });
        }
        let fresh = DeviceExperts::new(gpu, experts)?;
        if cache.tables.len() >= cache.capacity {
            cache.tables.clear();
        }
        cache.tables.insert(key, fresh.table.clone());
        Ok(fresh)
    }

    pub fn len(&self) -> usize {
        self.experts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    pub fn layouts(&self) -> impl Iterator<Item = &DeltaLayout> {
        self.experts.iter().map(|e| &e.layout)
    }

    /// Bytes of the packed deltas of the experts with index in `active`.
    pub fn device_bytes(&self, active: &[u32]) -> usize {
        active
            .iter()
            .map(|&e| self.experts[e as usize].device_bytes())
            .sum()
    }

    /// Expert `i` of the call.
    pub fn delta(&self, i: usize) -> &'a DeviceDelta {
        self.experts[i]
    }

    pub(crate) fn table(&self) -> &launch::ExpertTable {
        &self.table
    }

    fn check_shape(&self, out_features: usize, in_features: usize) -> Result<(), ShapeError> {
        for (expert, l) in self.layouts().enumerate() {
            let shape = (l.out_features, l.in_features);
            ShapeError::check_expert_shape(expert, shape, (out_features, in_features))?;
        }
        Ok(())
    }
}

/// Expert tables kept across calls by [`DeviceExperts::new_cached`].
///
/// Sound by construction: a table is reused only for experts whose layouts
/// and device addresses are exactly those it was built from, so it holds
/// the bytes a fresh upload would; and every call borrows its experts, so
/// their memory is alive while a launch reads the table. A table whose
/// experts were dropped just stays unused until the cache is cleared
/// (whole, when it reaches `capacity` entries: a model's tensors times a
/// few expert sets fit, and a rebuild costs one upload per tensor).
pub struct ExpertTableCache {
    tables: HashMap<Vec<u64>, Arc<launch::ExpertTable>>,
    capacity: usize,
}

impl ExpertTableCache {
    pub fn new(capacity: usize) -> ExpertTableCache {
        ExpertTableCache {
            tables: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Tables held now.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// The batch's row → expert map on the device (`None` = base only), checked
/// against the number of experts once at upload.
pub struct DeviceRows {
    rows: Vec<Option<u32>>,
    ids: CudaSlice<u32>,
}

impl DeviceRows {
    pub fn upload(
        gpu: &Gpu,
        rows: &[Option<u32>],
        n_experts: usize,
    ) -> Result<DeviceRows, OpsError> {
        ShapeError::check_row_experts(rows, n_experts)?;
        let ids: Vec<u32> = rows.iter().map(|e| launch::row_id(*e)).collect();
        Ok(DeviceRows {
            rows: rows.to_vec(),
            ids: upload(gpu, &ids)?,
        })
    }

    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    pub fn rows(&self) -> &[Option<u32>] {
        &self.rows
    }

    /// Distinct experts used, ascending.
    pub fn active_experts(&self) -> Vec<u32> {
        let mut a: Vec<u32> = self.rows.iter().flatten().copied().collect();
        a.sort_unstable();
        a.dedup();
        a
    }

    pub(crate) fn ids(&self) -> &CudaSlice<u32> {
        &self.ids
    }

    fn check_experts(&self, n_experts: usize) -> Result<(), ShapeError> {
        ShapeError::check_row_experts(&self.rows, n_experts)
    }
}

/// `Y = X·W_baseᵀ + X·Δ̂_{e(b)}ᵀ` on device buffers: `x [batch, in]`,
/// `y [batch, out]`, FP16; one fused launch per `launch::MAX_BATCH` rows.
/// Runs the default kernel ([`GemvKernel::Chunk128`]).
pub fn multi_expert_gemv_device(
    gpu: &Gpu,
    base: &DeviceBase,
    experts: &DeviceExperts,
    x: &CudaSlice<f16>,
    rows: &DeviceRows,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    multi_expert_gemv_device_with(gpu, GemvKernel::default(), base, experts, x, rows, y)
}

/// [`multi_expert_gemv_device`] with the delta items of `kernel`.
pub fn multi_expert_gemv_device_with(
    gpu: &Gpu,
    kernel: GemvKernel,
    base: &DeviceBase,
    experts: &DeviceExperts,
    x: &CudaSlice<f16>,
    rows: &DeviceRows,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let (o, i, batch) = (base.out_features, base.in_features, rows.batch());
    experts.check_shape(o, i)?;
    rows.check_experts(experts.len())?;
    check_len("x", batch * i, x.len())?;
    check_len("y", batch * o, y.len())?;
    if batch == 0 {
        return Ok(());
    }
    launch::multi_expert_gemv(gpu, kernel, base, experts, x, rows, y)
}

/// `Y += X·Δ̂_{e(b)}ᵀ` on device buffers; rows with no expert are untouched.
/// Runs the default kernel ([`GemvKernel::Chunk128`]).
pub fn delta_gemv_accumulate_device(
    gpu: &Gpu,
    out_features: usize,
    in_features: usize,
    experts: &DeviceExperts,
    x: &CudaSlice<f16>,
    rows: &DeviceRows,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    delta_gemv_accumulate_device_with(
        gpu,
        GemvKernel::default(),
        out_features,
        in_features,
        experts,
        x,
        rows,
        y,
    )
}

/// [`delta_gemv_accumulate_device`] with the delta items of `kernel`.
#[allow(clippy::too_many_arguments)]
pub fn delta_gemv_accumulate_device_with(
    gpu: &Gpu,
    kernel: GemvKernel,
    out_features: usize,
    in_features: usize,
    experts: &DeviceExperts,
    x: &CudaSlice<f16>,
    rows: &DeviceRows,
    y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let batch = rows.batch();
    experts.check_shape(out_features, in_features)?;
    rows.check_experts(experts.len())?;
    check_len("x", batch * in_features, x.len())?;
    check_len("y", batch * out_features, y.len())?;
    if batch == 0 || rows.active_experts().is_empty() {
        return Ok(());
    }
    launch::delta_gemv_accumulate(gpu, kernel, out_features, in_features, experts, x, rows, y)
}

/// Dense Δ̂ (or `W_base + Δ̂` with a base) as FP16 `[out, in]` on the device.
pub fn dequantize_device(
    gpu: &Gpu,
    delta: &DeviceDelta,
    base: Option<&DeviceBase>,
    out: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let l = &delta.layout;
    check_len("out", l.out_features * l.in_features, out.len())?;
    if let Some(b) = base {
        let shape = (l.out_features, l.in_features);
        ShapeError::check_expert_shape(0, shape, (b.out_features, b.in_features))?;
    }
    launch::dequantize(gpu, delta, base, out)
}

/// Poison for host-API outputs: an FP16 NaN, so an element a kernel fails to
/// write reaches the caller as NaN rather than as a plausible stale value.
const UNWRITTEN: f16 = f16::from_bits(0x7E00);

fn upload_experts(gpu: &Gpu, experts: &[DeltaView]) -> Result<Vec<DeviceDelta>, OpsError> {
    experts
        .iter()
        .map(|e| DeviceDelta::upload(gpu, e))
        .collect()
}

/// The fused kernel with the reference's signature (host slices).
pub fn multi_expert_gemv(
    gpu: &Gpu,
    base: &BaseView,
    experts: &[DeltaView],
    x: &[f16],
    row_expert: &[Option<u32>],
    y: &mut [f16],
) -> Result<(), OpsError> {
    multi_expert_gemv_with(gpu, GemvKernel::default(), base, experts, x, row_expert, y)
}

/// [`multi_expert_gemv`] with the delta items of `kernel`.
pub fn multi_expert_gemv_with(
    gpu: &Gpu,
    kernel: GemvKernel,
    base: &BaseView,
    experts: &[DeltaView],
    x: &[f16],
    row_expert: &[Option<u32>],
    y: &mut [f16],
) -> Result<(), OpsError> {
    let (o, i, batch) = (base.out_features, base.in_features, row_expert.len());
    check_len("x", batch * i, x.len())?;
    check_len("y", batch * o, y.len())?;
    if batch == 0 {
        return Ok(());
    }
    let d_base = DeviceBase::upload(gpu, base)?;
    let d_experts = upload_experts(gpu, experts)?;
    let refs: Vec<&DeviceDelta> = d_experts.iter().collect();
    let table = DeviceExperts::new(gpu, &refs)?;
    let rows = DeviceRows::upload(gpu, row_expert, experts.len())?;
    let d_x = upload(gpu, x)?;
    let mut d_y = upload(gpu, &vec![UNWRITTEN; y.len()])?;
    multi_expert_gemv_device_with(gpu, kernel, &d_base, &table, &d_x, &rows, &mut d_y)?;
    gpu.stream()
        .memcpy_dtoh(&d_y.slice(..y.len()), y)
        .during("device to host copy")?;
    gpu.synchronize()
}

/// The delta-only kernel with the reference's signature (host slices).
pub fn delta_gemv_accumulate(
    gpu: &Gpu,
    out_features: usize,
    in_features: usize,
    experts: &[DeltaView],
    x: &[f16],
    row_expert: &[Option<u32>],
    y: &mut [f16],
) -> Result<(), OpsError> {
    delta_gemv_accumulate_with(
        gpu,
        GemvKernel::default(),
        out_features,
        in_features,
        experts,
        x,
        row_expert,
        y,
    )
}

/// [`delta_gemv_accumulate`] with the delta items of `kernel`.
#[allow(clippy::too_many_arguments)]
pub fn delta_gemv_accumulate_with(
    gpu: &Gpu,
    kernel: GemvKernel,
    out_features: usize,
    in_features: usize,
    experts: &[DeltaView],
    x: &[f16],
    row_expert: &[Option<u32>],
    y: &mut [f16],
) -> Result<(), OpsError> {
    let batch = row_expert.len();
    check_len("x", batch * in_features, x.len())?;
    check_len("y", batch * out_features, y.len())?;
    if batch == 0 {
        return Ok(());
    }
    let d_experts = upload_experts(gpu, experts)?;
    let refs: Vec<&DeviceDelta> = d_experts.iter().collect();
    let table = DeviceExperts::new(gpu, &refs)?;
    let rows = DeviceRows::upload(gpu, row_expert, experts.len())?;
    let d_x = upload(gpu, x)?;
    let mut d_y = upload(gpu, y)?;
    delta_gemv_accumulate_device_with(
        gpu,
        kernel,
        out_features,
        in_features,
        &table,
        &d_x,
        &rows,
        &mut d_y,
    )?;
    gpu.stream()
        .memcpy_dtoh(&d_y.slice(..y.len()), y)
        .during("device to host copy")?;
    gpu.synchronize()
}

/// The dequantize kernel with the reference's signature (host slices).
pub fn dequantize_f16(
    gpu: &Gpu,
    delta: &DeltaView,
    base: Option<&BaseView>,
    out: &mut [f16],
) -> Result<(), OpsError> {
    let l = &delta.layout;
    check_len("out", l.out_features * l.in_features, out.len())?;
    let d_delta = DeviceDelta::upload(gpu, delta)?;
    let d_base = base.map(|b| DeviceBase::upload(gpu, b)).transpose()?;
    let mut d_out = upload(gpu, &vec![UNWRITTEN; out.len()])?;
    dequantize_device(gpu, &d_delta, d_base.as_ref(), &mut d_out)?;
    gpu.stream()
        .memcpy_dtoh(&d_out.slice(..out.len()), out)
        .during("device to host copy")?;
    gpu.synchronize()
}
