//! What an expert file stores and how its metadata is spelled: the stored
//! tensor names derived from a Hugging Face tensor name, the per-tensor
//! description in `__metadata__["tensors"]`, and the checksums. The writer
//! and the reader both derive everything from here, so they cannot drift.
//!
//! ```text
//!   HF tensor T, kind "delta"  ->  T.codes           U32  [out, words_per_row]
//!                                  T.scales          F16  [out, n_groups]
//!                                  T.offsets         F16  [out, n_groups]
//!                                  T.salient_index   U16 [k] if in <= 65536, else U32 [k]
//!                                  T.salient_values  F16  [out, k]
//!   HF tensor T, kind "dense"  ->  T                 F16  shape as in the base
//! ```

use std::collections::BTreeMap;

use safetensors::Dtype;
use serde_json::{json, Value};

use super::error::FormatError;
use crate::error::DeltaError;
use crate::layout::{Bits, DeltaLayout, MAX_DIM};

/// `__metadata__["format"]` of every expert file.
pub const FORMAT_NAME: &str = "meswitch-delta";

/// Keys of `__metadata__` (all values are strings, as safetensors requires).
pub mod keys {
    pub const FORMAT: &str = "format";
    pub const FORMAT_VERSION: &str = "format_version";
    pub const BASE_IDENTITY: &str = "base_identity";
    pub const EXPERT_NAME: &str = "expert_name";
    /// Compression settings, JSON text.
    pub const SETTINGS: &str = "settings";
    /// HF name -> {kind, shape, bits, group_size, salient}, JSON text.
    pub const TENSORS: &str = "tensors";
    /// Stored name -> CRC32C of its bytes (8 lowercase hex digits), JSON text.
    pub const CHECKSUMS: &str = "checksums";
    /// CRC32C over every other metadata entry (see `metadata_checksum`), so
    /// a flipped bit in the settings or names is caught like one in data.
    pub const METADATA_CHECKSUM: &str = "metadata_checksum";

    pub const ALL: [&str; 8] = [
        FORMAT,
        FORMAT_VERSION,
        BASE_IDENTITY,
        EXPERT_NAME,
        SETTINGS,
        TENSORS,
        CHECKSUMS,
        METADATA_CHECKSUM,
    ];
}

/// Suffixes of the five stored arrays of a delta, in the layout's order.
pub const DELTA_SUFFIXES: [&str; 5] = [
    "codes",
    "scales",
    "offsets",
    "salient_index",
    "salient_values",
];

/// Dense tensors of real checkpoints have rank 1 or 2; a little headroom,
/// but no unbounded shape vectors from a hostile header.
pub const MAX_DENSE_RANK: usize = 4;

/// Element types the format stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    U32,
    U16,
    F16,
}

impl StoredDtype {
    pub fn safetensors(self) -> Dtype {
        match self {
            StoredDtype::U32 => Dtype::U32,
            StoredDtype::U16 => Dtype::U16,
            StoredDtype::F16 => Dtype::F16,
        }
    }

    pub fn size(self) -> usize {
        match self {
            StoredDtype::U32 => 4,
            StoredDtype::U16 | StoredDtype::F16 => 2,
        }
    }
}

/// One stored safetensors tensor as the metadata says it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSpec {
    pub name: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
}

/// Description of one HF tensor in `__metadata__["tensors"]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorMeta {
    Delta(DeltaLayout),
    Dense { shape: Vec<usize> },
}

impl TensorMeta {
    /// The HF-side shape (`[out, in]` for a delta).
    pub fn shape(&self) -> Vec<usize> {
        match self {
            TensorMeta::Delta(l) => vec![l.out_features, l.in_features],
            TensorMeta::Dense { shape } => shape.clone(),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            TensorMeta::Delta(l) => json!({
                "kind": "delta",
                "shape": [l.out_features, l.in_features],
                "bits": l.bits.count(),
                "group_size": l.group_size,
                "salient": l.salient,
            }),
            TensorMeta::Dense { shape } => json!({ "kind": "dense", "shape": shape }),
        }
    }

    /// Parses and validates one entry; `name` is the HF tensor name.
    pub fn from_json(file: &str, name: &str, entry: &Value) -> Result<TensorMeta, FormatError> {
        let bad = |problem: String| FormatError::Metadata {
            file: file.to_owned(),
            key: format!("tensors[{name}]"),
            problem,
        };
        let object = entry
            .as_object()
            .ok_or_else(|| bad("entry is not a JSON object".into()))?;
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing string `kind`".into()))?;
        let allowed: &[&str] = match kind {
            "delta" => &["kind", "shape", "bits", "group_size", "salient"],
            "dense" => &["kind", "shape"],
            other => return Err(bad(format!("unknown kind {other:?}"))),
        };
        if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(bad(format!("unexpected key {extra:?} for kind {kind:?}")));
        }
        let count = |key: &str| -> Result<usize, FormatError> {
            let value = object
                .get(key)
                .ok_or_else(|| bad(format!("missing `{key}`")))?;
            value
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| bad(format!("`{key}` is not a non-negative integer: {value}")))
        };
        let shape_value = object
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing array `shape`".into()))?;
        if shape_value.len() > MAX_DENSE_RANK {
            return Err(bad(format!("rank {} is too large", shape_value.len())));
        }
        let mut shape = Vec::with_capacity(shape_value.len());
        for dim in shape_value {
            let d = dim
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&d| (1..=MAX_DIM).contains(&d))
                .ok_or_else(|| bad(format!("dimension {dim} is not in 1..={MAX_DIM}")))?;
            shape.push(d);
        }
        match kind {
            "delta" => {
                if shape.len() != 2 {
                    return Err(bad(format!("a delta has shape [out, in], got {shape:?}")));
                }
                let bits = count("bits")?;
                let layout_error = |source: crate::error::LayoutError| FormatError::Delta {
                    file: file.to_owned(),
                    tensor: name.to_owned(),
                    source: DeltaError::Layout(source),
                };
                let bits = u32::try_from(bits)
                    .map_err(|_| bad(format!("bits {bits} out of range")))
                    .and_then(|b| Bits::from_count(b).map_err(layout_error))?;
                let layout = DeltaLayout::new(
                    shape[0],
                    shape[1],
                    bits,
                    count("group_size")?,
                    count("salient")?,
                )
                .map_err(layout_error)?;
                Ok(TensorMeta::Delta(layout))
            }
            _ => Ok(TensorMeta::Dense { shape }),
        }
    }

    /// The stored tensors that represent HF tensor `name`.
    pub fn stored(&self, name: &str) -> Vec<StoredSpec> {
        match self {
            TensorMeta::Delta(l) => {
                let index_dtype = if l.salient_index_bytes() == 2 {
                    StoredDtype::U16
                } else {
                    StoredDtype::U32
                };
                let specs = [
                    (StoredDtype::U32, vec![l.out_features, l.words_per_row()]),
                    (StoredDtype::F16, vec![l.out_features, l.n_groups()]),
                    (StoredDtype::F16, vec![l.out_features, l.n_groups()]),
                    (index_dtype, vec![l.salient]),
                    (StoredDtype::F16, vec![l.out_features, l.salient]),
                ];
                DELTA_SUFFIXES
                    .iter()
                    .zip(specs)
                    .map(|(suffix, (dtype, shape))| StoredSpec {
                        name: delta_array_name(name, suffix),
                        dtype,
                        shape,
                    })
                    .collect()
            }
            TensorMeta::Dense { shape } => vec![StoredSpec {
                name: name.to_owned(),
                dtype: StoredDtype::F16,
                shape: shape.clone(),
            }],
        }
    }
}

pub fn delta_array_name(name: &str, suffix: &str) -> String {
    format!("{name}.{suffix}")
}

/// CRC32C as it appears in the metadata: 8 lowercase hex digits.
pub fn crc_hex(crc: u32) -> String {
    format!("{crc:08x}")
}

/// CRC32C over every metadata entry except `metadata_checksum` itself, in
/// key order, each as `key NUL value NUL`.
pub fn metadata_checksum(metadata: &BTreeMap<String, String>) -> String {
    let mut crc = 0u32;
    for (key, value) in metadata {
        if key == keys::METADATA_CHECKSUM {
            continue;
        }
        crc = crc32c::crc32c_append(crc, key.as_bytes());
        crc = crc32c::crc32c_append(crc, &[0]);
        crc = crc32c::crc32c_append(crc, value.as_bytes());
        crc = crc32c::crc32c_append(crc, &[0]);
    }
    crc_hex(crc)
}

/// HF tensor names the format accepts: non-empty, and not starting with
/// `__` (safetensors reserves `__metadata__`).
pub fn check_tensor_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("empty tensor name".into())
    } else if name.starts_with("__") {
        Err("names starting with `__` are reserved".into())
    } else {
        Ok(())
    }
}
