// norm.cu: RMSNorm of the f32 residual stream into the f16 input of the next
// linear (meswitch_reference::layers::rms_norm, one row per block).
//
//   x      f32 [rows][n]   (row r at x + r·n)
//   weight f32 [n]
//   y      f16 [rows][n]
//   y[r,c] = fp16( x[r,c] · (1 / sqrt(Σ_c x[r,c]² / n + eps)) · weight[c] )
//
// grid.x = rows, block = MESWITCH_ROW_THREADS. Each thread sums the squares of
// the columns c ≡ tid (mod block) in f32, the block reduces them (warp
// shuffles, then one value per warp through shared memory): the summation
// order differs from the reference's sequential sum, which the tests' f32
// tolerance covers. Accurate sqrtf and division (NVRTC's default
// -prec-sqrt/-prec-div), no fast-math intrinsics.
#include <cuda_fp16.h>

#include "meswitch_abi.h"

#define MESWITCH_WARP 32u
#define MESWITCH_FULL_MASK 0xFFFFFFFFu

__device__ __forceinline__ float meswitch_warp_sum(float v) {
#pragma unroll
    for (uint32_t o = MESWITCH_WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(MESWITCH_FULL_MASK, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(MESWITCH_ROW_THREADS) meswitch_rms_norm(const MeswitchRmsNormParams p) {
    __shared__ float warp_sums[MESWITCH_ROW_THREADS / MESWITCH_WARP];
    const uint32_t r = blockIdx.x, n = p.n;
    if (r >= p.rows) return;
    const float* x = reinterpret_cast<const float*>(p.x) + (size_t)r * n;
    const float* w = reinterpret_cast<const float*>(p.weight);
    __half* y = reinterpret_cast<__half*>(p.y) + (size_t)r * n;

    float sq = 0.f;
    for (uint32_t c = threadIdx.x; c < n; c += blockDim.x) sq += x[c] * x[c];
    sq = meswitch_warp_sum(sq);
    const uint32_t warp = threadIdx.x / MESWITCH_WARP, lane = threadIdx.x % MESWITCH_WARP;
    if (lane == 0) warp_sums[warp] = sq;
    __syncthreads();
    // Every warp re-reduces the per-warp sums, so all threads hold the total
    // without a second barrier.
    const uint32_t n_warps = blockDim.x / MESWITCH_WARP;
    float total = lane < n_warps ? warp_sums[lane] : 0.f;
    total = meswitch_warp_sum(total);
    const float inv = 1.f / sqrtf(total / (float)n + p.eps);
    for (uint32_t c = threadIdx.x; c < n; c += blockDim.x) y[c] = __float2half_rn(x[c] * inv * w[c]);
}
