//! Hugging Face checkpoints on disk: `config.json` plus either one
//! `model.safetensors` or shards listed in `model.safetensors.index.json`.
//!
//! ```text
//!   DIR/config.json
//!   DIR/model.safetensors                       (one file)
//!   DIR/model.safetensors.index.json            (or: {"weight_map": {tensor: shard file}})
//!   DIR/model-00001-of-0000N.safetensors ...
//! ```
//!
//! Shards are memory-mapped and their headers validated once at open; a
//! tensor is decoded only when asked for, so streaming over a model keeps
//! about one tensor in memory.

mod dtype;
mod write;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use meswitch_reference::container::BaseIdentity;
use safetensors::SafeTensors;
use serde_json::Value;
use thiserror::Error;

pub use dtype::FloatDtype;
pub use write::{write_checkpoint, write_config, TensorFileWriter, TensorPlan};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Length of the little-endian u64 that opens a safetensors file.
const LENGTH_PREFIX: usize = 8;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: not a checkpoint directory (no config.json)", dir.display())]
    MissingConfig { dir: PathBuf },
    #[error("{}: neither model.safetensors nor model.safetensors.index.json", dir.display())]
    MissingWeights { dir: PathBuf },
    #[error("{}: invalid JSON: {error}", path.display())]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{}: {reason}", path.display())]
    Index { path: PathBuf, reason: String },
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("tensor {name} is in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{}: no tensor named {name}", dir.display())]
    MissingTensor { dir: PathBuf, name: String },
    #[error("{}: tensor {name} has unsupported dtype {dtype} (expected F16, BF16 or F32)", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
}

/// Where one tensor's bytes live.
#[derive(Clone, Debug)]
struct TensorEntry {
    shard: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range within the shard's memory map.
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// An opened checkpoint: parsed config and a tensor index over its shards.
pub struct Checkpoint {
    dir: PathBuf,
    config: Value,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        if !dir.is_dir() {
            return Err(CheckpointError::Io {
                path: dir.to_path_buf(),
                error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            });
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(CheckpointError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(CheckpointError::Index {
                path: config_path,
                reason: "config is not a JSON object".into(),
            });
        }
        let mut checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            checkpoint.open_sharded(&index)?;
        } else if single.is_file() {
            checkpoint.add_shard(&single, None)?;
        } else {
            return Err(CheckpointError::MissingWeights {
                dir: dir.to_path_buf(),
            });
        }
        Ok(checkpoint)
    }

    /// Opens one bare safetensors file (no config; `config()` is `{}`), e.g.
    /// a calibration file of activations.
    pub fn open_file(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let mut checkpoint = Checkpoint {
            dir: path.to_path_buf(),
            config: Value::Object(Default::default()),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        checkpoint.add_shard(path, None)?;
        Ok(checkpoint)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &Value {
        &self.config
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }

    /// The stored dtype, `None` for an unknown tensor.
    pub fn dtype(&self, name: &str) -> Option<safetensors::Dtype> {
        self.tensors.get(name).map(|t| t.dtype)
    }

    /// The stored dtype when it is one meswitch reads, else an error naming it.
    pub fn float_dtype(&self, name: &str) -> Result<FloatDtype, CheckpointError> {
        let entry = self.entry(name)?;
        FloatDtype::from_safetensors(entry.dtype).ok_or_else(|| CheckpointError::UnsupportedDtype {
            path: self.shards[entry.shard].path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        })
    }

    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let dtype = self.float_dtype(name)?;
        let values = dtype.decode_f32(self.bytes(name)?);
        self.release_pages(name);
        Ok(values)
    }

    pub fn tensor_f16(&self, name: &str) -> Result<Vec<f16>, CheckpointError> {
        let values = match self.float_dtype(name)? {
            FloatDtype::F16 => Ok(self
                .bytes(name)?
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect()),
            other => Ok(other
                .decode_f32(self.bytes(name)?)
                .into_iter()
                .map(f16::from_f32)
                .collect()),
        };
        self.release_pages(name);
        values
    }

    /// Drops a decoded tensor's pages from this process's resident set, so
    /// streaming over a model keeps RSS near one tensor instead of growing
    /// to the whole mapped file (the kernel keeps them in its page cache).
    fn release_pages(&self, name: &str) {
        #[cfg(unix)]
        if let Some(t) = self.tensors.get(name) {
            // SAFETY: the map is a read-only shared file mapping; after
            // MADV_DONTNEED a later access faults the same bytes back in from
            // the file, so any slice still borrowed keeps its contents. The
            // call is advisory: failure changes nothing but memory use.
            let _ = unsafe {
                self.shards[t.shard].map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    t.start,
                    t.end - t.start,
                )
            };
        }
    }

    /// Identity of this checkpoint as a base model (config + every tensor's name and shape).
    pub fn identity(&self) -> BaseIdentity {
        let tensors: Vec<(String, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.shape.clone()))
            .collect();
        BaseIdentity::compute(&self.config, &tensors)
    }

    /// Every tensor's shape, keyed by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.shape.clone()))
            .collect()
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry, CheckpointError> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_string(),
            })
    }

    fn bytes(&self, name: &str) -> Result<&[u8], CheckpointError> {
        let entry = self.entry(name)?;
        Ok(&self.shards[entry.shard].map[entry.start..entry.end])
    }

    fn open_sharded(&mut self, index_path: &Path) -> Result<(), CheckpointError> {
        let index = read_json(index_path)?;
        let bad = |reason: String| CheckpointError::Index {
            path: index_path.to_path_buf(),
            reason,
        };
        let weight_map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
        let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, file) in weight_map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{tensor}] is not a file name")))?;
            // A shard must be a plain file name next to the index: an index
            // naming "../x" or "/etc/x" is not allowed to read elsewhere.
            if file.is_empty() || file.contains(['/', '\\']) || file == ".." || file == "." {
                return Err(bad(format!("shard name {file:?} is not a plain file name")));
            }
            by_file.entry(file).or_default().push(tensor);
        }
        if by_file.is_empty() {
            return Err(bad("weight_map is empty".into()));
        }
        for (file, names) in by_file {
            self.add_shard(&self.dir.join(file), Some(&names))?;
        }
        Ok(())
    }

    /// Maps one shard and indexes its tensors (only `wanted` ones when the
    /// index names them; each of those must be present).
    fn add_shard(&mut self, path: &Path, wanted: Option<&[&str]>) -> Result<(), CheckpointError> {
        let file = File::open(path).map_err(|error| CheckpointError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        // SAFETY: the map is read-only; a checkpoint being rewritten under a
        // running process is outside what meswitch supports (as for every
        // mmap-based model loader).
        let map = unsafe { Mmap::map(&file) }.map_err(|error| CheckpointError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| CheckpointError::Safetensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let data_start = LENGTH_PREFIX + header_len;
        let shard = self.shards.len();
        let infos = metadata.tensors();
        let names: Vec<String> = match wanted {
            Some(names) => names.iter().map(|s| s.to_string()).collect(),
            None => infos.keys().cloned().collect(),
        };
        for name in names {
            let info = infos
                .get(&name)
                .ok_or_else(|| CheckpointError::Safetensors {
                    path: path.to_path_buf(),
                    reason: format!("the index lists tensor {name} here but the file lacks it"),
                })?;
            if let Some(previous) = self.tensors.get(&name) {
                return Err(CheckpointError::DuplicateTensor {
                    name,
                    first: self.shards[previous.shard].path.clone(),
                    second: path.to_path_buf(),
                });
            }
            // read_metadata checked that offsets lie in the buffer and match
            // shape × dtype size.
            let (start, end) = info.data_offsets;
            self.tensors.insert(
                name,
                TensorEntry {
                    shard,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                },
            );
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            map,
        });
        Ok(())
    }
}

fn read_json(path: &Path) -> Result<Value, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    serde_json::from_str(&text).map_err(|error| CheckpointError::Json {
        path: path.to_path_buf(),
        error,
    })
}
