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

// The 8·bits-bit field holding the codes of octet q of a lane, from the
// lane's `bits` words (lane columns start on a word boundary because
// 32 columns x bits = bits words):
//
//   bits = 4: words w0..w3, octet q = all of word q
//   bits = 2: words w0..w1, octet q = 16-bit half (q % 2) of word q / 2
//   bits = 1: word  w0,     octet q = byte q of w0
MESWITCH_HD uint32_t meswitch_octet_field(const uint32_t* lane_words, uint32_t q, uint32_t bits) {
    uint32_t octets_per_word = MESWITCH_WORD_BITS / (8u * bits);  // 1, 2, 4
    uint32_t word = lane_words[q / octets_per_word];
    uint32_t shift = (q % octets_per_word) * 8u * bits;
    return bits == 4u ? word : (word >> shift) & ((1u << (8u * bits)) - 1u);
}

// ---- low-bit code -> FP16 via the exponent trick ------------------------------
//
// FP16 0x6400 is 1024.0 with a 10-bit mantissa of zero; OR-ing an integer
// q < 1024 into the mantissa gives exactly 1024 + q. So two codes at bits 0
// and 16 of a word become the half2 (1024 + qa, 1024 + qb) with one
// AND-then-OR (lop3) and no integer->float conversion; subtracting 1024 is
// exact.
#define MESWITCH_FP16_1024_X2 0x64006400u
// lop3 truth table for (a & b) | c, from the operand constants
// a = 0xF0, b = 0xCC, c = 0xAA: (0xF0 & 0xCC) | 0xAA = 0xEA.
#define MESWITCH_LOP3_AND_OR 0xEA

MESWITCH_HD uint32_t meswitch_and_or(uint32_t a, uint32_t b, uint32_t c) {
#ifdef __CUDA_ARCH__
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(MESWITCH_LOP3_AND_OR));
    return d;
#else
    return (a & b) | c;
#endif
}

// Octet field f (8 codes c0..c7, code j at bits j·bits) -> 4 half2 bit
// patterns out[j] = (lo: 1024 + c_j, hi: 1024 + c_{j+4}), j = 0..3.
//
// First c4 is moved to bit 16: v = f | f << (16 − 4·bits) (for 4-bit the
// word already has c4 at bit 16). Then pair j is (v >> j·bits) masked to
// `bits` bits at positions 0 and 16. The masked-out bits are garbage from
// the other copy of f, never read:
//
//   bits = 2, f = c7..c0 in bits 15..0:
//     v bits 31..16 = f bits 15..0 shifted by 8 -> c4 at 17..16, c5 at 19..18
//     v bits 15..0  = f                        -> c0 at  1..0,  c1 at  3..2
MESWITCH_HD void meswitch_octet_to_half2x4(uint32_t field, uint32_t bits, uint32_t out[4]) {
    uint32_t v = bits == 4u ? field : field | (field << (16u - 4u * bits));
    uint32_t mask = ((1u << bits) - 1u) * 0x00010001u;
    for (uint32_t j = 0; j < 4u; ++j) {
        out[j] = meswitch_and_or(v >> (j * bits), mask, MESWITCH_FP16_1024_X2);
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

// Selectors picking half-words: low halves of a and b, high halves of a and b.
#define MESWITCH_PRMT_LO_LO 0x5410u
#define MESWITCH_PRMT_HI_HI 0x7632u

// Re-pairs an octet of x (X01, X23, X45, X67: halves x0..x7 as 4 u32) to
// match meswitch_octet_to_half2x4: out[j] = (x_j, x_{j+4}).
MESWITCH_HD void meswitch_pair_x_octet(const uint32_t x[4], uint32_t out[4]) {
    out[0] = meswitch_prmt(x[0], x[2], MESWITCH_PRMT_LO_LO);  // (x0, x4)
    out[1] = meswitch_prmt(x[0], x[2], MESWITCH_PRMT_HI_HI);  // (x1, x5)
    out[2] = meswitch_prmt(x[1], x[3], MESWITCH_PRMT_LO_LO);  // (x2, x6)
    out[3] = meswitch_prmt(x[1], x[3], MESWITCH_PRMT_HI_HI);  // (x3, x7)
}

#endif  // MESWITCH_DELTA_UNPACK_CUH
