// attention.cu: the per-sequence device KV cache and causal grouped-query
// attention over it, decode and prefill rows of many sequences in one launch
// (meswitch_reference::layers::attention).
//
// KV cache of one sequence, all layers, f16, keys after RoPE:
//
//   kv: [n_layers][2 (K, V)][capacity][kv_dim]          kv_dim = n_kv_heads · head_dim
//   K(l, p) = kv + ((l·2 + 0)·capacity + p)·kv_dim      V(l, p) = kv + ((l·2 + 1)·capacity + p)·kv_dim
//
// A step's rows: rows[r] = { kv (that sequence's cache), capacity, pos }.
// Prefill rows of one sequence and decode rows of others are all just rows.
//
// meswitch_kv_append: grid.x = n_rows, block = MESWITCH_ROW_THREADS;
//   K(layer, pos(r))[:] = k[r,:], V(layer, pos(r))[:] = v[r,:]. The launcher
//   guarantees pos < capacity and no two rows on one (cache, pos).
//
// meswitch_attention: grid = (n_heads, n_rows), block = MESWITCH_ATTN_THREADS
// (MESWITCH_ATTN_WARPS warps) for query head h of row r:
//
//   kvh = h / (n_heads / n_kv_heads)                  (GQA)
//   lo  = sliding_window ? max(pos + 1 − window, 0) : 0
//   warp w takes key positions j = lo + w, lo + w + WARPS, ... ≤ pos
//   lane l holds head elements (2i, 2i+1) for i = l, l + 32, ... < head_dim/2
//     (half2 loads; MESWITCH_ATTN_MAX_HEAD_DIM / 64 = 4 pairs per lane at most)
//   per key: s = (q·k) · scale, the lanes' partial dots summed by shuffles;
//     online softmax in f32:  m' = max(m, s),  l = l·e^(m−m') + e^(s−m'),
//                             acc = acc·e^(m−m') + e^(s−m')·v
//   end: each warp's (m, l, acc[head_dim]) into shared memory, then
//     out = Σ_w acc_w·e^(m_w−M) / Σ_w l_w·e^(m_w−M),  M = max_w m_w
//   (a warp that saw no position has m = −inf, l = 0 and weighs e^(−inf) = 0;
//    warp 0 always sees lo ≤ pos, so M is finite).
//
// The reference computes exact max-subtracted softmax then Σ p·v in f32; the
// online form and the summation order differ by f32 rounding only.
#include <cuda_fp16.h>

#include "meswitch_abi.h"

#define MESWITCH_WARP 32u
#define MESWITCH_FULL_MASK 0xFFFFFFFFu
/* half2 pairs of one head a lane holds: head_dim/2 pairs over 32 lanes. */
#define MESWITCH_ATTN_PAIRS_PER_LANE (MESWITCH_ATTN_MAX_HEAD_DIM / 2u / MESWITCH_WARP)
/* f32 bit patterns: −inf (softmax state before any key) and a quiet NaN (poison). */
#define MESWITCH_F32_NEG_INF_BITS 0xFF800000
#define MESWITCH_F32_NAN_BITS 0x7FC00000

__device__ __forceinline__ const MeswitchAttnRow& meswitch_attn_row(uint64_t rows, uint32_t r) {
    return reinterpret_cast<const MeswitchAttnRow*>(rows)[r];
}

extern "C" __global__ void __launch_bounds__(MESWITCH_ROW_THREADS)
    meswitch_kv_append(const MeswitchKvAppendParams p) {
    const uint32_t r = blockIdx.x;
    if (r >= p.n_rows) return;
    const MeswitchAttnRow row = meswitch_attn_row(p.rows, r);
    if (row.pos >= row.capacity) return;  // the launcher rejects it; never write past the cache
    __half* kv = reinterpret_cast<__half*>(row.kv);
    __half* key = kv + ((size_t)p.layer * 2 * row.capacity + row.pos) * p.kv_dim;
    __half* value = kv + (((size_t)p.layer * 2 + 1) * row.capacity + row.pos) * p.kv_dim;
    const __half* k = reinterpret_cast<const __half*>(p.k) + (size_t)r * p.kv_dim;
    const __half* v = reinterpret_cast<const __half*>(p.v) + (size_t)r * p.kv_dim;
    for (uint32_t c = threadIdx.x; c < p.kv_dim; c += blockDim.x) {
        key[c] = k[c];
        value[c] = v[c];
    }
}

__device__ __forceinline__ float meswitch_attn_warp_sum(float v) {
#pragma unroll
    for (uint32_t o = MESWITCH_WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(MESWITCH_FULL_MASK, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(MESWITCH_ATTN_THREADS) meswitch_attention(const MeswitchAttentionParams p) {
    __shared__ float warp_max[MESWITCH_ATTN_WARPS];
    __shared__ float warp_denominator[MESWITCH_ATTN_WARPS];
    __shared__ float warp_acc[MESWITCH_ATTN_WARPS][MESWITCH_ATTN_MAX_HEAD_DIM];

    const uint32_t h = blockIdx.x, r = blockIdx.y;
    if (h >= p.n_heads || r >= p.n_rows || p.n_kv_heads == 0 || p.head_dim > MESWITCH_ATTN_MAX_HEAD_DIM) return;
    const uint32_t warp = threadIdx.x / MESWITCH_WARP, lane = threadIdx.x % MESWITCH_WARP;
    const uint32_t d = p.head_dim, n_pairs = d / 2, kv_dim = p.n_kv_heads * d;
    const uint32_t kvh = h / (p.n_heads / p.n_kv_heads);
    const MeswitchAttnRow row = meswitch_attn_row(p.rows, r);
    __half* out = reinterpret_cast<__half*>(p.out) + ((size_t)r * p.n_heads + h) * d;
    if (row.pos >= row.capacity) {  // rejected by the launcher; never read past the cache
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) out[c] = __float2half_rn(__int_as_float(MESWITCH_F32_NAN_BITS));
        return;
    }
    const uint32_t lo =
        (p.sliding_window != MESWITCH_NO_WINDOW && row.pos + 1 > p.sliding_window) ? row.pos + 1 - p.sliding_window : 0;

    const __half2* q = reinterpret_cast<const __half2*>(reinterpret_cast<const __half*>(p.q) + ((size_t)r * p.n_heads + h) * d);
    const __half* kv = reinterpret_cast<const __half*>(row.kv);
    const __half2* keys = reinterpret_cast<const __half2*>(kv + (size_t)p.layer * 2 * row.capacity * kv_dim + kvh * d);
    const __half2* values =
        reinterpret_cast<const __half2*>(kv + ((size_t)p.layer * 2 + 1) * row.capacity * kv_dim + kvh * d);
    const uint32_t pair_stride = kv_dim / 2;  // one position, in half2

    float2 qf[MESWITCH_ATTN_PAIRS_PER_LANE], acc[MESWITCH_ATTN_PAIRS_PER_LANE];
#pragma unroll
    for (uint32_t k = 0; k < MESWITCH_ATTN_PAIRS_PER_LANE; ++k) {
        const uint32_t i = lane + k * MESWITCH_WARP;
        qf[k] = i < n_pairs ? __half22float2(q[i]) : make_float2(0.f, 0.f);
        acc[k] = make_float2(0.f, 0.f);
    }
    float m = __int_as_float(MESWITCH_F32_NEG_INF_BITS), l = 0.f;
    for (uint32_t j = lo + warp; j <= row.pos; j += MESWITCH_ATTN_WARPS) {
        const __half2* key = keys + (size_t)j * pair_stride;
        float dot = 0.f;
#pragma unroll
        for (uint32_t k = 0; k < MESWITCH_ATTN_PAIRS_PER_LANE; ++k) {
            const uint32_t i = lane + k * MESWITCH_WARP;
            if (i < n_pairs) {
                const float2 kf = __half22float2(key[i]);
                dot += qf[k].x * kf.x + qf[k].y * kf.y;
            }
        }
        const float s = meswitch_attn_warp_sum(dot) * p.scale;
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new), weight = expf(s - m_new);
        l = l * correction + weight;
        const __half2* value = values + (size_t)j * pair_stride;
#pragma unroll
        for (uint32_t k = 0; k < MESWITCH_ATTN_PAIRS_PER_LANE; ++k) {
            const uint32_t i = lane + k * MESWITCH_WARP;
            if (i < n_pairs) {
                const float2 vf = __half22float2(value[i]);
                acc[k].x = acc[k].x * correction + weight * vf.x;
                acc[k].y = acc[k].y * correction + weight * vf.y;
            }
        }
        m = m_new;
    }

    if (lane == 0) {
        warp_max[warp] = m;
        warp_denominator[warp] = l;
    }
#pragma unroll
    for (uint32_t k = 0; k < MESWITCH_ATTN_PAIRS_PER_LANE; ++k) {
        const uint32_t i = lane + k * MESWITCH_WARP;
        if (i < n_pairs) {
            warp_acc[warp][2 * i] = acc[k].x;
            warp_acc[warp][2 * i + 1] = acc[k].y;
        }
    }
    __syncthreads();
    float max_all = __int_as_float(MESWITCH_F32_NEG_INF_BITS);
#pragma unroll
    for (uint32_t w = 0; w < MESWITCH_ATTN_WARPS; ++w) max_all = fmaxf(max_all, warp_max[w]);
    float scale_w[MESWITCH_ATTN_WARPS], denominator = 0.f;
#pragma unroll
    for (uint32_t w = 0; w < MESWITCH_ATTN_WARPS; ++w) {
        scale_w[w] = expf(warp_max[w] - max_all);
        denominator += warp_denominator[w] * scale_w[w];
    }
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (uint32_t w = 0; w < MESWITCH_ATTN_WARPS; ++w) o += warp_acc[w][c] * scale_w[w];
        out[c] = __float2half_rn(o / denominator);
    }
}
