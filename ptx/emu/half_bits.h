// half_bits.h: IEEE binary16 <-> binary32/64 conversions on bit patterns,
// shared by the emulation's cuda_fp16.h (the kernels' __half arithmetic) and
// simt.cpp (the mma's operands). tests/emu_runtime.rs checks them against
// the `half` crate and from first principles.
#ifndef MESWITCH_EMU_HALF_BITS_H
#define MESWITCH_EMU_HALF_BITS_H

#include <stdint.h>
#include <string.h>

namespace meswitch_emu {

// Exact: every binary16 value is an f32. Bit manipulation, not libm: the
// GEMV converts several values per weight, and this is its hot path.
inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (man << 13);  // inf, NaN (payload kept)
    } else if (exp != 0) {
        bits = sign | ((exp + (127 - 15)) << 23) | (man << 13);
    } else {
        const float v = (float)man * 5.9604644775390625e-8f;  // man·2^-24, exact
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// Round-to-nearest-even binary16 of a double, from its bits. Callers pass
// values whose exact result fits a double (an f32, or a product and sum of
// FP16 values), so this is the single rounding the device applies.
inline uint16_t half_bits_from_double(double f) {
    constexpr int MANTISSA = 52, HALF_MANTISSA = 10, EXP_BIAS = 1023, HALF_BIAS = 15;
    uint64_t x;
    memcpy(&x, &f, 8);
    const uint16_t sign = (uint16_t)((x >> 48) & 0x8000u);
    const uint64_t a = x & 0x7FFFFFFFFFFFFFFFull;
    if (a > 0x7FF0000000000000ull) return sign | 0x7E00u;  // NaN
    if (a == 0) return sign;
    const int e = (int)(a >> MANTISSA) - EXP_BIAS;  // a = 1.m·2^e (normal doubles only here)
    const uint64_t m = (a & ((1ull << MANTISSA) - 1)) | (1ull << MANTISSA);
    // Keep 11 significant bits for a normal half, fewer below 2^-14: the
    // result counts units of 2^(e-10), or of 2^-24 when subnormal.
    const int shift = e >= 1 - HALF_BIAS ? MANTISSA - HALF_MANTISSA : MANTISSA - HALF_MANTISSA + (1 - HALF_BIAS - e);
    if (shift > MANTISSA + 1) return sign;  // below half the smallest subnormal
    uint64_t q = m >> shift;
    const uint64_t rem = m & ((1ull << shift) - 1), halfway = 1ull << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    if (e < 1 - HALF_BIAS) return sign | (uint16_t)q;  // q = 1024 is the smallest normal, encoded alike
    int exp = e + HALF_BIAS;
    if (q == (2ull << HALF_MANTISSA)) {
        q >>= 1;
        ++exp;
    }
    if (exp >= 31) return sign | 0x7C00u;
    return sign | (uint16_t)((uint32_t)exp << HALF_MANTISSA) | (uint16_t)(q & 0x3FFu);
}

}  // namespace meswitch_emu

#endif  // MESWITCH_EMU_HALF_BITS_H
