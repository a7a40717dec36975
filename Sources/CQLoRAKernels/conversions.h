// Scalar fp32 <-> bf16/fp16 conversions with torch's rounding, shared by the kernel files.
// Not part of the module's public header.
#ifndef QLORA_CONVERSIONS_H
#define QLORA_CONVERSIONS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t b) { return u2f((uint32_t)b << 16); }

// Round to nearest even, NaN -> 0x7FC0: torch's c10::BFloat16 conversion.
static inline uint16_t f32_to_bf16(float f) {
    if (isnan(f)) return 0x7FC0;
    uint32_t u = f2u(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// IEEE binary16 -> binary32, exact.
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0x1F) return u2f(sign | 0x7F800000u | (mant << 13));
    if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
        float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    }
    return u2f(sign | ((exp + 112u) << 23) | (mant << 13));
}

// binary32 -> binary16, round to nearest even (F. Giesen's float_to_half_fast3_rtne).
static inline uint16_t f32_to_f16(float f) {
    const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
    const uint32_t denorm_magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t u = f2u(f), sign = u & 0x80000000u;
    u ^= sign;
    uint16_t o;
    if (u >= f16max) {
        o = (u > f32infty) ? 0x7E00 : 0x7C00;
    } else if (u < (113u << 23)) {
        o = (uint16_t)(f2u(u2f(u) + u2f(denorm_magic_u)) - denorm_magic_u);
    } else {
        uint32_t mant_odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xFFFu;
        u += mant_odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

#endif
