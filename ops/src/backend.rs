//! One signature, two implementations: the CPU reference or the CUDA
//! kernels. A caller that asks for [`Backend::detect`] gets CUDA when a
//! device works and the reference otherwise, with the reason, and then calls
//! the same three functions either way.

use half::f16;
use meswitch_reference::{BaseView, DeltaView};

use crate::device::Gpu;
use crate::error::OpsError;
use crate::gemv;

pub enum Backend {
    /// `meswitch_reference` on the CPU.
    Reference,
    Cuda(Gpu),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Backend {
    /// CUDA on device 0 if it can be opened, else the reference and the
    /// reason (any failure to open the device falls back: a server is more
    /// useful slow than not at all; the reason is for its log).
    pub fn detect() -> (Backend, Option<OpsError>) {
        match Gpu::detect() {
            Ok(gpu) => (Backend::Cuda(gpu), None),
            Err(e) => (Backend::Reference, Some(e)),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Backend::Cuda(_))
    }

    pub fn gpu(&self) -> Option<&Gpu> {
        match self {
            Backend::Cuda(gpu) => Some(gpu),
            Backend::Reference => None,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Backend::Reference => "cpu-reference".to_string(),
            Backend::Cuda(gpu) => format!("cuda ({})", gpu.name()),
        }
    }

    /// See [`meswitch_reference::multi_expert_gemv`].
    pub fn multi_expert_gemv(
        &self,
        base: &BaseView,
        experts: &[DeltaView],
        x: &[f16],
        row_expert: &[Option<u32>],
        y: &mut [f16],
    ) -> Result<(), OpsError> {
        match self {
            Backend::Reference => Ok(meswitch_reference::multi_expert_gemv(
                base, experts, x, row_expert, y,
            )?),
            Backend::Cuda(gpu) => gemv::multi_expert_gemv(gpu, base, experts, x, row_expert, y),
        }
    }

    /// See [`meswitch_reference::delta_gemv_accumulate`].
    pub fn delta_gemv_accumulate(
        &self,
        out_features: usize,
        in_features: usize,
        experts: &[DeltaView],
        x: &[f16],
        row_expert: &[Option<u32>],
        y: &mut [f16],
    ) -> Result<(), OpsError> {
        match self {
            Backend::Reference => Ok(meswitch_reference::delta_gemv_accumulate(
                out_features,
                in_features,
                experts,
                x,
                row_expert,
                y,
            )?),
            Backend::Cuda(gpu) => gemv::delta_gemv_accumulate(
                gpu,
                out_features,
                in_features,
                experts,
                x,
                row_expert,
                y,
            ),
        }
    }

    /// See [`meswitch_reference::dequantize_f16`].
    pub fn dequantize_f16(
        &self,
        delta: &DeltaView,
        base: Option<&BaseView>,
        out: &mut [f16],
    ) -> Result<(), OpsError> {
        match self {
            Backend::Reference => Ok(meswitch_reference::dequantize_f16(delta, base, out)?),
            Backend::Cuda(gpu) => gemv::dequantize_f16(gpu, delta, base, out),
        }
    }
}
