//! ggml tensor types and their dequantization to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` (checked against it; written here from the layout,
//! not copied). All multi-byte fields are little-endian; `f16` is IEEE half.

use half::f16;

/// Elements per block of the "legacy" quants Q4_0 / Q4_1 / Q8_0 (ggml `QK4_0`, `QK4_1`, `QK8_0`).
pub const QK: usize = 32;
/// Elements per super-block of the k-quants Q4_K / Q6_K (ggml `QK_K`).
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales+mins in a Q4_K super-block (ggml `K_SCALE_SIZE`).
const K_SCALE_SIZE: usize = 12;

/// The ggml tensor types this loader understands. Discriminants are ggml's `enum ggml_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    Q4K = 12,
    Q6K = 14,
    BF16 = 30,
}

impl GgmlType {
    /// `None` for a ggml type id we do not dequantize (the caller reports it by number).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Elements per block (1 for the plain float types).
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => QK,
            GgmlType::Q4K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => Q4_0_BYTES,
            GgmlType::Q4_1 => Q4_1_BYTES,
            GgmlType::Q8_0 => Q8_0_BYTES,
            GgmlType::Q4K => Q4_K_BYTES,
            GgmlType::Q6K => Q6_K_BYTES,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
        }
    }
}

// block_q4_0 (18 bytes, 32 weights):   | d: f16 | qs: u8[16] |
//   weight j      = (qs[j] & 0xF) - 8) * d      for j in 0..16
//   weight j + 16 = (qs[j] >> 4)  - 8) * d
const Q4_0_BYTES: usize = 2 + QK / 2;
/// Q4_0 stores unsigned nibbles 0..15 centred on this value.
const Q4_0_ZERO: i32 = 8;

// block_q4_1 (20 bytes): | d: f16 | m: f16 | qs: u8[16] |, same nibble order as Q4_0,
//   weight = q * d + m
const Q4_1_BYTES: usize = 4 + QK / 2;

// block_q8_0 (34 bytes): | d: f16 | qs: i8[32] |,  weight j = qs[j] * d
const Q8_0_BYTES: usize = 2 + QK;

// block_q4_K (144 bytes, 256 weights = 8 sub-blocks of 32):
//   | d: f16 | dmin: f16 | scales: u8[12] | qs: u8[128] |
//   sub-block j has a 6-bit scale sc_j and a 6-bit min m_j packed in `scales`:
//     j < 4:  sc = scales[j] & 63,                 m = scales[j + 4] & 63
//     j >= 4: sc = (scales[j+4] & 0xF) | (scales[j-4] >> 6) << 4
//             m  = (scales[j+4] >> 4)  | (scales[j]   >> 6) << 4
//   qs is read 32 bytes at a time: bytes qs[32c..32c+32] hold sub-block 2c in their low nibbles
//   and sub-block 2c+1 in their high nibbles.
//   weight = d * sc_j * q - dmin * m_j
const Q4_K_BYTES: usize = 4 + K_SCALE_SIZE + QK_K / 2;

// block_q6_K (210 bytes, 256 weights = 16 sub-blocks of 16):
//   | ql: u8[128] (low 4 bits) | qh: u8[64] (high 2 bits) | scales: i8[16] | d: f16 |
//   Two halves of 128 weights; in half h (ql += 64h, qh += 32h, scales += 8h), for l in 0..32:
//     q(l)      = (ql[l]      & 0xF) | ((qh[l] >> 0) & 3) << 4
//     q(l + 32) = (ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4
//     q(l + 64) = (ql[l]      >> 4)  | ((qh[l] >> 4) & 3) << 4
//     q(l + 96) = (ql[l + 32] >> 4)  | ((qh[l] >> 6) & 3) << 4
//   weight(i) = d * scales[i / 16] * (q(i) - 32)
const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
/// Q6_K stores unsigned 6-bit values centred on this value.
const Q6_K_ZERO: i32 = 32;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantize `bytes` (a whole number of blocks of `ty`) into `out`
/// (`out.len() == bytes.len() / block_bytes * block_elems`; the caller checks sizes).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    debug_assert_eq!(bytes.len() / bb * be, out.len());
    for (blk, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            GgmlType::F16 => y[0] = f16_at(blk, 0),
            GgmlType::BF16 => y[0] = half::bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            GgmlType::Q4_0 => dequant_q4_0(blk, y),
            GgmlType::Q4_1 => dequant_q4_1(blk, y),
            GgmlType::Q8_0 => dequant_q8_0(blk, y),
            GgmlType::Q4K => dequant_q4_k(blk, y),
            GgmlType::Q6K => dequant_q6_k(blk, y),
        }
    }
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..];
    for j in 0..QK / 2 {
        y[j] = ((qs[j] & 0xF) as i32 - Q4_0_ZERO) as f32 * d;
        y[j + QK / 2] = ((qs[j] >> 4) as i32 - Q4_0_ZERO) as f32 * d;
    }
}

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..];
    for j in 0..QK / 2 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..2 + QK]) {
        *yj = q as i8 as f32 * d;
    }
}

/// The 6-bit (scale, min) of Q4_K sub-block `j` (see the layout above).
fn q4_k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..4 + K_SCALE_SIZE];
    let qs = &b[4 + K_SCALE_SIZE..];
    for c in 0..QK_K / 64 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc_lo, m_lo) = q4_k_scale_min(2 * c, scales);
        let (sc_hi, m_hi) = q4_k_scale_min(2 * c + 1, scales);
        let (d_lo, min_lo) = (d * sc_lo as f32, dmin * m_lo as f32);
        let (d_hi, min_hi) = (d * sc_hi as f32, dmin * m_hi as f32);
        let out = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            out[l] = d_lo * (q[l] & 0xF) as f32 - min_lo;
            out[l + 32] = d_hi * (q[l] >> 4) as f32 - min_hi;
        }
    }
}

fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, QK_K / 2 + QK_K / 4 + QK_K / 16);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[QK_K / 2 + 32 * h..QK_K / 2 + 32 * h + 32];
        let sc = &b[QK_K / 2 + QK_K / 4 + 8 * h..QK_K / 2 + QK_K / 4 + 8 * h + 8];
        let out = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &qk) in q.iter().enumerate() {
                let scale = sc[is + 2 * k] as i8 as f32;
                out[l + 32 * k] = d * scale * (qk as i32 - Q6_K_ZERO) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn run(ty: GgmlType, b: &[u8]) -> Vec<f32> {
        let mut y = vec![0.0; b.len() / ty.block_bytes() * ty.block_elems()];
        dequantize(ty, b, &mut y);
        y
    }

    #[test]
    fn q4_0_nibble_order_and_zero_point() {
        let mut b = h(0.5).to_vec();
        // byte j: low nibble = j, high nibble = 15 - j
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = run(GgmlType::Q4_0, &b);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_scale_and_min() {
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | (3 << 4)));
        let y = run(GgmlType::Q4_1, &b);
        assert_eq!(y[5], 5.0 * 0.25 - 1.0);
        assert_eq!(y[16 + 5], 3.0 * 0.25 - 1.0);
    }

    #[test]
    fn q8_0_signed_values() {
        let mut b = h(2.0).to_vec();
        b.extend((0..32i32).map(|j| (j - 16) as i8 as u8));
        let y = run(GgmlType::Q8_0, &b);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 2.0);
        }
    }

    #[test]
    fn q4_k_packed_scales() {
        // d = 1, dmin = 0.5; sub-block j scale = j + 1 (and upper 2 bits for j >= 4 come from
        // the top bits of bytes 0..4 / 4..8), min = 2j.
        let mut scales = [0u8; 12];
        let want_sc = [1u8, 2, 3, 4, 37, 38, 63, 40];
        let want_m = [0u8, 2, 4, 6, 50, 10, 12, 61];
        for j in 0..4 {
            scales[j] = want_sc[j] | ((want_sc[j + 4] >> 4) << 6);
            scales[j + 4] = want_m[j] | ((want_m[j + 4] >> 4) << 6);
            scales[j + 8] = (want_sc[j + 4] & 0xF) | ((want_m[j + 4] & 0xF) << 4);
        }
        for j in 0..8 {
            assert_eq!(
                q4_k_scale_min(j, &scales),
                (want_sc[j], want_m[j]),
                "sub-block {j}"
            );
        }
        let mut b = h(1.0).to_vec();
        b.extend(h(0.5));
        b.extend(scales);
        // qs: byte (32c + l) = low nibble (l % 16), high nibble 15 - l % 16
        b.extend((0..128usize).map(|i| ((i % 16) as u8) | ((15 - (i % 16) as u8) << 4)));
        let y = run(GgmlType::Q4K, &b);
        for c in 0..4 {
            for l in 0..32 {
                let (lo, hi) = ((l % 16) as f32, (15 - l % 16) as f32);
                let (j0, j1) = (2 * c, 2 * c + 1);
                assert_eq!(
                    y[64 * c + l],
                    want_sc[j0] as f32 * lo - 0.5 * want_m[j0] as f32
                );
                assert_eq!(
                    y[64 * c + 32 + l],
                    want_sc[j1] as f32 * hi - 0.5 * want_m[j1] as f32
                );
            }
        }
    }

    #[test]
    fn q6_k_bit_assembly() {
        // Choose q(i) = i % 64 for every weight, pack it, and check weight = d*sc*(q-32).
        let want_q: Vec<u8> = (0..256).map(|i| (i % 64) as u8).collect();
        let scales: Vec<i8> = (0..16).map(|s| s as i8 - 8).collect();
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for hh in 0..2 {
            for l in 0..32 {
                let q = |k: usize| want_q[128 * hh + l + 32 * k];
                ql[64 * hh + l] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
                ql[64 * hh + l + 32] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
                qh[32 * hh + l] =
                    (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
            }
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(h(0.125));
        assert_eq!(b.len(), Q6_K_BYTES);
        let y = run(GgmlType::Q6K, &b);
        for i in 0..256 {
            let want = 0.125 * scales[i / 16] as f32 * (want_q[i] as f32 - 32.0);
            assert_eq!(y[i], want, "weight {i}");
        }
    }

    #[test]
    fn plain_floats() {
        let mut b = 1.5f32.to_le_bytes().to_vec();
        b.extend((-2.25f32).to_le_bytes());
        assert_eq!(run(GgmlType::F32, &b), vec![1.5, -2.25]);
        let b: Vec<u8> = [h(0.5), h(-3.0)].concat();
        assert_eq!(run(GgmlType::F16, &b), vec![0.5, -3.0]);
    }
}
