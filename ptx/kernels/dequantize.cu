// dequantize.cu: dense FP16 Δ̂ (base == 0) or W_base + Δ̂, [out][in] row-major,
// for prefill through cuBLAS. Bit-identical to meswitch_reference's
// dequantize_f16: per element the same f32 operations in the same order
//
//   q    = code of (r, c)                         (layout.rs unpack_code)
//   d    = offsets[r, g] + scales[r, g]·q          rounded mul, rounded add
//   d   += salient_values[r, i]   if c == salient_index[i]
//   out  = fp16(base[r, c] + d)   (base term +0.0 when there is no base, which
//                                  also turns -0.0 into +0.0 as the reference does)
//
// One block per row (grid.x = out_features, block = MESWITCH_DEQUANT_THREADS);
// threads stride over the row's columns, so any in_features and group size
// works. Pass 1 writes every column without the salient term; after a block
// barrier pass 2 rewrites the k salient columns with it, so no element is
// written by two threads at once. This kernel is memory-bound and simple on
// purpose: it runs once per expert switch for prefill, not per token.
#include <cuda_fp16.h>

#include "delta_unpack.cuh"

template <int BITS>
__device__ __forceinline__ float meswitch_dequant_at(const MeswitchDequantParams& p, const uint32_t* row_words,
                                                     uint32_t r, uint32_t c, uint32_t n_groups) {
    const __half* scales = reinterpret_cast<const __half*>(p.delta.scales);
    const __half* offsets = reinterpret_cast<const __half*>(p.delta.offsets);
    const size_t gi = (size_t)r * n_groups + c / p.group_size;
    return meswitch_dequant_f32(__half2float(scales[gi]), __half2float(offsets[gi]),
                                meswitch_unpack_code(row_words, c, BITS));
}

template <int BITS>
__device__ __forceinline__ void meswitch_dequantize(const MeswitchDequantParams& p) {
    const uint32_t r = blockIdx.x, in = p.in_features;
    // group_size 0 would divide by zero below; the launcher rejects it, and
    // this keeps a bad launch from reading outside the scale arrays.
    if (r >= p.out_features || p.group_size == 0) return;
    const uint32_t n_groups = meswitch_n_groups(in, p.group_size);
    const uint32_t* row_words =
        reinterpret_cast<const uint32_t*>(p.delta.codes) + (size_t)r * meswitch_words_per_row(in, BITS);
    const __half* base = p.base ? reinterpret_cast<const __half*>(p.base) + (size_t)r * in : nullptr;
    __half* out = reinterpret_cast<__half*>(p.out) + (size_t)r * in;

    for (uint32_t c = threadIdx.x; c < in; c += blockDim.x) {
        const float d = meswitch_dequant_at<BITS>(p, row_words, r, c, n_groups);
        out[c] = __float2half_rn(__fadd_rn(base ? __half2float(base[c]) : 0.f, d));
    }
    __syncthreads();
    const uint32_t* sidx = reinterpret_cast<const uint32_t*>(p.delta.salient_index);
    const __half* sval = reinterpret_cast<const __half*>(p.delta.salient_values) + (size_t)r * p.delta.n_salient;
    for (uint32_t i = threadIdx.x; i < p.delta.n_salient; i += blockDim.x) {
        const uint32_t c = sidx[i];
        if (c >= in) continue;  // the launcher validates; never write out of the row
        const float d = __fadd_rn(meswitch_dequant_at<BITS>(p, row_words, r, c, n_groups), __half2float(sval[i]));
        out[c] = __float2half_rn(__fadd_rn(base ? __half2float(base[c]) : 0.f, d));
    }
}

#define MESWITCH_DEQUANT_ENTRY(bits)                                                        \
    extern "C" __global__ void __launch_bounds__(MESWITCH_DEQUANT_THREADS)                  \
        meswitch_dequantize_b##bits(const MeswitchDequantParams p) {                        \
        meswitch_dequantize<bits>(p);                                                       \
    }

MESWITCH_DEQUANT_ENTRY(1)
MESWITCH_DEQUANT_ENTRY(2)
MESWITCH_DEQUANT_ENTRY(4)
