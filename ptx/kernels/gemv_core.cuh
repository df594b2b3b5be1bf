// gemv_core.cuh: the batched multi-expert GEMV shared by multi_expert_gemv.cu
// (base + deltas, writes y) and delta_gemv.cu (deltas only, adds into y).
//
//   y[b, r] (=|+=) Σ_c x[b, c]·W_base[r, c]  +  Σ_c x[b, c]·Δ̂_{e(b)}[r, c]
//
// Work split (constants in meswitch_abi.h):
//
//   grid.x = ceil(out / 16)     one block per 16 output rows (mma M = 16)
//   block  = 8 warps            the base's K chunks of 128 input columns go to
//                               warp w = chunk % 8; the deltas' (expert, chunk)
//                               items are dealt round-robin the same way
//                               (intra-block split-K), several items' loads
//                               issued before their first mma
//   batch  <= 8·TILES           TILES (1, 2, 4 or 8: a template parameter)
//                               mma n-tiles of 8 batch rows, all held in
//                               registers: acc[n-tile][4] f32
//
// So W_base is read once per launch whatever the batch, and each active
// expert's codes/scales/offsets once: an expert's mma runs with B = x masked
// to the batch rows that use that expert (n-tiles without such a row are
// skipped). 4096 rows give 256 blocks, about two per SM on a 132-SM H100.
//
// The salient residual columns run as more mma items after the deltas (see
// there). After the K loop each warp parks its 16 x (8·TILES) partial sums in
// shared memory; the block adds the warps in a fixed order (deterministic)
// and rounds to FP16 once.
#ifndef MESWITCH_GEMV_CORE_CUH
#define MESWITCH_GEMV_CORE_CUH

#include <cuda_fp16.h>

#include "delta_unpack.cuh"

#define MESWITCH_OCTETS_PER_LANE 4u

// D = A·B + D for one m16n8k16 tile, FP16 inputs, FP32 accumulators.
// Fragment layout (PTX ISA, f16 m16n8k16), g = lane / 4, t = lane % 4:
//   A (16x16, row-major):  a[0] = (row g,   k 2t..2t+1)   a[1] = (row g+8, k 2t..2t+1)
//                          a[2] = (row g,   k 2t+8..2t+9) a[3] = (row g+8, k 2t+8..2t+9)
//   B (16x8, col-major):   b[0] = (k 2t..2t+1, col g)     b[1] = (k 2t+8..2t+9, col g)
//   C/D (16x8 f32):        c[0..1] = (row g, cols 2t, 2t+1), c[2..3] = (row g+8, cols 2t, 2t+1)
// Each half2 register holds the lower k index in its low 16 bits.
__device__ __forceinline__ void meswitch_mma_16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                   uint32_t a3, uint32_t b0, uint32_t b1) {
#ifdef __CUDA_ARCH__
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    meswitch_emu::mma_16816(c, a0, a1, a2, a3, b0, b1);  // host emulation (ptx/emu/simt.h)
#endif
}

__device__ __forceinline__ uint4 meswitch_ld16(const __half* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

// Weights are read once per launch: loading them without allocating in L1
// leaves L1 to x, which every item of the block re-reads. Not volatile: the
// loads have no side effects, and the compiler may schedule them early.
// The host emulation (ptx/emu) reads them through its checked __ldg.
__device__ __forceinline__ uint4 meswitch_ld16_stream(const void* p) {
#ifdef __CUDA_ARCH__
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
#else
    return __ldg(static_cast<const uint4*>(p));
#endif
}
__device__ __forceinline__ uint2 meswitch_ld8_stream(const void* p) {
#ifdef __CUDA_ARCH__
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
#else
    return __ldg(static_cast<const uint2*>(p));
#endif
}
__device__ __forceinline__ uint32_t meswitch_ld4_stream(const void* p) {
#ifdef __CUDA_ARCH__
    uint32_t v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
#else
    return __ldg(static_cast<const unsigned int*>(p));
#endif
}

// Lane's `BITS` code words for 32 columns (16, 8 or 4 bytes, naturally aligned
// because in_features % 128 == 0 puts every row and lane start on them).
template <int BITS>
__device__ __forceinline__ void meswitch_load_lane_words(const uint32_t* p, uint32_t w[4]) {
    if (BITS == 4) {
        uint4 v = meswitch_ld16_stream(p);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if (BITS == 2) {
        uint2 v = meswitch_ld8_stream(p);
        w[0] = v.x; w[1] = v.y; w[2] = 0u; w[3] = 0u;
    } else {
        w[0] = meswitch_ld4_stream(p); w[1] = 0u; w[2] = 0u; w[3] = 0u;
    }
}

// half2 (1024 + 2^p_lo·qa, 1024 + 2^p_hi·qb) -> (offset + scale·qa, offset +
// scale·qb): the exact unbias fma with the pair's constants (mul = 2^-p,
// add = -2^(10-p) per half, delta_unpack.cuh), then one FP16 rounding of
// q·scale + offset. The host emulation's twin is dequant_pair in
// ptx/host/unpack_host.cpp (f32 fma, then FP16 rounding: the same values,
// because the unbias result q is exact).
__device__ __forceinline__ uint32_t meswitch_dequant_pair(uint32_t magic, uint32_t unbias_mul, uint32_t unbias_add,
                                                          __half2 scale, __half2 offset) {
    const __half2 q = __hfma2(*reinterpret_cast<__half2*>(&magic), *reinterpret_cast<__half2*>(&unbias_mul),
                              *reinterpret_cast<__half2*>(&unbias_add));
    __half2 v = __hfma2(q, scale, offset);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Work items in flight per warp. A decode GEMV is latency-bound unless each
// warp has several independent loads outstanding: the loop issues the loads
// of this many items (K chunks of the base, or (expert, K chunk) pairs of the
// deltas) before the first mma that consumes them. Registers bound them: a
// base item holds 32 registers of weights, an INT4 expert item 8 + 4; from
// 4 n-tiles on, the accumulators leave room for fewer under the 128-register
// cap (more would spill, which the build rejects).
#define MESWITCH_BASE_ITEMS_IN_FLIGHT(tiles) ((tiles) >= 4u ? 1u : 2u)
#define MESWITCH_DELTA_ITEMS_IN_FLIGHT(tiles, bits) \
    ((tiles) >= 8u ? 1u : (tiles) >= 4u || ((tiles) >= 2u && (bits) == 4) ? 2u : 4u)

// x masking by address. A batch row that must contribute nothing to an mma
// (not the expert's, or past the batch) gets its B fragment from this
// all-zero array instead of from x: one address select per n-tile, where
// zeroing the loaded registers took one SEL per register (16 per n-tile).
// The loaded values are the same +0.0 halves, so the products are the same
// bits. Never written: zero-initialized at module load, read with
// ld.global.nc. Sized for the widest pattern a lane reads from its base
// address, the base pass's octets at 32q + 0..7 halves (the delta items read
// 8q + 0..7):
//
//   halves  0 .. 7 | 8 .. 31 | 32 .. 39 | ... | 96 .. 103
//   base    q = 0  |  (gap)  | q = 1    | ... | q = 3
//   delta   q = 0..3 in 0 .. 31
#define MESWITCH_X_OCTET_HALVES 8u
#define MESWITCH_BASE_OCTET_STRIDE 32u
#define MESWITCH_ZERO_X_HALVES (MESWITCH_BASE_OCTET_STRIDE * (MESWITCH_OCTETS_PER_LANE - 1u) + MESWITCH_X_OCTET_HALVES)
__device__ uint4 meswitch_zero_x[MESWITCH_ZERO_X_HALVES / MESWITCH_X_OCTET_HALVES];

// The base of a lane's x loads for batch row b: row b of x from column col
// on when `use_row`, else the zero array. A selp in inline PTX: written as
// `?:`, the compiler branches around the row's address arithmetic instead
// (a BSSY/BSYNC pair and moves, more instructions than the select saves).
__device__ __forceinline__ const __half* meswitch_x_or_zero(const __half* x, bool use_row, uint32_t b, uint32_t in,
                                                            uint32_t col) {
    const __half* row = x + (size_t)b * in + col;
    const __half* zero = reinterpret_cast<const __half*>(meswitch_zero_x);
#ifdef __CUDA_ARCH__
    const __half* base;
    asm("{\n\t.reg .pred use;\n\tsetp.ne.u32 use, %3, 0;\n\tselp.b64 %0, %1, %2, use;\n\t}"
        : "=l"(base)
        : "l"(row), "l"(zero), "r"((uint32_t)use_row));
    return base;
#else
    return use_row ? row : zero;
#endif
}

// The x values of batch row b = nt·8 + g that a lane's 4 octets multiply:
// 16 bytes per octet from column col on, or zeros when the row is not the
// expert's. `lane_rows` is the expert's row mask shifted right by g once per
// item, so that row b's bit is bit nt·8 (a constant in the unrolled n-tile
// loop: one LOP3 with an immediate, not a 64-bit shift by b per n-tile); a b
// past the batch is never set.
__device__ __forceinline__ void meswitch_load_x_octets(const __half* x, unsigned long long lane_rows, uint32_t nt,
                                                       uint32_t g, uint32_t in, uint32_t col,
                                                       uint4 (&xv)[MESWITCH_OCTETS_PER_LANE]) {
    const uint32_t b = nt * MESWITCH_GEMV_BATCH_TILE + g;
    const bool mine = (lane_rows >> (nt * MESWITCH_GEMV_BATCH_TILE)) & 1ull;
    const __half* xb = meswitch_x_or_zero(x, mine, b, in, col);
#pragma unroll
    for (uint32_t q = 0; q < MESWITCH_OCTETS_PER_LANE; ++q) xv[q] = meswitch_ld16(xb + MESWITCH_X_OCTET_HALVES * q);
}

// (lo, hi) -> half2 bits, lo in the low 16 bits (the lower k index of an mma register).
__device__ __forceinline__ uint32_t meswitch_pack_half2(__half lo, __half hi) {
    return (uint32_t)__half_as_ushort(lo) | ((uint32_t)__half_as_ushort(hi) << 16);
}

// The wide variant's delta items (uses the helpers above).
#include "gemv_wide.cuh"

// WIDE: the delta items of gemv_wide.cuh (16 code bytes per lane and row)
// instead of the 128-column items below; everything else is shared.
template <int BITS, uint32_t GROUP, bool WITH_BASE, uint32_t TILES, bool WIDE>
__device__ __forceinline__ void meswitch_gemv_core(const MeswitchGemvParams& p) {
    // Partial sums of each warp: [warp][tile row 0..15][batch row 0..63].
    __shared__ float s_part[MESWITCH_GEMV_WARPS][MESWITCH_GEMV_ROWS_PER_BLOCK][TILES * MESWITCH_GEMV_BATCH_TILE];
    // Distinct experts of the batch, their descriptors (read from global
    // memory once per block, not once per K chunk) and, per expert, a bit per
    // batch row.
    __shared__ uint32_t s_expert[MESWITCH_MAX_BATCH];
    __shared__ MeswitchExpertDelta s_delta[MESWITCH_MAX_BATCH];
    __shared__ unsigned long long s_rows[MESWITCH_MAX_BATCH];
    __shared__ uint32_t s_n_active;

    const uint32_t out = p.out_features, in = p.in_features;
    const uint32_t batch = min(p.batch, TILES * MESWITCH_GEMV_BATCH_TILE);
    const uint32_t* row_expert = reinterpret_cast<const uint32_t*>(p.row_expert);
    const MeswitchExpertDelta* experts = reinterpret_cast<const MeswitchExpertDelta*>(p.experts);
    const __half* x = reinterpret_cast<const __half*>(p.x);
    __half* y = reinterpret_cast<__half*>(p.y);

    if (threadIdx.x == 0) {
        // At most 64 rows: a serial scan is a few hundred cycles, once a block.
        uint32_t n = 0;
        for (uint32_t b = 0; b < batch; ++b) {
            uint32_t e = row_expert[b];
            if (e >= p.n_experts) continue;  // NO_EXPERT, or rejected by the launcher
            uint32_t i = 0;
            while (i < n && s_expert[i] != e) ++i;
            if (i == n) { s_expert[n] = e; s_rows[n] = 0ull; ++n; }
            s_rows[i] |= 1ull << b;
        }
        s_n_active = n;
    }
    __syncthreads();
    const uint32_t n_active = s_n_active;
    if (threadIdx.x < n_active) s_delta[threadIdx.x] = experts[s_expert[threadIdx.x]];
    __syncthreads();

    const uint32_t warp = threadIdx.x / 32u, lane = threadIdx.x % 32u;
    const uint32_t g = lane / 4u, t = lane % 4u;
    const uint32_t r0 = blockIdx.x * MESWITCH_GEMV_ROWS_PER_BLOCK;
    // Rows past the end are clamped for loading (valid memory) and never stored.
    const uint32_t r_lo = min(r0 + g, out - 1u), r_hi = min(r0 + g + 8u, out - 1u);
    const uint32_t n_tiles = (batch + MESWITCH_GEMV_BATCH_TILE - 1u) / MESWITCH_GEMV_BATCH_TILE;
    const uint32_t n_chunks = in / MESWITCH_GEMV_K_CHUNK;
    const uint32_t words_per_row = in * BITS / MESWITCH_WORD_BITS;
    const uint32_t n_groups = GROUP == MESWITCH_GROUP_ROW ? 1u : in / GROUP;

    float acc[TILES][4];
#pragma unroll
    for (uint32_t nt = 0; nt < TILES; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

    // ---- base: warp w takes K chunks w, w + WARPS, ..., BASE_ITEMS_IN_FLIGHT at a time.
    if (WITH_BASE) {
        const __half* base = reinterpret_cast<const __half*>(p.base);
        for (uint32_t first = warp; first < n_chunks;
             first += MESWITCH_GEMV_WARPS * MESWITCH_BASE_ITEMS_IN_FLIGHT(TILES)) {
            uint4 lo[MESWITCH_BASE_ITEMS_IN_FLIGHT(TILES)][MESWITCH_OCTETS_PER_LANE];
            uint4 hi[MESWITCH_BASE_ITEMS_IN_FLIGHT(TILES)][MESWITCH_OCTETS_PER_LANE];
#pragma unroll
            for (uint32_t u = 0; u < MESWITCH_BASE_ITEMS_IN_FLIGHT(TILES); ++u) {
                const uint32_t chunk = first + u * MESWITCH_GEMV_WARPS;
                // Base octet q of lane t: columns 32q + 8t .. +7 of the chunk, so the
                // 4 lanes of a row read 64 contiguous bytes per load (whole 32-byte
                // sectors: these loads skip L1, a half-used sector would be fetched
                // twice). Any column-to-k-slot map is valid as long as x uses it too.
                const uint32_t col0 = min(chunk, n_chunks - 1u) * MESWITCH_GEMV_K_CHUNK + 8u * t;
#pragma unroll
                for (uint32_t q = 0; q < MESWITCH_OCTETS_PER_LANE; ++q) {
                    lo[u][q] = meswitch_ld16(base + (size_t)r_lo * in + col0 + 32u * q);
                    hi[u][q] = meswitch_ld16(base + (size_t)r_hi * in + col0 + 32u * q);
                }
            }
#pragma unroll
            for (uint32_t u = 0; u < MESWITCH_BASE_ITEMS_IN_FLIGHT(TILES); ++u) {
                const uint32_t chunk = first + u * MESWITCH_GEMV_WARPS;
                if (chunk >= n_chunks) break;  // warp-uniform
                const uint32_t col0 = chunk * MESWITCH_GEMV_K_CHUNK + 8u * t;
#pragma unroll
                for (uint32_t nt = 0; nt < TILES; ++nt) {
                    if (nt < n_tiles) {
                        // The tile's x for all octets first: one memory latency, not four.
                        const uint32_t b = nt * MESWITCH_GEMV_BATCH_TILE + g;
                        const __half* xb = meswitch_x_or_zero(x, b < batch, b, in, col0);
                        uint4 xv[MESWITCH_OCTETS_PER_LANE];
#pragma unroll
                        for (uint32_t q = 0; q < MESWITCH_OCTETS_PER_LANE; ++q) {
                            xv[q] = meswitch_ld16(xb + MESWITCH_BASE_OCTET_STRIDE * q);
                        }
#pragma unroll
                        for (uint32_t q = 0; q < MESWITCH_OCTETS_PER_LANE; ++q) {
                            meswitch_mma_16816(acc[nt], lo[u][q].x, hi[u][q].x, lo[u][q].y, hi[u][q].y, xv[q].x, xv[q].y);
                            meswitch_mma_16816(acc[nt], lo[u][q].z, hi[u][q].z, lo[u][q].w, hi[u][q].w, xv[q].z, xv[q].w);
                        }
                    }
                }
            }
        }
    }

    // ---- deltas: the (active expert i, K chunk) pairs, item k = i·n_chunks +
    // chunk, dealt to the warps round-robin so that a batch of many experts
    // keeps every warp as busy as one expert does; all warps' partial sums
    // are added in the epilogue, so any warp may take any item.
    if constexpr (WIDE) {
        meswitch_wide_delta_items<BITS, GROUP, TILES>(acc, s_delta, s_rows, n_active, warp, g, t, r_lo, r_hi,
                                                      n_tiles, in, x);
    } else {
    constexpr uint32_t IN_FLIGHT = MESWITCH_DELTA_ITEMS_IN_FLIGHT(TILES, BITS);
    // (i, chunk) of the warp's next item k = i·n_chunks + chunk (k = warp,
    // warp + WARPS, ...). With several items in flight it is carried by
    // subtraction (meswitch_item_advance), with no k / n_chunks or
    // k % n_chunks per item. With one, the division stays: there the carry
    // costs more than it saves (static SASS at 8 n-tiles, INT2, per 128
    // columns x expert: 591 with the carry, 550 with the division; these
    // variants sit at the 128-register cap).
    constexpr bool CARRY = IN_FLIGHT > 1u;
    // in == 0 is outside the launch contract; even so the carry must not
    // loop forever and the division's quotient by 0 must not be used: no
    // items then (the division walk tests k against n_items, 0 then; a
    // guard around the division instead cost 18 static SASS per item at 8
    // n-tiles, through register allocation).
    const uint32_t n_items = n_active * n_chunks;
    uint32_t next_k = warp, next_i = 0, next_chunk = 0;
    if (CARRY) {
        if (n_chunks > 0u) {
            meswitch_item_advance(next_i, next_chunk, warp, n_chunks);
        } else {
            next_i = n_active;
        }
    } else {
        next_i = warp / n_chunks;
        next_chunk = warp % n_chunks;
    }
    while (CARRY ? next_i < n_active : next_k < n_items) {
        uint32_t it_i[IN_FLIGHT], it_chunk[IN_FLIGHT];
#pragma unroll
        for (uint32_t u = 0; u < IN_FLIGHT; ++u) {
            it_i[u] = next_i;
            it_chunk[u] = next_chunk;
            if (CARRY) {
                meswitch_item_advance(next_i, next_chunk, MESWITCH_GEMV_WARPS, n_chunks);
            } else {
                next_k += MESWITCH_GEMV_WARPS;
                next_i = next_k / n_chunks;
                next_chunk = next_k % n_chunks;
            }
        }
        uint32_t w_lo[IN_FLIGHT][4], w_hi[IN_FLIGHT][4];
        __half2 s_lo[IN_FLIGHT], s_hi[IN_FLIGHT], o_lo[IN_FLIGHT], o_hi[IN_FLIGHT];
#pragma unroll
        for (uint32_t u = 0; u < IN_FLIGHT; ++u) {
            // Past the end: reload the last item (valid memory), never used.
            const bool live = it_i[u] < n_active;
            const uint32_t i = live ? it_i[u] : n_active - 1u, chunk = live ? it_chunk[u] : n_chunks - 1u;
            const MeswitchExpertDelta& d = s_delta[i];
            const uint32_t grp = meswitch_lane_group(chunk, t, GROUP);
            const __half* scales = reinterpret_cast<const __half*>(d.scales);
            const __half* offsets = reinterpret_cast<const __half*>(d.offsets);
            s_lo[u] = __half2half2(scales[(size_t)r_lo * n_groups + grp]);
            s_hi[u] = __half2half2(scales[(size_t)r_hi * n_groups + grp]);
            o_lo[u] = __half2half2(offsets[(size_t)r_lo * n_groups + grp]);
            o_hi[u] = __half2half2(offsets[(size_t)r_hi * n_groups + grp]);
            const uint32_t* codes = reinterpret_cast<const uint32_t*>(d.codes);
            const uint32_t lane_word = (chunk * MESWITCH_GEMV_K_CHUNK + 32u * t) * BITS / MESWITCH_WORD_BITS;
            meswitch_load_lane_words<BITS>(codes + (size_t)r_lo * words_per_row + lane_word, w_lo[u]);
            meswitch_load_lane_words<BITS>(codes + (size_t)r_hi * words_per_row + lane_word, w_hi[u]);
        }
#pragma unroll
        for (uint32_t u = 0; u < IN_FLIGHT; ++u) {
            if (it_i[u] >= n_active) break;  // warp-uniform
            const unsigned long long rows = s_rows[it_i[u]];
            const uint32_t col0 = it_chunk[u] * MESWITCH_GEMV_K_CHUNK + 32u * t;
            // Dequantized A fragments of the 4 octets (16 half2 per row half).
            uint32_t a_lo[MESWITCH_OCTETS_PER_LANE][4], a_hi[MESWITCH_OCTETS_PER_LANE][4];
#pragma unroll
            for (uint32_t q = 0; q < MESWITCH_OCTETS_PER_LANE; ++q) {
                const uint32_t v_lo = meswitch_octet_spread(w_lo[u], q, BITS);
                const uint32_t v_hi = meswitch_octet_spread(w_hi[u], q, BITS);
#pragma unroll
                for (uint32_t j = 0; j < 4u; ++j) {
                    const uint32_t mul = meswitch_octet_unbias_mul(j, BITS), add = meswitch_octet_unbias_add(j, BITS);
                    a_lo[q][j] = meswitch_dequant_pair(meswitch_octet_pair_magic(v_lo, j, BITS), mul, add, s_lo[u], o_lo[u]);
                    a_hi[q][j] = meswitch_dequant_pair(meswitch_octet_pair_magic(v_hi, j, BITS), mul, add, s_hi[u], o_hi[u]);
                }
            }
#pragma unroll
            for (uint32_t nt = 0; nt < TILES; ++nt) {
                // Warp-uniform: skip n-tiles with no row of this expert.
                if (nt < n_tiles && ((rows >> (nt * MESWITCH_GEMV_BATCH_TILE)) & 0xFFull) != 0ull) {
                    uint4 xv[MESWITCH_OCTETS_PER_LANE];
                    meswitch_load_x_octets(x, rows >> g, nt, g, in, col0, xv);
#pragma unroll
                    for (uint32_t q = 0; q < MESWITCH_OCTETS_PER_LANE; ++q) {
                        const uint32_t xo[4] = {xv[q].x, xv[q].y, xv[q].z, xv[q].w};
                        uint32_t xp[4];
                        meswitch_pair_x_octet(xo, xp);
                        meswitch_mma_16816(acc[nt], a_lo[q][0], a_hi[q][0], a_lo[q][1], a_hi[q][1], xp[0], xp[1]);
                        meswitch_mma_16816(acc[nt], a_lo[q][2], a_hi[q][2], a_lo[q][3], a_hi[q][3], xp[2], xp[3]);
                    }
                }
            }
        }
    }
    }  // WIDE

    // ---- salient residual columns: per expert a dense [16 rows x k] FP16
    // tile S times x gathered at the k salient columns, as mma items of 16
    // columns (k padded with zeros), dealt to the warps like the delta items.
    // Running them through the tensor cores inside the K loop keeps them off
    // the epilogue, where k dependent gathers per output would serialize.
    //
    //   lane (g, t), item columns j = 16·sc + {2t, 2t+1, 2t+8, 2t+9}:
    //     A = S[r_lo | r_hi, j]        (0 where j >= k)
    //     B = x[b, salient_index[j]]   (0 where j >= k or row b is not this expert's)
    {
        uint32_t item = 0;
        for (uint32_t i = 0; i < n_active; ++i) {
            const MeswitchExpertDelta& d = s_delta[i];
            const uint32_t k = d.n_salient;
            const __half* sval = reinterpret_cast<const __half*>(d.salient_values);
            const uint32_t* sidx = reinterpret_cast<const uint32_t*>(d.salient_index);
            const unsigned long long rows = s_rows[i];
            for (uint32_t j0 = 0; j0 < k; j0 += 16u, ++item) {
                if (item % MESWITCH_GEMV_WARPS != warp) continue;  // warp-uniform
                const uint32_t j[4] = {j0 + 2u * t, j0 + 2u * t + 1u, j0 + 2u * t + 8u, j0 + 2u * t + 9u};
                __half a_lo[4], a_hi[4];
                uint32_t col[4];
#pragma unroll
                for (uint32_t q = 0; q < 4u; ++q) {
                    const bool ok = j[q] < k;
                    a_lo[q] = ok ? sval[(size_t)r_lo * k + j[q]] : __ushort_as_half(0);
                    a_hi[q] = ok ? sval[(size_t)r_hi * k + j[q]] : __ushort_as_half(0);
                    col[q] = ok ? sidx[j[q]] : 0u;
                }
                const uint32_t a0 = meswitch_pack_half2(a_lo[0], a_lo[1]);
                const uint32_t a1 = meswitch_pack_half2(a_hi[0], a_hi[1]);
                const uint32_t a2 = meswitch_pack_half2(a_lo[2], a_lo[3]);
                const uint32_t a3 = meswitch_pack_half2(a_hi[2], a_hi[3]);
#pragma unroll
                for (uint32_t nt = 0; nt < TILES; ++nt) {
                    if (nt < n_tiles && ((rows >> (nt * MESWITCH_GEMV_BATCH_TILE)) & 0xFFull) != 0ull) {
                        const uint32_t b = nt * MESWITCH_GEMV_BATCH_TILE + g;
                        __half xb[4];
                        const bool mine = (rows >> b) & 1ull;
#pragma unroll
                        for (uint32_t q = 0; q < 4u; ++q) {
                            xb[q] = mine && j[q] < k ? x[(size_t)b * in + col[q]] : __ushort_as_half(0);
                        }
                        meswitch_mma_16816(acc[nt], a0, a1, a2, a3, meswitch_pack_half2(xb[0], xb[1]),
                                           meswitch_pack_half2(xb[2], xb[3]));
                    }
                }
            }
        }
    }

#pragma unroll
    for (uint32_t nt = 0; nt < TILES; ++nt) {
        if (nt < n_tiles) {
            const uint32_t b = nt * MESWITCH_GEMV_BATCH_TILE + 2u * t;
            s_part[warp][g][b] = acc[nt][0];
            s_part[warp][g][b + 1u] = acc[nt][1];
            s_part[warp][g + 8u][b] = acc[nt][2];
            s_part[warp][g + 8u][b + 1u] = acc[nt][3];
        }
    }
    __syncthreads();

    // Epilogue: tile row m runs fastest so consecutive threads store
    // consecutive y elements of one batch row.
    for (uint32_t idx = threadIdx.x; idx < MESWITCH_GEMV_ROWS_PER_BLOCK * batch; idx += MESWITCH_GEMV_THREADS) {
        const uint32_t m = idx % MESWITCH_GEMV_ROWS_PER_BLOCK, b = idx / MESWITCH_GEMV_ROWS_PER_BLOCK;
        const uint32_t r = r0 + m;
        if (r >= out) continue;
        float sum = 0.f;
#pragma unroll
        for (uint32_t w = 0; w < MESWITCH_GEMV_WARPS; ++w) sum += s_part[w][m][b];
        __half* dst = y + (size_t)b * out + r;
        if (WITH_BASE) {
            *dst = __float2half_rn(sum);
        } else if (row_expert[b] < p.n_experts) {
            *dst = __float2half_rn(__half2float(*dst) + sum);
        }
    }
}

// One extern "C" entry point per (bits, group, n-tiles) variant. At most 128
// registers a thread (2 blocks of MESWITCH_GEMV_THREADS per SM); ptxas fails the
// build on a spill (scripts/build_ptx.sh).
#define MESWITCH_GEMV_ENTRY(prefix, bits, gname, group, with_base, tiles, wide)                \
    extern "C" __global__ void __launch_bounds__(MESWITCH_GEMV_THREADS, 2)                       \
        prefix##bits##_g##gname##_t##tiles(const MeswitchGemvParams p) {                         \
        meswitch_gemv_core<bits, group, with_base, tiles, wide>(p);                             \
    }

#define MESWITCH_GEMV_ALL_TILES(prefix, bits, gname, group, with_base, wide) \
    MESWITCH_GEMV_ENTRY(prefix, bits, gname, group, with_base, 1, wide)      \
    MESWITCH_GEMV_ENTRY(prefix, bits, gname, group, with_base, 2, wide)      \
    MESWITCH_GEMV_ENTRY(prefix, bits, gname, group, with_base, 4, wide)      \
    MESWITCH_GEMV_ENTRY(prefix, bits, gname, group, with_base, 8, wide)

// wide = false: the 128-column delta items; true: gemv_wide.cuh's.
#define MESWITCH_GEMV_ALL_GROUPS_OF(prefix, bits, with_base, wide)               \
    MESWITCH_GEMV_ALL_TILES(prefix, bits, 32, MESWITCH_GROUP_32, with_base, wide)   \
    MESWITCH_GEMV_ALL_TILES(prefix, bits, 64, MESWITCH_GROUP_64, with_base, wide)   \
    MESWITCH_GEMV_ALL_TILES(prefix, bits, 128, MESWITCH_GROUP_128, with_base, wide) \
    MESWITCH_GEMV_ALL_TILES(prefix, bits, row, MESWITCH_GROUP_ROW, with_base, wide)

#define MESWITCH_GEMV_ALL_GROUPS(prefix, bits, with_base) MESWITCH_GEMV_ALL_GROUPS_OF(prefix, bits, with_base, false)
#define MESWITCH_GEMV_WIDE_ALL_GROUPS(prefix, bits, with_base) \
    MESWITCH_GEMV_ALL_GROUPS_OF(prefix, bits, with_base, true)

#endif  // MESWITCH_GEMV_CORE_CUH
