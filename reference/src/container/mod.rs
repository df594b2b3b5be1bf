//! The compressed-expert file: one safetensors file (or shards plus a
//! `*.safetensors.index.json`) holding every compressed delta and dense
//! tensor of one expert, with metadata that ties it to its base model and
//! checksums that make on-disk corruption an error.
//!
//! The full specification, with drawings, is `docs/format.md`; the packed
//! delta arrays themselves are defined once, in [`crate::layout`].
//!
//! - [`schema`]: stored names, metadata keys, per-tensor descriptions.
//! - [`identity`]: the base model's identity digest.
//! - [`write`]: the streaming [`ExpertWriter`].
//! - [`read`]: the validating reader, [`read_expert`] / [`read_expert_bytes`].

use std::collections::BTreeMap;

use half::f16;

use crate::delta::PackedDelta;

pub mod error;
pub mod identity;
pub mod read;
pub mod schema;
pub mod write;

pub use error::FormatError;
pub use identity::{BaseIdentity, IDENTITY_CONFIG_KEYS};
pub use read::{read_expert, read_expert_bytes};
pub use write::ExpertWriter;

/// Version written to and required in `__metadata__["format_version"]`.
pub const FORMAT_VERSION: u32 = 1;

/// One tensor of an expert, under its Hugging Face name.
#[derive(Clone, Debug, PartialEq)]
pub enum ExpertTensor {
    /// A linear weight stored as a compressed delta against the base.
    Delta(PackedDelta),
    /// A tensor stored whole in FP16 (norms, embeddings, lm_head: whatever
    /// the compressor chose not to compress). It replaces the base tensor.
    Dense { shape: Vec<usize>, values: Vec<f16> },
}

impl ExpertTensor {
    /// The Hugging Face shape of the tensor (`[out, in]` for a delta).
    pub fn shape(&self) -> Vec<usize> {
        match self {
            ExpertTensor::Delta(d) => vec![d.layout().out_features, d.layout().in_features],
            ExpertTensor::Dense { shape, .. } => shape.clone(),
        }
    }
}

/// What an expert file says about itself besides its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertHeader {
    pub base: BaseIdentity,
    pub expert_name: String,
    /// Compression settings as the compressor recorded them (free-form JSON).
    pub settings: serde_json::Value,
}

/// A fully read and validated expert.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertFile {
    pub header: ExpertHeader,
    pub format_version: u32,
    /// HF tensor name -> tensor.
    pub tensors: BTreeMap<String, ExpertTensor>,
}

impl ExpertFile {
    /// Checks that this expert was made for `base` and that every tensor's
    /// shape equals the base tensor of the same name.
    pub fn check_base(
        &self,
        base: &BaseIdentity,
        base_shapes: &BTreeMap<String, Vec<usize>>,
    ) -> Result<(), FormatError> {
        if &self.header.base != base {
            return Err(FormatError::BaseMismatch {
                expert: self.header.expert_name.clone(),
                expected: base.digest.clone(),
                found: self.header.base.digest.clone(),
            });
        }
        for (name, tensor) in &self.tensors {
            let base_shape = base_shapes
                .get(name)
                .ok_or_else(|| FormatError::NotInBase {
                    tensor: name.clone(),
                })?;
            let shape = tensor.shape();
            if &shape != base_shape {
                return Err(FormatError::BaseShape {
                    tensor: name.clone(),
                    expert: shape,
                    base: base_shape.clone(),
                });
            }
        }
        Ok(())
    }
}
