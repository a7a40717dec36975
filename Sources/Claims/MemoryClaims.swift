import Foundation
import QLoRA
import Memory
import GGUF
import CheckpointJobs

/// M1–M22 of ../shared/claims.md: memory per component. "7B" is llama-2-7b; estimates are r=16
/// on all linear layers, 2048 tokens × batch 1, gradient checkpointing, unless a row says otherwise.
extension Claims {
    static let memoryClaims: [Claim] = [
        // M1–M5: multiples of the FP16 model size (llama-2-7b, 2 B per parameter).
        Claim("M1", "Full fine-tune memory multiplier ~6x the FP16 model size (FP16 + AdamW)", "A") { c in
            let m1 = c.multiple(withoutActivations(c.full))
            return Finding(String(format: "%.1fx before activations (bf16 weights + grads, fp32 master, fp32 AdamW: 16 B/param); 6x is 12 B/param, i.e. no fp32 master copy", m1),
                           within(m1, 6))
        },
        Claim("M2", "Full fine-tune BF16 + 8-bit Adam ~4x model size", "A") { c in
            let m2 = c.multiple(withoutActivations(try estimate("llama-2-7b", .full8BitAdam)))
            let judged = within(m2, 4)
            return Finding(String(format: "%.2fx before activations (bf16 weights + grads, 8-bit AdamW states); %.2fx with an fp32 master copy", m2, m2 + 2),
                           judged.0, judged.1 + String(format: " (%.2fx with a master copy)", m2 + 2))
        },
        Claim("M3", "LoRA (r=16, FP16 base) ~1.2x model size", "A") { c in
            let lo = c.multiple(withoutActivations(c.lora)), hi = c.multiple(c.lora.totalEstimatedBytes)
            let holds = inRange(1.2, lo, hi)
            return Finding(String(format: "%.2fx before activations, %.2fx with activations at 2048 tokens, gradient checkpointing", lo, hi),
                           holds ? .holds : .off, holds ? "holds: 1.2x lies between" : "off by \(pct(hi / 1.2 - 1)) at 2048 tokens")
        },
        Claim("M4", "QLoRA (4-bit base, r=16) ~0.4x the FP16 model size", "A") { c in
            let lo = c.multiple(withoutActivations(c.q7)), hi = c.multiple(c.q7.totalEstimatedBytes)
            let holds = inRange(0.4, lo, hi)
            return Finding(String(format: "%.2fx before activations, %.2fx with activations at 2048 tokens, gradient checkpointing", lo, hi),
                           holds ? .holds : .off, holds ? "holds: 0.4x lies between" : "off by \(pct(hi / 0.4 - 1))")
        },
        Claim("M5", "DoRA / rsLoRA on a 4-bit base ~0.5x the FP16 size", "A") { c in
            let lo = c.multiple(withoutActivations(c.q7)), hi = c.multiple(c.q7.totalEstimatedBytes)
            // DoRA's step from the model held to the measured -dora timelines: its peak, the
            // magnitudes, the kept results and each module's weight norm in the recompute.
            let o = MemoryOptions(method: .qlora, rank: 16, seqLen: 2048, gradientCheckpointing: true, dora: true)
            let dora = try StepTimeline(model: c.l7, options: o)
            let plain = try StepTimeline(model: c.l7, options: { var p = o; p.dora = false; return p }())
            let d = c.multiple(dora.peakBytes), p = c.multiple(plain.peakBytes)
            let magnitudes = try MemoryEstimate(model: c.l7, options: o).params.trainable - c.q7.params.trainable
            let judgedR = within(hi, 0.5), judgedD = within(d, 0.5)
            let verdict: ClaimCheck.Verdict = judgedR.0 == .holds && judgedD.0 == .holds ? .holds : .off
            return Finding(String(format: "rsLoRA: %.2fx–%.2fx, the same as QLoRA (only the scaling differs); DoRA: %.2fx at its step's peak (%@, against %.2fx without DoRA; its magnitudes add %d parameters)",
                                  lo, hi, d, dora.peak.phase, p, magnitudes),
                           verdict, "rsLoRA " + judgedR.1 + "; DoRA " + judgedD.1 + " (QLoRA r=16 all linear, 2048 tokens, checkpointing, the peft recipe's step peak)")
        },
        Claim("M6", "LoRA/QLoRA trainable parameters are 0.1-1% of the model; DoRA 0.5-2%", "A, C") { c in
            let q7 = c.q7
            let pct16 = Double(q7.params.trainable) / Double(q7.params.total)
            let qv8 = try estimate("llama-2-7b", .qlora, rank: 8, targets: ["q_proj", "v_proj"])
            let pctQV = Double(qv8.params.trainable) / Double(qv8.params.total)
            let doraParams = try MemoryEstimate(model: c.l7, options: MemoryOptions(method: .qlora, rank: 16, seqLen: 2048, gradientCheckpointing: true, dora: true)).params.trainable
            let dora = Double(doraParams) / Double(q7.params.total)
            return Finding(String(format: "llama-2-7b r=16 all linear: %.3f%%; r=8 on q,v: %.3f%%; DoRA r=16 all linear: %.3f%%", 100 * pct16, 100 * pctQV, 100 * dora),
                           .holds, "holds for r=16 on all linear layers (LoRA and DoRA); r=8 on q,v alone is below 0.1%")
        },
        // M7, M8: the components of a 7B full fine-tune, by hand.
        Claim("M7", "7B full fine-tune FP16: weights 14 GB, gradients 28 GB (FP32, 4 B x 7B), AdamW states 56 GB, activations ~6 GB at batch 4: ~104 GB", "B") { c in
            let n = c.l7.totalParameters
            let w16 = 2 * n, g32 = 4 * n, adam32 = 8 * n
            let act4 = try estimate("llama-2-7b", .full, seq: 512, batch: 4, gc: false).component("activations")!.estimatedBytes
            let judged = within(Double(w16 + g32 + adam32) / (98 * gb), 1, 0.1)
            return Finding("llama-2-7b: weights \(gigabytes(w16)), fp32 gradients \(gigabytes(g32)), AdamW \(gigabytes(adam32)); activations at batch 4 × 512 tokens \(gigabytes(act4)) (the article gives no length)",
                           judged.0, "weights, gradients and states " + judged.1 + " (7B rounds 6.74B up); activations depend on the unstated sequence length")
        },
        Claim("M8", "7B full fine-tune FP16: weights 14 + gradients 14 + AdamW 28 = 56 GB before activations", "D") { c in
            let w16 = c.fp16Size, adam16 = 4 * c.l7.totalParameters
            return Finding("llama-2-7b: \(gigabytes(w16)) + \(gigabytes(w16)) + \(gigabytes(adam16)) = \(gigabytes(2 * w16 + adam16)) (AdamW moments in bf16, as torch keeps them for bf16 parameters)",
                           within(Double(2 * w16 + adam16) / (56 * gb), 1))
        },
        Claim("M9", "7B LoRA rank 64, FP16 base: base 14 GB, LoRA params+grads ~0.7 GB, optimizer ~1.4 GB, activations ~4 GB: ~20 GB", "B") { _ in
            let l64 = try estimate("llama-2-7b", .lora, rank: 64)
            let params64 = l64.params.trainable
            let judged = within(Double(withoutActivations(l64)) / gb, 16)
            return Finding("llama-2-7b r=64 all linear (\(params64.formatted()) params): base \(gigabytes(bytes(l64, "base_weights", "unquantized_weights"))), params+grads \(gigabytes(8 * params64)) fp32 (\(gigabytes(4 * params64)) fp16), AdamW \(gigabytes(8 * params64)); before activations \(gigabytes(withoutActivations(l64)))",
                           judged.0, "before activations " + judged.1 + " of the article's 16 GB; its params+grads match fp16 adapters")
        },
        // M10, M11: a 7B QLoRA run's parts.
        Claim("M10", "7B QLoRA: 4-bit weights ~4.5 GB, adapters+grads+optimizer+activations 4-5.5 GB: 8-10 GB", "B") { c in
            let q7 = c.q7
            let w4 = bytes(q7, "base_weights", "quant_constants", "unquantized_weights")
            let judged = within(Double(w4) / gb, 4.5)
            return Finding("llama-2-7b: weights \(gigabytes(w4)) (4-bit projections + constants \(gigabytes(bytes(q7, "base_weights", "quant_constants"))), bf16 embeddings/lm_head \(gigabytes(bytes(q7, "unquantized_weights")))); total \(gigabytes(q7.totalEstimatedBytes)) at 2048 tokens with checkpointing, \(gigabytes(c.q7noGC.totalEstimatedBytes)) without",
                           judged.0, "4-bit weights " + judged.1 + "; the total depends on activations")
        },
        Claim("M11", "7B QLoRA: NF4 weights ~3.5 GB, LoRA adapters (FP16) ~0.1 GB, optimizer ~0.4 GB, gradients+activations ~4 GB: ~8 GB", "E") { c in
            let q7 = c.q7
            let nf4 = bytes(q7, "base_weights", "quant_constants")
            let judged = within(Double(nf4) / gb, 3.5)
            return Finding("llama-2-7b: NF4 \(gigabytes(nf4)), adapters fp16 \(gigabytes(2 * q7.params.trainable)), AdamW \(gigabytes(8 * q7.params.trainable)), total \(gigabytes(q7.totalEstimatedBytes)) (2048 tokens, checkpointing)",
                           judged.0, "NF4 weights " + judged.1 + "; optimizer " + within(Double(8 * q7.params.trainable) / gb, 0.4).1)
        },
        // M12, M13: measured CUDA peaks.
        Claim("M12", "Llama-3.1-8B QLoRA r=16 alpha=32 on q_proj+v_proj, gradient checkpointing: 14.8 GB peak", "B") { _ in
            // The step's peak as transformers + PEFT + bitsandbytes reach it (StepTimeline); the
            // article gives no length or batch, so the length at which the peak is 14.8 GB decides it.
            let a = ModelArchitecture.preset("llama-3.1-8b")!
            func options(_ seq: Int, _ batch: Int = 1) -> MemoryOptions {
                MemoryOptions(method: .qlora, rank: 16, alpha: 32, targets: ["q_proj", "v_proj"], seqLen: seq, batch: batch, gradientCheckpointing: true)
            }
            let at2048 = try StepTimeline(model: a, options: options(2048))
            let seq1 = try Memory.Fit.largest(upTo: longestSeqLen) { Double(try StepTimeline(model: a, options: options($0)).peakBytes) <= 14.8 * gb }
            let batch4 = try Memory.Fit.largest(upTo: longestSeqLen) { Double(try StepTimeline(model: a, options: options($0, 4)).peakBytes) <= 14.8 * gb }
            let holds = (seq1 ?? 0) >= 512 && (seq1 ?? .max) <= 16384
            return Finding(String(format: "llama-3.1-8b, transformers + PEFT + bitsandbytes step: peak %@ at 2048 tokens × 1 (%@), 14.8 GB at %@ tokens × 1 or %@ × 4; the fp32 log-softmax and its gradient over 128,256 logits dominate",
                                  gigabytes(at2048.peakBytes), at2048.peak.phase, seq1?.formatted() ?? "no", batch4?.formatted() ?? "no"),
                           holds ? .holds : .off,
                           (holds ? "holds" : "off") + " for a run of about \(seq1?.formatted() ?? "?") tokens × batch 1 (or \(batch4?.formatted() ?? "?") × 4): the article gives no length or batch, and the length decides it; CUDA's context and caching allocator add to it")
        },
        Claim("M13", "Llama-3.1-8B at 2048 tokens peaks ~6.6 GB reserved with Unsloth QLoRA", "C") { _ in
            // Unsloth's notebook settings: r=16 on all seven projections, 8-bit AdamW, its
            // offloaded checkpointing; the step as Unsloth's source lays it out (StepTimeline's
            // unsloth recipe: not measured, Unsloth needs CUDA), a later step holding the states.
            let a = ModelArchitecture.preset("llama-3.1-8b")!
            let o = MemoryOptions(method: .qlora, rank: 16, alpha: 16, seqLen: 2048, batch: 1, gradientCheckpointing: true, optimizer: .adamw8bit)
            let unsloth = try StepTimeline(model: a, options: o, recipe: .unsloth)
            let hf = try StepTimeline(model: a, options: o)
            let judged = within(Double(unsloth.peakBytes) / gb, 6.6)
            return Finding("llama-3.1-8b r=16 all linear, 2048 tokens × 1, 8-bit AdamW, Unsloth's step (from its source; not measured): peak \(gigabytes(unsloth.peakBytes)) at \(unsloth.peak.phase), weights \(gigabytes(unsloth.peak.components["weights"]!)), \(gigabytes(unsloth.hostBytes)) of checkpoints offloaded to host memory; transformers + PEFT + bitsandbytes on the same settings peak at \(gigabytes(hf.peakBytes)) (\(hf.peak.phase))",
                           judged.0, "allocated peak " + judged.1 + "; reserved adds the CUDA allocator's rounding and cache, outside the model")
        },
        // M14–M17: footprints per model size.
        Claim("M14", "QLoRA VRAM: 8B 10-14 GB; 14B 16-20 GB; 32B 24-32 GB; 70B ~48 GB. LoRA BF16: 8B 24-32 GB; 14B 40-48 GB; 70B 100-140 GB. Full: 8B 56 GB+; 14B 100 GB+", "D") { _ in
            let ranges: [(label: String, model: String, method: TrainingMethod, lo: Double, hi: Double?)] = [
                ("QLoRA 8B", "llama-3.1-8b", .qlora, 10, 14), ("14B", "qwen2.5-14b", .qlora, 16, 20),
                ("32B", "qwen2.5-32b", .qlora, 24, 32), ("70B", "llama-3.1-70b", .qlora, 48 * 0.9, 48 * 1.1),
                ("LoRA 8B", "llama-3.1-8b", .lora, 24, 32), ("14B", "qwen2.5-14b", .lora, 40, 48), ("70B", "llama-3.1-70b", .lora, 100, 140),
                ("Full 8B", "llama-3.1-8b", .full, 56, nil), ("14B", "qwen2.5-14b", .full, 100, nil),
            ]
            var parts: [String] = []
            var ok = 0
            for r in ranges {
                let v = Double(try estimate(r.model, r.method).totalEstimatedBytes) / gb
                let inside = r.hi.map { inRange(v, r.lo, $0) } ?? (v >= r.lo * 0.95)
                if inside { ok += 1 }
                parts.append(String(format: "%@ %.1f GB%@", r.label, v, inside ? "" : " (outside)"))
            }
            return Finding(parts.joined(separator: "; ") + " (r=16 all linear, 2048 tokens × 1, checkpointing)",
                           ok == ranges.count ? .holds : .off, "\(ok) of \(ranges.count) ranges hold")
        },
        Claim("M15", "QLoRA footprints: 7B comfortable on 16 GB; 13B fits 24 GB; 30-32B ~40 GB; 70B ~46 GB", "C") { _ in
            var parts: [String] = []
            var ok = true
            for (label, model, limit) in [("7B ≤ 16", "llama-2-7b", 16.0), ("13B ≤ 24", "llama-2-13b", 24), ("32B ~40", "qwen2.5-32b", 40 * 1.1), ("70B ~46", "llama-2-70b", 46 * 1.1)] {
                let v = Double(try estimate(model, .qlora).totalEstimatedBytes) / gb
                ok = ok && v <= limit
                parts.append(String(format: "%@ GB: %.1f GB", label, v))
            }
            return Finding(parts.joined(separator: "; ") + " (r=16 all linear, 2048 tokens, checkpointing)", ok ? .holds : .off, ok ? "holds: each fits" : "off: not every size fits")
        },
        Claim("M16", "A 65B model fits on a single 48 GB GPU with QLoRA", "C (QLoRA paper)") { _ in
            let m16 = Double(try estimate("llama-65b", .qlora, rank: 64, seq: 512).totalEstimatedBytes) / gb
            return Finding(String(format: "llama-65b, r=64 all linear, 512 tokens, checkpointing: %.1f GB", m16), m16 <= 48 ? .holds : .off,
                           m16 <= 48 ? String(format: "holds with %.1f GB to spare for the CUDA context and buffers", 48 - m16)
                                     : "off by \(pct(m16 / 48 - 1)): it fits only with the paper's paged optimizer (AdamW states paged to CPU memory), which this estimate keeps on the device")
        },
        Claim("M17", "70B QLoRA is feasible on a single 128 GB unified-memory device", "A") { _ in
            let m17 = Double(try estimate("llama-3.1-70b", .qlora).totalEstimatedBytes) / gb
            return Finding(String(format: "llama-3.1-70b r=16 all linear, 2048 tokens, checkpointing: %.1f GB", m17), m17 <= 128 ? .holds : .off, m17 <= 128 ? "holds" : "off")
        },
        // M18–M22
        Claim("M18", "LoRA on a 7B model fits in 24 GB at common batch sizes; LoRA 7B needs 12-14 GB vs ~5 GB for inference", "A, B") { c in
            let m18 = Double(try estimate("llama-2-7b", .lora, batch: 4).totalEstimatedBytes) / gb
            return Finding(String(format: "llama-2-7b LoRA r=16: %.1f GB at 2048 × 4 with checkpointing; the bf16 weights alone are %.1f GB", m18, Double(c.fp16Size) / gb),
                           .off, String(format: "fits 24 GB holds (%.1f GB); '12-14 GB' is off: above %.1f GB before activations", m18, Double(withoutActivations(c.lora)) / gb))
        },
        Claim("M19", "7B full fine-tune needs 60-70 GB; 80-100+ GB with activations", "E, B") { c in
            Finding("llama-2-7b: \(gigabytes(withoutActivations(c.full))) before activations with an fp32 master copy and fp32 AdamW; \(gigabytes(2 * c.fp16Size + 4 * c.l7.totalParameters)) in pure bf16",
                    .off, "off: 60-70 GB matches neither recipe (108 GB mixed precision, 54 GB pure bf16)")
        },
        Claim("M20", "A trained LoRA adapter is often ~100 MB; adapters are 1-5% of the model size", "C, B") { c in
            let adapterFP16 = 2 * c.q7.params.trainable
            return Finding(String(format: "llama-2-7b r=16 all linear: %@ in fp16 (%@ fp32) = %.2f%% of the fp16 model", gigabytes(adapterFP16), gigabytes(2 * adapterFP16), 100 * Double(adapterFP16) / Double(c.fp16Size)),
                           .off, "~100 MB holds; 1-5% is off (0.6% at r=16; 5% needs r≈128)")
        },
        Claim("M21", "Gradient checkpointing cuts activation memory (~30% less memory) at ~30% more compute", "B, C") { c in
            let a0 = bytes(c.q7noGC, "activations"), a1 = bytes(c.q7, "activations")
            return Finding(String(format: "llama-2-7b QLoRA, 2048 tokens: activations %@ → %@ (%.0f%% less); one extra forward ≈ +33%% compute", gigabytes(a0), gigabytes(a1), 100 * (1 - Double(a1) / Double(a0))),
                           .off, "memory off: per-layer checkpointing keeps one layer's activations, not 70% of all; compute holds (+1 forward of 3)")
        },
        Claim("M22", "Mistral-7B Q4_K_M inference ~4.5 GB", "B") { _ in
            // llama-quantize's Q4_K_M mix (llama.cpp src/llama-quant.cpp, llama_tensor_get_type;
            // `LlamaQuantize`): Q4_K by default, Q6_K for output.weight and, in the layers
            // `use_more_bits` picks, for attn_v and ffn_down; norms stay F32.
            let a = ModelArchitecture.preset("mistral-7b")!
            let weights = ggufQ4KMBytes(a)
            let kvPerToken = 2 * a.layers * a.keyValueDim * 2  // K and V, f16, every layer
            let kv4096 = 4096 * kvPerToken
            let judged = within(Double(weights + kv4096) / gb, 4.5)
            return Finding(String(format: "mistral-7b as llama-quantize's Q4_K_M lays it out: %@ of weights (%.2f bits/weight over %@ parameters); the f16 KV cache adds %@ per 1,000 tokens of context, %@ at llama.cpp's 4,096",
                                  gigabytes(weights), Double(8 * weights) / Double(a.totalParameters), a.totalParameters.formatted(), gigabytes(1000 * kvPerToken), gigabytes(kv4096)),
                           judged.0, "weights + KV cache at 4,096 tokens of context " + judged.1 + " (the context length decides the rest; compute buffers come on top)")
        },
    ]
}

/// The bytes of the weights of `a` in a GGUF quantized as llama-quantize's Q4_K_M (no imatrix):
/// the tensors convert_hf_to_gguf.py writes for a Llama-architecture model, typed by
/// `LlamaQuantize`'s mixture rule (the one `qlora export --type q4_k_m` writes by); see M22.
func ggufQ4KMBytes(_ a: ModelArchitecture) -> Int {
    var hf = ["model.embed_tokens.weight", "model.norm.weight"] + (a.tiedEmbeddings ? [] : ["lm_head.weight"])
    var shapes = [[a.vocabSize, a.hiddenSize], [a.hiddenSize]] + (a.tiedEmbeddings ? [] : [[a.vocabSize, a.hiddenSize]])
    for l in 0..<a.layers {
        for t in a.layerTensors(l) { hf.append(t.name); shapes.append(t.shape) }
    }
    let names = hf.map { GGUFExport.ggufName($0, .llama)! }
    let ne = shapes.map { Array($0.reversed()) }  // ggml's order: columns first
    let order = LlamaQuantize.loaderOrder(names)
    let (n, e) = (order.map { names[$0] }, order.map { ne[$0] })
    let current = e.map { $0.count >= 2 ? GGMLType.f16 : .f32 }  // the converter's: 1-D tensors F32
    let types = LlamaQuantize.types(names: n, ne: e, current: current, mixture: .q4_k_m,
                                    model: .init(layers: a.layers, attentionHeads: a.attentionHeads, keyValueHeads: a.keyValueHeads))
    return zip(types, e).reduce(0) { $0 + $1.0.byteCount($1.1)! }
}
