//! cuBLAS FP16 products on row-major weights: the runtime's path for large
//! batches (prefill) and the benches' baselines.
//!
//! cuBLAS is column-major. A row-major `W [out, in]` is, unchanged in memory,
//! a column-major `Wᵀ [in, out]` with leading dimension `in`; likewise
//! `X [batch, in]` is column-major `Xᵀ [in, batch]` and `Y [batch, out]` is
//! `Yᵀ [out, batch]`. So `Yᵀ = op(Wᵀ)ᵀ·Xᵀ` is one GEMM with
//! `transa = T, transb = N, m = out, n = batch, k = in`, no copies.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::f16;

use crate::device::Gpu;
use crate::error::{DriverContext, OpsError};

/// cuBLAS takes dimensions as `i32`.
fn dim(what: &'static str, v: usize) -> Result<i32, OpsError> {
    i32::try_from(v)
        .map_err(|_| OpsError::Unsupported(format!("{what} = {v} exceeds i32 for cuBLAS")))
}

/// `Y = X·Wᵀ` (or `Y += X·Wᵀ` when `accumulate`), FP16 in and out, f32
/// accumulation (`CUBLAS_COMPUTE_32F`). Lengths are checked against the dims.
#[allow(clippy::too_many_arguments)]
pub fn linear_f16<W, X, Y>(
    gpu: &Gpu,
    weight: &W,
    out_features: usize,
    in_features: usize,
    x: &X,
    batch: usize,
    y: &mut Y,
    accumulate: bool,
) -> Result<(), OpsError>
where
    W: DevicePtr<f16>,
    X: DevicePtr<f16>,
    Y: DevicePtrMut<f16>,
{
    let check = |what: &'static str, expected: usize, found: usize| {
        if expected == found {
            Ok(())
        } else {
            Err(meswitch_reference::ShapeError::Length {
                what,
                expected,
                found,
            })
        }
    };
    check("weight", out_features * in_features, weight.len())?;
    check("x", batch * in_features, x.len())?;
    check("y", batch * out_features, y.len())?;
    if batch == 0 {
        return Ok(());
    }
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: dim("out_features", out_features)?,
        n: dim("batch", batch)?,
        k: dim("in_features", in_features)?,
        alpha: f16::ONE,
        lda: dim("in_features", in_features)?,
        ldb: dim("in_features", in_features)?,
        beta: if accumulate { f16::ONE } else { f16::ZERO },
        ldc: dim("out_features", out_features)?,
    };
    // SAFETY: the three lengths were checked against m, n, k and the leading
    // dimensions above, so cuBLAS stays inside each allocation.
    unsafe { gpu.blas()?.gemm(cfg, weight, x, y) }.during("cuBLAS FP16 GEMM")
}
