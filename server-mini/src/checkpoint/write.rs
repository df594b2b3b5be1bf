//! Writing Hugging Face style checkpoints, one tensor at a time.
//!
//! A safetensors file is
//!
//! ```text
//!   u64 LE  n            length of the JSON header
//!   n bytes header       {"__metadata__": {...}, name: {dtype, shape, data_offsets: [a, b]}, ...}
//!                        padded with spaces to a multiple of 8 bytes
//!   data                 tensors back to back, offsets relative to the end of the header
//! ```
//!
//! Every shape is known before any data is produced, so [`TensorFileWriter`]
//! writes the header first and then streams each tensor's bytes as the caller
//! computes them: memory stays at one tensor however large the model is.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::f16;
use serde_json::{json, Map, Value};

use super::dtype::{f16_bytes, FloatDtype};
use super::{CheckpointError, CONFIG_FILE, SINGLE_FILE};

/// The safetensors header length is padded to this many bytes so the data
/// section starts aligned for every element type.
const HEADER_ALIGN: usize = 8;

/// One tensor the writer expects, in the order its bytes will be written.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: FloatDtype,
    pub shape: Vec<usize>,
}

impl TensorPlan {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Streams tensors into one safetensors file in a fixed, planned order.
pub struct TensorFileWriter {
    path: PathBuf,
    out: BufWriter<File>,
    plan: Vec<TensorPlan>,
    next: usize,
}

impl TensorFileWriter {
    pub fn create(
        path: &Path,
        plan: Vec<TensorPlan>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<TensorFileWriter, CheckpointError> {
        let mut header = Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), json!(metadata));
        }
        let mut offset = 0usize;
        for t in &plan {
            if header.contains_key(&t.name) {
                return Err(CheckpointError::Write {
                    path: path.to_path_buf(),
                    reason: format!("tensor {} planned twice", t.name),
                });
            }
            let end = offset + t.byte_len();
            header.insert(
                t.name.clone(),
                json!({
                    "dtype": t.dtype.to_safetensors(),
                    "shape": t.shape,
                    "data_offsets": [offset, end],
                }),
            );
            offset = end;
        }
        let mut header_bytes =
            serde_json::to_vec(&Value::Object(header)).map_err(|e| CheckpointError::Write {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        header_bytes.resize(header_bytes.len().next_multiple_of(HEADER_ALIGN), b' ');
        let file = File::create(path).map_err(|error| CheckpointError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let mut writer = TensorFileWriter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            plan,
            next: 0,
        };
        writer.put(&(header_bytes.len() as u64).to_le_bytes())?;
        writer.put(&header_bytes)?;
        Ok(writer)
    }

    /// The next tensor to write, if any.
    pub fn next_tensor(&self) -> Option<&TensorPlan> {
        self.plan.get(self.next)
    }

    /// Writes the next planned tensor from f32 values, converted to its dtype.
    pub fn write_f32(&mut self, name: &str, values: &[f32]) -> Result<(), CheckpointError> {
        let dtype = self.expect(name, values.len())?;
        let bytes = dtype.encode_f32(values);
        self.put(&bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Writes the next planned tensor, which must be F16.
    pub fn write_f16(&mut self, name: &str, values: &[f16]) -> Result<(), CheckpointError> {
        let dtype = self.expect(name, values.len())?;
        if dtype != FloatDtype::F16 {
            return Err(self.error(format!("tensor {name} is planned as {dtype:?}, got F16")));
        }
        self.put(&f16_bytes(values))?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<PathBuf, CheckpointError> {
        if let Some(t) = self.next_tensor() {
            return Err(self.error(format!("tensor {} was never written", t.name)));
        }
        self.out.flush().map_err(|error| CheckpointError::Io {
            path: self.path.clone(),
            error,
        })?;
        Ok(self.path)
    }

    fn expect(&self, name: &str, elements: usize) -> Result<FloatDtype, CheckpointError> {
        let Some(t) = self.next_tensor() else {
            return Err(self.error(format!("tensor {name} written after the last planned one")));
        };
        if t.name != name {
            return Err(self.error(format!("expected tensor {}, got {name}", t.name)));
        }
        let planned: usize = t.shape.iter().product();
        if planned != elements {
            return Err(self.error(format!(
                "tensor {name}: shape {:?} needs {planned} values, got {elements}",
                t.shape
            )));
        }
        Ok(t.dtype)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        self.out
            .write_all(bytes)
            .map_err(|error| CheckpointError::Io {
                path: self.path.clone(),
                error,
            })
    }

    fn error(&self, reason: String) -> CheckpointError {
        CheckpointError::Write {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Writes `config.json` (pretty, so a human can read it) into `dir`.
pub fn write_config(dir: &Path, config: &Value) -> Result<(), CheckpointError> {
    let path = dir.join(CONFIG_FILE);
    let mut text = serde_json::to_string_pretty(config).map_err(|e| CheckpointError::Write {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(&path, text).map_err(|error| CheckpointError::Io { path, error })
}

/// Writes a complete FP16 checkpoint (`config.json` + `model.safetensors`),
/// tensors sorted by name so the same input gives byte-identical files.
pub fn write_checkpoint(
    dir: &Path,
    config: &Value,
    tensors: &[(String, Vec<usize>, Vec<f16>)],
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|error| CheckpointError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    write_config(dir, config)?;
    let mut order: Vec<&(String, Vec<usize>, Vec<f16>)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let plan = order
        .iter()
        .map(|(name, shape, _)| TensorPlan {
            name: name.clone(),
            dtype: FloatDtype::F16,
            shape: shape.clone(),
        })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = TensorFileWriter::create(&dir.join(SINGLE_FILE), plan, &metadata)?;
    for (name, _, values) in order {
        writer.write_f16(name, values)?;
    }
    writer.finish()?;
    Ok(())
}
