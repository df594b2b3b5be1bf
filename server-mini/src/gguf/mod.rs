//! GGUF (llama.cpp model file) reader: header, metadata, tensor table, dequantization, and an
//! HF-style view (config keys and tensor names) so GGUF base models load like HF checkpoints.
//!
//! File layout (GGUF v2/v3, little-endian; v1 used u32 counts and is rejected):
//! ```text
//! | "GGUF" | version u32 | n_tensors u64 | n_kv u64 |
//! | n_kv x (key: string, type: u32, value)                      |  metadata
//! | n_tensors x (name: string, n_dims u32, ne[n_dims] u64,      |  tensor infos
//! |              ggml type u32, offset u64)                      |
//! | padding to `general.alignment` (default 32)                  |
//! | tensor data: tensor t at data_start + offset_t               |
//! ```
//! string = u64 byte length + UTF-8 bytes. Shapes are in ggml order: `ne[0]` is the contiguous
//! (innermost) dimension, so a PyTorch `[out, in]` weight has `ne = [in, out]`.

mod dequant;
mod hf;
mod reader;
mod writer;

pub use dequant::{GgmlType, QK, QK_K};
pub use writer::{write_gguf, TensorToWrite};

use reader::Reader;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const MIN_VERSION: u32 = 2;
const MAX_VERSION: u32 = 3;
/// Alignment of the tensor data section and of each tensor's offset unless
/// `general.alignment` says otherwise (gguf spec `GGUF_DEFAULT_ALIGNMENT`).
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal GGUF but never used by llama.cpp; bound recursion anyway.
const MAX_ARRAY_DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {inner}")]
    InFile {
        path: PathBuf,
        inner: Box<GgufError>,
    },
    #[error("not a GGUF file (magic {0:?})")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} not supported (only {MIN_VERSION}..={MAX_VERSION})")]
    Version(u32),
    #[error("truncated while reading {what} at byte {offset} (needed {needed} more bytes)")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
    },
    #[error("{what}: count {count} cannot fit in the {remaining} bytes left")]
    CountTooLarge {
        what: String,
        count: u64,
        remaining: u64,
    },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    BadUtf8 { what: String, offset: u64 },
    #[error("metadata key {key:?}: unknown value type {ty}")]
    BadValueType { key: String, ty: u32 },
    #[error("metadata key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}")]
    NestedTooDeep { key: String },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("general.alignment = {0} is not a power of two")]
    BadAlignment(u64),
    #[error("tensor {name:?}: {problem}")]
    BadTensor { name: String, problem: String },
    #[error("tensor {name:?}: ggml type {ty} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K are)")]
    UnsupportedType { name: String, ty: u32 },
    #[error("no tensor named {0:?}")]
    NoTensor(String),
    #[error("metadata key {key:?}: {problem}")]
    BadMetadata { key: String, problem: String },
}

/// One metadata value. Integer widths are kept so a round trip is exact.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any integer type as i64 (u64 above i64::MAX gives None).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            GgufValue::U8(v) => v as i64,
            GgufValue::I8(v) => v as i64,
            GgufValue::U16(v) => v as i64,
            GgufValue::I16(v) => v as i64,
            GgufValue::U32(v) => v as i64,
            GgufValue::I32(v) => v as i64,
            GgufValue::U64(v) => i64::try_from(v).ok()?,
            GgufValue::I64(v) => v,
            _ => return None,
        })
    }
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `shape[0]` is contiguous. `[in, out]` for a linear weight.
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    /// Byte offset from the start of the data section (already checked: aligned and in bounds).
    pub offset: u64,
    /// Size in bytes of the stored (possibly quantized) data.
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open GGUF file: parsed header and tensor table over a memory map of the file.
pub struct GgufFile {
    storage: Storage,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
}

impl GgufFile {
    /// Memory-map and validate `path` (header, metadata, tensor table, every tensor in bounds).
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap-based loader we assume the file is not
        // truncated by another process while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mmap(map)).map_err(|e| GgufError::InFile {
            path: path.to_path_buf(),
            inner: Box::new(e),
        })
    }

    /// Parse a whole GGUF file held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<GgufFile, GgufError> {
        let bytes = storage.bytes();
        let mut r = Reader::new(bytes);
        let magic: [u8; 4] = r.take(4, "magic")?.try_into().expect("4 bytes");
        if &magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
            return Err(GgufError::Version(version));
        }
        // Smallest possible tensor info: 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset).
        let n_tensors = r.u64("tensor count")?;
        // Smallest possible KV: 8 (key len) + 4 (type) + 1 (u8 value).
        let n_kv = r.count(13, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = read_value(&mut r, &key, ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
        }
        const MIN_TENSOR_INFO: u64 = 24;
        if n_tensors > r.remaining() as u64 / MIN_TENSOR_INFO {
            return Err(GgufError::CountTooLarge {
                what: "tensor count".into(),
                count: n_tensors,
                remaining: r.remaining() as u64,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut by_name = HashMap::new();
        for _ in 0..n_tensors {
            let t = read_tensor_info(&mut r)?;
            if t.offset % alignment != 0 {
                return Err(bad(
                    &t.name,
                    format!("offset {} not a multiple of {alignment}", t.offset),
                ));
            }
            if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor(t.name));
            }
            tensors.push(t);
        }
        let data_start = (r.pos() as u64).div_ceil(alignment) * alignment;
        let data_len = (bytes.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(bad(
                    &t.name,
                    format!(
                        "data [{}, +{}) runs past the end of the data section ({data_len} bytes)",
                        t.offset, t.n_bytes
                    ),
                ));
            }
        }
        let data_start = data_start as usize;
        Ok(GgufFile {
            storage,
            version,
            metadata,
            tensors,
            by_name,
            data_start,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of a tensor (quantized blocks as on disk).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::NoTensor(name.to_string()))?;
        let start = self.data_start + t.offset as usize;
        Ok(&self.storage.bytes()[start..start + t.n_bytes as usize])
    }

    /// The tensor dequantized to f32 exactly as stored in the file (ggml row order; for
    /// `attn_q`/`attn_k` that is llama.cpp's RoPE-permuted row order). See [`Self::tensor_f32`].
    pub fn tensor_f32_raw(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::NoTensor(name.to_string()))?;
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0f32; t.n_elements()];
        dequant::dequantize(t.dtype, bytes, &mut out);
        Ok(out)
    }

    /// The tensor dequantized to f32, row-major with `shape[0]` contiguous (so a linear weight
    /// reads as HF's `[out, in]`), and in HF layout: for `blk.N.attn_q.weight` /
    /// `blk.N.attn_k.weight` of a llama-architecture file the converter's RoPE row permutation is
    /// undone (see `hf.rs`), so HF `rotate_half` RoPE applies. Every other tensor is as stored.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let mut w = self.tensor_f32_raw(name)?;
        if let Some(n_head) = self.rope_permuted_heads(name)? {
            let t = self.tensor_info(name).expect("checked by tensor_f32_raw");
            // A bias `[out]` is one value per row.
            let row_len = if t.shape.len() == 1 { 1 } else { t.shape[0] };
            hf::unpermute_rope_rows(&mut w, row_len, n_head).map_err(|p| bad(name, p))?;
        }
        Ok(w)
    }

    /// For a 2-D `Q4_1` or `Q8_0` tensor: its ggml blocks as stored (`[rows][row_len / 32]`
    /// blocks, each row's bytes contiguous), in HF row order (the Q/K RoPE permutation undone
    /// like [`Self::tensor_f32`]: rows move as wholes); `None` for every other type.
    /// [`crate::model::Numerics::LlamaCpp`] computes on these exactly as ggml does.
    pub fn tensor_blocks(&self, name: &str) -> Result<Option<(GgmlType, Vec<u8>)>, GgufError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::NoTensor(name.to_string()))?;
        if !matches!(t.dtype, GgmlType::Q4_1 | GgmlType::Q8_0) || t.shape.len() != 2 {
            return Ok(None);
        }
        let mut bytes = self.tensor_bytes(name)?.to_vec();
        if let Some(n_head) = self.rope_permuted_heads(name)? {
            let row_bytes = t.shape[0] / QK * t.dtype.block_bytes();
            hf::unpermute_rope_rows(&mut bytes, row_bytes, n_head).map_err(|p| bad(name, p))?;
        }
        Ok(Some((t.dtype, bytes)))
    }

    /// [`Self::tensor_f32`] rounded to f16 (the runtime keeps base weights in FP16).
    pub fn tensor_f16(&self, name: &str) -> Result<Vec<half::f16>, GgufError> {
        Ok(self
            .tensor_f32(name)?
            .into_iter()
            .map(half::f16::from_f32)
            .collect())
    }

    pub(crate) fn meta_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(GgufValue::as_u64)
    }

    pub(crate) fn meta_f64(&self, key: &str) -> Option<f64> {
        self.metadata.get(key).and_then(GgufValue::as_f64)
    }

    pub(crate) fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(GgufValue::as_str)
    }
}

fn bad(name: &str, problem: String) -> GgufError {
    GgufError::BadTensor {
        name: name.to_string(),
        problem,
    }
}

/// GGUF value type ids (gguf spec `gguf_metadata_value_type`).
mod vtype {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Smallest on-disk size of one value of type `ty` (sizes array allocations before reading).
fn min_value_bytes(ty: u32) -> usize {
    match ty {
        vtype::U8 | vtype::I8 | vtype::BOOL => 1,
        vtype::U16 | vtype::I16 => 2,
        vtype::U32 | vtype::I32 | vtype::F32 => 4,
        // string and array both start with a u64 length (arrays also a u32 type first)
        _ => 8,
    }
}

fn read_value(r: &mut Reader, key: &str, ty: u32, depth: usize) -> Result<GgufValue, GgufError> {
    let w = key; // what we are reading, for error messages
    Ok(match ty {
        vtype::U8 => GgufValue::U8(r.u8(w)?),
        vtype::I8 => GgufValue::I8(r.u8(w)? as i8),
        vtype::U16 => GgufValue::U16(r.u16(w)?),
        vtype::I16 => GgufValue::I16(r.u16(w)? as i16),
        vtype::U32 => GgufValue::U32(r.u32(w)?),
        vtype::I32 => GgufValue::I32(r.u32(w)? as i32),
        vtype::U64 => GgufValue::U64(r.u64(w)?),
        vtype::I64 => GgufValue::I64(r.u64(w)? as i64),
        vtype::F32 => GgufValue::F32(r.f32(w)?),
        vtype::F64 => GgufValue::F64(r.f64(w)?),
        vtype::BOOL => GgufValue::Bool(r.u8(w)? != 0),
        vtype::STRING => GgufValue::String(r.string(w)?),
        vtype::ARRAY => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(GgufError::NestedTooDeep {
                    key: key.to_string(),
                });
            }
            let elem_ty = r.u32(w)?;
            if elem_ty > vtype::F64 {
                return Err(GgufError::BadValueType {
                    key: key.to_string(),
                    ty: elem_ty,
                });
            }
            let n = r.count(min_value_bytes(elem_ty), w)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(read_value(r, key, elem_ty, depth + 1)?);
            }
            GgufValue::Array(items)
        }
        other => {
            return Err(GgufError::BadValueType {
                key: key.to_string(),
                ty: other,
            })
        }
    })
}

fn read_tensor_info(r: &mut Reader) -> Result<TensorInfo, GgufError> {
    let name = r.string("tensor name")?;
    let n_dims = r.u32("tensor n_dims")? as usize;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(bad(
            &name,
            format!("{n_dims} dimensions (1..={MAX_DIMS} allowed)"),
        ));
    }
    let mut shape = Vec::with_capacity(n_dims);
    for _ in 0..n_dims {
        let d = r.u64("tensor dimension")?;
        shape.push(usize::try_from(d).map_err(|_| bad(&name, format!("dimension {d} too large")))?);
    }
    let ty_id = r.u32("tensor type")?;
    let offset = r.u64("tensor offset")?;
    let dtype = GgmlType::from_id(ty_id).ok_or_else(|| GgufError::UnsupportedType {
        name: name.clone(),
        ty: ty_id,
    })?;
    let n_elems = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(&name, format!("shape {shape:?} overflows")))?;
    let be = dtype.block_elems();
    if shape[0] % be != 0 {
        return Err(bad(
            &name,
            format!(
                "row length {} is not a multiple of the {} block size {be}",
                shape[0],
                dtype.name()
            ),
        ));
    }
    let n_bytes = (n_elems / be)
        .checked_mul(dtype.block_bytes())
        .ok_or_else(|| bad(&name, "byte size overflows".into()))? as u64;
    Ok(TensorInfo {
        name,
        shape,
        dtype,
        offset,
        n_bytes,
    })
}

#[cfg(test)]
mod tests;
