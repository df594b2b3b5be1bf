// cuda_fp16.h of the host emulation (ptx/emu): the part of CUDA the kernels in
// ptx/kernels use, as host C++. The emulation's include path puts this file in
// front of the kernels' `#include <cuda_fp16.h>`; the kernels themselves are
// compiled unchanged, without __CUDACC__ or __CUDA_ARCH__, so every inline-PTX
// spelling takes its portable twin.
//
// Arithmetic follows the device's: FP16 values are IEEE binary16 with
// round-to-nearest-even conversions, __hfma2 rounds once, the _rn float
// intrinsics are plain IEEE f32 operations (the build uses -ffp-contract=off,
// so nothing is fused that the source does not fuse). Math functions are the
// host's (glibc expf is within 1 ulp, CUDA's within 2; both sides' tests
// allow for it).
#ifndef MESWITCH_EMU_CUDA_FP16_H
#define MESWITCH_EMU_CUDA_FP16_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "half_bits.h"
#include "simt.h"

// ---- qualifiers ---------------------------------------------------------------
// Device functions and globals get internal linkage (every module is its own
// translation unit, as every .cu is its own NVRTC program). Shared memory is
// a function-local static: the runtime runs one block at a time in the whole
// process (simt.cpp), so the static is that block's shared memory. (Not
// thread_local: the GEMV variants' shared arrays add up to megabytes, and
// static TLS is carved out of every thread's stack.)
#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---- vector types -------------------------------------------------------------
struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
    uint32_t x, y;
};
struct alignas(8) float2 {
    float x, y;
};
inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

inline uint32_t min(uint32_t a, uint32_t b) { return a < b ? a : b; }
inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }

// ---- binary16 -------------------------------------------------------------------
struct __half {
    uint16_t __x;
};
struct alignas(4) __half2 {
    __half x, y;
};


inline float __half2float(__half h) { return meswitch_emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{meswitch_emu::half_bits_from_double((double)f)}; }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half2 __half2half2(__half h) { return __half2{h, h}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }

// One rounding per half: the exact a·b + c of FP16 operands fits a double
// whenever the exponents are within 29 of each other, which holds for every
// fma the kernels issue (the unbias fma is exact; scale·q + offset has q < 16).
inline __half __hfma(__half a, __half b, __half c) {
    const double r = fma((double)__half2float(a), (double)__half2float(b), (double)__half2float(c));
    return __half{meswitch_emu::half_bits_from_double(r)};
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return __half2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}

// ---- f32 intrinsics -----------------------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
inline unsigned int __byte_perm(unsigned int a, unsigned int b, unsigned int sel) {
    const uint64_t ab = ((uint64_t)b << 32) | a;
    unsigned int d = 0;
    for (unsigned int i = 0; i < 4u; ++i) {
        const unsigned int s = (sel >> (4u * i)) & 7u;
        d |= (unsigned int)((ab >> (8u * s)) & 0xFFu) << (8u * i);
    }
    return d;
}

// ---- loads through the read-only cache (checked) ----------------------------------
template <class T>
inline T meswitch_emu_load(const T* p) {
    T v;
    if (meswitch_emu::check_load(p, sizeof(T))) {
        memcpy(&v, p, sizeof(T));
    } else {
        memset(&v, 0, sizeof(T));
    }
    return v;
}
inline uint4 __ldg(const uint4* p) { return meswitch_emu_load(p); }
inline uint2 __ldg(const uint2* p) { return meswitch_emu_load(p); }
inline unsigned int __ldg(const unsigned int* p) { return meswitch_emu_load(p); }
inline unsigned short __ldg(const unsigned short* p) { return meswitch_emu_load(p); }

// ---- warp shuffles ----------------------------------------------------------------
inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits = meswitch_emu::shfl_xor_bits(mask, bits, lane_mask);
    memcpy(&v, &bits, 4);
    return v;
}

#endif  // MESWITCH_EMU_CUDA_FP16_H
