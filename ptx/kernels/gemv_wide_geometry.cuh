// gemv_wide_geometry.cuh: lane geometry of the wide GEMV delta items
// (gemv_wide.cuh), as __host__ __device__ integer functions so that the host
// emulation (ptx/host/unpack_host.cpp) runs the very index math the kernel
// runs. Plain C++ without __CUDACC__, like delta_unpack.cuh.
//
// A wide item is 16 bytes of codes per lane and row, whatever the bit width
// (one 16-byte load, where the 128-column items of gemv_core.cuh load 4, 8 or
// 16 bytes). So an item spans 512/bits input columns of one expert:
//
//   bits   lane columns   item columns   32-column sub-blocks per lane
//    4          32            128                  1
//    2          64            256                  2
//    1         128            512                  4
//
// Lane l = 4g + t owns rows g and g+8 of the block's 16-row tile and the
// contiguous columns [item·ITEM + t·LANE, +LANE) of them:
//
//   item columns   0 .. LANE-1 | LANE .. 2LANE-1 | 2LANE .. 3LANE-1 | 3LANE .. 4LANE-1
//   lane t         0           | 1               | 2                | 3
//   code words     16·item + 4t .. +3 of each row (uint4, 16-byte aligned)
//
// Inside a lane, sub-block s = columns 32s .. 32s+31 of its range = words
// s·bits .. s·bits + bits - 1 of its uint4 (the lane words of a 128-column
// item of gemv_core.cuh). Its codes become half2 pairs straight from the
// words (pairs section below), with the same lop3 trick and the same FP16
// dequantization as gemv_core.cuh; only which two columns share a pair differs.
//
// Groups: a sub-block lies in one group (32-aligned, groups are multiples of
// 32). A lane's range covers LANE/group groups when the group is smaller than
// the range (else one), contiguous in the scale/offset row:
//
//   lane groups    G = 1 (row, or group >= LANE), else LANE / group (2 or 4)
//   first group    (item·ITEM + t·LANE) / group   (0 for a whole-row group)
//   loaded as      G halves from scales[r·n_groups + first] (2, 4 or 8 bytes,
//                  naturally aligned: n_groups and first are multiples of G)
//   sub-block s    uses loaded half s·32 / group (0 when G = 1)
//
// The kernel requires in_features % (512/bits) == 0; the host plan sends
// other widths to the 128-column kernel.
#ifndef MESWITCH_GEMV_WIDE_GEOMETRY_CUH
#define MESWITCH_GEMV_WIDE_GEOMETRY_CUH

#include "delta_unpack.cuh"

// constexpr so that the kernel sizes its register arrays from them.
#define MESWITCH_WIDE_HD MESWITCH_HD constexpr

// MESWITCH_WIDE_LANE_CODE_BYTES (one 16-byte load) and
// MESWITCH_WIDE_LANES_PER_ROW (t = 0..3) are in meswitch_abi.h.
// Columns of one sub-block: the 4 octets of a gemv_core.cuh lane.
#define MESWITCH_WIDE_SUBBLOCK_COLS 32u

MESWITCH_WIDE_HD uint32_t meswitch_wide_lane_cols(uint32_t bits) { return MESWITCH_WIDE_LANE_CODE_BYTES * 8u / bits; }

MESWITCH_WIDE_HD uint32_t meswitch_wide_item_cols(uint32_t bits) {
    return MESWITCH_WIDE_LANES_PER_ROW * meswitch_wide_lane_cols(bits);
}

MESWITCH_WIDE_HD uint32_t meswitch_wide_subblocks(uint32_t bits) {
    return meswitch_wide_lane_cols(bits) / MESWITCH_WIDE_SUBBLOCK_COLS;
}

// First column of lane t in item `item`.
MESWITCH_WIDE_HD uint32_t meswitch_wide_lane_col0(uint32_t item, uint32_t t, uint32_t bits) {
    return item * meswitch_wide_item_cols(bits) + t * meswitch_wide_lane_cols(bits);
}

// First code word of lane t in item `item`, within a row: 16 words per item,
// 4 per lane, for every bit width.
MESWITCH_WIDE_HD uint32_t meswitch_wide_lane_word(uint32_t item, uint32_t t) {
    const uint32_t words = MESWITCH_WIDE_LANE_CODE_BYTES / 4u;
    return item * MESWITCH_WIDE_LANES_PER_ROW * words + t * words;
}

// Groups a lane's columns cover (1, 2 or 4).
MESWITCH_WIDE_HD uint32_t meswitch_wide_lane_groups(uint32_t bits, uint32_t group) {
    const uint32_t lane = meswitch_wide_lane_cols(bits);
    return group == MESWITCH_GROUP_ROW || group >= lane ? 1u : lane / group;
}

// Index of the lane's first group in its row.
MESWITCH_WIDE_HD uint32_t meswitch_wide_lane_group0(uint32_t item, uint32_t t, uint32_t bits, uint32_t group) {
    return group == MESWITCH_GROUP_ROW ? 0u : meswitch_wide_lane_col0(item, t, bits) / group;
}

// Which of the lane's loaded groups sub-block s uses.
MESWITCH_WIDE_HD uint32_t meswitch_wide_local_group(uint32_t s, uint32_t bits, uint32_t group) {
    return meswitch_wide_lane_groups(bits, group) == 1u ? 0u : s * MESWITCH_WIDE_SUBBLOCK_COLS / group;
}

// Half j (0..3) of a lane's loaded group values {v0: halves 0, 1; v1: halves 2, 3}.
MESWITCH_WIDE_HD uint32_t meswitch_wide_param_bits(uint32_t v0, uint32_t v1, uint32_t j) {
    const uint32_t word = j < 2u ? v0 : v1;
    return (word >> (16u * (j % 2u))) & 0xFFFFu;
}

// ---- pairs straight from the code words -------------------------------------
//
// A sub-block's 32 columns as 16 half2 pairs, pair p = (column c, column c + D)
// with D = 16/bits, so that both codes sit in ONE word at bits j·bits and
// j·bits + 16 (j = p mod D) and one lop3 masks them in place into
// (1024 + 2^pos·code, 1024 + 2^pos·code) with no octet extraction first
// (delta_unpack.cuh: the code must stay inside the 10-bit mantissa):
//
//   bits  D   word k = p / D covers columns 2D·k .. 2D·k + 2D-1,  c = 2D·k + j
//    4    4   word q = octet q: pairs (c_j, c_j+4), as gemv_core.cuh
//    2    8   pairs (c_j, c_j+8) of the word's 16 columns
//    1   16   pairs (c_j, c_j+16) of the word's 32 columns
//
//   pair at j·bits < 8: masked in the word as it is, pos = j·bits
//   pair at j·bits >= 8: masked in word >> 8 (one SHF per word, shared by
//                        all such pairs), pos = j·bits - 8
//   so pos <= 7 and pos + bits <= 8 for every bits: exact.
//
// mma step m (0..7) takes pairs 2m (k slots 2t, 2t+1) and 2m+1 (2t+8, 2t+9);
// x is re-paired the same way: (x_c, x_c+D), both halves from 4-byte words of
// the sub-block's 4 loaded x octets (16 words, word i = columns 2i, 2i+1).
#define MESWITCH_WIDE_PAIRS 16u

MESWITCH_WIDE_HD uint32_t meswitch_wide_pair_distance(uint32_t bits) { return 16u / bits; }

// First column (within the sub-block) of pair p.
MESWITCH_WIDE_HD uint32_t meswitch_wide_pair_col(uint32_t p, uint32_t bits) {
    const uint32_t d = meswitch_wide_pair_distance(bits);
    return (p / d) * 2u * d + p % d;
}

// Shift of the pair's word (0 or 8) and the codes' mantissa position after it.
MESWITCH_WIDE_HD uint32_t meswitch_wide_pair_shift(uint32_t p, uint32_t bits) {
    return MESWITCH_BYTE_BITS * (p % meswitch_wide_pair_distance(bits) * bits / MESWITCH_BYTE_BITS);
}
MESWITCH_WIDE_HD uint32_t meswitch_wide_pair_pos(uint32_t p, uint32_t bits) {
    return p % meswitch_wide_pair_distance(bits) * bits % MESWITCH_BYTE_BITS;
}

// (1024 + 2^pos·code of column c, 1024 + 2^pos·code of column c + D) as half2
// bits, from the sub-block's `bits` words.
MESWITCH_HD uint32_t meswitch_wide_pair_code(const uint32_t* words, uint32_t p, uint32_t bits) {
    return meswitch_pair_magic(words[p / meswitch_wide_pair_distance(bits)], meswitch_wide_pair_shift(p, bits),
                               meswitch_wide_pair_pos(p, bits), bits);
}
// The unbias fma's constants of pair p (delta_unpack.cuh).
MESWITCH_WIDE_HD uint32_t meswitch_wide_unbias_mul(uint32_t p, uint32_t bits) {
    return meswitch_unbias_mul2(meswitch_wide_pair_pos(p, bits));
}
MESWITCH_WIDE_HD uint32_t meswitch_wide_unbias_add(uint32_t p, uint32_t bits) {
    return meswitch_unbias_add2(meswitch_wide_pair_pos(p, bits));
}

// (x_c, x_c+D) as half2 bits, from the sub-block's 16 x words.
MESWITCH_HD uint32_t meswitch_wide_pair_x(const uint32_t* x_words, uint32_t p, uint32_t bits) {
    const uint32_t c = meswitch_wide_pair_col(p, bits), d = meswitch_wide_pair_distance(bits);
    const uint32_t sel = c % 2u ? MESWITCH_PRMT_HI_HI : MESWITCH_PRMT_LO_LO;
    return meswitch_prmt(x_words[c / 2u], x_words[(c + d) / 2u], sel);
}

// True when the wide kernel accepts this input width (whole items).
MESWITCH_WIDE_HD bool meswitch_wide_supports(uint32_t in_features, uint32_t bits) {
    return in_features > 0u && in_features % meswitch_wide_item_cols(bits) == 0u;
}

#endif  // MESWITCH_GEMV_WIDE_GEOMETRY_CUH
