//! A small GGUF v3 writer: metadata values plus tensors of already-encoded bytes. Used to build
//! synthetic GGUF files in tests (tokenizers, loaders) without a converter.

use super::{vtype, GgmlType, GgufValue, DEFAULT_ALIGNMENT};

/// One tensor to write: name, ggml shape (`ne[0]` contiguous), type, stored bytes.
pub struct TensorToWrite<'a> {
    pub name: &'a str,
    pub shape: &'a [u64],
    pub dtype: GgmlType,
    pub data: &'a [u8],
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => vtype::U8,
        GgufValue::I8(_) => vtype::I8,
        GgufValue::U16(_) => vtype::U16,
        GgufValue::I16(_) => vtype::I16,
        GgufValue::U32(_) => vtype::U32,
        GgufValue::I32(_) => vtype::I32,
        GgufValue::U64(_) => vtype::U64,
        GgufValue::I64(_) => vtype::I64,
        GgufValue::F32(_) => vtype::F32,
        GgufValue::F64(_) => vtype::F64,
        GgufValue::Bool(_) => vtype::BOOL,
        GgufValue::String(_) => vtype::STRING,
        GgufValue::Array(_) => vtype::ARRAY,
    }
}

fn put_value(b: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => b.push(*x),
        GgufValue::I8(x) => b.push(*x as u8),
        GgufValue::U16(x) => b.extend(x.to_le_bytes()),
        GgufValue::I16(x) => b.extend(x.to_le_bytes()),
        GgufValue::U32(x) => b.extend(x.to_le_bytes()),
        GgufValue::I32(x) => b.extend(x.to_le_bytes()),
        GgufValue::U64(x) => b.extend(x.to_le_bytes()),
        GgufValue::I64(x) => b.extend(x.to_le_bytes()),
        GgufValue::F32(x) => b.extend(x.to_le_bytes()),
        GgufValue::F64(x) => b.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => b.push(*x as u8),
        GgufValue::String(s) => put_str(b, s),
        GgufValue::Array(items) => {
            // Element type of an empty array is irrelevant to readers; u8 is the smallest.
            let elem = items.first().map_or(vtype::U8, type_id);
            b.extend(elem.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(b, it);
            }
        }
    }
}

/// The bytes of a GGUF v3 file with `metadata` and `tensors` (default 32-byte alignment).
/// Arrays must be homogeneous (as GGUF requires); the first element's type is written.
pub fn write_gguf(metadata: &[(&str, GgufValue)], tensors: &[TensorToWrite]) -> Vec<u8> {
    let align = DEFAULT_ALIGNMENT;
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut b, k);
        b.extend(type_id(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut b, t.name);
        b.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape {
            b.extend(d.to_le_bytes());
        }
        b.extend((t.dtype as u32).to_le_bytes());
        b.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(align) * align;
    }
    let start = (b.len() as u64).div_ceil(align) * align;
    for (t, off) in tensors.iter().zip(offsets) {
        b.resize((start + off) as usize, 0);
        b.extend(t.data);
    }
    b
}
