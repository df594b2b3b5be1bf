//! The validating reader. Order of checks, so that each problem is reported
//! as itself and nothing is allocated from an unchecked count:
//!
//! 1. safetensors structure (the `safetensors` crate: header length, JSON,
//!    offsets contiguous and covering the data, sizes = shape × dtype);
//! 2. `__metadata__`: exact key set, format name, version, metadata checksum,
//!    then each value parsed (identity, settings, tensors, checksums);
//! 3. the stored tensors the metadata implies equal the tensors present;
//! 4. per stored tensor: dtype, shape, CRC32C of its bytes;
//! 5. decode, and let `PackedDelta::new` check the layout invariants
//!    (padding bits, index order and range, finite scales).
//!
//! Allocations in step 5 are sized from shapes already checked against the
//! bytes actually present, so they never exceed the input size.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::SafeTensors;
use serde_json::Value;

use super::error::{FormatError, MEMORY_FILE};
use super::schema::{self, keys, StoredDtype, StoredSpec, TensorMeta};
use super::{BaseIdentity, ExpertFile, ExpertHeader, ExpertTensor, FORMAT_VERSION};
use crate::delta::PackedDelta;

/// Bytes of the safetensors length prefix.
const LENGTH_PREFIX: usize = 8;

/// Reads an expert: a `.safetensors` file, a `.safetensors.index.json` of
/// shards, or a `.safetensors` path that only exists as shards + index.
pub fn read_expert(path: &Path) -> Result<ExpertFile, FormatError> {
    let as_index = PathBuf::from(format!("{}.index.json", path.display()));
    if path.to_string_lossy().ends_with(".index.json") {
        return read_index(path);
    }
    if !path.exists() && as_index.exists() {
        return read_index(&as_index);
    }
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io {
        path: path.to_owned(),
        source,
    })?;
    let parsed = parse_file(&path.display().to_string(), &bytes)?;
    Ok(ExpertFile {
        header: parsed.header,
        format_version: FORMAT_VERSION,
        tensors: parsed.tensors,
    })
}

/// Reads one expert file held in memory (the fuzz target).
pub fn read_expert_bytes(bytes: &[u8]) -> Result<ExpertFile, FormatError> {
    let parsed = parse_file(MEMORY_FILE, bytes)?;
    Ok(ExpertFile {
        header: parsed.header,
        format_version: FORMAT_VERSION,
        tensors: parsed.tensors,
    })
}

/// One parsed and validated file (a whole expert or one shard).
struct ParsedFile {
    header: ExpertHeader,
    tensors: BTreeMap<String, ExpertTensor>,
    stored_names: Vec<String>,
    data_bytes: u64,
}

fn metadata_error(file: &str, key: &str, problem: impl Into<String>) -> FormatError {
    FormatError::Metadata {
        file: file.to_owned(),
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// Parses the header fields common to a file's `__metadata__` and an
/// index's `metadata` (everything but tensors and checksums).
fn parse_header(
    file: &str,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<ExpertHeader, FormatError> {
    let require = |key: &str| get(key).ok_or_else(|| metadata_error(file, key, "missing"));
    let format = require(keys::FORMAT)?;
    if format != schema::FORMAT_NAME {
        return Err(metadata_error(
            file,
            keys::FORMAT,
            format!("is {format:?}, expected {:?}", schema::FORMAT_NAME),
        ));
    }
    let version = require(keys::FORMAT_VERSION)?;
    if version != FORMAT_VERSION.to_string() {
        return Err(FormatError::Version {
            file: file.to_owned(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let digest = require(keys::BASE_IDENTITY)?;
    if !BaseIdentity::is_well_formed(&digest) {
        return Err(metadata_error(
            file,
            keys::BASE_IDENTITY,
            "is not 64 lowercase hex digits",
        ));
    }
    let expert_name = require(keys::EXPERT_NAME)?;
    if expert_name.is_empty() {
        return Err(metadata_error(file, keys::EXPERT_NAME, "is empty"));
    }
    let settings = serde_json::from_str(&require(keys::SETTINGS)?)
        .map_err(|e| metadata_error(file, keys::SETTINGS, format!("invalid JSON: {e}")))?;
    Ok(ExpertHeader {
        base: BaseIdentity { digest },
        expert_name,
        settings,
    })
}

fn parse_file(file: &str, bytes: &[u8]) -> Result<ParsedFile, FormatError> {
    let (header_len, st_meta) =
        SafeTensors::read_metadata(bytes).map_err(|source| FormatError::Safetensors {
            file: file.to_owned(),
            source,
        })?;
    let data = bytes
        .get(LENGTH_PREFIX.saturating_add(header_len)..)
        .unwrap_or_default();

    // Step 2: metadata.
    let metadata: BTreeMap<String, String> = st_meta
        .metadata()
        .as_ref()
        .ok_or_else(|| metadata_error(file, "__metadata__", "missing"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(unknown) = metadata.keys().find(|k| !keys::ALL.contains(&k.as_str())) {
        return Err(metadata_error(file, unknown, "unknown key"));
    }
    let get = |key: &str| metadata.get(key).cloned();
    let header = parse_header(file, &get)?;
    let stored_checksum = get(keys::METADATA_CHECKSUM)
        .ok_or_else(|| metadata_error(file, keys::METADATA_CHECKSUM, "missing"))?;
    let computed = schema::metadata_checksum(&metadata);
    if stored_checksum != computed {
        return Err(FormatError::Checksum {
            file: file.to_owned(),
            tensor: "__metadata__".into(),
            expected: stored_checksum,
            found: computed,
        });
    }
    let json_object = |key: &str| -> Result<serde_json::Map<String, Value>, FormatError> {
        let text = get(key).ok_or_else(|| metadata_error(file, key, "missing"))?;
        match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(metadata_error(file, key, "is not a JSON object")),
            Err(e) => Err(metadata_error(file, key, format!("invalid JSON: {e}"))),
        }
    };
    let mut metas = BTreeMap::new();
    for (name, entry) in json_object(keys::TENSORS)? {
        schema::check_tensor_name(&name)
            .map_err(|p| metadata_error(file, keys::TENSORS, format!("`{name}`: {p}")))?;
        let meta = TensorMeta::from_json(file, &name, &entry)?;
        metas.insert(name, meta);
    }
    let mut checksums = BTreeMap::new();
    for (name, crc) in json_object(keys::CHECKSUMS)? {
        let crc = crc
            .as_str()
            .filter(|s| s.len() == 8)
            .and_then(|s| u32::from_str_radix(s, 16).ok())
            .ok_or_else(|| {
                metadata_error(file, keys::CHECKSUMS, format!("`{name}`: not 8 hex digits"))
            })?;
        checksums.insert(name, crc);
    }

    // Step 3: the stored tensors implied by the metadata = those present.
    let mut expected: BTreeMap<String, (String, StoredSpec)> = BTreeMap::new();
    for (name, meta) in &metas {
        for spec in meta.stored(name) {
            if let Some((other, _)) = expected.get(&spec.name) {
                return Err(metadata_error(
                    file,
                    keys::TENSORS,
                    format!(
                        "stored name `{}` claimed by both `{other}` and `{name}`",
                        spec.name
                    ),
                ));
            }
            expected.insert(spec.name.clone(), (name.clone(), spec));
        }
    }
    let present = st_meta.tensors();
    let present_names: BTreeSet<&String> = present.keys().collect();
    if let Some(extra) = present_names.iter().find(|n| !expected.contains_key(**n)) {
        return Err(FormatError::UnexpectedTensor {
            file: file.to_owned(),
            tensor: (*extra).clone(),
        });
    }
    if let Some(missing) = expected.keys().find(|n| !present.contains_key(*n)) {
        return Err(FormatError::MissingTensor {
            file: file.to_owned(),
            tensor: missing.clone(),
        });
    }
    if let Some(extra) = checksums.keys().find(|n| !expected.contains_key(*n)) {
        return Err(metadata_error(
            file,
            keys::CHECKSUMS,
            format!("checksum for unknown tensor `{extra}`"),
        ));
    }

    // Step 4: dtype, shape and checksum of every stored tensor.
    let mut arrays: BTreeMap<&str, &[u8]> = BTreeMap::new();
    let mut data_bytes = 0u64;
    for (stored, (_, spec)) in &expected {
        let info = present[stored];
        let found_dtype = info.dtype;
        if found_dtype != spec.dtype.safetensors() {
            return Err(FormatError::Dtype {
                file: file.to_owned(),
                tensor: stored.clone(),
                expected: spec.dtype.safetensors().to_string(),
                found: found_dtype.to_string(),
            });
        }
        if info.shape != spec.shape {
            return Err(FormatError::Shape {
                file: file.to_owned(),
                tensor: stored.clone(),
                expected: spec.shape.clone(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = data.get(start..end).ok_or_else(|| FormatError::Values {
            file: file.to_owned(),
            tensor: stored.clone(),
            problem: format!("byte range {start}..{end} is outside the data"),
        })?;
        let want = checksums.get(stored).ok_or_else(|| {
            metadata_error(file, keys::CHECKSUMS, format!("no checksum for `{stored}`"))
        })?;
        let got = crc32c::crc32c(bytes);
        if got != *want {
            return Err(FormatError::Checksum {
                file: file.to_owned(),
                tensor: stored.clone(),
                expected: schema::crc_hex(*want),
                found: schema::crc_hex(got),
            });
        }
        data_bytes += bytes.len() as u64;
        arrays.insert(stored.as_str(), bytes);
    }

    // Step 5: decode.
    let mut tensors = BTreeMap::new();
    for (name, meta) in metas {
        let specs = meta.stored(&name);
        let array = |i: usize| arrays[specs[i].name.as_str()];
        let tensor = match meta {
            TensorMeta::Dense { shape } => {
                let values = to_f16(array(0));
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(values_error(file, &name, "non-finite dense value"));
                }
                ExpertTensor::Dense { shape, values }
            }
            TensorMeta::Delta(layout) => {
                let salient_index = if specs[3].dtype == StoredDtype::U16 {
                    to_u16(array(3)).into_iter().map(u32::from).collect()
                } else {
                    to_u32(array(3))
                };
                let salient_values = to_f16(array(4));
                if salient_values.iter().any(|v| !v.is_finite()) {
                    return Err(values_error(file, &name, "non-finite salient value"));
                }
                let delta = PackedDelta::new(
                    layout,
                    to_u32(array(0)),
                    to_f16(array(1)),
                    to_f16(array(2)),
                    salient_index,
                    salient_values,
                )
                .map_err(|source| FormatError::Delta {
                    file: file.to_owned(),
                    tensor: name.clone(),
                    source,
                })?;
                ExpertTensor::Delta(delta)
            }
        };
        tensors.insert(name, tensor);
    }
    Ok(ParsedFile {
        header,
        tensors,
        stored_names: expected.into_keys().collect(),
        data_bytes,
    })
}

fn values_error(file: &str, tensor: &str, problem: &str) -> FormatError {
    FormatError::Values {
        file: file.to_owned(),
        tensor: tensor.to_owned(),
        problem: problem.to_owned(),
    }
}

/// Little-endian bytes to values. On little-endian hosts this is one copy
/// (the bytes may be unaligned, so they cannot be viewed in place).
fn to_u32(bytes: &[u8]) -> Vec<u32> {
    if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec(bytes)
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

fn to_u16(bytes: &[u8]) -> Vec<u16> {
    if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec(bytes)
    } else {
        bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }
}

fn to_f16(bytes: &[u8]) -> Vec<f16> {
    if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec(bytes)
    } else {
        to_u16(bytes).into_iter().map(f16::from_bits).collect()
    }
}

/// Reads shards through their `*.safetensors.index.json`.
fn read_index(index_path: &Path) -> Result<ExpertFile, FormatError> {
    let file = index_path.display().to_string();
    let index_error = |problem: String| FormatError::Index {
        file: file.clone(),
        problem,
    };
    let text = std::fs::read_to_string(index_path).map_err(|source| FormatError::Io {
        path: index_path.to_owned(),
        source,
    })?;
    let index: Value =
        serde_json::from_str(&text).map_err(|e| index_error(format!("invalid JSON: {e}")))?;
    let metadata = index
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| index_error("missing object `metadata`".into()))?;
    let weight_map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| index_error("missing object `weight_map`".into()))?;
    let get = |key: &str| metadata.get(key).and_then(Value::as_str).map(str::to_owned);
    let header = parse_header(&file, &get)?;
    let total_size = metadata.get("total_size").and_then(Value::as_u64);

    let mut shard_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (stored, shard) in weight_map {
        let shard = shard
            .as_str()
            .ok_or_else(|| index_error(format!("weight_map[`{stored}`] is not a string")))?;
        let plain = !shard.is_empty()
            && !shard.contains(['/', '\\'])
            && shard != ".."
            && shard.ends_with(".safetensors");
        if !plain {
            return Err(index_error(format!(
                "shard {shard:?} is not a plain .safetensors file name in the index's folder"
            )));
        }
        shard_of.insert(stored, shard);
    }
    let shards: BTreeSet<&str> = shard_of.values().copied().collect();
    let dir = index_path.parent().unwrap_or(Path::new(""));
    let mut tensors = BTreeMap::new();
    let mut data_bytes = 0u64;
    for shard in shards {
        let shard_path = dir.join(shard);
        let bytes = std::fs::read(&shard_path).map_err(|source| FormatError::Io {
            path: shard_path.clone(),
            source,
        })?;
        let parsed = parse_file(&shard_path.display().to_string(), &bytes)?;
        if parsed.header != header {
            return Err(index_error(format!(
                "shard {shard} has a different header (base, name or settings) than the index"
            )));
        }
        for stored in &parsed.stored_names {
            if shard_of.get(stored.as_str()) != Some(&shard) {
                return Err(index_error(format!(
                    "tensor `{stored}` is in shard {shard} but the weight_map says otherwise"
                )));
            }
        }
        let listed = shard_of.values().filter(|s| **s == shard).count();
        if listed != parsed.stored_names.len() {
            return Err(index_error(format!(
                "weight_map lists {listed} tensors in shard {shard}, which holds {}",
                parsed.stored_names.len()
            )));
        }
        for (name, tensor) in parsed.tensors {
            if tensors.contains_key(&name) {
                return Err(index_error(format!("tensor `{name}` is in two shards")));
            }
            tensors.insert(name, tensor);
        }
        data_bytes += parsed.data_bytes;
    }
    if total_size.is_some_and(|t| t != data_bytes) {
        return Err(index_error(format!(
            "total_size {total_size:?} differs from the shards' {data_bytes} data bytes"
        )));
    }
    Ok(ExpertFile {
        header,
        format_version: FORMAT_VERSION,
        tensors,
    })
}
