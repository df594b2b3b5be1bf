//! Typed errors of the CUDA ops. `NoDevice` is the one a caller is expected
//! to handle by falling back to the CPU reference; every other variant is a
//! real failure (bad shapes, a driver error mid-run) and must surface.

use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;
use meswitch_reference::{DeltaError, ShapeError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OpsError {
    /// No usable CUDA device: libcuda missing, zero devices, or the context
    /// could not be created. Callers fall back to the reference.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed after the device was found.
    #[error("CUDA driver error during {during}: {source}")]
    Driver {
        during: &'static str,
        #[source]
        source: DriverError,
    },
    /// The driver could not load an embedded PTX module (typically a driver
    /// older than the PTX ISA version the module was compiled for).
    #[error("cannot load PTX module `{module}`: {source}")]
    ModuleLoad {
        module: &'static str,
        #[source]
        source: DriverError,
    },
    /// A kernel this crate needs is not in the embedded modules: the PTX in
    /// meswitch-ptx and this crate disagree.
    #[error("kernel `{kernel}` not found in the embedded PTX modules")]
    MissingKernel { kernel: String },
    /// cuBLAS is needed (baselines, large-batch base products) but was not found.
    #[error("cuBLAS unavailable: {0}")]
    NoBlas(String),
    #[error("cuBLAS error during {during}: {source}")]
    Blas {
        during: &'static str,
        #[source]
        source: CublasError,
    },
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// An invalid input to a layer kernel (token, position, cache, shape).
    #[error(transparent)]
    Layer(#[from] crate::layers::LayerError),
    /// A valid input that the compiled kernel variants do not cover.
    #[error("unsupported by the CUDA kernels: {0}")]
    Unsupported(String),
}

impl OpsError {
    pub fn is_no_device(&self) -> bool {
        matches!(self, OpsError::NoDevice(_))
    }
}

/// Attaches "during what" to a driver result.
pub(crate) trait DriverContext<T> {
    fn during(self, during: &'static str) -> Result<T, OpsError>;
}

impl<T> DriverContext<T> for Result<T, DriverError> {
    fn during(self, during: &'static str) -> Result<T, OpsError> {
        self.map_err(|source| OpsError::Driver { during, source })
    }
}

impl<T> DriverContext<T> for Result<T, CublasError> {
    fn during(self, during: &'static str) -> Result<T, OpsError> {
        self.map_err(|source| OpsError::Blas { during, source })
    }
}
