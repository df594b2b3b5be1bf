// rope.cu: rotary position embedding in place on f16 q or k rows, Hugging
// Face rotate-half pairing, as meswitch_reference::layers::rope:
//
//   x   f16 [rows][n_heads][head_dim]          half = head_dim / 2
//   cos, sin  f32 [max_positions][half]        filled on the host by the
//             reference's rope_angles (f64 angle, one rounding to f32)
//   head = [ x_0 .. x_{half-1} | x_half .. x_{d-1} ]
//   x_i'      = x_i·cos[p,i] − x_{i+half}·sin[p,i]
//   x_{i+half}' = x_{i+half}·cos[p,i] + x_i·sin[p,i]       p = positions[r]
//
// grid.x = rows, block = MESWITCH_ROW_THREADS; thread t rotates the pairs
// t, t + block, ... of the row's n_heads·half pairs (each pair read and
// written by one thread only, so in place is safe). A position outside the
// tables writes NaN over the row instead of reading past them.
#include <cuda_fp16.h>

#include "meswitch_abi.h"

#define MESWITCH_F16_NAN 0x7E00u

extern "C" __global__ void __launch_bounds__(MESWITCH_ROW_THREADS) meswitch_rope(const MeswitchRopeParams p) {
    const uint32_t r = blockIdx.x;
    if (r >= p.rows || p.head_dim < 2) return;
    const uint32_t half = p.head_dim / 2, pairs = p.n_heads * half;
    __half* x = reinterpret_cast<__half*>(p.x) + (size_t)r * p.n_heads * p.head_dim;
    const uint32_t pos = reinterpret_cast<const uint32_t*>(p.positions)[r];
    if (pos >= p.max_positions) {
        for (uint32_t c = threadIdx.x; c < p.n_heads * p.head_dim; c += blockDim.x)
            x[c] = __ushort_as_half((unsigned short)MESWITCH_F16_NAN);
        return;
    }
    const float* cos_row = reinterpret_cast<const float*>(p.cos) + (size_t)pos * half;
    const float* sin_row = reinterpret_cast<const float*>(p.sin) + (size_t)pos * half;
    for (uint32_t t = threadIdx.x; t < pairs; t += blockDim.x) {
        const uint32_t head = t / half, i = t % half;
        __half* h = x + (size_t)head * p.head_dim;
        const float a = __half2float(h[i]), b = __half2float(h[i + half]);
        const float c = cos_row[i], s = sin_row[i];
        // Separate rounded products and difference, as the reference's
        // a*c - b*s without FMA contraction (f32 then one f16 rounding).
        h[i] = __float2half_rn(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        h[i + half] = __float2half_rn(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}
