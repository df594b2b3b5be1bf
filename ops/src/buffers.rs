//! Device-resident copies of the reference's views: the FP16 base weight and
//! packed deltas, uploaded once and then used by any number of launches.
//!
//! The device arrays are byte-for-byte the layout of `meswitch_reference::layout`
//! (codes u32 `[out, words_per_row]`, scales/offsets f16 `[out, n_groups]`,
//! salient_index u32 `[k]`, salient_values f16 `[out, k]`); nothing is
//! repacked, so a kernel reading them follows the same drawing as the CPU.

use cudarc::driver::{CudaSlice, DeviceRepr};
use half::f16;
use meswitch_reference::{BaseView, DeltaLayout, DeltaView, ShapeError};

use crate::device::Gpu;
use crate::error::{DriverContext, OpsError};

/// Copies `data` to the device. An empty array becomes a one-element
/// allocation (never read: its length is 0 in every param struct) so that
/// every pointer handed to a kernel is a valid device address; cuMemAlloc
/// rejects size 0.
pub(crate) fn upload<T: DeviceRepr + Default + Clone>(
    gpu: &Gpu,
    data: &[T],
    during: &'static str,
) -> Result<CudaSlice<T>, OpsError> {
    if data.is_empty() {
        gpu.stream().clone_htod(&[T::default()]).during(during)
    } else {
        gpu.stream().clone_htod(data).during(during)
    }
}

/// Dense FP16 base weight `[out, in]` row-major on the device.
pub struct DeviceBase {
    pub out_features: usize,
    pub in_features: usize,
    pub weights: CudaSlice<f16>,
}

impl DeviceBase {
    pub fn upload(gpu: &Gpu, base: &BaseView) -> Result<DeviceBase, OpsError> {
        let expected = base.out_features * base.in_features;
        if base.weights.len() != expected || expected == 0 {
            return Err(ShapeError::Length {
                what: "base",
                expected,
                found: base.weights.len(),
            }
            .into());
        }
        Ok(DeviceBase {
            out_features: base.out_features,
            in_features: base.in_features,
            weights: upload(gpu, base.weights, "uploading the base weight")?,
        })
    }

    pub fn bytes(&self) -> usize {
        self.out_features * self.in_features * std::mem::size_of::<f16>()
    }
}

/// One packed delta on the device (see the module docs for the layout).
pub struct DeviceDelta {
    pub layout: DeltaLayout,
    pub codes: CudaSlice<u32>,
    pub scales: CudaSlice<f16>,
    pub offsets: CudaSlice<f16>,
    pub salient_index: CudaSlice<u32>,
    pub salient_values: CudaSlice<f16>,
}

impl DeviceDelta {
    /// Validates the view (a kernel trusts lengths, index ranges and zero
    /// padding bits) and uploads it.
    pub fn upload(gpu: &Gpu, delta: &DeltaView) -> Result<DeviceDelta, OpsError> {
        delta.validate()?;
        Ok(DeviceDelta {
            layout: delta.layout,
            codes: upload(gpu, delta.codes, "uploading delta codes")?,
            scales: upload(gpu, delta.scales, "uploading delta scales")?,
            offsets: upload(gpu, delta.offsets, "uploading delta offsets")?,
            salient_index: upload(gpu, delta.salient_index, "uploading salient indices")?,
            salient_values: upload(gpu, delta.salient_values, "uploading salient values")?,
        })
    }

    /// Bytes a kernel must read to apply this delta once (indices are u32 on
    /// the device, unlike the u16 the file may use).
    pub fn device_bytes(&self) -> usize {
        let l = &self.layout;
        l.code_words() * 4 + l.group_params() * 2 * 2 + l.salient * 4 + l.salient_values() * 2
    }
}
