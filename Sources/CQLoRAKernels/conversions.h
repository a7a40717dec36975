// fp32 <-> bf16/fp16 conversions with torch's rounding, shared by the kernel files: the scalar
// reference of each, and the bf16 rounder once per vector level, written lane by lane like the
// scalar one. Not part of the module's public header.
#ifndef QLORA_CONVERSIONS_H
#define QLORA_CONVERSIONS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t b) { return u2f((uint32_t)b << 16); }

// The bf16 rounder: round to nearest even, as torch's c10::BFloat16 (round_to_nearest_even).
// Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped
// half is above a tie, or a tie with an odd kept half; finite values past the largest bf16
// carry on into infinity, and -0 stays -0. A NaN could carry into infinity or wrap past the
// sign bit into a zero, so it becomes 0x7FC0 first: torch's NaN, positive and quiet, payload
// dropped. Every vector form below is this, lane by lane.
static inline uint16_t f32_to_bf16(float f) {
    if (isnan(f)) return 0x7FC0;
    uint32_t u = f2u(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// The value a bf16 tensor would hold, kept in fp32 (the operand of a bf16-compute matmul).
static inline float round_bf16_f32(float f) { return bf16_to_f32(f32_to_bf16(f)); }

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

// MARK: - Vector forms, one per level

// The function targets of the two vector levels (qlora_level); AVX-512 also implies AVX2.
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

// W-lane types (clang vector extensions; they convert implicitly to and from __m256/__m512 of
// the same width) and the bf16 conversions on them. round_bf16_<level> is f32_to_bf16 above in
// every lane, kept in fp32: the rounded value's bits are the carried sum with its low half
// cleared, NaN lanes 0x7FC00000. It stays in 32-bit lanes because the matmul kernels want fp32
// operands; f32_to_bf16_<level> narrows it for stores.
#define DEFINE_VECTOR_CONVERSIONS(LEVEL, TARGET, W)                                              \
typedef float vf_##LEVEL __attribute__((ext_vector_type(W)));                                   \
typedef uint32_t vu32_##LEVEL __attribute__((ext_vector_type(W)));                              \
typedef uint16_t vu16_##LEVEL __attribute__((ext_vector_type(W)));                              \
                                                                                                \
TARGET static inline vf_##LEVEL round_bf16_##LEVEL(vf_##LEVEL v) {                              \
    vu32_##LEVEL u = __builtin_bit_cast(vu32_##LEVEL, v);                                       \
    vu32_##LEVEL rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;                      \
    vu32_##LEVEL ordered = __builtin_bit_cast(vu32_##LEVEL, v == v);  /* all ones unless NaN */ \
    return __builtin_bit_cast(vf_##LEVEL, (rounded & ordered) | (0x7FC00000u & ~ordered));      \
}                                                                                               \
TARGET static inline vu16_##LEVEL f32_to_bf16_##LEVEL(vf_##LEVEL v) {                           \
    return __builtin_convertvector(__builtin_bit_cast(vu32_##LEVEL, round_bf16_##LEVEL(v)) >> 16, \
                                   vu16_##LEVEL);                                               \
}                                                                                               \
TARGET static inline vf_##LEVEL bf16_to_f32_##LEVEL(vu16_##LEVEL b) {                           \
    return __builtin_bit_cast(vf_##LEVEL, __builtin_convertvector(b, vu32_##LEVEL) << 16);      \
}

DEFINE_VECTOR_CONVERSIONS(avx512, AVX512, 16)
DEFINE_VECTOR_CONVERSIONS(avx2, AVX2, 8)

#endif
