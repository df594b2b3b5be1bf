//! The GEMV kernels' shift-free code -> FP16 conversion (kernels/delta_unpack.cuh
//! for the 128-column octets, kernels/gemv_wide_geometry.cuh for the wide
//! pairs), built as host C++ by build.rs:
//!
//! - exhaustive over bits, octet/pair position and both codes of a pair (with
//!   the other codes of the word as garbage around them): the masked word read
//!   as FP16 is exactly 1024 + 2^p·code with the code inside the mantissa, and
//!   the unbias fma (f32 fma, one rounding to f16, via the `half` crate) gives
//!   the code exactly, +0.0 for a zero code;
//! - random words, scales and offsets (any bit pattern): every dequantized
//!   weight is bit-identical to the conversion the kernels used before
//!   (shift, lop3, hsub2 1024, hfma2), kept in the shim as `legacy`.
//!
//! What this cannot check: the device's own fma.rn.f16x2 (its result is exact
//! here, so any correctly rounded fma gives it) and the compiler.

use half::f16;
// Links the crate, and with it the static host shim its build script makes.
use meswitch_ptx as _;
use meswitch_reference::layout::{pack_row, Bits};
use proptest::prelude::*;

extern "C" {
    fn meswitch_host_octet_spread(lane_words: *const u32, q: u32, bits: u32) -> u32;
    fn meswitch_host_octet_pair(spread: u32, j: u32, bits: u32, out: *mut u32);
    fn meswitch_host_wide_pair(words: *const u32, p: u32, bits: u32, out: *mut u32);
    fn meswitch_host_octet_dequant(
        lane_words: *const u32,
        q: u32,
        bits: u32,
        scale: u16,
        offset: u16,
        use_legacy: i32,
        out: *mut u32,
    );
    fn meswitch_host_wide_dequant(
        words: *const u32,
        bits: u32,
        scale: u16,
        offset: u16,
        use_legacy: i32,
        out: *mut u32,
    );
}

/// FP16 mantissa width: a code at bit p is exact while p + bits <= 10.
const FP16_MANTISSA_BITS: u32 = 10;
/// The magic number whose zero mantissa the codes are OR-ed into.
const MAGIC: f32 = 1024.0;
/// Columns of one lane of a 128-column item, = one wide sub-block.
const LANE_COLUMNS: usize = 32;
const OCTETS: u32 = 4;
const PAIRS_PER_OCTET: u32 = 4;
const WIDE_PAIRS: u32 = 16;

/// Garbage around the pair under test: none, every bit set, and a pattern
/// that differs from column to column.
fn backgrounds(bits: Bits) -> [Box<dyn Fn(usize) -> u8>; 3] {
    let max = bits.max_code() as u8;
    [
        Box::new(|_| 0),
        Box::new(move |_| max),
        Box::new(move |c| ((c * 7 + 3) as u8) & max),
    ]
}

fn lane_words(codes: &[u8], bits: Bits) -> Vec<u32> {
    let mut words = vec![0u32; bits.count() as usize];
    pack_row(codes, bits, &mut words);
    words
}

/// Checks one converted pair: `out` = [magic half2, p, unbias mul, unbias add].
fn check_pair(what: &str, out: [u32; 4], bits: Bits, codes: [u32; 2]) {
    let [magic, p, mul, add] = out;
    assert!(
        p + bits.count() <= FP16_MANTISSA_BITS,
        "{what}: code at bit {p} leaves the mantissa"
    );
    // The constants, from their definition rather than the shim's table.
    let scale = 2f32.powi(-(p as i32));
    let want_mul = f16::from_f32(scale).to_bits() as u32;
    let want_add = f16::from_f32(-MAGIC * scale).to_bits() as u32;
    assert_eq!(mul, want_mul * 0x1_0001, "{what}: multiplier");
    assert_eq!(add, want_add * 0x1_0001, "{what}: addend");
    for (half, code) in codes.into_iter().enumerate() {
        let field = |v: u32| f16::from_bits((v >> (16 * half)) as u16);
        let value = field(magic).to_f32();
        assert_eq!(
            value,
            MAGIC + (1u32 << p) as f32 * code as f32,
            "{what}: half {half} magic"
        );
        let q = f16::from_f32(value.mul_add(field(mul).to_f32(), field(add).to_f32()));
        assert_eq!(
            q.to_bits(),
            f16::from_f32(code as f32).to_bits(),
            "{what}: half {half} unbias"
        );
    }
}

/// Every bits, octet q, pair j and pair of codes (c_j, c_{j+4}), each with
/// three different garbage backgrounds.
#[test]
fn octet_pairs_are_exact_for_every_code() {
    for bits in Bits::ALL {
        for q in 0..OCTETS {
            for j in 0..PAIRS_PER_OCTET {
                for (b, background) in backgrounds(bits).iter().enumerate() {
                    for c_lo in 0..=bits.max_code() {
                        for c_hi in 0..=bits.max_code() {
                            let mut codes: Vec<u8> = (0..LANE_COLUMNS).map(background).collect();
                            let col = (8 * q + j) as usize;
                            codes[col] = c_lo as u8;
                            codes[col + 4] = c_hi as u8;
                            let words = lane_words(&codes, bits);
                            let mut out = [0u32; 4];
                            unsafe {
                                let v = meswitch_host_octet_spread(words.as_ptr(), q, bits.count());
                                meswitch_host_octet_pair(v, j, bits.count(), out.as_mut_ptr());
                            }
                            let what = format!("{bits:?} octet {q} pair {j} background {b}");
                            check_pair(&what, out, bits, [c_lo, c_hi]);
                        }
                    }
                }
            }
        }
    }
}

/// Every bits, wide pair p = (column c, column c + 16/bits) of a sub-block
/// and pair of codes, with the same backgrounds.
#[test]
fn wide_pairs_are_exact_for_every_code() {
    for bits in Bits::ALL {
        let distance = 16 / bits.count();
        for p in 0..WIDE_PAIRS {
            let col = ((p / distance) * 2 * distance + p % distance) as usize;
            for (b, background) in backgrounds(bits).iter().enumerate() {
                for c_lo in 0..=bits.max_code() {
                    for c_hi in 0..=bits.max_code() {
                        let mut codes: Vec<u8> = (0..LANE_COLUMNS).map(background).collect();
                        codes[col] = c_lo as u8;
                        codes[col + distance as usize] = c_hi as u8;
                        let words = lane_words(&codes, bits);
                        let mut out = [0u32; 4];
                        unsafe {
                            meswitch_host_wide_pair(
                                words.as_ptr(),
                                p,
                                bits.count(),
                                out.as_mut_ptr(),
                            )
                        };
                        let what = format!("{bits:?} wide pair {p} background {b}");
                        check_pair(&what, out, bits, [c_lo, c_hi]);
                    }
                }
            }
        }
    }
}

fn bits_strategy() -> impl Strategy<Value = Bits> {
    prop::sample::select(Bits::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// A whole octet dequantized (4 half2 = 8 weights) is bit-identical to
    /// the previous conversion, for any scale and offset bits (NaN, inf,
    /// subnormal, negative zero included).
    #[test]
    fn octet_dequant_bit_identical_to_legacy(bits in bits_strategy(), words in prop::array::uniform4(any::<u32>()),
                                             q in 0..OCTETS, scale in any::<u16>(), offset in any::<u16>()) {
        let (mut new, mut old) = ([0u32; 4], [0u32; 4]);
        unsafe {
            meswitch_host_octet_dequant(words.as_ptr(), q, bits.count(), scale, offset, 0, new.as_mut_ptr());
            meswitch_host_octet_dequant(words.as_ptr(), q, bits.count(), scale, offset, 1, old.as_mut_ptr());
        }
        prop_assert_eq!(new, old);
    }

    /// A whole wide sub-block (16 half2 = 32 weights), likewise.
    #[test]
    fn wide_dequant_bit_identical_to_legacy(bits in bits_strategy(), words in prop::array::uniform4(any::<u32>()),
                                            scale in any::<u16>(), offset in any::<u16>()) {
        let (mut new, mut old) = ([0u32; 16], [0u32; 16]);
        unsafe {
            meswitch_host_wide_dequant(words.as_ptr(), bits.count(), scale, offset, 0, new.as_mut_ptr());
            meswitch_host_wide_dequant(words.as_ptr(), bits.count(), scale, offset, 1, old.as_mut_ptr());
        }
        prop_assert_eq!(new, old);
    }
}
