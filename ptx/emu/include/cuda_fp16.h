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

namespace meswitch_emu {

inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    float v;
    if (exp == 0) {
        v = ldexpf((float)man, -24);  // zero or subnormal
    } else if (exp == 31) {
        v = man ? NAN : INFINITY;
    } else {
        v = ldexpf((float)(man | 0x400u), (int)exp - 25);
    }
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits |= sign;
    memcpy(&v, &bits, 4);
    return v;
}

// Round-to-nearest-even binary16 of a double. Callers pass values whose
// exact result fits a double (an f32, or a product and sum of FP16 values),
// so this is the single rounding the device applies.
inline uint16_t half_bits_from_double(double f) {
    uint64_t x;
    memcpy(&x, &f, 8);
    const uint16_t sign = (uint16_t)((x >> 48) & 0x8000u);
    const double a = fabs(f);
    if (isnan(f)) return sign | 0x7E00u;
    if (a >= 65520.0) return sign | 0x7C00u;  // rounds to infinity
    if (a < ldexp(1.0, -14)) {
        // Subnormal range: units of 2^-24 (exact scaling), ties to even.
        return sign | (uint16_t)nearbyint(a * 16777216.0);
    }
    int e;
    frexp(a, &e);                           // a = m·2^e, m in [0.5, 1)
    const double scaled = ldexp(a, 11 - e);  // 11 significant bits: [1024, 2048)
    uint32_t m = (uint32_t)nearbyint(scaled);
    if (m == 2048u) {
        m = 1024u;
        e += 1;
    }
    const uint32_t exp = (uint32_t)(e - 1 + 15);
    if (exp >= 31u) return sign | 0x7C00u;
    return sign | (uint16_t)((exp << 10) | (m & 0x3FFu));
}

}  // namespace meswitch_emu

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
