//! The unsafe layer: ABI param structs filled from checked device buffers,
//! launch configurations, kernel launches. PROVISIONAL until
//! `ptx/include/meswitch_abi.h` and its bindings land: every launch returns
//! `OpsError::Unsupported`.

use cudarc::driver::CudaSlice;
use half::f16;

use crate::buffers::{DeviceBase, DeviceDelta};
use crate::device::Gpu;
use crate::error::OpsError;
use crate::gemv::{DeviceExperts, DeviceRows};

/// Row marker for "no expert, base only".
pub const NO_EXPERT: u32 = u32::MAX;

pub(crate) fn row_id(e: Option<u32>) -> u32 {
    e.unwrap_or(NO_EXPERT)
}

pub(crate) struct ExpertTable;

impl ExpertTable {
    pub(crate) fn new(_gpu: &Gpu, _experts: &[&DeviceDelta]) -> Result<ExpertTable, OpsError> {
        Ok(ExpertTable)
    }
}

fn not_yet() -> OpsError {
    OpsError::Unsupported("the kernel ABI is not embedded in meswitch-ptx yet".into())
}

pub(crate) fn multi_expert_gemv(
    _gpu: &Gpu,
    _base: &DeviceBase,
    experts: &DeviceExperts,
    _x: &CudaSlice<f16>,
    rows: &DeviceRows,
    _y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let _ = (experts.table(), rows.ids());
    Err(not_yet())
}

pub(crate) fn delta_gemv_accumulate(
    _gpu: &Gpu,
    _out_features: usize,
    _in_features: usize,
    experts: &DeviceExperts,
    _x: &CudaSlice<f16>,
    rows: &DeviceRows,
    _y: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    let _ = (experts.table(), rows.ids());
    Err(not_yet())
}

pub(crate) fn dequantize(
    _gpu: &Gpu,
    _delta: &DeviceDelta,
    _base: Option<&DeviceBase>,
    _out: &mut CudaSlice<f16>,
) -> Result<(), OpsError> {
    Err(not_yet())
}
