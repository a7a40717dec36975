// LoRA merge kernels: W + (B·A)·scaling in one pass per row, without an [out, in] delta
// buffer, and the Float64 sums of the merge report. One body written with clang vector
// extensions, compiled for AVX-512 (16 lanes) and AVX2 (8 lanes), beside a scalar reference.
// Every lane does the same operations in the same order as the scalar code, so all levels
// give the same bits (the report sums excepted: their lanes add in another order).
#include "qlora_kernels.h"
#include "conversions.h"
#include <math.h>
#include <string.h>

// Rounding happens where the code says so: no fused multiply-adds the source does not ask for.
#pragma clang fp contract(off)

// MARK: - Scalar reference

static inline float load_scalar(const void *p, int type, int64_t i) {
    switch (type) {
    case QLORA_TYPE_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case QLORA_TYPE_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

// Stores v rounded to type; returns whether the stored value is finite.
static inline int store_scalar(void *p, int type, int64_t i, float v) {
    switch (type) {
    case QLORA_TYPE_BF16: { uint16_t b = f32_to_bf16(v); ((uint16_t *)p)[i] = b; return (b & 0x7F80u) != 0x7F80u; }
    case QLORA_TYPE_F16: { uint16_t h = f32_to_f16(v); ((uint16_t *)p)[i] = h; return (h & 0x7C00u) != 0x7C00u; }
    default: ((float *)p)[i] = v; return (f2u(v) & 0x7F800000u) != 0x7F800000u;
    }
}

static inline float cast_scalar(float v, int type) {
    switch (type) {
    case QLORA_TYPE_BF16: return round_bf16_f32(v);
    case QLORA_TYPE_F16: return f16_to_f32(f32_to_f16(v));
    default: return v;
    }
}

// Columns [x0, x1) of one row.
static int64_t merge_cols_scalar(const float *c, const float *m, int64_t r, int64_t cols, int64_t row,
                                 int64_t x0, int64_t x1, float s, int at, const void *base, int bt,
                                 void *out, int ot, float *delta_out) {
    int64_t bad = -1;
    for (int64_t x = x0; x < x1; x++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < r; j++) acc = fmaf(c[j], m[j * cols + x], acc);
        float d = cast_scalar(acc * s, at);
        int64_t i = row * cols + x;
        if (delta_out) delta_out[i] = d;
        float sum = load_scalar(base, bt, i) + d;
        if (!store_scalar(out, ot, i, sum) && bad < 0) bad = i;
    }
    return bad;
}

static int64_t merge_rows_scalar(const float *coef, const float *m, int64_t r, int64_t cols, int64_t r0, int64_t r1,
                                 float s, int at, const void *base, int bt, void *out, int ot, float *delta_out) {
    int64_t first = -1;
    for (int64_t row = r0; row < r1; row++) {
        int64_t bad = merge_cols_scalar(coef + row * r, m, r, cols, row, 0, cols, s, at, base, bt, out, ot, delta_out);
        if (bad >= 0 && first < 0) first = bad;
    }
    return first;
}

static void report_sums_scalar(const void *base, int bt, const float *delta, const void *written, int wt,
                               int64_t from, int64_t n, double *acc) {
    for (int64_t i = from; i < n; i++) {
        float b = load_scalar(base, bt, i), w = load_scalar(written, wt, i);
        float s = b + delta[i];
        double e = (double)w - (double)s, a = (double)w - (double)b, d = delta[i];
        acc[0] += e * e; acc[1] += d * d; acc[2] += (double)s * (double)s; acc[3] += a * d; acc[4] += a * a;
    }
}

// MARK: - Vector versions

// vf_, vu32_, vu16_ and the bf16 conversions of each level come from conversions.h.
#define DEFINE_MERGE_VECTOR(SUFFIX, TARGET, W, RT)                                                         \
typedef int32_t vi32_##SUFFIX __attribute__((ext_vector_type(W)));                                     \
typedef _Float16 vh_##SUFFIX __attribute__((ext_vector_type(W)));                                     \
typedef double vd_##SUFFIX __attribute__((ext_vector_type(W)));                                        \
                                                                                                       \
TARGET static inline vf_##SUFFIX load_##SUFFIX(const void *p, int type, int64_t i) {                   \
    if (type == QLORA_TYPE_F32) { vf_##SUFFIX v; memcpy(&v, (const float *)p + i, sizeof v); return v; } \
    vu16_##SUFFIX h;                                                                                   \
    memcpy(&h, (const uint16_t *)p + i, sizeof h);                                                     \
    if (type == QLORA_TYPE_BF16) return bf16_to_f32_##SUFFIX(h);                                       \
    return __builtin_convertvector(__builtin_bit_cast(vh_##SUFFIX, h), vf_##SUFFIX);                   \
}                                                                                                      \
/* Stores v rounded to type; returns an all-ones lane where the stored value is not finite. */       \
TARGET static inline vi32_##SUFFIX store_##SUFFIX(void *p, int type, int64_t i, vf_##SUFFIX v) {       \
    if (type == QLORA_TYPE_F32) {                                                                      \
        memcpy((float *)p + i, &v, sizeof v);                                                          \
        return (__builtin_bit_cast(vu32_##SUFFIX, v) & 0x7F800000u) == 0x7F800000u;                    \
    }                                                                                                  \
    vu16_##SUFFIX h;                                                                                   \
    vu32_##SUFFIX bits, mask;                                                                          \
    if (type == QLORA_TYPE_BF16) { h = f32_to_bf16_##SUFFIX(v); mask = 0x7F80u; }                      \
    else { h = __builtin_bit_cast(vu16_##SUFFIX, __builtin_convertvector(v, vh_##SUFFIX)); mask = 0x7C00u; } \
    memcpy((uint16_t *)p + i, &h, sizeof h);                                                           \
    bits = __builtin_convertvector(h, vu32_##SUFFIX);                                                  \
    return (bits & mask) == mask;                                                                      \
}                                                                                                      \
TARGET static inline vf_##SUFFIX cast_##SUFFIX(vf_##SUFFIX v, int type) {                              \
    if (type == QLORA_TYPE_BF16) return round_bf16_##SUFFIX(v);                                        \
    if (type == QLORA_TYPE_F16) return __builtin_convertvector(__builtin_convertvector(v, vh_##SUFFIX), vf_##SUFFIX); \
    return v;                                                                                          \
}                                                                                                      \
/* Rows [row, row + R) x columns [x, x + U*W): R*U independent FMA chains sharing each load of m  \
   (R, U are constants after inlining). */                                                           \
TARGET static inline __attribute__((always_inline)) vi32_##SUFFIX merge_tile_##SUFFIX(                \
        const float *coef, const float *m, int64_t r, int64_t cols, int64_t row, int64_t x,            \
        const int R, const int U, float s, int at, const void *base, int bt, void *out, int ot,        \
        float *delta_out) {                                                                            \
    vf_##SUFFIX acc[4][8], mv[8];                                                                      \
    vi32_##SUFFIX bad = 0;                                                                             \
    for (int a = 0; a < R; a++)                                                                        \
        for (int u = 0; u < U; u++) acc[a][u] = 0.0f;                                                  \
    for (int64_t j = 0; j < r; j++) {                                                                  \
        for (int u = 0; u < U; u++) memcpy(&mv[u], m + j * cols + x + u * W, sizeof mv[u]);           \
        for (int a = 0; a < R; a++) {                                                                  \
            const vf_##SUFFIX cj = coef[(row + a) * r + j];                                            \
            for (int u = 0; u < U; u++) acc[a][u] = __builtin_elementwise_fma(cj, mv[u], acc[a][u]);   \
        }                                                                                              \
    }                                                                                                  \
    for (int a = 0; a < R; a++)                                                                        \
        for (int u = 0; u < U; u++) {                                                                  \
            vf_##SUFFIX d = cast_##SUFFIX(acc[a][u] * s, at);                                          \
            int64_t i = (row + a) * cols + x + u * W;                                                  \
            if (delta_out) memcpy(delta_out + i, &d, sizeof d);                                        \
            bad |= store_##SUFFIX(out, ot, i, load_##SUFFIX(base, bt, i) + d);                         \
        }                                                                                              \
    return bad;                                                                                        \
}                                                                                                      \
/* Groups of RT rows in RT x 4-vector tiles (one row at a time, 8 vectors, for the last rows);      \
   then single vectors and a scalar tail per row. */                                                 \
TARGET static int64_t merge_rows_##SUFFIX(const float *coef, const float *m, int64_t r, int64_t cols,   \
                                          int64_t r0, int64_t r1, float s, int at, const void *base,   \
                                          int bt, void *out, int ot, float *delta_out) {               \
    int64_t first = -1;                                                                                \
    for (int64_t row = r0; row < r1;) {                                                                \
        const int64_t R = row + RT <= r1 ? RT : 1;                                                     \
        vi32_##SUFFIX bad = 0;                                                                         \
        int64_t x = 0, tail = -1;                                                                      \
        if (R == RT)                                                                                   \
            for (; x + 4 * W <= cols; x += 4 * W)                                                      \
                bad |= merge_tile_##SUFFIX(coef, m, r, cols, row, x, RT, 4, s, at, base, bt, out, ot, delta_out); \
        else                                                                                           \
            for (; x + 8 * W <= cols; x += 8 * W)                                                      \
                bad |= merge_tile_##SUFFIX(coef, m, r, cols, row, x, 1, 8, s, at, base, bt, out, ot, delta_out); \
        for (int64_t a = row; a < row + R; a++) {                                                      \
            int64_t xx = x;                                                                            \
            for (; xx + W <= cols; xx += W)                                                            \
                bad |= merge_tile_##SUFFIX(coef, m, r, cols, a, xx, 1, 1, s, at, base, bt, out, ot, delta_out); \
            int64_t t = merge_cols_scalar(coef + a * r, m, r, cols, a, xx, cols, s, at, base, bt, out, ot, delta_out); \
            if (tail < 0) tail = t;                                                                    \
        }                                                                                              \
        if (first < 0 && (tail >= 0 || __builtin_reduce_or(bad) != 0))                                 \
            for (int64_t k = row * cols; k < (row + R) * cols && first < 0; k++)                       \
                if (!isfinite(load_scalar(out, ot, k))) first = k;                                     \
        row += R;                                                                                      \
    }                                                                                                  \
    return first;                                                                                      \
}                                                                                                      \
TARGET static void report_sums_##SUFFIX(const void *base, int bt, const float *delta, const void *written, \
                                        int wt, int64_t n, double *acc) {                              \
    vd_##SUFFIX e2 = 0, d2 = 0, s2 = 0, ad = 0, a2 = 0;                                                \
    int64_t i = 0;                                                                                     \
    for (; i + W <= n; i += W) {                                                                       \
        vf_##SUFFIX b = load_##SUFFIX(base, bt, i), w = load_##SUFFIX(written, wt, i), d;              \
        memcpy(&d, delta + i, sizeof d);                                                               \
        vd_##SUFFIX sd = __builtin_convertvector(b + d, vd_##SUFFIX);                                  \
        vd_##SUFFIX wd = __builtin_convertvector(w, vd_##SUFFIX), dd = __builtin_convertvector(d, vd_##SUFFIX); \
        vd_##SUFFIX e = wd - sd, a = wd - __builtin_convertvector(b, vd_##SUFFIX);                     \
        e2 += e * e; d2 += dd * dd; s2 += sd * sd; ad += a * dd; a2 += a * a;                          \
    }                                                                                                  \
    for (int k = 0; k < W; k++) {                                                                     \
        acc[0] += e2[k]; acc[1] += d2[k]; acc[2] += s2[k]; acc[3] += ad[k]; acc[4] += a2[k];           \
    }                                                                                                  \
    report_sums_scalar(base, bt, delta, written, wt, i, n, acc);                                       \
}

DEFINE_MERGE_VECTOR(avx512, AVX512, 16, 4)  // 16 accumulators + 4 loads of 32 registers
DEFINE_MERGE_VECTOR(avx2, AVX2, 8, 2)  // 8 accumulators + 4 loads of 16 registers

// MARK: - Entry points

int64_t qlora_lora_merge_rows(const float *coef, const float *m, int64_t r, int64_t cols,
                              int64_t row_begin, int64_t row_end, float scaling, int adapter_type,
                              const void *base, int base_type, void *out, int out_type, float *delta_out) {
    // Levels are ordered: a CPU with AVX512-BF16 (level 3) runs the AVX-512 kernel.
    const int level = qlora_active_level();
    if (level >= QLORA_LEVEL_AVX512)
        return merge_rows_avx512(coef, m, r, cols, row_begin, row_end, scaling, adapter_type, base, base_type, out, out_type, delta_out);
    if (level >= QLORA_LEVEL_AVX2)
        return merge_rows_avx2(coef, m, r, cols, row_begin, row_end, scaling, adapter_type, base, base_type, out, out_type, delta_out);
    return merge_rows_scalar(coef, m, r, cols, row_begin, row_end, scaling, adapter_type, base, base_type, out, out_type, delta_out);
}

void qlora_merge_report_sums(const void *base, int base_type, const float *delta, const void *written, int written_type,
                             int64_t n, double *acc) {
    const int level = qlora_active_level();
    if (level >= QLORA_LEVEL_AVX512) report_sums_avx512(base, base_type, delta, written, written_type, n, acc);
    else if (level >= QLORA_LEVEL_AVX2) report_sums_avx2(base, base_type, delta, written, written_type, n, acc);
    else report_sums_scalar(base, base_type, delta, written, written_type, 0, n, acc);
}
