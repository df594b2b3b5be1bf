// activation.cu: the elementwise kernels of a decoder layer and the
// embedding gather. FP16 storage, f32 math, accurate expf (no fast-math).
//
//   meswitch_swiglu:        out[i] = fp16( silu(gate[i]) · up[i] ),  silu(g) = g / (1 + e^−g)
//                           gate, up, out f16 [n]      (meswitch_reference::layers::swiglu)
//   meswitch_add_residual:  h[i] += float(y[i])        h f32 [n], y f16 [n]
//       grid = min(ceil(n / MESWITCH_ELEMENTWISE_THREADS), MESWITCH_ELEMENTWISE_MAX_BLOCKS),
//       block = MESWITCH_ELEMENTWISE_THREADS, grid-stride loop over i.
//   meswitch_embed:         out[r,:] = float(table[tokens[r],:])
//                           table f16 [vocab][hidden], tokens u32 [rows], out f32 [rows][hidden]
//       grid.x = rows, block = MESWITCH_ROW_THREADS. The launcher rejects
//       tokens >= vocab; a kernel that still sees one writes NaN (never reads
//       past the table).
#include <cuda_fp16.h>

#include "meswitch_abi.h"

/* f32 quiet NaN bit pattern (poison for rows that name a bad token). */
#define MESWITCH_F32_NAN_BITS 0x7FC00000

__device__ __forceinline__ uint32_t meswitch_grid_stride() { return gridDim.x * blockDim.x; }

extern "C" __global__ void __launch_bounds__(MESWITCH_ELEMENTWISE_THREADS)
    meswitch_swiglu(const MeswitchElementwiseParams p) {
    const __half* gate = reinterpret_cast<const __half*>(p.a);
    const __half* up = reinterpret_cast<const __half*>(p.b);
    __half* out = reinterpret_cast<__half*>(p.out);
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += meswitch_grid_stride()) {
        const float g = __half2float(gate[i]);
        // expf(-g) overflows to inf for g < -88, giving g / inf = -0: the
        // reference's f32 result too.
        const float silu = __fdiv_rn(g, __fadd_rn(1.f, expf(-g)));
        out[i] = __float2half_rn(__fmul_rn(silu, __half2float(up[i])));
    }
}

extern "C" __global__ void __launch_bounds__(MESWITCH_ELEMENTWISE_THREADS)
    meswitch_add_residual(const MeswitchElementwiseParams p) {
    float* h = reinterpret_cast<float*>(p.a);
    const __half* y = reinterpret_cast<const __half*>(p.b);
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += meswitch_grid_stride())
        h[i] = __fadd_rn(h[i], __half2float(y[i]));
}

extern "C" __global__ void __launch_bounds__(MESWITCH_ROW_THREADS) meswitch_embed(const MeswitchEmbedParams p) {
    const uint32_t r = blockIdx.x;
    if (r >= p.rows) return;
    const uint32_t token = reinterpret_cast<const uint32_t*>(p.tokens)[r];
    float* out = reinterpret_cast<float*>(p.out) + (size_t)r * p.hidden;
    if (token >= p.vocab) {
        for (uint32_t c = threadIdx.x; c < p.hidden; c += blockDim.x) out[c] = __int_as_float(MESWITCH_F32_NAN_BITS);
        return;
    }
    const __half* row = reinterpret_cast<const __half*>(p.table) + (size_t)token * p.hidden;
    for (uint32_t c = threadIdx.x; c < p.hidden; c += blockDim.x) out[c] = __half2float(row[c]);
}
