// delta_unpack.cuh: index math and code unpacking shared by every kernel and
// by the host C++ test shim (ptx/host/unpack_host.cpp).
//
// Every function is __host__ __device__. When __CUDACC__ is not defined the
// file compiles as plain C++ (the qualifiers expand to nothing), so the host
// tests exercise the same arithmetic the kernels run. Each inline-PTX fast
// path has a portable twin right next to it, and the twin is what the host
// tests check; the fast path is a one-instruction spelling of the same
// integer expression.
#ifndef MESWITCH_DELTA_UNPACK_CUH
#define MESWITCH_DELTA_UNPACK_CUH

#include "meswitch_abi.h"

#ifdef __CUDACC__
#define MESWITCH_HD __host__ __device__ __forceinline__
#else
#define MESWITCH_HD inline
#endif

// ---- packed layout index math (mirror of layout.rs) -------------------------

// Codes per 32-bit word: 8 (4-bit), 16 (2-bit), 32 (1-bit).
MESWITCH_HD uint32_t meswitch_codes_per_word(uint32_t bits) { return MESWITCH_WORD_BITS / bits; }

MESWITCH_HD uint32_t meswitch_words_per_row(uint32_t in_features, uint32_t bits) {
    uint32_t per_word = meswitch_codes_per_word(bits);
    return (in_features + per_word - 1) / per_word;
}

MESWITCH_HD uint32_t meswitch_n_groups(uint32_t in_features, uint32_t group_size) {
    return (in_features + group_size - 1) / group_size;
}

// Code of column `col` in one row's words (layout.rs: unpack_code).
MESWITCH_HD uint32_t meswitch_unpack_code(const uint32_t* row_words, uint32_t col, uint32_t bits) {
    uint32_t per_word = meswitch_codes_per_word(bits);
    uint32_t shift = (col % per_word) * bits;
    uint32_t mask = (1u << bits) - 1u;
    return (row_words[col / per_word] >> shift) & mask;
}

// offset + scale·q exactly as the reference computes it: a rounded f32
// multiply, then a rounded f32 add (no FMA), so that the dequantize kernel is
// bit-identical to meswitch_reference. The host shim is built with
// -ffp-contract=off for the same reason.
MESWITCH_HD float meswitch_dequant_f32(float scale, float offset, uint32_t q) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(offset, __fmul_rn(scale, (float)q));
#else
    return offset + scale * (float)q;
#endif
}

// ---- GEMV lane geometry -------------------------------------------------------
//
// A warp consumes MESWITCH_GEMV_K_CHUNK = 128 input columns per step. Lane
// l = 4·g + t (g = l/4 in 0..8, t = l%4 in 0..4) owns output rows g and g+8 of
// the block's 16-row tile, and the 32 columns [chunk·128 + 32t, +32) of them.
// It walks those in 4 "octets" of 8 contiguous columns:
//
//   chunk columns   0 ..  31 | 32 ..  63 | 64 ..  95 | 96 .. 127
//   lane t          0        | 1         | 2         | 3
//   octet q (each)  0:+0..7  1:+8..15  2:+16..23  3:+24..31
//
// Each octet is 8·bits bits of codes (and one 16-byte load of x), and feeds
// TWO mma.m16n8k16 steps (k = 16 each, 4 lanes x 4 k). The base, which has
// no codes to keep whole, uses octet q = columns 32q + 8t .. +7 instead, so
// that the 4 lanes of a row read 64 contiguous bytes per load (gemv_core.cuh).
// The order of the k (input) index inside an mma does not change a dot
// product, so the kernel may assign physical columns to mma k slots in any
// way, as long as A and B use the same assignment. The fragment layout of
// m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16", f16) gives lane
// (g, t) the k slots {2t, 2t+1} in A regs 0/1 and B reg 0, and {2t+8, 2t+9}
// in A regs 2/3 and B reg 1. So the k slots a lane holds depend only on t,
// and any mapping from those 4 slots to 4 of the lane's own columns is the
// same for A and B. The kernels use:
//
//   base mma (octet halves h0..h7 as 4 half2 H01 H23 H45 H67):
//     step 2q:   A = {row g: H01, row g+8: H01, row g: H23, row g+8: H23}, B = {X01, X23}
//     step 2q+1: A = {..H45.., ..H67..},                                     B = {X45, X67}
//   expert mma (the magic-number conversion pairs columns j and j+4):
//     step 2q:   A pairs (c0,c4) (c1,c5),  B = {(x0,x4), (x1,x5)}
//     step 2q+1: A pairs (c2,c6) (c3,c7),  B = {(x2,x6), (x3,x7)}
//   where (xj, xj+4) is built from X01/X23/X45/X67 with one prmt each.

// Group index of lane t's 32 columns in chunk `chunk`. A lane's 32 columns
// never straddle a group: groups are 32, 64, 128 or the whole row, and the
// 32 columns start at a multiple of 32.
MESWITCH_HD uint32_t meswitch_lane_group(uint32_t chunk, uint32_t t, uint32_t group_size) {
    uint32_t col0 = chunk * MESWITCH_GEMV_K_CHUNK + 32u * t;
    return group_size == MESWITCH_GROUP_ROW ? 0u : col0 / group_size;
}

// The delta items of a GEMV are the (active expert i, item c) pairs, item
// k = i·n_per + c, and warp w takes k = w, w + WARPS, ...; (i, c) is carried
// from one item to the next by subtraction instead of k / n_per and
// k % n_per (a division by a run-time value, several IMAD.HI each):
// advances (i, c) by `step` items, at most step / n_per + 1 iterations,
// warp-uniform.
MESWITCH_HD void meswitch_item_advance(uint32_t& i, uint32_t& c, uint32_t step, uint32_t n_per) {
    c += step;
    while (c >= n_per) {
        c -= n_per;
        ++i;
    }
}

// prmt.b32 in its default mode: byte i of the result is byte sel_i of the
// 8-byte value {b, a} (a = bytes 0..3), sel_i = nibble i of `sel` (low 3 bits;
// the sign-replicate bit is never used here).
MESWITCH_HD uint32_t meswitch_prmt(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef __CUDA_ARCH__
    return __byte_perm(a, b, sel);
#else
    uint64_t ab = ((uint64_t)b << 32) | a;
    uint32_t d = 0;
    for (uint32_t i = 0; i < 4u; ++i) {
        uint32_t s = (sel >> (4u * i)) & 7u;
        d |= (uint32_t)((ab >> (8u * s)) & 0xFFu) << (8u * i);
    }
    return d;
#endif
}

// ---- low-bit code -> FP16 via the exponent trick, without shifts ------------
//
// FP16 0x6400 is 1024.0 = 2^10 with a 10-bit mantissa of zero, so mantissa
// bit p weighs 2^p. OR-ing a code q of `bits` bits into the mantissa at bit
// p gives exactly 1024 + 2^p·q while p + bits <= 10 (the code stays inside
// the mantissa). One AND-then-OR (lop3) does that for both halves of a
// half2 at once, with the code masked IN PLACE: no shift down to bit 0 first.
// Then one exact FP16 fma removes the bias and the scale 2^p:
//
//   (1024 + 2^p·q)·2^-p + (-1024·2^-p) = q
//
// Exact: 2^-p and -2^(10-p) are powers of two (FP16 patterns below), the
// product is exact, and the sum q is an integer < 16, representable; so the
// one rounding of fma.rn changes nothing and q is +0.0 for a zero code,
// exactly what `hsub2(1024 + q, 1024)` gave before. The dequantization fma
// hfma2(q, scale, offset) therefore sees the same operands, bit for bit.
// Per pair: lop3 + hfma2 (unbias) + hfma2 (dequant), no SHF.
#define MESWITCH_FP16_1024_X2 0x64006400u
// lop3 truth table for (a & b) | c, from the operand constants
// a = 0xF0, b = 0xCC, c = 0xAA: (0xF0 & 0xCC) | 0xAA = 0xEA.
#define MESWITCH_LOP3_AND_OR 0xEA
// FP16 fields: 2^e is the pattern (e + 15) << 10 for -14 <= e <= 15.
#define MESWITCH_FP16_EXP_BIAS 15
#define MESWITCH_FP16_MANTISSA_BITS 10u
#define MESWITCH_FP16_SIGN 0x8000u
// Bits of the magic number 1024.0 = 2^10 (its exponent, not a mantissa field).
#define MESWITCH_MAGIC_LOG2 10
// Codes only ever sit at mantissa bits 0..7: a shifted pair starts at bit 0
// of the byte it moved into, so every position is below one byte.
#define MESWITCH_BYTE_BITS 8u

MESWITCH_HD uint32_t meswitch_and_or(uint32_t a, uint32_t b, uint32_t c) {
#ifdef __CUDA_ARCH__
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(MESWITCH_LOP3_AND_OR));
    return d;
#else
    return (a & b) | c;
#endif
}

// FP16 bit pattern of 2^e (normal range only, which is all this file uses).
MESWITCH_HD constexpr uint32_t meswitch_fp16_pow2(int e) {
    return (uint32_t)(e + MESWITCH_FP16_EXP_BIAS) << MESWITCH_FP16_MANTISSA_BITS;
}

// The unbias fma's constants for a code at mantissa bit p, as FP16 patterns:
//
//   p   multiplier 2^-p   addend -2^(10-p)
//   0   0x3C00 (1)        0xE400 (-1024)
//   1   0x3800 (1/2)      0xE000 (-512)
//   2   0x3400 (1/4)      0xDC00 (-256)
//   4   0x2C00 (1/16)     0xD400 (-64)
//   6   0x2400 (1/64)     0xCC00 (-16)
//   7   0x2000 (1/128)    0xC800 (-8)
MESWITCH_HD constexpr uint32_t meswitch_unbias_mul(uint32_t p) { return meswitch_fp16_pow2(-(int)p); }
MESWITCH_HD constexpr uint32_t meswitch_unbias_add(uint32_t p) {
    return MESWITCH_FP16_SIGN | meswitch_fp16_pow2(MESWITCH_MAGIC_LOG2 - (int)p);
}
static_assert(meswitch_unbias_mul(0) == 0x3C00u && meswitch_unbias_add(0) == 0xE400u, "1, -1024");
static_assert(meswitch_unbias_mul(6) == 0x2400u && meswitch_unbias_add(6) == 0xCC00u, "1/64, -16");

// The same constant in both halves of a half2 (both codes of a pair sit at
// the same p, so the compiler can keep two p's in one register and pick a
// half with .H0_H0 / .H1_H1).
MESWITCH_HD constexpr uint32_t meswitch_unbias_mul2(uint32_t p) { return meswitch_unbias_mul(p) * 0x00010001u; }
MESWITCH_HD constexpr uint32_t meswitch_unbias_add2(uint32_t p) { return meswitch_unbias_add(p) * 0x00010001u; }

// (1024 + 2^p·c_lo, 1024 + 2^p·c_hi) as half2 bits, from a word v that holds
// c_lo at bit shift + p and c_hi at bit 16 + shift + p. shift is 0 or 8 (one
// SHF per word, shared by all its pairs that need it).
MESWITCH_HD uint32_t meswitch_pair_magic(uint32_t v, uint32_t shift, uint32_t p, uint32_t bits) {
    const uint32_t code_mask = ((1u << bits) - 1u) * 0x00010001u;
    return meswitch_and_or(v >> shift, code_mask << p, MESWITCH_FP16_1024_X2);
}

// ---- octets of the 128-column kernel -----------------------------------------
//
// Octet q of a lane = its columns 8q .. 8q+7, codes c0..c7 (code j at bit
// j·bits of the octet's 8·bits-bit field). The lane's `bits` words hold
// (lane columns start on a word boundary: 32 columns x bits = bits words):
//
//   bits = 4: words w0..w3, octet q = all of word q
//   bits = 2: words w0..w1, octet q = bytes 2(q%2), 2(q%2)+1 of word q/2
//   bits = 1: word  w0,     octet q = byte q of w0
//
// The mma pairs columns j and j+4 (gemv_core.cuh), so pair j = (c_j, c_{j+4})
// must come to the low and high half of one word. One prmt ("spread") per
// octet places the octet so that every pair is masked in place:
//
//   bits = 4: v = word q (no op): c_j at 4j, c_{j+4} at 16 + 4j
//             j = 0, 1: p = 0, 4 in v;  j = 2, 3: p = 0, 4 in v >> 8
//             (at 8 and 12, 8 + 4 > 10 would leave the mantissa)
//   bits = 2: v = bytes (f0, f1, f1, f1) of the field f:
//             low half  f0 f1 = c0..c7, c_j at 2j       (p = 0, 2, 4, 6)
//             high half f1 f1,  c_{j+4} at 16 + 2j      (p = 0, 2, 4, 6)
//   bits = 1: v = f + (f << 12) with f = byte q alone (prmt, then one
//             IMAD by 0x1001; f < 2^8, so the copies do not overlap and +
//             is |): low half c_j at j, high half c_{j+4} at 12 + 4 + j = 16 + j
//             (p = j). (Byte q in all four bytes, one prmt, would put c_{j+4}
//             at 16 + 4 + j: a different p per half needs four constant
//             registers, and ptxas then re-materializes them: 22 more SASS
//             per item than this IMAD, static count.)
//
// So p = (j·bits) mod 8 and the shift is 8·floor(j·bits / 8) in every case.
// Bits of v outside a pair's mask are the other codes, never read.
#define MESWITCH_INT1_COPY_MUL 0x1001u
// prmt selector nibble 4: byte 0 of the second operand (0), i.e. a zero byte.
#define MESWITCH_PRMT_ZERO_BYTES 0x4440u

MESWITCH_HD uint32_t meswitch_octet_spread(const uint32_t* lane_words, uint32_t q, uint32_t bits) {
    if (bits == 4u) return lane_words[q];
    if (bits == 2u) {
        const uint32_t b0 = 2u * (q % 2u), b1 = b0 + 1u;  // the octet's bytes in word q/2
        return meswitch_prmt(lane_words[q / 2u], 0u, b0 | b1 << 4 | b1 << 8 | b1 << 12);
    }
    return meswitch_prmt(lane_words[0], 0u, MESWITCH_PRMT_ZERO_BYTES | q) * MESWITCH_INT1_COPY_MUL;
}

// Where pair j of a spread octet lies: the shift of v (0 or 8) and the code
// position in both halves after it (table above).
MESWITCH_HD constexpr uint32_t meswitch_octet_pair_shift(uint32_t j, uint32_t bits) {
    return MESWITCH_BYTE_BITS * (j * bits / MESWITCH_BYTE_BITS);
}
MESWITCH_HD constexpr uint32_t meswitch_octet_pair_pos(uint32_t j, uint32_t bits) {
    return j * bits % MESWITCH_BYTE_BITS;
}

// Pair j (0..3) of a spread octet as (1024 + 2^p·c_j, 1024 + 2^p·c_{j+4}).
MESWITCH_HD uint32_t meswitch_octet_pair_magic(uint32_t spread, uint32_t j, uint32_t bits) {
    return meswitch_pair_magic(spread, meswitch_octet_pair_shift(j, bits), meswitch_octet_pair_pos(j, bits), bits);
}
MESWITCH_HD constexpr uint32_t meswitch_octet_unbias_mul(uint32_t j, uint32_t bits) {
    return meswitch_unbias_mul2(meswitch_octet_pair_pos(j, bits));
}
MESWITCH_HD constexpr uint32_t meswitch_octet_unbias_add(uint32_t j, uint32_t bits) {
    return meswitch_unbias_add2(meswitch_octet_pair_pos(j, bits));
}

// Selectors picking half-words: low halves of a and b, high halves of a and b.
#define MESWITCH_PRMT_LO_LO 0x5410u
#define MESWITCH_PRMT_HI_HI 0x7632u

// Re-pairs an octet of x (X01, X23, X45, X67: halves x0..x7 as 4 u32) to
// match meswitch_octet_pair_magic: out[j] = (x_j, x_{j+4}).
MESWITCH_HD void meswitch_pair_x_octet(const uint32_t x[4], uint32_t out[4]) {
    out[0] = meswitch_prmt(x[0], x[2], MESWITCH_PRMT_LO_LO);  // (x0, x4)
    out[1] = meswitch_prmt(x[0], x[2], MESWITCH_PRMT_HI_HI);  // (x1, x5)
    out[2] = meswitch_prmt(x[1], x[3], MESWITCH_PRMT_LO_LO);  // (x2, x6)
    out[3] = meswitch_prmt(x[1], x[3], MESWITCH_PRMT_HI_HI);  // (x3, x7)
}

#endif  // MESWITCH_DELTA_UNPACK_CUH
