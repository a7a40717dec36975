// 4-bit blockwise quantize/dequantize/matmul kernels: a scalar version of each, an AVX-512
// version of each, and AVX2 versions of the two the matmul uses (range dequantize, GEMV),
// picked at run time. The scalar Swift reference (Sources/QLoRA) defines the answer.
#include "qlora_kernels.h"
#include "conversions.h"
#include <math.h>
#include <string.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <immintrin.h>

// MARK: - CPU dispatch

static _Atomic int max_level = QLORA_LEVEL_AVX512_BF16;

#if defined(__x86_64__)
#include <cpuid.h>
// AVX512-BF16 (vdpbf16ps): CPUID leaf 7, subleaf 1, EAX bit 5. The OS must also save the
// zmm state, which the AVX-512 check below already implies (__builtin_cpu_supports reads XCR0).
static int cpu_has_avx512_bf16(void) {
    unsigned int eax, ebx, ecx, edx;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 1, eax, ebx, ecx, edx);
    return (eax >> 5) & 1u;
}
#endif

static int probe_cpu_level(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return cpu_has_avx512_bf16() ? QLORA_LEVEL_AVX512_BF16 : QLORA_LEVEL_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return QLORA_LEVEL_AVX2;
#endif
    return QLORA_LEVEL_SCALAR;
}

// Every kernel call asks for the level, so the CPU is probed once. -1 until then; threads
// that race to the first call each probe and store the same value, so relaxed order is enough.
static _Atomic int cpu_level = -1;

int qlora_cpu_level(void) {
    int level = atomic_load_explicit(&cpu_level, memory_order_relaxed);
    if (level < 0) {
        level = probe_cpu_level();
        atomic_store_explicit(&cpu_level, level, memory_order_relaxed);
    }
    return level;
}

int qlora_cpu_has_skylakex_features(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

void qlora_set_max_level(int level) { atomic_store(&max_level, level); }

// The cap is read on every call (tests move it between calls); an entry point reads the level
// once and dispatches on that.
int qlora_active_level(void) {
    int cpu = qlora_cpu_level();
    int cap = atomic_load_explicit(&max_level, memory_order_relaxed);
    return cpu < cap ? cpu : cap;
}

static const float kAbsmaxFloor = 1e-38f;  // bitsandbytes: absmax.clamp(min=1e-38)

// MARK: - Quantize, scalar

static inline uint8_t bucket(float v, const float *mids) {
    uint8_t c = 0;
    for (int k = 0; k < 15; k++) c += (uint8_t)(v > mids[k]);
    return c;
}

#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)
#define LOAD_F16(v) f16_to_f32(v)

// max |x| over one block into *am; 0 when the block holds a NaN or infinity.
#define DEFINE_BLOCK_ABSMAX_SCALAR(NAME, T, LOAD)                                               \
static inline int NAME(const T *p, int64_t bs, float *am_out) {                                 \
    float am = 0.0f;                                                                            \
    for (int64_t i = 0; i < bs; i++) {                                                          \
        float a = fabsf(LOAD(p[i]));                                                            \
        if (!(a < INFINITY)) return 0;                                                          \
        am = a > am ? a : am;                                                                   \
    }                                                                                           \
    *am_out = am;                                                                               \
    return 1;                                                                                   \
}
DEFINE_BLOCK_ABSMAX_SCALAR(block_absmax_scalar_f32, float, LOAD_F32)
DEFINE_BLOCK_ABSMAX_SCALAR(block_absmax_scalar_bf16, uint16_t, LOAD_BF16)
DEFINE_BLOCK_ABSMAX_SCALAR(block_absmax_scalar_f16, uint16_t, LOAD_F16)

#define DEFINE_QUANT_SCALAR(NAME, T, LOAD, BLOCKMAX)                                            \
static int64_t NAME(const T *x, int64_t nblocks, int64_t bs, const float *mids,                 \
                    const uint8_t *order, float *absmax, uint8_t *packed) {                    \
    for (int64_t b = 0; b < nblocks; b++) {                                                     \
        const T *p = x + b * bs;                                                                \
        float am;                                                                               \
        if (!BLOCKMAX(p, bs, &am)) return b;                                                    \
        absmax[b] = am;                                                                         \
        float inv = 1.0f / (am > kAbsmaxFloor ? am : kAbsmaxFloor);                             \
        uint8_t *out = packed + b * bs / 2;                                                     \
        for (int64_t i = 0; i < bs; i += 2) {                                                   \
            uint8_t hi = order[bucket(LOAD(p[i]) * inv, mids)];                                 \
            uint8_t lo = order[bucket(LOAD(p[i + 1]) * inv, mids)];                             \
            out[i / 2] = (uint8_t)((hi << 4) | lo);                                             \
        }                                                                                       \
    }                                                                                           \
    return -1;                                                                                  \
}
DEFINE_QUANT_SCALAR(quant4_scalar_f32, float, LOAD_F32, block_absmax_scalar_f32)
DEFINE_QUANT_SCALAR(quant4_scalar_bf16, uint16_t, LOAD_BF16, block_absmax_scalar_bf16)
DEFINE_QUANT_SCALAR(quant4_scalar_f16, uint16_t, LOAD_F16, block_absmax_scalar_f16)

// MARK: - Quantize, AVX-512

AVX512 static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
AVX512 static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
AVX512 static inline __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

// Sorted-bucket index of 16 scaled values: a branchless binary search over the 15
// midpoints (+inf in slot 15), one vpermps per level. Equals the count of midpoints < v.
AVX512 static inline __m512i bucket16(__m512 v, __m512 mids) {
    __m512i idx = _mm512_setzero_si512();
    const int steps[4] = {8, 4, 2, 1};
    for (int s = 0; s < 4; s++) {
        __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(steps[s] - 1));
        __m512 m = _mm512_permutexvar_ps(probe, mids);
        __mmask16 gt = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ);
        idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(steps[s]));
    }
    return idx;
}

// 16 nibbles (int32 lanes) -> 8 packed bytes, even element in the high nibble.
AVX512 static inline void pack16(__m512i nib, uint8_t *out) {
    __m128i b = _mm512_cvtepi32_epi8(nib);
    __m128i hi = _mm_and_si128(_mm_slli_epi16(b, 4), _mm_set1_epi16(0x00F0));
    __m128i lo = _mm_srli_epi16(b, 8);
    __m128i w = _mm_or_si128(hi, lo);
    _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(w, w));
}

#define DEFINE_BLOCK_ABSMAX_AVX512(NAME, T, LOAD16)                                             \
AVX512 static inline int NAME(const T *p, int64_t bs, float *am_out) {                          \
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));                  \
    const __m512 inf = _mm512_set1_ps(INFINITY);                                                \
    __m512 m = _mm512_setzero_ps();                                                             \
    __mmask16 bad = 0;                                                                          \
    for (int64_t i = 0; i < bs; i += 16) {                                                      \
        __m512 a = _mm512_and_ps(LOAD16(p + i), absmask);                                       \
        bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);                                         \
        m = _mm512_max_ps(m, a);                                                                \
    }                                                                                           \
    if (bad) return 0;                                                                          \
    *am_out = _mm512_reduce_max_ps(m);                                                          \
    return 1;                                                                                   \
}
DEFINE_BLOCK_ABSMAX_AVX512(block_absmax_avx512_f32, float, load16_f32)
DEFINE_BLOCK_ABSMAX_AVX512(block_absmax_avx512_bf16, uint16_t, load16_bf16)
DEFINE_BLOCK_ABSMAX_AVX512(block_absmax_avx512_f16, uint16_t, load16_f16)

#define DEFINE_QUANT_AVX512(NAME, T, LOAD16, BLOCKMAX)                                          \
AVX512 static int64_t NAME(const T *x, int64_t nblocks, int64_t bs, const float *mids16,        \
                           const uint8_t *order, float *absmax, uint8_t *packed) {              \
    const __m512 mids = _mm512_loadu_ps(mids16);                                                \
    const __m512i ord = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)order));          \
    for (int64_t b = 0; b < nblocks; b++) {                                                     \
        const T *p = x + b * bs;                                                                \
        float am;                                                                               \
        if (!BLOCKMAX(p, bs, &am)) return b;                                                    \
        absmax[b] = am;                                                                         \
        const __m512 inv = _mm512_set1_ps(1.0f / (am > kAbsmaxFloor ? am : kAbsmaxFloor));      \
        uint8_t *out = packed + b * bs / 2;                                                     \
        for (int64_t i = 0; i < bs; i += 16) {                                                  \
            __m512i idx = bucket16(_mm512_mul_ps(LOAD16(p + i), inv), mids);                    \
            pack16(_mm512_permutexvar_epi32(idx, ord), out + i / 2);                            \
        }                                                                                       \
    }                                                                                           \
    return -1;                                                                                  \
}
DEFINE_QUANT_AVX512(quant4_avx512_f32, float, load16_f32, block_absmax_avx512_f32)
DEFINE_QUANT_AVX512(quant4_avx512_bf16, uint16_t, load16_bf16, block_absmax_avx512_bf16)
DEFINE_QUANT_AVX512(quant4_avx512_f16, uint16_t, load16_f16, block_absmax_avx512_f16)

#define DEFINE_QUANT_ENTRY(NAME, T, SCALAR, VEC)                                                \
int64_t NAME(const T *x, int64_t nblocks, int64_t bs, const float *mids16,                      \
             const uint8_t *order16, float *absmax, uint8_t *packed) {                         \
    if (qlora_active_level() >= QLORA_LEVEL_AVX512 && bs % 16 == 0)                             \
        return VEC(x, nblocks, bs, mids16, order16, absmax, packed);                            \
    return SCALAR(x, nblocks, bs, mids16, order16, absmax, packed);                             \
}
DEFINE_QUANT_ENTRY(qlora_quantize4_blocks_f32, float, quant4_scalar_f32, quant4_avx512_f32)
DEFINE_QUANT_ENTRY(qlora_quantize4_blocks_bf16, uint16_t, quant4_scalar_bf16, quant4_avx512_bf16)
DEFINE_QUANT_ENTRY(qlora_quantize4_blocks_f16, uint16_t, quant4_scalar_f16, quant4_avx512_f16)

// MARK: - Absmax only

// The quantize kernels' absmax step alone.
#define DEFINE_ABSMAX(NAME, T, BLOCKMAX, ATTR)                                                  \
ATTR static int64_t NAME(const T *x, int64_t nblocks, int64_t bs, float *absmax) {              \
    for (int64_t b = 0; b < nblocks; b++)                                                       \
        if (!BLOCKMAX(x + b * bs, bs, &absmax[b])) return b;                                    \
    return -1;                                                                                  \
}
#define NO_TARGET
DEFINE_ABSMAX(absmax_scalar_f32, float, block_absmax_scalar_f32, NO_TARGET)
DEFINE_ABSMAX(absmax_scalar_bf16, uint16_t, block_absmax_scalar_bf16, NO_TARGET)
DEFINE_ABSMAX(absmax_scalar_f16, uint16_t, block_absmax_scalar_f16, NO_TARGET)
DEFINE_ABSMAX(absmax_avx512_f32, float, block_absmax_avx512_f32, AVX512)
DEFINE_ABSMAX(absmax_avx512_bf16, uint16_t, block_absmax_avx512_bf16, AVX512)
DEFINE_ABSMAX(absmax_avx512_f16, uint16_t, block_absmax_avx512_f16, AVX512)

#define DEFINE_ABSMAX_ENTRY(NAME, T, SCALAR, VEC)                                               \
int64_t NAME(const T *x, int64_t nblocks, int64_t bs, float *absmax) {                          \
    if (qlora_active_level() >= QLORA_LEVEL_AVX512 && bs % 16 == 0)                             \
        return VEC(x, nblocks, bs, absmax);                                                     \
    return SCALAR(x, nblocks, bs, absmax);                                                      \
}
DEFINE_ABSMAX_ENTRY(qlora_absmax_blocks_f32, float, absmax_scalar_f32, absmax_avx512_f32)
DEFINE_ABSMAX_ENTRY(qlora_absmax_blocks_bf16, uint16_t, absmax_scalar_bf16, absmax_avx512_bf16)
DEFINE_ABSMAX_ENTRY(qlora_absmax_blocks_f16, uint16_t, absmax_scalar_f16, absmax_avx512_f16)

// MARK: - Dequantize

#define STORE_F32(o, v) (o) = (v)
#define STORE_BF16(o, v) (o) = f32_to_bf16(v)
#define STORE_F16(o, v) (o) = f32_to_f16(v)

// Elements [start, end) one at a time; start may be odd.
#define DEFINE_DEQUANT_SCALAR(NAME, T, STORE)                                                   \
static void NAME(const uint8_t *packed, int64_t start, int64_t end, int64_t bs,                 \
                 const float *code, const float *absmax, T *out) {                              \
    for (int64_t i = start; i < end; i++) {                                                     \
        uint8_t byte = packed[i >> 1];                                                          \
        uint8_t nib = (i & 1) ? (byte & 0x0F) : (byte >> 4);                                    \
        STORE(out[i], code[nib] * absmax[i / bs]);                                              \
    }                                                                                           \
}
DEFINE_DEQUANT_SCALAR(dequant4_scalar_f32, float, STORE_F32)
DEFINE_DEQUANT_SCALAR(dequant4_scalar_bf16, uint16_t, STORE_BF16)
DEFINE_DEQUANT_SCALAR(dequant4_scalar_f16, uint16_t, STORE_F16)

// 8 packed bytes -> 16 nibble indices in element order.
AVX512 static inline __m512i unpack16(const uint8_t *p) {
    __m128i raw = _mm_loadl_epi64((const __m128i *)p);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    __m128i lo = _mm_and_si128(raw, mask);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
}

AVX512 static inline void store16_f32(float *o, __m512 v) { _mm512_storeu_ps(o, v); }
AVX512 static inline void store16_bf16(uint16_t *o, __m512 v) {
    vu16_avx512 h = f32_to_bf16_avx512(v);
    memcpy(o, &h, sizeof h);
}
AVX512 static inline void store16_f16(uint16_t *o, __m512 v) {
    _mm256_storeu_si256((__m256i *)o, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Full blocks with 16 | blocksize: 64 elements (32 bytes) per step where the block allows.
#define DEFINE_DEQUANT_AVX512(NAME, T, STORE16)                                                 \
AVX512 static void NAME(const uint8_t *packed, int64_t nblocks, int64_t bs,                     \
                        const float *code16, const float *absmax, T *out) {                     \
    const __m512 code = _mm512_loadu_ps(code16);                                                \
    for (int64_t b = 0; b < nblocks; b++) {                                                     \
        const __m512 s = _mm512_set1_ps(absmax[b]);                                             \
        const uint8_t *p = packed + b * bs / 2;                                                 \
        T *o = out + b * bs;                                                                    \
        int64_t i = 0;                                                                          \
        for (; i + 64 <= bs; i += 64) {                                                         \
            __m512 v0 = _mm512_mul_ps(_mm512_permutexvar_ps(unpack16(p + i / 2), code), s);     \
            __m512 v1 = _mm512_mul_ps(_mm512_permutexvar_ps(unpack16(p + i / 2 + 8), code), s); \
            __m512 v2 = _mm512_mul_ps(_mm512_permutexvar_ps(unpack16(p + i / 2 + 16), code), s);\
            __m512 v3 = _mm512_mul_ps(_mm512_permutexvar_ps(unpack16(p + i / 2 + 24), code), s);\
            STORE16(o + i, v0); STORE16(o + i + 16, v1);                                        \
            STORE16(o + i + 32, v2); STORE16(o + i + 48, v3);                                   \
        }                                                                                       \
        for (; i < bs; i += 16)                                                                 \
            STORE16(o + i, _mm512_mul_ps(_mm512_permutexvar_ps(unpack16(p + i / 2), code), s)); \
    }                                                                                           \
}
DEFINE_DEQUANT_AVX512(dequant4_avx512_f32, float, store16_f32)
DEFINE_DEQUANT_AVX512(dequant4_avx512_bf16, uint16_t, store16_bf16)
DEFINE_DEQUANT_AVX512(dequant4_avx512_f16, uint16_t, store16_f16)

#define DEFINE_DEQUANT_ENTRY(NAME, T, SCALAR, VEC)                                              \
void NAME(const uint8_t *packed, int64_t n, int64_t bs, const float *code16,                    \
          const float *absmax, T *out) {                                                        \
    int64_t done = 0;                                                                           \
    if (qlora_active_level() >= QLORA_LEVEL_AVX512 && bs % 16 == 0) {                           \
        int64_t nfull = n / bs;                                                                 \
        VEC(packed, nfull, bs, code16, absmax, out);                                            \
        done = nfull * bs;                                                                      \
    }                                                                                           \
    SCALAR(packed, done, n, bs, code16, absmax, out);                                           \
}
DEFINE_DEQUANT_ENTRY(qlora_dequantize4_f32, float, dequant4_scalar_f32, dequant4_avx512_f32)
DEFINE_DEQUANT_ENTRY(qlora_dequantize4_bf16, uint16_t, dequant4_scalar_bf16, dequant4_avx512_bf16)
DEFINE_DEQUANT_ENTRY(qlora_dequantize4_f16, uint16_t, dequant4_scalar_f16, dequant4_avx512_f16)

// MARK: - AVX2 versions of the matmul kernels

static inline float nibble_value(const uint8_t *packed, int64_t i, int64_t bs, const float *code, const float *absmax) {
    uint8_t byte = packed[i >> 1];
    uint8_t nib = (i & 1) ? (byte & 0x0F) : (byte >> 4);
    return code[nib] * absmax[i / bs];
}

// 8 nibble indices (int32 lanes) from 4 packed bytes, element order.
AVX2 static inline __m256i unpack8_avx2(const uint8_t *p) {
    int32_t raw32;
    memcpy(&raw32, p, 4);
    __m128i raw = _mm_cvtsi32_si128(raw32);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    __m128i lo = _mm_and_si128(raw, mask);
    return _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
}

// A 16-entry table lookup: two 8-lane permutes, chosen by index bit 3.
AVX2 static inline __m256 lookup16_avx2(__m256i idx, __m256 lo, __m256 hi) {
    __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

AVX2 static void dequant_range_avx2(const uint8_t *packed, int64_t start, int64_t count, int64_t bs,
                                    const float *code16, const float *absmax, int rb, float *out) {
    const __m256 lo = _mm256_loadu_ps(code16), hi = _mm256_loadu_ps(code16 + 8);
    int64_t i = start, end = start + count;
    for (; i < end && (i & 7); i++) { float v = nibble_value(packed, i, bs, code16, absmax); out[i - start] = rb ? round_bf16_f32(v) : v; }
    for (; i + 8 <= end; i += 8) {
        __m256 v = _mm256_mul_ps(lookup16_avx2(unpack8_avx2(packed + i / 2), lo, hi), _mm256_set1_ps(absmax[i / bs]));
        _mm256_storeu_ps(out + (i - start), rb ? round_bf16_avx2(v) : v);
    }
    for (; i < end; i++) { float v = nibble_value(packed, i, bs, code16, absmax); out[i - start] = rb ? round_bf16_f32(v) : v; }
}

// in % 8 == 0: per block, bf16(code * absmax) as two 8-lane tables; 8 weights per step.
AVX2 static void gemv4_avx2(const uint8_t *packed, int64_t r0, int64_t r1, int64_t in, int64_t bs,
                            const float *code16, const float *absmax, const float *x, int64_t tokens,
                            float *y, int64_t ldy) {
    const __m256 clo = _mm256_loadu_ps(code16), chi = _mm256_loadu_ps(code16 + 8);
    for (int64_t r = r0; r < r1; r++) {
        __m256 acc[8];
        for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
        const int64_t base = r * in;
        int64_t block = base / bs, left = bs - base % bs;
        __m256 s = _mm256_set1_ps(absmax[block]);
        __m256 tlo = round_bf16_avx2(_mm256_mul_ps(clo, s)), thi = round_bf16_avx2(_mm256_mul_ps(chi, s));
        for (int64_t k = 0, u = 0; k < in; k += 8, u = (u + 1) & 3) {
            if (left == 0) {
                block++;
                left = bs;
                s = _mm256_set1_ps(absmax[block]);
                tlo = round_bf16_avx2(_mm256_mul_ps(clo, s));
                thi = round_bf16_avx2(_mm256_mul_ps(chi, s));
            }
            left -= 8;
            __m256 w = lookup16_avx2(unpack8_avx2(packed + (base + k) / 2), tlo, thi);
            if (tokens == 1) {
                acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w, acc[u]);  // four chains for one token
            } else {
                for (int64_t t = 0; t < tokens; t++) acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * in + k), w, acc[t]);
            }
        }
        if (tokens == 1) acc[0] = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        for (int64_t t = 0; t < tokens; t++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[t * ldy + r] = _mm_cvtss_f32(h);
        }
    }
}

// MARK: - Dequantize a range, fp32 out (optionally bf16-rounded)

static inline __mmask16 mask16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

// 16 values starting at element i (i % 16 == 0, so one block and 8 whole bytes).
AVX512 static inline __m512 dequant16_at(const uint8_t *packed, int64_t i, int64_t bs, __m512 code, const float *absmax) {
    return _mm512_mul_ps(_mm512_permutexvar_ps(unpack16(packed + i / 2), code), _mm512_set1_ps(absmax[i / bs]));
}

AVX512 static void dequant_range_avx512(const uint8_t *packed, int64_t start, int64_t count, int64_t bs,
                                        const float *code16, const float *absmax, int rb, float *out) {
    const __m512 code = _mm512_loadu_ps(code16);
    int64_t i = start, end = start + count;
    for (; i < end && (i & 15); i++) { float v = nibble_value(packed, i, bs, code16, absmax); out[i - start] = rb ? round_bf16_f32(v) : v; }
    for (; i + 16 <= end; i += 16) {
        __m512 v = dequant16_at(packed, i, bs, code, absmax);
        _mm512_storeu_ps(out + (i - start), rb ? round_bf16_avx512(v) : v);
    }
    for (; i < end; i++) { float v = nibble_value(packed, i, bs, code16, absmax); out[i - start] = rb ? round_bf16_f32(v) : v; }
}

void qlora_dequantize4_range_f32(const uint8_t *packed, int64_t start, int64_t count, int64_t bs,
                                 const float *code16, const float *absmax, int round_bf16, float *out) {
    const int level = qlora_active_level();
    if (level >= QLORA_LEVEL_AVX512 && bs % 16 == 0) {
        dequant_range_avx512(packed, start, count, bs, code16, absmax, round_bf16, out);
        return;
    }
    if (level >= QLORA_LEVEL_AVX2 && bs % 8 == 0) {
        dequant_range_avx2(packed, start, count, bs, code16, absmax, round_bf16, out);
        return;
    }
    for (int64_t i = start; i < start + count; i++) {
        float v = nibble_value(packed, i, bs, code16, absmax);
        out[i - start] = round_bf16 ? round_bf16_f32(v) : v;
    }
}

// MARK: - Fused GEMV, bf16 semantics

// The 16 weights a block can hold, bf16(code[j] * absmax): a table for vpermps.
AVX512 static inline __m512 block_table16(__m512 code, float absmax) {
    return round_bf16_avx512(_mm512_mul_ps(code, _mm512_set1_ps(absmax)));
}

static void gemv4_scalar(const uint8_t *packed, int64_t r0, int64_t r1, int64_t in, int64_t bs,
                         const float *code, const float *absmax, const float *x, int64_t tokens, float *y, int64_t ldy) {
    for (int64_t r = r0; r < r1; r++) {
        float acc[8] = {0};
        for (int64_t k = 0; k < in; k++) {
            float w = round_bf16_f32(nibble_value(packed, r * in + k, bs, code, absmax));
            for (int64_t t = 0; t < tokens; t++) acc[t] += x[t * in + k] * w;
        }
        for (int64_t t = 0; t < tokens; t++) y[t * ldy + r] = acc[t];
    }
}

// Rows whose first element is 16-aligned (in % 16 == 0). Per block, the 16 possible weight
// values bf16(code[j] * absmax) are computed once into a register table; each group of 16
// weights is then one vpermps of its nibbles, FMA'd into one accumulator per token.
AVX512 static void gemv4_avx512(const uint8_t *packed, int64_t r0, int64_t r1, int64_t in, int64_t bs,
                                const float *code16, const float *absmax, const float *x, int64_t tokens,
                                float *y, int64_t ldy) {
    const __m512 code = _mm512_loadu_ps(code16);
    if (tokens == 1) {
        // One token: four accumulators in rotation, so the FMA latency is not the limit.
        for (int64_t r = r0; r < r1; r++) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            const int64_t base = r * in;
            int64_t block = base / bs;
            int64_t left = bs - base % bs;
            __m512 table = block_table16(code, absmax[block]);
            for (int64_t k = 0, u = 0; k < in; k += 16, u = (u + 1) & 3) {
                if (left == 0) {
                    block++;
                    left = bs;
                    table = block_table16(code, absmax[block]);
                }
                left -= 16;
                __m512 w = _mm512_permutexvar_ps(unpack16(packed + (base + k) / 2), table);
                acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), w, acc[u]);
            }
            y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
        }
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        __m512 acc[8];
        for (int t = 0; t < 8; t++) acc[t] = _mm512_setzero_ps();
        const int64_t base = r * in;
        int64_t block = base / bs;
        int64_t left = bs - base % bs;  // elements until the next block starts (a multiple of 16)
        __m512 table = block_table16(code, absmax[block]);
        for (int64_t k = 0; k < in; k += 16) {
            if (left == 0) {
                block++;
                left = bs;
                table = block_table16(code, absmax[block]);
            }
            left -= 16;
            __m512 w = _mm512_permutexvar_ps(unpack16(packed + (base + k) / 2), table);
            for (int64_t t = 0; t < tokens; t++) acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * in + k), w, acc[t]);
        }
        for (int64_t t = 0; t < tokens; t++) y[t * ldy + r] = _mm512_reduce_add_ps(acc[t]);
    }
}

// in % 32 == 0: 16 packed bytes hold 32 weights. Zero-extending the bytes to 32-bit lanes
// gives the odd elements' nibbles in the low 4 bits (vpermps reads only those) and, after a
// shift, the even elements': two lookups, one widening. The dot product does not care about
// order, so x is de-interleaved to match (even elements, then odd, per 32) once per call.
AVX512 static void gemv4_avx512_pairs(const uint8_t *packed, int64_t r0, int64_t r1, int64_t in, int64_t bs,
                                      const float *code16, const float *absmax, const float *x, int64_t tokens,
                                      float *y, int64_t ldy, float *xd) {
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t k = 0; k < in; k += 32)
            for (int j = 0; j < 16; j++) {
                xd[t * in + k + j] = x[t * in + k + 2 * j];
                xd[t * in + k + 16 + j] = x[t * in + k + 2 * j + 1];
            }
    const __m512 code = _mm512_loadu_ps(code16);
    for (int64_t r = r0; r < r1; r++) {
        __m512 acc[8][2];
        for (int t = 0; t < 8; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        const int64_t base = r * in;
        int64_t block = base / bs;
        int64_t left = bs - base % bs;  // a multiple of 32
        __m512 table = block_table16(code, absmax[block]);
        for (int64_t k = 0; k < in; k += 32) {
            if (left == 0) {
                block++;
                left = bs;
                table = block_table16(code, absmax[block]);
            }
            left -= 32;
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + (base + k) / 2)));
            __m512 wodd = _mm512_permutexvar_ps(bytes, table);
            __m512 weven = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
            for (int64_t t = 0; t < tokens; t++) {
                acc[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xd + t * in + k), weven, acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xd + t * in + k + 16), wodd, acc[t][1]);
            }
        }
        for (int64_t t = 0; t < tokens; t++) y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
    }
}

// in % 64 == 0, bs % 64 == 0, AVX512-BF16: per block, the 16 possible weights bf16(code[j] * absmax)
// as a 16-bit table for vpermw (vcvtneps2bf16 rounds to nearest even, as round_bf16 does; it
// flushes denormals, which vdpbf16ps would read as zero anyway). 32 packed bytes widen to 32
// 16-bit lanes: the low nibbles (odd elements) and high nibbles (even elements) index the table,
// 32 weights per vpermw, and vdpbf16ps multiplies them with x's bf16 bits in pairs (exact
// products, fp32 sums). x is laid out once per call to match: per 64 elements, the 32 even ones
// then the 32 odd ones.
AVX512BF16 static inline __m512i block_table16_bf16(__m512 code, float absmax) {
    return _mm512_zextsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(absmax))));
}

// Rows the one-token loop takes at a time: 8 measured fastest of 1, 2, 4, 6, 8 on the AMD EPYC
// (Zen 5) machine (4096x14336: 37, 45, 57, 60, 67 G params/s on 2 threads).
enum { GEMV_ROWS = 8 };
AVX512BF16 static void gemv4_avx512bf16(const uint8_t *packed, int64_t r0, int64_t r1, int64_t in, int64_t bs,
                                        const float *code16, const float *absmax, const float *x, int64_t tokens,
                                        float *y, int64_t ldy, uint16_t *xd) {
    // x holds bf16 values, so vcvtneps2bf16 is exact on them (a denormal may flush to zero,
    // which vdpbf16ps reads as zero anyway); vpermt2w then picks the even and the odd words.
    const __m512i even_words = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,
                                                30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd_words = _mm512_add_epi16(even_words, _mm512_set1_epi16(1));
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t k = 0; k < in; k += 64) {
            const float *xk = x + t * in + k;
            __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xk))),
                                           (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xk + 16)), 1);
            __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xk + 32))),
                                           (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xk + 48)), 1);
            _mm512_storeu_si512(xd + t * in + k, _mm512_permutex2var_epi16(a, even_words, b));
            _mm512_storeu_si512(xd + t * in + k + 32, _mm512_permutex2var_epi16(a, odd_words, b));
        }
    const __m512 code = _mm512_loadu_ps(code16);
    const __m512i low = _mm512_set1_epi16(0x0F);
    int64_t r = r0;
    if (tokens == 1 && in % bs == 0) {
        // GEMV_ROWS rows at a time: x is read once per GEMV_ROWS rows (a long row's x no longer
        // has to stay in L1 beside the weights streaming past), and 2·GEMV_ROWS accumulator
        // chains hide vdpbf16ps's latency. Each row sums in the same order as the one-row loop.
        for (; r + GEMV_ROWS <= r1; r += GEMV_ROWS) {
            __m512 acc[GEMV_ROWS][2];
            __m512i table[GEMV_ROWS];
            for (int q = 0; q < GEMV_ROWS; q++) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
            for (int64_t k = 0; k < in; k += 64) {
                if (k % bs == 0)
                    for (int q = 0; q < GEMV_ROWS; q++) table[q] = block_table16_bf16(code, absmax[((r + q) * in + k) / bs]);
                const __m512bh xe = (__m512bh)_mm512_loadu_si512(xd + k), xo = (__m512bh)_mm512_loadu_si512(xd + k + 32);
                for (int q = 0; q < GEMV_ROWS; q++) {
                    __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + ((r + q) * in + k) / 2)));
                    acc[q][0] = _mm512_dpbf16_ps(acc[q][0], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table[q]), xe);
                    acc[q][1] = _mm512_dpbf16_ps(acc[q][1], (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, low), table[q]), xo);
                }
            }
            for (int q = 0; q < GEMV_ROWS; q++) y[r + q] = _mm512_reduce_add_ps(_mm512_add_ps(acc[q][0], acc[q][1]));
        }
    }
    for (; r < r1; r++) {
        __m512 acc[8][2];
        for (int t = 0; t < 8; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        const int64_t base = r * in;
        int64_t block = base / bs;
        int64_t left = bs - base % bs;  // a multiple of 64
        __m512i table = block_table16_bf16(code, absmax[block]);
        for (int64_t k = 0; k < in; k += 64) {
            if (left == 0) {
                block++;
                left = bs;
                table = block_table16_bf16(code, absmax[block]);
            }
            left -= 64;
            __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + (base + k) / 2)));
            __m512bh wodd = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, low), table);
            __m512bh weven = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
            for (int64_t t = 0; t < tokens; t++) {
                acc[t][0] = _mm512_dpbf16_ps(acc[t][0], weven, (__m512bh)_mm512_loadu_si512(xd + t * in + k));
                acc[t][1] = _mm512_dpbf16_ps(acc[t][1], wodd, (__m512bh)_mm512_loadu_si512(xd + t * in + k + 32));
            }
        }
        for (int64_t t = 0; t < tokens; t++) y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
    }
}

void qlora_gemv4_bf16(const uint8_t *packed, int64_t r0, int64_t r1, int64_t in, int64_t bs,
                      const float *code16, const float *absmax, const float *x, int64_t tokens, float *y, int64_t ldy) {
    if (tokens < 1 || tokens > 8) return;
    const int level = qlora_active_level();
    if (level >= QLORA_LEVEL_AVX512_BF16 && bs % 64 == 0 && in % 64 == 0) {
        uint16_t *xd = (uint16_t *)malloc((size_t)(tokens * in) * sizeof(uint16_t));
        if (xd) {
            gemv4_avx512bf16(packed, r0, r1, in, bs, code16, absmax, x, tokens, y, ldy, xd);
            free(xd);
            return;
        }
    }
    if (level >= QLORA_LEVEL_AVX512 && bs % 32 == 0 && in % 32 == 0) {
        float *xd = (float *)malloc((size_t)(tokens * in) * sizeof(float));
        if (xd) {
            gemv4_avx512_pairs(packed, r0, r1, in, bs, code16, absmax, x, tokens, y, ldy, xd);
            free(xd);
            return;
        }
    }
    if (level >= QLORA_LEVEL_AVX512 && bs % 16 == 0 && in % 16 == 0)
        gemv4_avx512(packed, r0, r1, in, bs, code16, absmax, x, tokens, y, ldy);
    else if (level >= QLORA_LEVEL_AVX2 && bs % 8 == 0 && in % 8 == 0)
        gemv4_avx2(packed, r0, r1, in, bs, code16, absmax, x, tokens, y, ldy);
    else
        gemv4_scalar(packed, r0, r1, in, bs, code16, absmax, x, tokens, y, ldy);
}

// MARK: - Round an activation to bf16 values

AVX512 static void round_bf16_array_avx512(const float *in, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, round_bf16_avx512(_mm512_loadu_ps(in + i)));
    for (; i < n; i++) out[i] = round_bf16_f32(in[i]);
}

void qlora_round_bf16_f32(const float *in, int64_t n, float *out) {
    if (qlora_active_level() >= QLORA_LEVEL_AVX512) { round_bf16_array_avx512(in, n, out); return; }
    for (int64_t i = 0; i < n; i++) out[i] = round_bf16_f32(in[i]);
}

// MARK: - bf16 dot-product GEMM with a 4-bit weight

// Rows of x to bf16 bits (the rounder above), each row zero-padded to ld elements.
AVX512 static void bf16_rows_avx512(const float *x, int64_t rows, int64_t cols, int64_t ld, uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *s = x + r * cols;
        uint16_t *o = out + r * ld;
        int64_t i = 0;
        for (; i + 16 <= cols; i += 16) {
            vu16_avx512 h = f32_to_bf16_avx512(_mm512_loadu_ps(s + i));
            memcpy(o + i, &h, sizeof h);
        }
        for (; i < cols; i++) o[i] = f32_to_bf16(s[i]);
        for (; i < ld; i++) o[i] = 0;
    }
}

void qlora_f32_to_bf16_rows(const float *x, int64_t rows, int64_t cols, int64_t ld, uint16_t *out) {
    if (qlora_active_level() >= QLORA_LEVEL_AVX512) { bf16_rows_avx512(x, rows, cols, ld, out); return; }
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < cols; i++) out[r * ld + i] = f32_to_bf16(x[r * cols + i]);
        for (int64_t i = cols; i < ld; i++) out[r * ld + i] = 0;
    }
}

// B(k, n), the GEMM's right operand: W[n, k] forward (K = in, N = out), W[k, n] backward
// (K = out, N = in); bf16(code * absmax) as the other kernels decode it.
static inline float gemm_b(const uint8_t *packed, int64_t in, int64_t bs, const float *code, const float *absmax,
                           int backward, int64_t k, int64_t n) {
    return round_bf16_f32(nibble_value(packed, backward ? k * in + n : n * in + k, bs, code, absmax));
}

// The reference: one fp32 accumulator per output, k ascending, products exact.
static void gemm4_bf16_scalar(const uint8_t *packed, int64_t out, int64_t in, int64_t bs, const float *code16,
                              const float *absmax, int backward, const uint16_t *a, int64_t lda, int64_t m,
                              int64_t n0, int64_t n1, float *c, int64_t ldc) {
    const int64_t kdim = backward ? out : in;
    for (int64_t i = 0; i < m; i++)
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < kdim; k++) acc += bf16_to_f32(a[i * lda + k]) * gemm_b(packed, in, bs, code16, absmax, backward, k, n);
            c[i * ldc + n] = acc;
        }
}


enum { GEMM_KC = 256, GEMM_NC = 256, GEMM_MR = 6 };  // K and N block (multiples of 16), rows per microkernel

// The packed B block (KC·NC bf16) and 32 floats for a vector crossing an edge (gemm_b16).
int64_t qlora_gemm4_bf16_scratch_floats(void) { return (int64_t)GEMM_KC * GEMM_NC / 2 + 32; }

// Packed B block (one K block of kp pairs, one N block of ng 16-column groups):
//   bp[(g * kp + p) * 32 + 2 * j + h] = bf16 bits of B(k0 + 2p + h, n0 + 16g + j),
// zero past the block's edges, so one 512-bit load is 16 lanes of (even k, odd k) pairs, the
// operand order of vdpbf16ps. Values are dequantized and rounded to bf16 in registers; t (32
// floats) holds only a vector that crosses the block's or a quantization block's edge.

// 32 values (bf16 in fp32) -> 16 words, word q = (bits of v[2q + 1]) << 16 | bits of v[2q].
AVX512 static inline __m512i bf16_pairs32(__m512 lo, __m512 hi) {
    const __m512i odd_halves = _mm512_setr_epi32(0x00030001, 0x00070005, 0x000B0009, 0x000F000D, 0x00130011, 0x00170015,
                                                 0x001B0019, 0x001F001D, 0x00230021, 0x00270025, 0x002B0029, 0x002F002D,
                                                 0x00330031, 0x00370035, 0x003B0039, 0x003F003D);
    return _mm512_permutex2var_epi16(_mm512_castps_si512(lo), odd_halves, _mm512_castps_si512(hi));
}

// 16 rounded values of W from element e on, the first `count` of them (zero after): one
// vector load where the 16 lie in one aligned step, else through t.
AVX512 static inline __m512 gemm_b16(const uint8_t *packed, int64_t e, int64_t count, int64_t bs, __m512 code,
                                     const float *code16, const float *absmax, float *t) {
    if (count >= 16 && (e & 15) == 0) return round_bf16_avx512(dequant16_at(packed, e, bs, code, absmax));
    if (count <= 0) return _mm512_setzero_ps();
    dequant_range_avx512(packed, e, count < 16 ? count : 16, bs, code16, absmax, 1, t);
    return _mm512_maskz_loadu_ps(mask16(count), t);
}

// r[j] word p -> r[p] word j (16 x 16 dwords).
AVX512 static inline void transpose16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // r[4a + b] now holds, in each 128-bit lane l, words (rows 4a..4a+3) of column 4l + b.
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++) t[4 * b + a] = r[4 * a + b];
    // t[4b + a]: lane l = rows 4a..4a+3 at column 4l + b. Gather lane l of the four a's.
    for (int b = 0; b < 4; b++) {
        __m512i x0 = _mm512_shuffle_i32x4(t[4 * b], t[4 * b + 1], 0x44), x1 = _mm512_shuffle_i32x4(t[4 * b], t[4 * b + 1], 0xEE);
        __m512i y0 = _mm512_shuffle_i32x4(t[4 * b + 2], t[4 * b + 3], 0x44), y1 = _mm512_shuffle_i32x4(t[4 * b + 2], t[4 * b + 3], 0xEE);
        r[b] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        r[4 + b] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
        r[8 + b] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        r[12 + b] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
}

AVX512 static void gemm_pack_b(const uint8_t *packed, int64_t in, int64_t bs, const float *code16, const float *absmax,
                               int backward, int64_t k0, int64_t kk, int64_t n0, int64_t nc, float *t, uint16_t *bp) {
    const int64_t kp = (kk + 1) / 2, ng = (nc + 15) / 16;
    const __m512 code = _mm512_loadu_ps(code16);
    if (!backward) {
        // B(k, n) = W[n0 + n, k0 + k]: a row's 32 consecutive k are 16 pairs, one word each;
        // 16 rows' words transposed give 16 pairs' vectors.
        for (int64_t g = 0; g < ng; g++)
            for (int64_t p0 = 0; p0 < kp; p0 += 16) {
                __m512i w[16];
                for (int j = 0; j < 16; j++) {
                    const int64_t n = 16 * g + j, left = n < nc ? kk - 2 * p0 : 0, e = (n0 + n) * in + k0 + 2 * p0;
                    w[j] = bf16_pairs32(gemm_b16(packed, e, left, bs, code, code16, absmax, t),
                                        gemm_b16(packed, e + 16, left - 16, bs, code, code16, absmax, t));
                }
                transpose16_epi32(w);
                for (int64_t p = p0; p < kp && p < p0 + 16; p++) _mm512_storeu_si512(bp + (g * kp + p) * 32, w[p - p0]);
            }
    } else {
        // B(k, n) = W[k0 + k, n0 + n]: a pair interleaves two rows' 16 columns.
        const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
        for (int64_t p = 0; p < kp; p++)
            for (int64_t g = 0; g < ng; g++) {
                const int64_t left = nc - 16 * g, e = (k0 + 2 * p) * in + n0 + 16 * g;
                __m512i ev = _mm512_castps_si512(gemm_b16(packed, e, left, bs, code, code16, absmax, t));
                __m512i od = _mm512_castps_si512(gemm_b16(packed, e + in, 2 * p + 1 < kk ? left : 0, bs, code, code16, absmax, t));
                _mm512_storeu_si512(bp + (g * kp + p) * 32, _mm512_or_si512(_mm512_and_si512(od, hi), _mm512_srli_epi32(ev, 16)));
            }
    }
}

// Rows [r0, r1) of the B block at (k0, n0) towards L2: their packed nibbles and absmax. The
// weights are cold (a layer's 4-bit weights exceed the last-level cache), and dequantizing a
// block row by row otherwise waits on each row's two cache lines in turn.
AVX512 static inline void gemm_prefetch_b(const uint8_t *packed, int64_t in, int64_t bs, const float *absmax, int backward,
                                          int64_t k0, int64_t kk, int64_t n0, int64_t nc, int64_t r0, int64_t r1) {
    const int64_t len = backward ? nc : kk;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t start = backward ? (k0 + r) * in + n0 : (n0 + r) * in + k0;
        for (int64_t off = 0; off < len; off += 128) _mm_prefetch((const char *)(packed + (start + off) / 2), _MM_HINT_T1);
        _mm_prefetch((const char *)(absmax + start / bs), _MM_HINT_T1);
    }
}

// C[MR rows, NV·16 columns] (+)= A[MR rows, 2·kp] · B block columns (group v's pairs kps apart): one vdpbf16ps per row and
// 16 columns per pair of k, so each output is one fp32 chain in k order. The last vector's
// columns past nlast are masked off. accumulate == 0 on the first K block overwrites C.
#define GEMM_MICRO(MR, NV)                                                                          \
AVX512BF16 static void gemm_micro_##MR##_##NV(const uint16_t *a, int64_t lda, const uint16_t *bp, int64_t kp,  \
                                              int64_t kps, float *c, int64_t ldc, int nlast, int accumulate) { \
    __m512 acc[MR][NV];                                                                             \
    const __mmask16 last = (__mmask16)((1u << nlast) - 1u);                                         \
    for (int r = 0; r < MR; r++)                                                                    \
        for (int v = 0; v < NV; v++) {                                                              \
            __mmask16 mk = v == NV - 1 ? last : (__mmask16)0xFFFF;                                  \
            acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mk, c + r * ldc + 16 * v) : _mm512_setzero_ps(); \
        }                                                                                           \
    for (int64_t p = 0; p < kp; p++) {                                                              \
        __m512bh b[NV];                                                                             \
        for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(bp + (v * kps + p) * 32);  \
        for (int r = 0; r < MR; r++) {                                                              \
            uint32_t pr;                                                                            \
            memcpy(&pr, a + r * lda + 2 * p, 4);                                                    \
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)pr);                                     \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, b[v]);        \
        }                                                                                           \
    }                                                                                               \
    for (int r = 0; r < MR; r++)                                                                    \
        for (int v = 0; v < NV; v++) {                                                              \
            __mmask16 mk = v == NV - 1 ? last : (__mmask16)0xFFFF;                                  \
            _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mk, acc[r][v]);                             \
        }                                                                                           \
}
#define GEMM_MICRO_ROW(MR) GEMM_MICRO(MR, 1) GEMM_MICRO(MR, 2) GEMM_MICRO(MR, 3) GEMM_MICRO(MR, 4)
GEMM_MICRO_ROW(1) GEMM_MICRO_ROW(2) GEMM_MICRO_ROW(3) GEMM_MICRO_ROW(4) GEMM_MICRO_ROW(5) GEMM_MICRO_ROW(6)

typedef void (*gemm_micro_fn)(const uint16_t *, int64_t, const uint16_t *, int64_t, int64_t, float *, int64_t, int, int);
#define GEMM_MICRO_FNS(MR) {gemm_micro_##MR##_1, gemm_micro_##MR##_2, gemm_micro_##MR##_3, gemm_micro_##MR##_4}
static const gemm_micro_fn gemm_micros[GEMM_MR][4] = {
    GEMM_MICRO_FNS(1), GEMM_MICRO_FNS(2), GEMM_MICRO_FNS(3), GEMM_MICRO_FNS(4), GEMM_MICRO_FNS(5), GEMM_MICRO_FNS(6),
};

// Blocked: N in GEMM_NC columns, K in GEMM_KC, each B block dequantized and packed once and
// then swept by every row of A, GEMM_MR rows at a time.
AVX512BF16 static void gemm4_bf16_avx512bf16(const uint8_t *packed, int64_t out, int64_t in, int64_t bs, const float *code16,
                                             const float *absmax, int backward, const uint16_t *a, int64_t lda, int64_t m,
                                             int64_t n_begin, int64_t n_end, float *c, int64_t ldc, float *scratch) {
    const int64_t kdim = backward ? out : in;
    uint16_t *bp = (uint16_t *)scratch;
    float *t = scratch + (int64_t)GEMM_KC * GEMM_NC / 2;
    if (kdim == 0) {
        for (int64_t i = 0; i < m; i++) for (int64_t n = n_begin; n < n_end; n++) c[i * ldc + n] = 0.0f;
        return;
    }
    for (int64_t n0 = n_begin; n0 < n_end; n0 += GEMM_NC) {
        const int64_t nc = n_end - n0 < GEMM_NC ? n_end - n0 : GEMM_NC, ng = (nc + 15) / 16;
        for (int64_t k0 = 0; k0 < kdim; k0 += GEMM_KC) {
            const int64_t kk = kdim - k0 < GEMM_KC ? kdim - k0 : GEMM_KC, kp = (kk + 1) / 2;
            gemm_pack_b(packed, in, bs, code16, absmax, backward, k0, kk, n0, nc, t, bp);
            // The next block (k, then n) is fetched a slice per row sweep, while this one is used.
            int64_t k0n = k0 + GEMM_KC, n0n = n0;
            if (k0n >= kdim) { k0n = 0; n0n = n0 + GEMM_NC; }
            const int64_t kkn = kdim - k0n < GEMM_KC ? kdim - k0n : GEMM_KC;
            const int64_t ncn = n_end - n0n < GEMM_NC ? n_end - n0n : GEMM_NC;
            const int64_t rows_next = n0n < n_end ? (backward ? kkn : ncn) : 0, sweeps = (m + GEMM_MR - 1) / GEMM_MR;
            for (int64_t i = 0; i < m; i += GEMM_MR) {
                const int64_t mr = m - i < GEMM_MR ? m - i : GEMM_MR, sweep = i / GEMM_MR;
                gemm_prefetch_b(packed, in, bs, absmax, backward, k0n, kkn, n0n, ncn,
                                rows_next * sweep / sweeps, rows_next * (sweep + 1) / sweeps);
                for (int64_t g = 0; g < ng; g += 4) {
                    const int64_t nv = ng - g < 4 ? ng - g : 4;
                    const int64_t nlast = nc - 16 * (g + nv - 1);
                    gemm_micros[mr - 1][nv - 1](a + i * lda + k0, lda, bp + g * kp * 32, kp, kp, c + i * ldc + n0 + 16 * g, ldc,
                                                (int)(nlast < 16 ? nlast : 16), k0 > 0);
                }
            }
        }
    }
}

void qlora_gemm4_bf16(const uint8_t *packed, int64_t out, int64_t in, int64_t bs, const float *code16, const float *absmax,
                      int backward, const uint16_t *a, int64_t lda, int64_t m, int64_t n_begin, int64_t n_end,
                      float *c, int64_t ldc, float *scratch) {
    if (m <= 0 || n_end <= n_begin) return;
    if (qlora_active_level() >= QLORA_LEVEL_AVX512_BF16 && bs % 16 == 0)
        gemm4_bf16_avx512bf16(packed, out, in, bs, code16, absmax, backward, a, lda, m, n_begin, n_end, c, ldc, scratch);
    else
        gemm4_bf16_scalar(packed, out, in, bs, code16, absmax, backward, a, lda, m, n_begin, n_end, c, ldc);
}

// MARK: - bf16 GEMM of two bf16 matrices (attention's products)

void qlora_pack_bf16_pairs(const float *x, int64_t ld, int b_is_kn, int64_t k, int64_t n, uint16_t *bp) {
    const int64_t kps = (k + 1) / 2, ng = (n + 15) / 16;
    for (int64_t g = 0; g < ng; g++)
        for (int64_t p = 0; p < kps; p++) {
            uint16_t *o = bp + (g * kps + p) * 32;
            for (int j = 0; j < 16; j++) {
                const int64_t col = 16 * g + j;
                for (int h = 0; h < 2; h++) {
                    const int64_t row = 2 * p + h;
                    float v = 0.0f;
                    if (row < k && col < n) v = b_is_kn ? x[row * ld + col] : x[col * ld + row];
                    o[2 * j + h] = f32_to_bf16(v);
                }
            }
        }
}

void qlora_f32_to_bf16_transposed(const float *x, int64_t rows, int64_t cols, int64_t ldx, uint16_t *out, int64_t ldo) {
    // Sixteen columns at a time: contiguous reads of x, writes to sixteen rows of out.
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        const int64_t c1 = c0 + 16 < cols ? c0 + 16 : cols;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = c0; c < c1; c++) out[c * ldo + r] = f32_to_bf16(x[r * ldx + c]);
        for (int64_t c = c0; c < c1; c++)
            for (int64_t r = rows; r < ldo; r++) out[c * ldo + r] = 0;
    }
}

// The reference: one fp32 sum per output in k order, products of bf16 values exact.
static void gemm_bf16_packed_scalar(const uint16_t *a, int64_t lda, const uint16_t *bp, int64_t kps, int64_t m, int64_t n,
                                    int64_t k, float *c, int64_t ldc, int accumulate) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t col = 0; col < n; col++) {
            float acc = accumulate ? c[i * ldc + col] : 0.0f;
            const uint16_t *b = bp + (col / 16) * kps * 32 + 2 * (col % 16);
            for (int64_t kk = 0; kk < k; kk++) acc += bf16_to_f32(a[i * lda + kk]) * bf16_to_f32(b[(kk / 2) * 32 + (kk % 2)]);
            c[i * ldc + col] = acc;
        }
}

void qlora_gemm_bf16_packed(const uint16_t *a, int64_t lda, const uint16_t *bp, int64_t kps, int64_t m, int64_t n, int64_t k,
                            float *c, int64_t ldc, int accumulate) {
    if (m <= 0 || n <= 0) return;
    if (qlora_active_level() < QLORA_LEVEL_AVX512_BF16) {
        gemm_bf16_packed_scalar(a, lda, bp, kps, m, n, k, c, ldc, accumulate);
        return;
    }
    const int64_t kp = (k + 1) / 2, ng = (n + 15) / 16;
    // Four 16-column groups at a time: their pairs stay in cache while every row block of A sweeps them.
    for (int64_t g = 0; g < ng; g += 4) {
        const int64_t nv = ng - g < 4 ? ng - g : 4;
        const int64_t nlast = n - 16 * (g + nv - 1);
        for (int64_t i = 0; i < m; i += GEMM_MR) {
            const int64_t mr = m - i < GEMM_MR ? m - i : GEMM_MR;
            gemm_micros[mr - 1][nv - 1](a + i * lda, lda, bp + g * kps * 32, kp, kps, c + i * ldc + 16 * g, ldc,
                                        (int)(nlast < 16 ? nlast : 16), accumulate);
        }
    }
}

// MARK: - Causal softmax rows (attention), bf16 semantics

// exp(x) for the x <= 0 a softmax feeds it (each score less the row's maximum): Cephes expf's
// range reduction (x = n·ln2 + r, ln2 split in two) and degree-6 polynomial, about 1 ulp; 0 below
// -87.3 where expf turns subnormal (those terms are below 2^-126 of the row's sum).
AVX512 static inline __m512 exp_nonpositive_avx512(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512 e = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), e);
}

static void softmax_causal_rows_scalar(float *s, int64_t rows, int64_t n, int64_t i0, float scale) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = s + r * n;
        const int64_t len = i0 + r + 1;
        float mx = -INFINITY;
        for (int64_t j = 0; j < len; j++) { row[j] = round_bf16_f32(round_bf16_f32(row[j]) * scale); mx = row[j] > mx ? row[j] : mx; }
        float sum = 0.0f;
        for (int64_t j = 0; j < len; j++) { row[j] = expf(row[j] - mx); sum += row[j]; }
        for (int64_t j = 0; j < len; j++) row[j] = row[j] / sum;
        for (int64_t j = len; j < n; j++) row[j] = 0.0f;
    }
}

/// The lanes of a 16-float step that hold values when `left` remain (all 16 when 16 or more).

AVX512 static void softmax_causal_rows_avx512(float *s, int64_t rows, int64_t n, int64_t i0, float scale) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t r = 0; r < rows; r++) {
        float *row = s + r * n;
        const int64_t len = i0 + r + 1;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 m = mask16(len - j);
            __m512 v = round_bf16_avx512(_mm512_mul_ps(round_bf16_avx512(_mm512_maskz_loadu_ps(m, row + j)), vscale));
            _mm512_mask_storeu_ps(row + j, m, v);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
        }
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 m = mask16(len - j);
            __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), mx)));
            _mm512_mask_storeu_ps(row + j, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(vsum));
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 m = mask16(len - j);
            _mm512_mask_storeu_ps(row + j, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, row + j), sum));
        }
        for (int64_t j = len; j < n; j++) row[j] = 0.0f;
    }
}

void qlora_softmax_causal_rows(float *s, int64_t rows, int64_t n, int64_t i0, float scale) {
    if (qlora_active_level() >= QLORA_LEVEL_AVX512) softmax_causal_rows_avx512(s, rows, n, i0, scale);
    else softmax_causal_rows_scalar(s, rows, n, i0, scale);
}

static void softmax_backward_rows_scalar(float *p, float *dp, int64_t rows, int64_t n, int64_t i0, float post_scale) {
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * n, *dr = dp + r * n;
        const int64_t len = i0 + r + 1;
        float dot = 0.0f;
        for (int64_t j = 0; j < len; j++) { dr[j] = round_bf16_f32(dr[j]); dot += dr[j] * pr[j]; }
        for (int64_t j = 0; j < len; j++) { dr[j] = round_bf16_f32(pr[j] * (dr[j] - dot)) * post_scale; pr[j] = round_bf16_f32(pr[j]); }
        for (int64_t j = len; j < n; j++) dr[j] = 0.0f;
    }
}

AVX512 static void softmax_backward_rows_avx512(float *p, float *dp, int64_t rows, int64_t n, int64_t i0, float post_scale) {
    const __m512 vpost = _mm512_set1_ps(post_scale);
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * n, *dr = dp + r * n;
        const int64_t len = i0 + r + 1;
        __m512 vdot = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 m = mask16(len - j);
            __m512 d = round_bf16_avx512(_mm512_maskz_loadu_ps(m, dr + j));
            _mm512_mask_storeu_ps(dr + j, m, d);
            vdot = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, pr + j), vdot);
        }
        const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vdot));
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 m = mask16(len - j);
            __m512 pv = _mm512_maskz_loadu_ps(m, pr + j);
            __m512 ds = _mm512_mul_ps(round_bf16_avx512(_mm512_mul_ps(pv, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dr + j), dot))), vpost);
            _mm512_mask_storeu_ps(dr + j, m, ds);
            _mm512_mask_storeu_ps(pr + j, m, round_bf16_avx512(pv));
        }
        for (int64_t j = len; j < n; j++) dr[j] = 0.0f;
    }
}

void qlora_softmax_backward_rows(float *p, float *dp, int64_t rows, int64_t n, int64_t i0, float post_scale) {
    if (qlora_active_level() >= QLORA_LEVEL_AVX512) softmax_backward_rows_avx512(p, dp, rows, n, i0, post_scale);
    else softmax_backward_rows_scalar(p, dp, rows, n, i0, post_scale);
}

// MARK: - Cross-entropy rows (the head's loss), bf16 logits, fp32 softmax

static void cross_entropy_rows_scalar(float *logits, int64_t rows, int64_t n, int64_t ld, const int64_t *targets, float count,
                                      uint16_t *dl, int64_t ldd, float *terms) {
    for (int64_t r = 0; r < rows; r++) {
        float *x = logits + r * ld;
        uint16_t *d = dl + r * ldd;
        const int64_t t = targets[r];
        for (int64_t v = 0; v < n; v++) x[v] = round_bf16_f32(x[v]);
        for (int64_t v = n; v < ldd; v++) d[v] = 0;
        if (t < 0) {
            for (int64_t v = 0; v < n; v++) d[v] = 0;
            terms[r] = 0.0f;
            continue;
        }
        float mx = -INFINITY;
        for (int64_t v = 0; v < n; v++) mx = x[v] > mx ? x[v] : mx;
        float sum = 0.0f;
        for (int64_t v = 0; v < n; v++) sum += expf(x[v] - mx);
        const float lse = mx + logf(sum);
        terms[r] = lse - x[t];
        for (int64_t v = 0; v < n; v++) d[v] = f32_to_bf16((expf(x[v] - lse) - (v == t ? 1.0f : 0.0f)) / count);
    }
}

AVX512 static void cross_entropy_rows_avx512(float *logits, int64_t rows, int64_t n, int64_t ld, const int64_t *targets, float count,
                                             uint16_t *dl, int64_t ldd, float *terms) {
    const __m512 vcount = _mm512_set1_ps(count), one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++) {
        float *x = logits + r * ld;
        uint16_t *d = dl + r * ldd;
        const int64_t t = targets[r];
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t v = 0; v < n; v += 16) {
            const __mmask16 m = mask16(n - v);
            const __m512 xv = round_bf16_avx512(_mm512_maskz_loadu_ps(m, x + v));
            _mm512_mask_storeu_ps(x + v, m, xv);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, xv);
        }
        for (int64_t v = n; v < ldd; v++) d[v] = 0;
        if (t < 0) {
            memset(d, 0, (size_t)n * sizeof *d);
            terms[r] = 0.0f;
            continue;
        }
        const float mxs = _mm512_reduce_max_ps(vmax);
        const __m512 mx = _mm512_set1_ps(mxs);
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t v = 0; v < n; v += 16) {
            const __mmask16 m = mask16(n - v);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, exp_nonpositive_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + v), mx))));
        }
        const float lse = mxs + logf(_mm512_reduce_add_ps(vsum));
        terms[r] = lse - x[t];
        const __m512 vlse = _mm512_set1_ps(lse);
        int64_t v = 0;
        for (; v + 16 <= n; v += 16) {
            const __m512 p = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + v), vlse));
            const __mmask16 hot = (t >= v && t < v + 16) ? (__mmask16)(1u << (t - v)) : 0;
            vu16_avx512 h = f32_to_bf16_avx512(_mm512_div_ps(_mm512_mask_sub_ps(p, hot, p, one), vcount));
            memcpy(d + v, &h, sizeof h);
        }
        if (v < n) {
            const __mmask16 m = mask16(n - v);
            const __m512 p = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + v), vlse));
            const __mmask16 hot = (t >= v) ? (__mmask16)(1u << (t - v)) : 0;
            vu16_avx512 h = f32_to_bf16_avx512(_mm512_div_ps(_mm512_mask_sub_ps(p, hot, p, one), vcount));
            uint16_t tail[16];
            memcpy(tail, &h, sizeof h);
            memcpy(d + v, tail, (size_t)(n - v) * sizeof *d);
        }
    }
}

void qlora_cross_entropy_rows(float *logits, int64_t rows, int64_t n, int64_t ld, const int64_t *targets, float count,
                              uint16_t *dl, int64_t ldd, float *terms) {
    if (qlora_active_level() >= QLORA_LEVEL_AVX512) cross_entropy_rows_avx512(logits, rows, n, ld, targets, count, dl, ldd, terms);
    else cross_entropy_rows_scalar(logits, rows, n, ld, targets, count, dl, ldd, terms);
}
