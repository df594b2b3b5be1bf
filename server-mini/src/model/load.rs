//! Opening a base model from a path: a `.gguf` file or an HF checkpoint
//! directory, with its tokenizer.

use std::path::Path;

use super::{CpuBackend, GgufSource, ModelError, Numerics};
use crate::checkpoint::Checkpoint;
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// A loaded base model and its tokenizer.
pub struct LoadedModel {
    pub backend: CpuBackend,
    pub tokenizer: Tokenizer,
}

pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Loads the weights on the CPU backend and the tokenizer (from the GGUF
/// metadata, or `tokenizer.json` next to the checkpoint).
pub fn load_cpu(path: &Path) -> Result<LoadedModel, ModelError> {
    load_cpu_with(path, Numerics::Exact)
}

/// [`load_cpu`] for the given [`Numerics`] (see [`CpuBackend::load_with`]).
pub fn load_cpu_with(path: &Path, numerics: Numerics) -> Result<LoadedModel, ModelError> {
    if is_gguf(path) {
        let file = GgufFile::open(path).map_err(|e| ModelError::Source(e.to_string()))?;
        let tokenizer =
            Tokenizer::from_gguf(&file).map_err(|e| ModelError::Source(e.to_string()))?;
        let backend = CpuBackend::load_with(&GgufSource::new(file), numerics)?;
        Ok(LoadedModel { backend, tokenizer })
    } else {
        let ckpt = Checkpoint::open(path).map_err(|e| ModelError::Source(e.to_string()))?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))
            .map_err(|e| ModelError::Source(e.to_string()))?;
        let backend = CpuBackend::load_with(&ckpt, numerics)?;
        Ok(LoadedModel { backend, tokenizer })
    }
}

/// Loads the weights on the CUDA backend (device 0) and the tokenizer. The
/// device is opened first, so a machine without one answers
/// [`ModelError::NoDevice`] at once, before reading any weights.
pub fn load_cuda(path: &Path) -> Result<(super::cuda::CudaBackend, Tokenizer), ModelError> {
    let gpu = meswitch_ops::Gpu::detect()
        .map_err(|e| super::cuda::device_err("opening the device", e))?;
    let source = |e: &dyn std::fmt::Display| ModelError::Source(e.to_string());
    if is_gguf(path) {
        let file = GgufFile::open(path).map_err(|e| source(&e))?;
        let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| source(&e))?;
        let backend = super::cuda::CudaBackend::load(&GgufSource::new(file), gpu)?;
        Ok((backend, tokenizer))
    } else {
        let ckpt = Checkpoint::open(path).map_err(|e| source(&e))?;
        let tokenizer =
            Tokenizer::from_file(&path.join("tokenizer.json")).map_err(|e| source(&e))?;
        let backend = super::cuda::CudaBackend::load(&ckpt, gpu)?;
        Ok((backend, tokenizer))
    }
}
