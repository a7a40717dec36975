import Foundation
import QLoRA
import Memory

/// Q1–Q6 of ../shared/claims.md: quantization and data types.
extension Claims {
    static let quantizationClaims: [Claim] = [
        Claim("Q1", "NF4 storage cuts weight memory by roughly 75% (about 4x) versus 16-bit", "C, D, E") { c in
            let quantizedShare = Double(bytes(c.q7, "base_weights", "quant_constants")) / Double(2 * c.q7.params.quantized)
            let wholeShare = Double(bytes(c.q7, "base_weights", "quant_constants", "unquantized_weights")) / Double(c.fp16Size)
            return Finding(String(format: "llama-2-7b: quantized weights −%.1f%% (%.2fx); whole model with bf16 embeddings/lm_head −%.1f%% (%.2fx)",
                                  100 * (1 - quantizedShare), 1 / quantizedShare, 100 * (1 - wholeShare), 1 / wholeShare),
                           .holds, "holds: 4.13 bits per weight with double quant (data + constants) against 16")
        },
        Claim("Q2", "Double quantization saves about 0.37 bits per parameter", "C (QLoRA paper)") { c in
            let p = c.precision
            let saved = p.bitsNoDoubleQuant - p.bitsDoubleQuant
            return Finding(String(format: "%.3f bits/param (%.3f without, %.3f with; measured on quantized 4096×4096 bytes, code tables included)",
                                  saved, p.bitsNoDoubleQuant, p.bitsDoubleQuant),
                           within(saved, 0.37, 0.05))
        },
        Claim("Q3", "Double quantization saves roughly 3 GB on a 65B model", "C") { _ in
            var nodq = MemoryOptions()
            nodq.doubleQuant = false
            let l65 = ModelArchitecture.preset("llama-65b")!
            let c65 = try MemoryEstimate(model: l65, options: nodq).component("quant_constants")!.estimatedBytes
                - (try MemoryEstimate(model: l65, options: MemoryOptions())).component("quant_constants")!.estimatedBytes
            return Finding("llama-65b: \(gigabytes(c65)) of constants saved (\(String(format: "%.2f GiB", Double(c65) / 1_073_741_824))), from the constants' byte counts, which tests hold to the byte against qlora quantize's output",
                           within(Double(c65) / gb, 3))
        },
        Claim("Q4", "NF4 is information-theoretically optimal for normally distributed weights (so: lower error than FP4 and Int4 on normal weights)", "C") { c in
            let p = c.precision
            var figure = String(format: "relative L2 error on N(0,1): NF4 %.4f, FP4 %.4f, Int4 %.4f", p.nf4Normal, p.fp4Normal, p.int4Normal)
            var holds = p.nf4Normal < p.fp4Normal && p.nf4Normal < p.int4Normal
            if let n = p.nf4Real, let f = p.fp4Real, let i = p.int4Real {
                figure += String(format: "; on %@: NF4 %.4f, FP4 %.4f, Int4 %.4f", p.realWeights ?? "real weights", n, f, i)
                holds = holds && n < f && n < i
            } else { figure += "; real weights not found (Data/all-MiniLM-L6-v2)" }
            return Finding(figure + " (blocksize 64, absmax scaling, no double quant)", holds ? .holds : .off,
                           holds ? "holds: NF4 has the lowest error of the three; 'optimal' itself is not tested (NF4's levels are equal-mass quantiles, not an MSE-optimal quantizer)"
                                 : "off: NF4 is not the lowest error here")
        },
        Claim("Q5", "Each block is de-quantized back to bf16 on the fly for the forward and backward pass; the math stays high precision", "C") { c in
            Finding(String(format: "Matmul4Bit computes with bf16(dequant(W)) and fp32 accumulation; bf16 rounding of the weights adds %.2e relative L2", c.precision.bf16DequantError),
                    .holds, "holds by construction; tests pin qlora's matmul to bitsandbytes' matmul_4bit (Vectors/quant/matmul.safetensors)")
        },
        Claim("Q6", "Quality measured on a 16-bit merge does not always transfer to a 4-bit serving path (merge-then-requantize error)", "C") { c in
            let p = c.precision
            return Finding(String(format: "re-quantizing a merged rank-16 delta (ΔW ≈ 4.7%% of W) adds %.2f‖ΔW‖ of error; the applied change keeps cosine %.2f to ΔW (bf16 merge: ~0.04‖ΔW‖)",
                                  p.requantErrorToDelta, p.requantCosine),
                           p.requantErrorToDelta > 0.1 ? .holds : .off, "holds: most of a small fine-tune's change is rounded away by re-quantization (see qlora merge --report)")
        },
    ]
}
