// SIMD kernels for 4-bit blockwise quantization, with run-time CPU dispatch.
//
// Every function here has the exact semantics of the scalar Swift reference in
// Sources/QLoRA (the reference defines the answer; tests hold these equal to it).
// Packing layout (bitsandbytes): element 2j goes in the HIGH nibble of byte j,
// element 2j+1 in the low nibble.
//
// Each function's comment says which versions it has ("Levels:"). A call runs the best one
// at or below qlora_active_level() whose shape condition holds, else the scalar one.
// bf16 rounding, everywhere: round to nearest even, NaN -> 0x7FC0, as torch's c10::BFloat16.
#ifndef QLORA_KERNELS_H
#define QLORA_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Instruction-set levels a kernel may use. The best one the CPU supports is chosen at
/// run time unless capped with qlora_set_max_level (tests force the fallbacks).
typedef enum {
    QLORA_LEVEL_SCALAR = 0,
    QLORA_LEVEL_AVX2 = 1,
    QLORA_LEVEL_AVX512 = 2,
    /// AVX-512 plus AVX512-BF16 (vdpbf16ps): only the bf16 dot-product GEMM uses it.
    QLORA_LEVEL_AVX512_BF16 = 3,
} qlora_level;

/// The highest level this CPU supports (AVX-512 means F+BW+VL+DQ; AVX512-BF16 means that plus
/// CPUID leaf 7 subleaf 1 EAX bit 5; AVX2 means AVX2+FMA+F16C).
/// Probed on the first call (from any kernel or thread) and cached.
int qlora_cpu_level(void);
/// Whether the CPU has everything OpenBLAS's SkylakeX kernels use (AVX-512 F, CD, BW, DQ, VL).
int qlora_cpu_has_skylakex_features(void);
/// Cap the level used by every kernel (e.g. QLORA_LEVEL_SCALAR to test the fallback); kernel
/// calls that start afterwards use the new cap.
void qlora_set_max_level(int level);
/// The level kernels use now: min(cpu level, cap). Each kernel call reads it once.
int qlora_active_level(void);

/// Quantize `nblocks` consecutive FULL blocks of `blocksize` fp32 values to 4-bit.
///   x: [nblocks * blocksize] fp32;
///   midpoints16: 15 sorted fp32 bucket boundaries then +inf (16 floats);
///   order16: nibble for each sorted bucket index (identity for NF4);
///   absmax: [nblocks] out, max |x| of each block (unclamped);
///   packed: [nblocks * blocksize / 2] out.
/// Scaling is x * (1 / max(absmax, 1e-38f)); the nibble is the sorted bucket index
/// (count of midpoints strictly below the scaled value), mapped through order16.
/// blocksize must be even and >= 2. Returns -1, or the index of the first block holding a
/// NaN or infinity (quantization stops there; bitsandbytes would emit NaN scales).
/// Levels: scalar; AVX-512 (blocksize % 16 == 0). Same bits at both.
int64_t qlora_quantize4_blocks_f32(const float *x, int64_t nblocks, int64_t blocksize,
                                const float *midpoints16, const uint8_t *order16,
                                float *absmax, uint8_t *packed);

/// Same for bf16 input (raw bits), converted exactly to fp32 first.
int64_t qlora_quantize4_blocks_bf16(const uint16_t *x, int64_t nblocks, int64_t blocksize,
                                 const float *midpoints16, const uint8_t *order16,
                                 float *absmax, uint8_t *packed);

/// Same for fp16 input (raw bits), converted exactly to fp32 first.
int64_t qlora_quantize4_blocks_f16(const uint16_t *x, int64_t nblocks, int64_t blocksize,
                                const float *midpoints16, const uint8_t *order16,
                                float *absmax, uint8_t *packed);

/// Absmax of `nblocks` FULL blocks only (max |x|, unclamped), as qlora_quantize4_blocks_*
/// computes it, without quantizing: sizing pass for streamed checkpoint writes.
/// Returns -1, or the index of the first block holding a NaN or infinity.
/// Levels: scalar; AVX-512 (blocksize % 16 == 0). Same bits at both.
int64_t qlora_absmax_blocks_f32(const float *x, int64_t nblocks, int64_t blocksize, float *absmax);
int64_t qlora_absmax_blocks_bf16(const uint16_t *x, int64_t nblocks, int64_t blocksize, float *absmax);
int64_t qlora_absmax_blocks_f16(const uint16_t *x, int64_t nblocks, int64_t blocksize, float *absmax);

/// Dequantize `n` 4-bit values (n even or odd) starting at element 0 of `packed`.
///   code16: the 16-entry code (fp32); absmax: one fp32 scale per block;
///   out[i] = code16[nibble(i)] * absmax[i / blocksize]  (one fp32 multiply).
/// Levels (all three types): scalar; AVX-512 (blocksize % 16 == 0) for the full blocks, the
/// scalar one for a partial last block. Same bits at both.
void qlora_dequantize4_f32(const uint8_t *packed, int64_t n, int64_t blocksize,
                           const float *code16, const float *absmax, float *out);
/// As above, then rounded to bf16 (round to nearest even; NaN -> 0x7FC0).
void qlora_dequantize4_bf16(const uint8_t *packed, int64_t n, int64_t blocksize,
                            const float *code16, const float *absmax, uint16_t *out);
/// As above, then rounded to fp16 (IEEE round to nearest even). Not bit-identical across levels
/// for a NaN (from a NaN absmax): the scalar version gives 0x7E00 with its sign; AVX-512
/// (vcvtps2ph), like the Swift reference's Float16(_:), also keeps its top payload bits.
void qlora_dequantize4_f16(const uint8_t *packed, int64_t n, int64_t blocksize,
                           const float *code16, const float *absmax, uint16_t *out);

/// Dequantize elements [start, start + count) of a packed 4-bit tensor (any start) into
/// out[0 ..< count] as fp32; with round_bf16 != 0 each value is rounded to bf16 (nearest
/// even, NaN -> 0x7FC00000) and kept in fp32: the operand of a bf16-compute matmul done with sgemm.
/// Levels: scalar; AVX2 (blocksize % 8 == 0); AVX-512 (blocksize % 16 == 0). Same bits at all.
void qlora_dequantize4_range_f32(const uint8_t *packed, int64_t start, int64_t count, int64_t blocksize,
                                 const float *code16, const float *absmax, int round_bf16, float *out);

/// out[i] = in[i] rounded to bf16 (nearest even, NaN -> 0x7FC00000), kept in fp32. in == out
/// is allowed. Levels: scalar; AVX-512 (AVX2 runs the scalar one). Same bits at both.
void qlora_round_bf16_f32(const float *in, int64_t n, float *out);

/// Fused 4-bit GEMV/GEMM for few tokens, bf16 compute semantics, no scratch:
///   y[t * ldy + r] = sum_i x[t * in + i] * bf16(code16[w(r, i)] * absmax[(r * in + i) / blocksize])
/// for rows r in [row_begin, row_end) of W [out, in], t < tokens (1...8). x must hold
/// bf16-representable values (already rounded); products are exact in fp32 and accumulate in
/// fp32 (order differs from sgemm, and between levels).
/// Levels: scalar; AVX2 (blocksize % 8 == 0 and in % 8 == 0); AVX-512 (blocksize % 16 == 0 and
/// in % 16 == 0; with both % 32 == 0, a paired version that needs a tokens * in fp32 scratch
/// and falls back to the 16-wide one if it cannot allocate it); AVX512-BF16 (both % 64 == 0,
/// `vdpbf16ps` on a tokens * in bf16 copy of x, falling back to AVX-512 without it).
void qlora_gemv4_bf16(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t in, int64_t blocksize,
                      const float *code16, const float *absmax, const float *x, int64_t tokens,
                      float *y, int64_t ldy);


/// Rows of fp32 x [rows, cols] to bf16 bits (nearest even, NaN -> 0x7FC0) into out [rows, ld]
/// (ld >= cols), each row zero-padded from cols to ld. Levels: scalar; AVX-512. Same bits.
void qlora_f32_to_bf16_rows(const float *x, int64_t rows, int64_t cols, int64_t ld, uint16_t *out);

/// Floats of scratch one qlora_gemm4_bf16 call needs (one dequantized and one packed B block).
int64_t qlora_gemm4_bf16_scratch_floats(void);

/// GEMM with a 4-bit weight W [out, in], bf16 compute semantics, columns [n_begin, n_end) of C:
///   forward  (backward == 0): C[i, n] = sum_k a[i, k] * bf16(W[n, k]),  K = in,  N = out;
///   backward (backward != 0): C[i, n] = sum_k a[i, k] * bf16(W[k, n]),  K = out, N = in;
/// i < m; bf16(W) as qlora_dequantize4_range_f32 with round_bf16 decodes it. a: bf16 bits,
/// [m, lda] with lda >= K rounded up to even and a zero in column K when K is odd (as
/// qlora_f32_to_bf16_rows pads it). C is overwritten (zeros when K == 0). Products are exact
/// in fp32 and each output is one fp32 sum in k order at both levels; the AVX512-BF16 one
/// (vdpbf16ps) treats denormal inputs as zero and flushes denormal results to zero.
/// scratch: qlora_gemm4_bf16_scratch_floats() floats, one per concurrent call.
/// Levels: scalar; AVX512-BF16 (blocksize % 16 == 0).
void qlora_gemm4_bf16(const uint8_t *packed, int64_t out, int64_t in, int64_t blocksize, const float *code16, const float *absmax,
                      int backward, const uint16_t *a, int64_t lda, int64_t m, int64_t n_begin, int64_t n_end,
                      float *c, int64_t ldc, float *scratch);

/// Packs B for qlora_gemm_bf16_packed. B [k, n] is a matrix of bf16 values held in fp32:
/// B(r, c) = x[r * ld + c] when b_is_kn, else x[c * ld + r] (x holds Bᵀ, as keys [n, d] do for
/// q·kᵀ). Layout: bp[(g * kps + p) * 32 + 2 * j + h] = bf16 bits of B(2p + h, 16g + j), zero past
/// k and n; kps = ceil(k / 2) pairs per group, ceil(n / 16) groups.
void qlora_pack_bf16_pairs(const float *x, int64_t ld, int b_is_kn, int64_t k, int64_t n, uint16_t *bp);

/// out[c * ldo + r] = bf16 bits of x[r * ldx + c] (nearest even) for r < rows, c < cols, and
/// zeros in rows..<ldo of each output row: an A operand of qlora_gemm_bf16_packed from xᵀ.
void qlora_f32_to_bf16_transposed(const float *x, int64_t rows, int64_t cols, int64_t ldx, uint16_t *out, int64_t ldo);

/// C[m, n] (+)= A[m, k] · B[k, n], bf16 inputs, fp32 sums: A as bf16 bits [m, lda] (lda >= k
/// rounded up to even, a zero in column k when k is odd, as qlora_f32_to_bf16_rows pads it); B
/// packed by qlora_pack_bf16_pairs with kps pairs per group, of which the first ceil(k / 2) are
/// read (so one packing of a long B serves any prefix k). accumulate: add to C, else overwrite.
/// Products are exact in fp32 and accumulate in one fp32 chain per output: in k order in the
/// scalar reference; AVX512-BF16's vdpbf16ps adds each pair's two products in turn and treats
/// denormals as zero. Levels: scalar; AVX512-BF16.
void qlora_gemm_bf16_packed(const uint16_t *a, int64_t lda, const uint16_t *bp, int64_t kps, int64_t m, int64_t n, int64_t k,
                            float *c, int64_t ldc, int accumulate);

/// Causal softmax of a block of attention scores, in place: row r of s [rows, n] holds query
/// i0 + r's raw fp32 q·k sums for keys 0..<n; keys 0...i0 + r become bf16(bf16(s) · scale), then
/// exp(x − max) / Σ in fp32, the rest 0 (HF eager attention's bf16 roundings). Levels: scalar
/// (expf, sums in key order: LlamaOps' reference); AVX-512 (a Cephes polynomial exp within about
/// an ulp, 16-lane partial sums).
void qlora_softmax_causal_rows(float *s, int64_t rows, int64_t n, int64_t i0, float scale);

/// The softmax backward of those rows, in place: dp's keys 0...i become bf16(dp), dot = Σ dp·p,
/// then dp = bf16(p · (dp − dot)) · post_scale and p = bf16(p); dp's other keys 0. Levels: scalar
/// (sums in key order); AVX-512 (16-lane partial sums).
void qlora_softmax_backward_rows(float *p, float *dp, int64_t rows, int64_t n, int64_t i0, float post_scale);

/// transformers' causal-LM loss on rows of the head's output, in place (rows are independent, so
/// any split of a [tokens, vocab] block into row blocks gives the same bits). Row r of logits
/// [rows, ld] holds the head GEMM's fp32 sums for vocabulary entries 0..<n; each becomes
/// x = bf16(sum), the head's bf16 output upcast to fp32. For targets[r] in 0..<n:
///   lse = max + log(Σ exp(x − max)),  terms[r] = lse − x[target] (fp32),
///   dl[r * ldd + v] = bf16 bits of (exp(x[v] − lse) − (v == target)) / count
/// (the logits' gradient under the mean over `count` positions, rounded to bf16 as the gradient
/// of the fp32 upcast is); for a negative target (ignored) terms[r] = 0 and dl's row is zeros.
/// dl's columns n..<ldd are zeroed (the pad a GEMM's A operand needs). Levels: scalar (expf,
/// logf, sums in vocabulary order: LlamaOps.crossEntropy's arithmetic to the bit); AVX-512 (the
/// softmax's polynomial exp, 16-lane sums).
void qlora_cross_entropy_rows(float *logits, int64_t rows, int64_t n, int64_t ld, const int64_t *targets, float count,
                              uint16_t *dl, int64_t ldd, float *terms);

/// Element types of a weight in the merge kernels (raw 16-bit patterns for bf16/fp16).
typedef enum {
    QLORA_TYPE_F32 = 0,
    QLORA_TYPE_BF16 = 1,
    QLORA_TYPE_F16 = 2,
} qlora_float_type;

/// PEFT's LoRA merge for rows [row_begin, row_end) of a [rows, cols] weight:
///   delta[i][x] = adapter_cast(fl(sum_j coef[i*r + j] * m[j*cols + x]) * scaling)
///   out[i][x]   = out_cast(base[i][x] + delta[i][x])
/// The sum is one fused multiply-add per j, j ascending, starting from +0 (torch's order);
/// adapter_cast rounds through adapter_type (identity for F32), out_cast rounds the fp32 sum
/// once to out_type. base and out may be unaligned. delta_out (fp32 [rows, cols]) may be NULL.
/// For W [out, in]: coef = B [out, r], m = A [r, in]. For fan_in_fan_out (W [in, out]):
/// coef = A transposed [in, r], m = B transposed [r, out].
/// Every row is written. Returns -1, or the flat index of the first output element that is not
/// finite.
/// Levels: scalar; AVX2; AVX-512 (any cols: a scalar tail per row). Same bits at all three,
/// but for a NaN rounded to fp16: 0x7E00 with its sign at the scalar level, its top payload bits
/// kept too at the vector ones (as in qlora_dequantize4_f16).
int64_t qlora_lora_merge_rows(const float *coef, const float *m, int64_t r, int64_t cols,
                              int64_t row_begin, int64_t row_end, float scaling, int adapter_type,
                              const void *base, int base_type, void *out, int out_type, float *delta_out);

/// Adds the merge report's sums over n elements to acc (Float64). base (base_type) and written
/// (written_type) may be unaligned; with b, w their fp32 values and s = fl(b + delta),
/// acc[0] += (w - s)^2, acc[1] += delta^2, acc[2] += s^2, acc[3] += (w - b) * delta,
/// acc[4] += (w - b)^2. Levels: scalar; AVX2; AVX-512. Lane order depends on the level, so
/// results agree across levels to Float64 rounding, not bit for bit.
void qlora_merge_report_sums(const void *base, int base_type, const float *delta, const void *written, int written_type,
                             int64_t n, double *acc);

#ifdef __cplusplus
}
#endif
#endif
