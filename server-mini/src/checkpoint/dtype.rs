//! Element types a checkpoint tensor may have, and their conversion to the
//! f32 / f16 the compression pipeline works in.
//!
//! Bytes come straight from a memory map whose tensor offsets a hostile file
//! controls, so nothing here assumes alignment: every element is decoded
//! with `from_le_bytes` from a byte chunk.

use half::{bf16, f16};
use safetensors::Dtype;

/// Floating-point dtypes meswitch reads and writes in checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F16,
    BF16,
    F32,
}

impl FloatDtype {
    pub fn from_safetensors(dtype: Dtype) -> Option<FloatDtype> {
        match dtype {
            Dtype::F16 => Some(FloatDtype::F16),
            Dtype::BF16 => Some(FloatDtype::BF16),
            Dtype::F32 => Some(FloatDtype::F32),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> Dtype {
        match self {
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::BF16 => Dtype::BF16,
            FloatDtype::F32 => Dtype::F32,
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatDtype::F16 | FloatDtype::BF16 => 2,
            FloatDtype::F32 => 4,
        }
    }

    /// Decodes little-endian bytes (length a multiple of [`Self::size`]).
    pub fn decode_f32(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            FloatDtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            FloatDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            FloatDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        }
    }

    /// Encodes f32 values in this dtype (round to nearest even).
    pub fn encode_f32(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            FloatDtype::F16 => {
                for &v in values {
                    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
            FloatDtype::BF16 => {
                for &v in values {
                    out.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
            }
            FloatDtype::F32 => {
                for &v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out
    }
}

pub fn f16_bytes(values: &[f16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 2);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_for_representable_values() {
        // Values exactly representable in all three formats.
        let values = [0.0f32, -1.5, 0.25, 3.0, -0.125, 1024.0];
        for dtype in [FloatDtype::F16, FloatDtype::BF16, FloatDtype::F32] {
            let bytes = dtype.encode_f32(&values);
            assert_eq!(bytes.len(), values.len() * dtype.size());
            assert_eq!(dtype.decode_f32(&bytes), values, "{dtype:?}");
        }
    }

    #[test]
    fn bf16_keeps_range_f16_does_not() {
        let big = [1.0e6f32];
        let bf = FloatDtype::BF16.decode_f32(&FloatDtype::BF16.encode_f32(&big));
        assert!((bf[0] - 1.0e6).abs() / 1.0e6 < 1e-2);
        let h = FloatDtype::F16.decode_f32(&FloatDtype::F16.encode_f32(&big));
        assert!(h[0].is_infinite());
    }
}
