import Foundation
import QLoRA
import SafeTensors

/// One published claim (../shared/claims.md) and the project's check of it.
public struct ClaimCheck: Sendable, Codable {
    public enum Verdict: String, Sendable, Codable {
        case holds
        case off
        case notCheckable = "not checkable here"
    }

    public var id: String
    public var claim: String
    public var source: String
    /// The project's own figure: computed from exact parameter counts and/or measured.
    public var figure: String
    public var verdict: Verdict
    /// "holds", "off by +33%", or why it cannot be checked here, with the reasoning.
    public var detail: String
}

/// Precision measurements behind claims Q2, Q4 and Q6.
public struct PrecisionFigures: Sendable, Codable {
    /// Relative L2 error, blocksize 64, no double quant, on N(0, 1) samples and on real trained weights.
    public var nf4Normal = 0.0, fp4Normal = 0.0, int4Normal = 0.0
    public var nf4Real: Double?, fp4Real: Double?, int4Real: Double?
    public var realWeights: String?
    /// Bits per parameter of data + constants, measured from quantized bytes (4096×4096 weight).
    public var bitsNoDoubleQuant = 0.0, bitsDoubleQuant = 0.0
    /// A rank-16 merge into a 4-bit base, re-quantized: error / ‖ΔW‖ and cos(applied, ΔW).
    public var requantErrorToDelta = 0.0, requantCosine = 0.0
    /// bf16 rounding of dequantized weights, relative L2 (what the on-the-fly matmul computes with).
    public var bf16DequantError = 0.0
}

/// Int4 absmax quantization at the same blocksize (15 levels, round to nearest), dequantized.
public func int4AbsmaxRoundTrip(_ x: [Float], blocksize: Int) -> [Float] {
    var out = [Float](repeating: 0, count: x.count)
    var start = 0
    while start < x.count {
        let end = min(x.count, start + blocksize)
        let absmax = x[start..<end].reduce(Float(0)) { max($0, abs($1)) }
        if absmax > 0 {
            for i in start..<end { out[i] = (x[i] / absmax * 7).rounded() / 7 * absmax }
        }
        start = end
    }
    return out
}

func relativeL2(_ a: [Float], _ b: [Float]) -> Double {
    var e = 0.0, n = 0.0
    for i in a.indices { let d = Double(a[i]) - Double(b[i]); e += d * d; n += Double(a[i]) * Double(a[i]) }
    return n > 0 ? (e / n).squareRoot() : 0
}

extension PrecisionFigures {
    /// Measures every figure. `realWeights`: trained fp32 tensors (e.g. the committed MiniLM slice).
    public static func measure(realWeights: (label: String, values: [Float])?) throws -> PrecisionFigures {
        var f = PrecisionFigures()
        var rng = SplitMix64(seed: 2026)
        let normal = (0..<(1 << 20)).map { _ in rng.normal() }
        func errors(_ x: [Float]) throws -> (Double, Double, Double) {
            func roundTrip(_ t: QuantType) throws -> [Float] {
                try x.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [x.count], quantType: t, blocksize: 64, doubleQuant: false) }.dequantizedFloat32()
            }
            return (relativeL2(x, try roundTrip(.nf4)), relativeL2(x, try roundTrip(.fp4)), relativeL2(x, int4AbsmaxRoundTrip(x, blocksize: 64)))
        }
        (f.nf4Normal, f.fp4Normal, f.int4Normal) = try errors(normal)
        if let r = realWeights {
            let e = try errors(r.values)
            (f.nf4Real, f.fp4Real, f.int4Real) = (e.0, e.1, e.2)
            f.realWeights = r.label
        }

        // Bits per parameter from real quantized bytes.
        let n = 4096 * 4096
        let w = (0..<n).map { _ in rng.normal() * 0.02 }
        func bits(_ dq: Bool) throws -> (Double, Quantized4Bit) {
            let q = try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [4096, 4096], doubleQuant: dq) }
            var bytes = q.packed.count
            switch q.state.absmax {
            case .nested(let nested): bytes += nested.quantized.count + 4 * nested.absmax.count + 4 * 256  // + nested code table
            case .plain(let a): bytes += 4 * a.count
            }
            bytes += 4 * 16  // code table
            return (8 * Double(bytes) / Double(n), q)
        }
        let (b0, _) = try bits(false)
        let (b1, q) = try bits(true)
        (f.bitsNoDoubleQuant, f.bitsDoubleQuant) = (b0, b1)

        let deq = q.dequantizedFloat32()
        f.bf16DequantError = relativeL2(deq, deq.map { HalfPrecision.roundedToBFloat16($0) })

        // A merge into the 4-bit base, re-quantized (1024×1024 slice of it, rank 16, alpha 32;
        // B ~ N(0, 0.01²) as after some training, so ΔW is a few percent of W).
        let (out, k, r) = (1024, 1024, 16)
        let base = Array(deq[0..<(out * k)])
        let a = (0..<(r * k)).map { _ in Float((rng.unit() * 2 - 1) / Double(k).squareRoot()) }
        let b = (0..<(out * r)).map { _ in rng.normal() * 0.01 }
        let delta = LoRAMerge.delta(loraA: a, loraB: b, rank: r, inFeatures: k, outFeatures: out, scaling: 2)
        let sum = zip(base, delta).map { $0 + $1 }
        let requant = try sum.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [out, k]) }.dequantizedFloat32()
        var e2 = 0.0, d2 = 0.0, dot = 0.0, a2 = 0.0
        for i in sum.indices {
            let e = Double(requant[i]) - Double(sum[i]), ap = Double(requant[i]) - Double(base[i]), d = Double(delta[i])
            e2 += e * e; d2 += d * d; dot += ap * d; a2 += ap * ap
        }
        f.requantErrorToDelta = (e2 / d2).squareRoot()
        f.requantCosine = dot / (d2 * a2).squareRoot()
        return f
    }
}

/// Checks every claim of ../shared/claims.md (ids Q1–Q6, M1–M22).
public enum Claims {
    public static let ids = (1...6).map { "Q\($0)" } + (1...22).map { "M\($0)" }

    static let gb = 1e9
    static func GB(_ bytes: Int) -> String { String(format: "%.2f GB", Double(bytes) / gb) }
    static func pct(_ x: Double) -> String { String(format: "%+.0f%%", 100 * x) }

    /// Estimate helper: totals in bytes.
    static func estimate(_ model: String, _ method: TrainingMethod, rank: Int = 16, targets: [String] = ModelArchitecture.projectionNames,
                         seq: Int = 2048, batch: Int = 1, gc: Bool = true) throws -> MemoryEstimate {
        var o = MemoryOptions()
        o.method = method
        o.rank = rank
        o.targets = targets
        o.seqLen = seq
        o.batch = batch
        o.gradientCheckpointing = gc
        return try MemoryEstimate(model: ModelArchitecture.preset(model)!, options: o)
    }

    static func bytes(_ m: MemoryEstimate, _ names: String...) -> Int { names.reduce(0) { $0 + (m.component($1)?.estimatedBytes ?? 0) } }
    static func withoutActivations(_ m: MemoryEstimate) -> Int { m.totalEstimatedBytes - bytes(m, "activations") }

    public static func check(precision p: PrecisionFigures) throws -> [ClaimCheck] {
        var out: [ClaimCheck] = []
        func add(_ id: String, _ claim: String, _ source: String, _ figure: String, _ verdict: ClaimCheck.Verdict, _ detail: String) {
            out.append(ClaimCheck(id: id, claim: claim, source: source, figure: figure, verdict: verdict, detail: detail))
        }
        func within(_ ours: Double, _ claimed: Double, _ tolerance: Double = 0.15) -> (ClaimCheck.Verdict, String) {
            let off = ours / claimed - 1
            return abs(off) <= tolerance ? (.holds, "holds (\(pct(off)))") : (.off, "off by \(pct(off))")
        }
        func inRange(_ ours: Double, _ lo: Double, _ hi: Double) -> Bool { ours >= lo * 0.95 && ours <= hi * 1.05 }

        let l7 = ModelArchitecture.preset("llama-2-7b")!
        let fp16Size = 2 * l7.totalParameters
        let q7 = try estimate("llama-2-7b", .qlora)
        let q7noGC = try estimate("llama-2-7b", .qlora, gc: false)

        // Q1
        let quantizedShare = Double(bytes(q7, "base_weights", "quant_constants")) / Double(2 * q7.params.quantized)
        let wholeShare = Double(bytes(q7, "base_weights", "quant_constants", "unquantized_weights")) / Double(fp16Size)
        add("Q1", "NF4 storage cuts weight memory by roughly 75% (about 4x) versus 16-bit", "C, D, E",
            String(format: "llama-2-7b: quantized weights −%.1f%% (%.2fx); whole model with bf16 embeddings/lm_head −%.1f%% (%.2fx)",
                   100 * (1 - quantizedShare), 1 / quantizedShare, 100 * (1 - wholeShare), 1 / wholeShare),
            .holds, "holds: 4.13 bits per weight with double quant (data + constants) against 16")
        // Q2
        let saved = p.bitsNoDoubleQuant - p.bitsDoubleQuant
        let q2 = within(saved, 0.37, 0.05)
        add("Q2", "Double quantization saves about 0.37 bits per parameter", "C (QLoRA paper)",
            String(format: "%.3f bits/param (%.3f without, %.3f with; measured on quantized 4096×4096 bytes, code tables included)", saved, p.bitsNoDoubleQuant, p.bitsDoubleQuant),
            q2.0, q2.1)
        // Q3
        var nodq = MemoryOptions(); nodq.doubleQuant = false
        let l65 = ModelArchitecture.preset("llama-65b")!
        let c65 = try MemoryEstimate(model: l65, options: nodq).component("quant_constants")!.estimatedBytes
            - (try MemoryEstimate(model: l65, options: MemoryOptions())).component("quant_constants")!.estimatedBytes
        let q3 = within(Double(c65) / gb, 3)
        add("Q3", "Double quantization saves roughly 3 GB on a 65B model", "C", "llama-65b: \(GB(c65)) of constants saved (\(String(format: "%.2f GiB", Double(c65) / 1_073_741_824))), from the constants' byte counts, which tests hold to the byte against qlora quantize's output", q3.0, q3.1)
        // Q4
        var q4fig = String(format: "relative L2 error on N(0,1): NF4 %.4f, FP4 %.4f, Int4 %.4f", p.nf4Normal, p.fp4Normal, p.int4Normal)
        var q4holds = p.nf4Normal < p.fp4Normal && p.nf4Normal < p.int4Normal
        if let n = p.nf4Real, let f = p.fp4Real, let i = p.int4Real {
            q4fig += String(format: "; on %@: NF4 %.4f, FP4 %.4f, Int4 %.4f", p.realWeights ?? "real weights", n, f, i)
            q4holds = q4holds && n < f && n < i
        } else { q4fig += "; real weights not found (Data/all-MiniLM-L6-v2)" }
        add("Q4", "NF4 is information-theoretically optimal for normally distributed weights (so: lower error than FP4 and Int4 on normal weights)", "C",
            q4fig + " (blocksize 64, absmax scaling, no double quant)", q4holds ? .holds : .off,
            q4holds ? "holds: NF4 has the lowest error of the three; 'optimal' itself is not tested (NF4's levels are equal-mass quantiles, not an MSE-optimal quantizer)"
                    : "off: NF4 is not the lowest error here")
        // Q5
        add("Q5", "Each block is de-quantized back to bf16 on the fly for the forward and backward pass; the math stays high precision", "C",
            String(format: "Matmul4Bit computes with bf16(dequant(W)) and fp32 accumulation; bf16 rounding of the weights adds %.2e relative L2", p.bf16DequantError),
            .holds, "holds by construction; tests pin qlora's matmul to bitsandbytes' matmul_4bit (Vectors/quant/matmul.safetensors)")
        // Q6
        add("Q6", "Quality measured on a 16-bit merge does not always transfer to a 4-bit serving path (merge-then-requantize error)", "C",
            String(format: "re-quantizing a merged rank-16 delta (ΔW ≈ 4.7%% of W) adds %.2f‖ΔW‖ of error; the applied change keeps cosine %.2f to ΔW (bf16 merge: ~0.04‖ΔW‖)", p.requantErrorToDelta, p.requantCosine),
            p.requantErrorToDelta > 0.1 ? .holds : .off, "holds: most of a small fine-tune's change is rounded away by re-quantization (see qlora merge --report)")

        // M1–M5: multiples of the FP16 model size (llama-2-7b, 2 B per parameter).
        func x(_ b: Int) -> Double { Double(b) / Double(fp16Size) }
        let full = try estimate("llama-2-7b", .full)
        let m1 = x(withoutActivations(full))
        add("M1", "Full fine-tune memory multiplier ~6x the FP16 model size (FP16 + AdamW)", "A",
            String(format: "%.1fx before activations (bf16 weights + grads, fp32 master, fp32 AdamW: 16 B/param); 6x is 12 B/param, i.e. no fp32 master copy", m1),
            within(m1, 6).0, within(m1, 6).1)
        let f8 = try estimate("llama-2-7b", .full8BitAdam)
        let m2 = x(withoutActivations(f8))
        add("M2", "Full fine-tune BF16 + 8-bit Adam ~4x model size", "A",
            String(format: "%.2fx before activations (bf16 weights + grads, 8-bit AdamW states); %.2fx with an fp32 master copy", m2, m2 + 2),
            within(m2, 4).0, within(m2, 4).1 + String(format: " (%.2fx with a master copy)", m2 + 2))
        let lora = try estimate("llama-2-7b", .lora)
        let m3lo = x(withoutActivations(lora)), m3hi = x(lora.totalEstimatedBytes)
        add("M3", "LoRA (r=16, FP16 base) ~1.2x model size", "A",
            String(format: "%.2fx before activations, %.2fx with activations at 2048 tokens, gradient checkpointing", m3lo, m3hi),
            inRange(1.2, m3lo, m3hi) ? .holds : .off, inRange(1.2, m3lo, m3hi) ? "holds: 1.2x lies between" : "off by \(pct(m3hi / 1.2 - 1)) at 2048 tokens")
        let m4lo = x(withoutActivations(q7)), m4hi = x(q7.totalEstimatedBytes)
        add("M4", "QLoRA (4-bit base, r=16) ~0.4x the FP16 model size", "A",
            String(format: "%.2fx before activations, %.2fx with activations at 2048 tokens, gradient checkpointing", m4lo, m4hi),
            inRange(0.4, m4lo, m4hi) ? .holds : .off, inRange(0.4, m4lo, m4hi) ? "holds: 0.4x lies between" : "off by \(pct(m4hi / 0.4 - 1))")
        add("M5", "DoRA / rsLoRA on a 4-bit base ~0.5x the FP16 size", "A",
            String(format: "rsLoRA: %.2fx–%.2fx, the same as QLoRA (only the scaling differs); DoRA's magnitude vectors add %d parameters", m4lo, m4hi, 32 * (4 * 4096 + 2 * 11008 + 4096) ),
            within(m4hi, 0.5).0, "rsLoRA " + within(m4hi, 0.5).1 + " at 2048 tokens with checkpointing; DoRA's extra activation memory (it materializes each layer's weight norm) is not modelled")
        // M6
        let pct16 = Double(q7.params.trainable) / Double(q7.params.total)
        let qv8 = try estimate("llama-2-7b", .qlora, rank: 8, targets: ["q_proj", "v_proj"])
        let pctQV = Double(qv8.params.trainable) / Double(qv8.params.total)
        let dora = Double(q7.params.trainable + 32 * (4 * 4096 + 2 * 11008 + 4096)) / Double(q7.params.total)
        add("M6", "LoRA/QLoRA trainable parameters are 0.1-1% of the model; DoRA 0.5-2%", "A, C",
            String(format: "llama-2-7b r=16 all linear: %.3f%%; r=8 on q,v: %.3f%%; DoRA r=16 all linear: %.3f%%", 100 * pct16, 100 * pctQV, 100 * dora),
            .holds, "holds for r=16 on all linear layers (LoRA and DoRA); r=8 on q,v alone is below 0.1%")
        // M7, M8
        let w16 = 2 * l7.totalParameters, g32 = 4 * l7.totalParameters, adam32 = 8 * l7.totalParameters
        let act4 = try estimate("llama-2-7b", .full, seq: 512, batch: 4, gc: false).component("activations")!.estimatedBytes
        let m7 = Double(w16 + g32 + adam32) / (98 * gb)
        add("M7", "7B full fine-tune FP16: weights 14 GB, gradients 28 GB (FP32, 4 B x 7B), AdamW states 56 GB, activations ~6 GB at batch 4: ~104 GB", "B",
            "llama-2-7b: weights \(GB(w16)), fp32 gradients \(GB(g32)), AdamW \(GB(adam32)); activations at batch 4 × 512 tokens \(GB(act4)) (the article gives no length)",
            within(m7, 1, 0.1).0, "weights, gradients and states " + within(m7, 1, 0.1).1 + " (7B rounds 6.74B up); activations depend on the unstated sequence length")
        let m8 = Double(w16 + w16 + 4 * l7.totalParameters) / (56 * gb)
        add("M8", "7B full fine-tune FP16: weights 14 + gradients 14 + AdamW 28 = 56 GB before activations", "D",
            "llama-2-7b: \(GB(w16)) + \(GB(w16)) + \(GB(4 * l7.totalParameters)) = \(GB(2 * w16 + 4 * l7.totalParameters)) (AdamW moments in bf16, as torch keeps them for bf16 parameters)",
            within(m8, 1).0, within(m8, 1).1)
        // M9
        let l64 = try estimate("llama-2-7b", .lora, rank: 64)
        let params64 = l64.params.trainable
        add("M9", "7B LoRA rank 64, FP16 base: base 14 GB, LoRA params+grads ~0.7 GB, optimizer ~1.4 GB, activations ~4 GB: ~20 GB", "B",
            "llama-2-7b r=64 all linear (\(params64.formatted()) params): base \(GB(bytes(l64, "base_weights", "unquantized_weights"))), params+grads \(GB(8 * params64)) fp32 (\(GB(4 * params64)) fp16), AdamW \(GB(8 * params64)); before activations \(GB(withoutActivations(l64)))",
            within(Double(withoutActivations(l64)) / gb, 16).0, "before activations " + within(Double(withoutActivations(l64)) / gb, 16).1 + " of the article's 16 GB; its params+grads match fp16 adapters")
        // M10, M11
        let w4 = bytes(q7, "base_weights", "quant_constants", "unquantized_weights")
        let m10 = within(Double(w4) / gb, 4.5)
        add("M10", "7B QLoRA: 4-bit weights ~4.5 GB, adapters+grads+optimizer+activations 4-5.5 GB: 8-10 GB", "B",
            "llama-2-7b: weights \(GB(w4)) (4-bit projections + constants \(GB(bytes(q7, "base_weights", "quant_constants"))), bf16 embeddings/lm_head \(GB(bytes(q7, "unquantized_weights")))); total \(GB(q7.totalEstimatedBytes)) at 2048 tokens with checkpointing, \(GB(q7noGC.totalEstimatedBytes)) without",
            m10.0, "4-bit weights " + m10.1 + "; the total depends on activations")
        let nf4 = bytes(q7, "base_weights", "quant_constants")
        let m11 = within(Double(nf4) / gb, 3.5)
        add("M11", "7B QLoRA: NF4 weights ~3.5 GB, LoRA adapters (FP16) ~0.1 GB, optimizer ~0.4 GB, gradients+activations ~4 GB: ~8 GB", "E",
            "llama-2-7b: NF4 \(GB(nf4)), adapters fp16 \(GB(2 * q7.params.trainable)), AdamW \(GB(8 * q7.params.trainable)), total \(GB(q7.totalEstimatedBytes)) (2048 tokens, checkpointing)",
            m11.0, "NF4 weights " + m11.1 + "; optimizer " + within(Double(8 * q7.params.trainable) / gb, 0.4).1)
        // M12, M13
        let qv31 = try estimate("llama-3.1-8b", .qlora, targets: ["q_proj", "v_proj"])
        add("M12", "Llama-3.1-8B QLoRA r=16 alpha=32 on q_proj+v_proj, gradient checkpointing: 14.8 GB peak", "B",
            "llama-3.1-8b, 2048 tokens × batch 1: \(GB(qv31.totalEstimatedBytes)) (activations \(GB(bytes(qv31, "activations"))), of which the fp32 log-softmax over 128,256 logits is \(GB(2048 * 4 * 128256)))",
            .notCheckable, "not checkable on CPU: a CUDA peak at an unstated batch and length, with allocator caching and workspaces; ours for 2048 × 1 is below it")
        let u31 = try estimate("llama-3.1-8b", .qlora)
        add("M13", "Llama-3.1-8B at 2048 tokens peaks ~6.6 GB reserved with Unsloth QLoRA", "C",
            "llama-3.1-8b r=16 all linear, 2048 tokens, checkpointing, HF's recipe: \(GB(u31.totalEstimatedBytes)); before activations \(GB(withoutActivations(u31)))",
            .notCheckable, "not checkable here: Unsloth's fused cross-entropy (no full fp32 logits) and offloaded checkpointing are not modelled")
        // M14
        var m14: [String] = []
        var m14ok = 0, m14n = 0
        func range(_ label: String, _ model: String, _ method: TrainingMethod, _ lo: Double, _ hi: Double?) throws {
            let e = try estimate(model, method)
            let v = Double(e.totalEstimatedBytes) / gb
            let ok = hi.map { inRange(v, lo, $0) } ?? (v >= lo * 0.95)
            m14n += 1
            if ok { m14ok += 1 }
            m14.append(String(format: "%@ %.1f GB%@", label, v, ok ? "" : " (outside)"))
        }
        try range("QLoRA 8B", "llama-3.1-8b", .qlora, 10, 14)
        try range("14B", "qwen2.5-14b", .qlora, 16, 20)
        try range("32B", "qwen2.5-32b", .qlora, 24, 32)
        try range("70B", "llama-3.1-70b", .qlora, 48 * 0.9, 48 * 1.1)
        try range("LoRA 8B", "llama-3.1-8b", .lora, 24, 32)
        try range("14B", "qwen2.5-14b", .lora, 40, 48)
        try range("70B", "llama-3.1-70b", .lora, 100, 140)
        try range("Full 8B", "llama-3.1-8b", .full, 56, nil)
        try range("14B", "qwen2.5-14b", .full, 100, nil)
        add("M14", "QLoRA VRAM: 8B 10-14 GB; 14B 16-20 GB; 32B 24-32 GB; 70B ~48 GB. LoRA BF16: 8B 24-32 GB; 14B 40-48 GB; 70B 100-140 GB. Full: 8B 56 GB+; 14B 100 GB+", "D",
            m14.joined(separator: "; ") + " (r=16 all linear, 2048 tokens × 1, checkpointing)",
            m14ok == m14n ? .holds : .off, "\(m14ok) of \(m14n) ranges hold")
        // M15–M17
        var m15: [String] = []
        var m15ok = true
        for (label, model, limit) in [("7B ≤ 16", "llama-2-7b", 16.0), ("13B ≤ 24", "llama-2-13b", 24), ("32B ~40", "qwen2.5-32b", 40 * 1.1), ("70B ~46", "llama-2-70b", 46 * 1.1)] {
            let v = Double(try estimate(model, .qlora).totalEstimatedBytes) / gb
            m15ok = m15ok && v <= limit
            m15.append(String(format: "%@ GB: %.1f GB", label, v))
        }
        add("M15", "QLoRA footprints: 7B comfortable on 16 GB; 13B fits 24 GB; 30-32B ~40 GB; 70B ~46 GB", "C",
            m15.joined(separator: "; ") + " (r=16 all linear, 2048 tokens, checkpointing)", m15ok ? .holds : .off, m15ok ? "holds: each fits" : "off: not every size fits")
        let g65 = try estimate("llama-65b", .qlora, rank: 64, seq: 512)
        let m16 = Double(g65.totalEstimatedBytes) / gb
        add("M16", "A 65B model fits on a single 48 GB GPU with QLoRA", "C (QLoRA paper)",
            String(format: "llama-65b, r=64 all linear, 512 tokens, checkpointing: %.1f GB", m16), m16 <= 48 ? .holds : .off,
            m16 <= 48 ? String(format: "holds with %.1f GB to spare for the CUDA context and buffers", 48 - m16)
                      : "off by \(pct(m16 / 48 - 1)): it fits only with the paper's paged optimizer (AdamW states paged to CPU memory), which this estimate keeps on the device")
        let g70 = try estimate("llama-3.1-70b", .qlora)
        let m17 = Double(g70.totalEstimatedBytes) / gb
        add("M17", "70B QLoRA is feasible on a single 128 GB unified-memory device", "A",
            String(format: "llama-3.1-70b r=16 all linear, 2048 tokens, checkpointing: %.1f GB", m17), m17 <= 128 ? .holds : .off, m17 <= 128 ? "holds" : "off")
        // M18
        let l7b4 = try estimate("llama-2-7b", .lora, batch: 4)
        let m18 = Double(l7b4.totalEstimatedBytes) / gb
        add("M18", "LoRA on a 7B model fits in 24 GB at common batch sizes; LoRA 7B needs 12-14 GB vs ~5 GB for inference", "A, B",
            String(format: "llama-2-7b LoRA r=16: %.1f GB at 2048 × 4 with checkpointing; the bf16 weights alone are %.1f GB", m18, Double(w16) / gb),
            .off, String(format: "fits 24 GB holds (%.1f GB); '12-14 GB' is off: above %.1f GB before activations", m18, Double(withoutActivations(lora)) / gb))
        // M19
        add("M19", "7B full fine-tune needs 60-70 GB; 80-100+ GB with activations", "E, B",
            "llama-2-7b: \(GB(withoutActivations(full))) before activations with an fp32 master copy and fp32 AdamW; \(GB(2 * w16 + 4 * l7.totalParameters)) in pure bf16",
            .off, "off: 60-70 GB matches neither recipe (108 GB mixed precision, 54 GB pure bf16)")
        // M20
        let adapterFP16 = 2 * q7.params.trainable
        add("M20", "A trained LoRA adapter is often ~100 MB; adapters are 1-5% of the model size", "C, B",
            String(format: "llama-2-7b r=16 all linear: %@ in fp16 (%@ fp32) = %.2f%% of the fp16 model", GB(adapterFP16), GB(2 * adapterFP16), 100 * Double(adapterFP16) / Double(fp16Size)),
            .off, "~100 MB holds; 1-5% is off (0.6% at r=16; 5% needs r≈128)")
        // M21
        let a0 = bytes(q7noGC, "activations"), a1 = bytes(q7, "activations")
        add("M21", "Gradient checkpointing cuts activation memory (~30% less memory) at ~30% more compute", "B, C",
            String(format: "llama-2-7b QLoRA, 2048 tokens: activations %@ → %@ (%.0f%% less); one extra forward ≈ +33%% compute", GB(a0), GB(a1), 100 * (1 - Double(a1) / Double(a0))),
            .off, "memory off: per-layer checkpointing keeps one layer's activations, not 70% of all; compute holds (+1 forward of 3)")
        // M22
        let mistral = ModelArchitecture.preset("mistral-7b")!
        let q4k = Double(mistral.totalParameters) * 4.5 / 8
        add("M22", "Mistral-7B Q4_K_M inference ~4.5 GB", "B",
            String(format: "%.2f GB of weights at Q4_K's 4.5 bits/weight (%@ params); Q4_K_M puts some tensors in 6-bit", q4k / gb, mistral.totalParameters.formatted()),
            .notCheckable, "not checkable exactly: GGUF K-quants are not implemented here; consistent with ~4.5 GB once the KV cache and buffers are added")
        return out
    }
}

extension PrecisionFigures {
    /// The committed slice of all-MiniLM-L6-v2 (Data/all-MiniLM-L6-v2/slice.safetensors), found
    /// under `$QLORA_DATA`, the current directory, or a parent of the executable's directory.
    public static func loadRealWeights() throws -> (label: String, values: [Float])? {
        let relative = "all-MiniLM-L6-v2/slice.safetensors"
        var candidates: [String] = []
        if let d = ProcessInfo.processInfo.environment["QLORA_DATA"] { candidates.append(d + "/" + relative) }
        candidates.append(FileManager.default.currentDirectoryPath + "/Data/" + relative)
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<6 {
            candidates.append(dir.appendingPathComponent("Data/" + relative).path)
            dir = dir.deletingLastPathComponent()
        }
        guard let path = candidates.first(where: { FileManager.default.fileExists(atPath: $0) }) else { return nil }
        let f = try SafeTensorsFile(path: path)
        var values: [Float] = []
        for t in f.tensors where t.dtype == .f32 {
            f.withBytes(of: t.name) { raw in values += (0..<(raw.count / 4)).map { raw.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self) } }
        }
        return ("\(values.count.formatted()) trained weights of all-MiniLM-L6-v2", values)
    }
}
