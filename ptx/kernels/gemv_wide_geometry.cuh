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
// s·bits .. s·bits + bits - 1 of its uint4: exactly the lane words of a
// 128-column item of gemv_core.cuh, so each sub-block runs that kernel's
// octet conversion, x re-pairing and mma unchanged.
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

// Item k = i·n_per + c (expert i, item c of its row) advanced by `step`
// items, carrying by subtraction: no integer division per item (at most
// step / n_per + 1 iterations).
MESWITCH_HD void meswitch_wide_advance(uint32_t& i, uint32_t& c, uint32_t step, uint32_t n_per) {
    c += step;
    while (c >= n_per) {
        c -= n_per;
        ++i;
    }
}

// True when the wide kernel accepts this input width (whole items).
MESWITCH_WIDE_HD bool meswitch_wide_supports(uint32_t in_features, uint32_t bits) {
    return in_features > 0u && in_features % meswitch_wide_item_cols(bits) == 0u;
}

#endif  // MESWITCH_GEMV_WIDE_GEOMETRY_CUH
