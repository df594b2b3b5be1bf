// gemv_wide.cuh: the delta items of the wide GEMV variant (entry points
// meswitch_{multi_expert,delta}_gemv_wide_b*_g*_t*). Everything else of the
// kernel (expert scan, base pass, salient items, epilogue) is gemv_core.cuh's,
// which includes this file after its helpers and calls
// meswitch_wide_delta_items in place of its own delta loop.
//
// STATUS: compiled and ptxas-checked only, UNVERIFIED ON A GPU. The host
// emulation (ptx/host/unpack_host.cpp, meswitch_host_gemv_variant with
// wide = 1) runs its geometry, pairing and item walk against the reference;
// tests/gpu_kernels.rs runs the kernel against the reference on a device.
//
// Why a second variant. Measured on an H100 (docs/perf.md), the 128-column
// items of gemv_core.cuh cost about the same time at INT1, INT2 and INT4 with
// 16 experts: the work per item (index math with a division, four scalar
// scale/offset loads, loop control) dominates, not the bytes. Here an item is
// 16 bytes of codes per lane and row for every bit width (the geometry is
// drawn in gemv_wide_geometry.cuh):
//
//   - INT2 items are 256 columns, INT1 items 512: the per-item overhead is
//     paid 2x / 4x less often per byte, and the codes come in one 16-byte
//     load per row (8 / 4 bytes before);
//   - scales and offsets: one load per row and array per item, 2, 4 or 8
//     bytes holding all the groups of the lane's columns (4 scalar loads per
//     128 columns before), so the lane's groups are staged in its registers;
//   - the (expert, item) pair of each item is advanced by subtraction from
//     the previous one, with no integer division per item;
//   - codes become half2 pairs straight from their word (columns c and
//     c + 16/bits), without first extracting 8-code octets.
//
// Each weight is still formed as gemv_core.cuh forms it (1024 + 2^p·code by
// lop3, the exact unbias fma, one FP16 fma with scale and offset), so both variants
// round every weight the same way; only the order of the f32 sums differs.
#ifndef MESWITCH_GEMV_WIDE_CUH
#define MESWITCH_GEMV_WIDE_CUH

#include "gemv_wide_geometry.cuh"

// Wide items in flight per warp: as many code bytes in flight as the
// 128-column items of gemv_core.cuh have (a wide item holds 4/bits of
// those), at least one. More spill: a wide item's registers (8 code words,
// up to 8 scale/offset words) are those of an INT4 item, whatever the bits.
#define MESWITCH_WIDE_ITEMS_IN_FLIGHT(tiles, bits) \
    (MESWITCH_DELTA_ITEMS_IN_FLIGHT(tiles, bits) * (bits) / 4u > 1u ? MESWITCH_DELTA_ITEMS_IN_FLIGHT(tiles, bits) * (bits) / 4u : 1u)

// The lane's G (1, 2 or 4) scale or offset halves of one row, from its first
// group on: one 2-, 4- or 8-byte load (aligned, see the geometry).
template <uint32_t G>
__device__ __forceinline__ uint2 meswitch_wide_load_params(const __half* p) {
    uint2 v = make_uint2(0u, 0u);
    if (G == 4u) {
        v = __ldg(reinterpret_cast<const uint2*>(p));
    } else if (G == 2u) {
        v.x = __ldg(reinterpret_cast<const unsigned int*>(p));
    } else {
        v.x = __ldg(reinterpret_cast<const unsigned short*>(p));
    }
    return v;
}

__device__ __forceinline__ __half2 meswitch_wide_param(uint2 v, uint32_t j) {
    return __half2half2(__ushort_as_half((unsigned short)meswitch_wide_param_bits(v.x, v.y, j)));
}

// One 32-column sub-block of a lane (its `BITS` words, rows g and g+8) as 16
// half2 pairs straight from the words (gemv_wide_geometry.cuh), against every
// n-tile that has a row of this expert.
template <int BITS, uint32_t TILES>
__device__ __forceinline__ void meswitch_wide_subblock(float (&acc)[TILES][4], const uint32_t* w_lo,
                                                       const uint32_t* w_hi, __half2 s_lo, __half2 o_lo,
                                                       __half2 s_hi, __half2 o_hi, const __half* x,
                                                       unsigned long long rows, uint32_t col,
                                                       uint32_t in, uint32_t n_tiles,
                                                       uint32_t g) {
    uint32_t a_lo[MESWITCH_WIDE_PAIRS], a_hi[MESWITCH_WIDE_PAIRS];
#pragma unroll
    for (uint32_t p = 0; p < MESWITCH_WIDE_PAIRS; ++p) {
        const uint32_t mul = meswitch_wide_unbias_mul(p, BITS), add = meswitch_wide_unbias_add(p, BITS);
        a_lo[p] = meswitch_dequant_pair(meswitch_wide_pair_code(w_lo, p, BITS), mul, add, s_lo, o_lo);
        a_hi[p] = meswitch_dequant_pair(meswitch_wide_pair_code(w_hi, p, BITS), mul, add, s_hi, o_hi);
    }
#pragma unroll
    for (uint32_t nt = 0; nt < TILES; ++nt) {
        // Warp-uniform: skip n-tiles with no row of this expert.
        if (nt < n_tiles && ((rows >> (nt * MESWITCH_GEMV_BATCH_TILE)) & 0xFFull) != 0ull) {
            uint4 xv[MESWITCH_OCTETS_PER_LANE];
            meswitch_load_x_octets(x, rows >> g, nt, g, in, col, xv);
            uint32_t xw[4u * MESWITCH_OCTETS_PER_LANE];
#pragma unroll
            for (uint32_t q = 0; q < MESWITCH_OCTETS_PER_LANE; ++q) {
                xw[4u * q] = xv[q].x; xw[4u * q + 1u] = xv[q].y; xw[4u * q + 2u] = xv[q].z; xw[4u * q + 3u] = xv[q].w;
            }
#pragma unroll
            for (uint32_t m = 0; m < MESWITCH_WIDE_PAIRS / 2u; ++m) {
                meswitch_mma_16816(acc[nt], a_lo[2u * m], a_hi[2u * m], a_lo[2u * m + 1u], a_hi[2u * m + 1u],
                                   meswitch_wide_pair_x(xw, 2u * m, BITS), meswitch_wide_pair_x(xw, 2u * m + 1u, BITS));
            }
        }
    }
}

// The (active expert i, wide item c) pairs, item k = i·n_per + c, dealt to
// the warps round-robin (warp w: k = w, w + WARPS, ...), ITEMS_IN_FLIGHT at
// a time: all their loads, then all their mma. Adds into acc like the delta
// loop of gemv_core.cuh. Requires in % meswitch_wide_item_cols(BITS) == 0.
template <int BITS, uint32_t GROUP, uint32_t TILES>
__device__ __forceinline__ void meswitch_wide_delta_items(float (&acc)[TILES][4],
                                                          const MeswitchExpertDelta* s_delta,
                                                          const unsigned long long* s_rows,
                                                          uint32_t n_active, uint32_t warp, uint32_t g,
                                                          uint32_t t, uint32_t r_lo, uint32_t r_hi,
                                                          uint32_t n_tiles, uint32_t in,
                                                          const __half* x) {
    constexpr uint32_t IN_FLIGHT = MESWITCH_WIDE_ITEMS_IN_FLIGHT(TILES, BITS);
    constexpr uint32_t ITEM = meswitch_wide_item_cols(BITS);
    constexpr uint32_t G = meswitch_wide_lane_groups(BITS, GROUP);
    constexpr uint32_t SUBS = meswitch_wide_subblocks(BITS);
    // Unrolled, the compiler overlaps the sub-blocks' A fragments (32
    // registers each), which spills next to the 16 or 32 accumulators of 4 or
    // 8 n-tiles; there the loop stays rolled, and INT1's four sub-blocks at 2
    // n-tiles are unrolled by two (fully, one INT1 variant spilled).
    constexpr uint32_t SUB_UNROLL = TILES >= 4u ? 1u : (BITS == 1 && TILES == 2u ? 2u : SUBS);
    const uint32_t n_per = in / ITEM;  // items per expert, >= 1
    const uint32_t words_per_row = in * BITS / MESWITCH_WORD_BITS;
    const uint32_t n_groups = GROUP == MESWITCH_GROUP_ROW ? 1u : in / GROUP;

    // (i, c) of the warp's next item; k = i·n_per + c advances by WARPS per
    // item, carried by subtraction (at most WARPS / n_per steps, warp-uniform).
    // No items when in == 0 (outside the launch contract): no endless carry.
    uint32_t next_i = n_per > 0u ? 0u : n_active, next_c = 0;
    if (n_per > 0u) meswitch_item_advance(next_i, next_c, warp, n_per);

    while (next_i < n_active) {
        uint32_t it_i[IN_FLIGHT], it_c[IN_FLIGHT];
#pragma unroll
        for (uint32_t u = 0; u < IN_FLIGHT; ++u) {
            it_i[u] = next_i;
            it_c[u] = next_c;
            meswitch_item_advance(next_i, next_c, MESWITCH_GEMV_WARPS, n_per);
        }
        uint4 w_lo[IN_FLIGHT], w_hi[IN_FLIGHT];
        uint2 sc_lo[IN_FLIGHT], sc_hi[IN_FLIGHT], of_lo[IN_FLIGHT], of_hi[IN_FLIGHT];
#pragma unroll
        for (uint32_t u = 0; u < IN_FLIGHT; ++u) {
            // Past the end: load the last item (valid memory), never used.
            const bool live = it_i[u] < n_active;
            const uint32_t i = live ? it_i[u] : n_active - 1u, c = live ? it_c[u] : n_per - 1u;
            const MeswitchExpertDelta& d = s_delta[i];
            const uint32_t* codes = reinterpret_cast<const uint32_t*>(d.codes);
            const uint32_t word = meswitch_wide_lane_word(c, t);
            w_lo[u] = meswitch_ld16_stream(codes + (size_t)r_lo * words_per_row + word);
            w_hi[u] = meswitch_ld16_stream(codes + (size_t)r_hi * words_per_row + word);
            const uint32_t grp = meswitch_wide_lane_group0(c, t, BITS, GROUP);
            const __half* scales = reinterpret_cast<const __half*>(d.scales);
            const __half* offsets = reinterpret_cast<const __half*>(d.offsets);
            sc_lo[u] = meswitch_wide_load_params<G>(scales + (size_t)r_lo * n_groups + grp);
            sc_hi[u] = meswitch_wide_load_params<G>(scales + (size_t)r_hi * n_groups + grp);
            of_lo[u] = meswitch_wide_load_params<G>(offsets + (size_t)r_lo * n_groups + grp);
            of_hi[u] = meswitch_wide_load_params<G>(offsets + (size_t)r_hi * n_groups + grp);
        }
#pragma unroll
        for (uint32_t u = 0; u < IN_FLIGHT; ++u) {
            if (it_i[u] >= n_active) break;  // warp-uniform
            const unsigned long long rows = s_rows[it_i[u]];
            const uint32_t col0 = meswitch_wide_lane_col0(it_c[u], t, BITS);
            uint32_t lo[4] = {w_lo[u].x, w_lo[u].y, w_lo[u].z, w_lo[u].w};
            uint32_t hi[4] = {w_hi[u].x, w_hi[u].y, w_hi[u].z, w_hi[u].w};
            // Sub-block s reads words 0 .. BITS-1, then the words shift down
            // by BITS (register moves; no dynamic register index when the loop
            // stays rolled).
#pragma unroll(SUB_UNROLL)
            for (uint32_t s = 0; s < SUBS; ++s) {
                const uint32_t j = meswitch_wide_local_group(s, BITS, GROUP);
                meswitch_wide_subblock<BITS, TILES>(
                    acc, lo, hi, meswitch_wide_param(sc_lo[u], j), meswitch_wide_param(of_lo[u], j),
                    meswitch_wide_param(sc_hi[u], j), meswitch_wide_param(of_hi[u], j), x, rows,
                    col0 + s * MESWITCH_WIDE_SUBBLOCK_COLS, in, n_tiles, g);
#pragma unroll
                for (uint32_t k = 0; k + BITS < 4u; ++k) {
                    lo[k] = lo[k + BITS];
                    hi[k] = hi[k + BITS];
                }
            }
        }
    }
}

#endif  // MESWITCH_GEMV_WIDE_CUH
