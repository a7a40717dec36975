import Foundation
import CMallocInfo
import QLoRA

/// The process's memory as the allocator and the kernel see it.
public enum MemoryProbe {
    /// Bytes in use from malloc (glibc `mallinfo2`: arena bytes in use + mmapped chunks).
    public static func allocatedBytes() -> Int { Int(qlora_malloc_in_use()) }

    /// Resident set size and its peak (`VmRSS`, `VmHWM` of /proc/self/status), bytes.
    public static func resident() -> (rss: Int, peak: Int) {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return (0, 0) }
        func field(_ name: String) -> Int {
            guard let line = s.split(separator: "\n").first(where: { $0.hasPrefix(name + ":") }) else { return 0 }
            return (Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "0") ?? 0) * 1024
        }
        return (field("VmRSS"), field("VmHWM"))
    }

    /// Returns malloc's free pages to the kernel, then resets the peak resident set (VmHWM) to
    /// the current RSS (Linux: /proc/self/clear_refs), so that a later peak counts what was
    /// allocated since.
    public static func resetPeak() {
        qlora_malloc_trim()
        if let h = FileHandle(forWritingAtPath: "/proc/self/clear_refs") {
            h.write(Data("5".utf8))
            try? h.close()
        }
    }

    /// `MemAvailable` of /proc/meminfo, bytes (nil when unknown).
    public static func availableBytes() -> Int? {
        guard let s = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("MemAvailable:") }),
              let kb = Int(line.split(separator: " ").dropFirst().first ?? "") else { return nil }
        return kb * 1024
    }
}

/// Builds the components of a `MemoryEstimate` for real in this process and records what the
/// allocator (and the resident set) grew by for each.
public struct MemoryMeasurement {
    /// How much of the model was built: the whole model, or one layer of each shape with the
    /// per-layer figures multiplied by the layer count.
    public var scope: String
    public var peakRSSBytes: Int
    /// The real decoder layer's step (LoRA methods).
    public var layerStep: LayerStep?

    /// Measures in place: fills `measuredBytes`, `measuredBy` and `measuredRSSBytes` of each
    /// component of `estimate` that can be built here. `progress` gets a line per step.
    public static func measure(_ estimate: inout MemoryEstimate, model a: ModelArchitecture, seed: UInt64 = 1,
                               progress: ((String) -> Void)? = nil) throws -> MemoryMeasurement {
        let o = estimate.options
        let buildable = estimate.components.filter { $0.name != "activations" && !$0.name.hasPrefix("(") }.reduce(0) { $0 + $1.estimatedBytes }
        let available = MemoryProbe.availableBytes() ?? 0
        let whole = buildable < available / 2
        let builtLayers = whole ? a.layers : 1
        let factor = whole ? 1 : a.layers
        let scope = whole ? "whole model (\(a.layers) layers)"
                          : "one layer of each shape, multiplied by \(a.layers) (the whole model needs \(buildable >> 20) MiB, over half of the \(available >> 20) MiB available)"

        // Synthetic N(0, 0.02²) weights, one buffer as large as the largest projection; every
        // weight is quantized from a prefix of it (the values do not change the bytes).
        let largest = a.projections.map { $0.outFeatures * $0.inFeatures }.max()!
        var rng = SplitMix64(seed: seed)
        let source = (0..<largest).map { _ in rng.normal() * 0.02 }

        var results: [String: (bytes: Int, rss: Int, how: String)] = [:]
        func probe<T>(_ body: () throws -> T) rethrows -> (T, allocated: Int, rss: Int) {
            let a0 = MemoryProbe.allocatedBytes(), r0 = MemoryProbe.resident().rss
            let value = try body()
            return (value, MemoryProbe.allocatedBytes() - a0, MemoryProbe.resident().rss - r0)
        }
        let scaled = whole ? "allocator (mallinfo2), whole model" : "allocator (mallinfo2), one layer × \(a.layers)"

        // Base weights (and constants): kept alive until the end so that every later component
        // is measured on top of them, as in training.
        var keep: [Any] = []
        var measuredStep: LayerStep? = nil
        if o.method == .qlora {
            progress?("quantizing \(builtLayers) layer(s) of projections to NF4")
            var (q, all, rssAll) = try probe { () -> [Quantized4Bit] in
                try (0..<builtLayers).flatMap { _ in
                    try a.moduleNames.map { p in
                        let s = a.projectionShape(p)
                        return try source.withUnsafeBufferPointer {
                            try quantize4Bit(.float32(UnsafeBufferPointer(rebasing: $0[0..<(s.out * s.in)])), shape: [s.out, s.in],
                                             blocksize: o.blocksize, doubleQuant: o.doubleQuant)
                        }
                    }
                }
            }
            // Split data from constants: keep only the packed arrays; what the allocator frees
            // when the rest of each weight goes is the constants.
            let packed = q.map(\.packed)
            let before = MemoryProbe.allocatedBytes()
            q = []
            let constants = before - MemoryProbe.allocatedBytes()
            keep.append(packed)
            results["base_weights"] = ((all - constants) * factor, rssAll * factor, scaled)
            results["quant_constants"] = (constants * factor, 0, scaled + "; the bytes freed when the constants were dropped")
        } else {
            progress?("allocating \(builtLayers) layer(s) of bf16 projection weights")
            let (w, bytes, rss) = probe { () -> [[UInt16]] in
                (0..<builtLayers).flatMap { _ in a.moduleNames.map { p in
                    let s = a.projectionShape(p)
                    return [UInt16](repeating: 1, count: s.out * s.in)
                } }
            }
            keep.append(w)
            results[o.method == .lora ? "base_weights" : "(projections)"] = (bytes * factor, rss * factor, scaled)
        }

        // Everything that is not a projection, whole (embeddings and lm_head are single tensors).
        progress?("allocating embeddings, norms, lm_head and biases in bf16")
        let others = a.tensorGroups.filter { $0.kind != .projection }
        let (dense, denseBytes, denseRSS) = probe { others.map { [UInt16](repeating: 1, count: $0.elements) } }
        keep.append(dense)
        switch o.method {
        case .qlora, .lora: results["unquantized_weights"] = (denseBytes, denseRSS, "allocator (mallinfo2), whole")
        case .full, .full8BitAdam:
            let proj = results.removeValue(forKey: "(projections)")!
            results["base_weights"] = (proj.bytes + denseBytes, proj.rss + denseRSS, scaled + " (projections); whole (the rest)")
        }

        if o.isLoRA {
            // LoRA A [r, in] and B [out, r] for each target, fp32; then gradients; then AdamW states.
            let shapes = (0..<builtLayers).flatMap { _ in a.adaptedModules(o.targets).map { a.projectionShape($0) } }
            progress?("allocating LoRA parameters, gradients and AdamW states")
            let (params, pBytes, pRSS) = probe { shapes.flatMap { [[Float](repeating: 0.01, count: o.rank * $0.in), [Float](repeating: 0.01, count: $0.out * o.rank)] } }
            let (grads, gBytes, gRSS) = probe { params.map { [Float](repeating: 0, count: $0.count) } }
            let (states, sBytes, sRSS) = probe { params.map { AdamWState(count: $0.count) }.map { s -> AdamWState in var s = s; s.expAvg[0] = 0; s.expAvgSq[0] = 0; return s } }
            keep += [params, grads, states]
            results["lora_params"] = (pBytes * factor, pRSS * factor, scaled)
            results["lora_grads"] = (gBytes * factor, gRSS * factor, scaled)
            results["optimizer_states"] = (sBytes * factor, sRSS * factor, scaled + " (AdamWState)")
        } else {
            // Full fine-tunes: one layer's worth (a 7B full fine-tune does not fit in RAM here).
            let groups = a.tensorGroups.filter { $0.kind == .projection || $0.kind == .norm || $0.kind == .bias }
            let perLayer = groups.filter { $0.count == a.layers }.map { $0.shape.reduce(1, *) }
            let single = a.tensorGroups.filter { $0.count == 1 }.map { $0.shape.reduce(1, *) }
            progress?("allocating one layer's gradients and optimizer states (full fine-tune)")
            let (g, gBytes, gRSS) = probe { perLayer.map { [UInt16](repeating: 0, count: $0) } }
            // The optimizer whose states these are: fp32 AdamW for a full fine-tune, 8-bit otherwise.
            let optimizer: Optimizer = o.method == .full ? .adamw : .adamw8bit
            let (s, sBytes, sRSS) = probe { () -> [[UInt8]] in perLayer.map { [UInt8](repeating: 0, count: optimizer.stateBytes($0)) } }
            keep += [g, s]
            let singleElements = single.reduce(0, +)
            let gradBytes = gBytes * a.layers + 2 * singleElements
            results["gradients"] = (gradBytes, gRSS * a.layers, "allocator (mallinfo2), one layer × \(a.layers); + 2 B × \(singleElements) for embeddings/lm_head/final norm, counted")
            let stateSingle = single.reduce(0) { $0 + optimizer.stateBytes($1) }
            results["optimizer_states"] = (sBytes * a.layers + stateSingle, sRSS * a.layers, "allocator (mallinfo2), one layer × \(a.layers); embeddings/lm_head counted")
            if o.method == .full {
                let (m, mBytes, mRSS) = probe { perLayer.map { [Float](repeating: 0, count: $0) } }
                keep.append(m)
                results["master_weights"] = (mBytes * a.layers + 4 * singleElements, mRSS * a.layers, "allocator (mallinfo2), one layer × \(a.layers); embeddings/lm_head counted")
            }
        }

        // One real decoder layer of this architecture (4-bit projections with adapters): a
        // forward at the requested tokens, measuring what it keeps for backward, then backward.
        if o.isLoRA {
            progress?("decoder layer forward + backward at \(o.tokens) tokens")
            let step = try Self.layerStep(a, o, source: source, seed: seed)
            results["(activations: qlora's decoder layer, one layer)"] = (step.keptAllocated, step.keptRSS,
                "allocator growth over a real forward of one decoder layer, less the matmuls' scratch growth (LlamaModel.layerStep; exact count \(step.keptExact) B)")
            results["(activations with checkpointing: qlora's decoder layer, one layer)"] = (step.checkpointedAllocated, 0,
                "allocator growth over a real forward with checkpointing (exact count \(step.checkpointedExact) B)")
            results["(qlora layer step peak, one layer)"] = (step.stepPeakRSS, step.stepPeakRSS,
                String(format: "peak RSS growth over a real forward + backward of one decoder layer (free heap returned first; %.0f tokens/s)", step.tokensPerSecond))
            measuredStep = step
        }

        for i in estimate.components.indices {
            let name = estimate.components[i].name
            if let r = results[name] {
                estimate.components[i].measuredBytes = r.bytes
                estimate.components[i].measuredRSSBytes = r.rss
                estimate.components[i].measuredBy = r.how
            } else if name == "activations" {
                estimate.components[i].measuredBy = "not measured: this is what transformers + PEFT keep (needs torch); qlora's own layer is measured in the rows below"
            }
        }
        withExtendedLifetime(keep) {}
        return MemoryMeasurement(scope: scope, peakRSSBytes: MemoryProbe.resident().peak, layerStep: measuredStep)
    }

    /// One decoder layer's training step, measured.
    public struct LayerStep: Sendable {
        /// Bytes the forward kept for backward: exact count, allocator growth, RSS growth.
        public var keptExact: Int, keptAllocated: Int, keptRSS: Int
        /// Peak resident-set growth over the whole step (forward + backward), from a reset VmHWM.
        public var stepPeakRSS: Int
        /// With per-layer checkpointing, what the forward keeps: exact count and allocator growth.
        public var checkpointedExact: Int, checkpointedAllocated: Int
        /// Tokens per second of forward + backward (adapter gradients included).
        public var tokensPerSecond: Double
        public var seconds: Double
    }

    /// Builds one decoder layer of `a` (NF4 projections from `source`, adapters of `o.rank`) and
    /// runs a forward + backward at `o.tokens` tokens (batch × seq), measuring memory and time.
    public static func layerStep(_ a: ModelArchitecture, _ o: MemoryOptions, source: [Float], seed: UInt64 = 1) throws -> LayerStep {
        let layer = try LlamaLayer.quantized(a, source: source, blocksize: o.blocksize, doubleQuant: o.doubleQuant,
                                             lora: LoRAConfig(rank: o.rank, alpha: o.alpha, dropout: o.loraDropout), seed: seed)
        let shared = layer.projections[0].scratch  // one for all, as LlamaModel shares one between its projections
        var cfg = a
        cfg.layers = 1
        cfg.rmsNormEps = 1e-5
        var rng = SplitMix64(seed: seed &+ 7)
        let x = (0..<(o.tokens * a.hiddenSize)).map { _ in HalfPrecision.roundedToBFloat16(rng.normal()) }
        let dout = (0..<(o.tokens * a.hiddenSize)).map { _ in HalfPrecision.roundedToBFloat16(rng.normal() * 1e-3) }
        // A short step first: each projection allocates its dequantization panel scratch
        // (Matmul4BitScratch) once; that is working memory of the weights, not activations.
        let warm = 16 * a.hiddenSize
        _ = try LlamaModel.layerStep(layer, config: cfg, x: Array(x[0..<warm]), dout: Array(dout[0..<warm]), batch: 1, seq: 16)
        MemoryProbe.resetPeak()
        let a0 = MemoryProbe.allocatedBytes(), r0 = MemoryProbe.resident().rss
        var kept = (exact: 0, allocated: 0, rss: 0)
        let scratch0 = shared.byteCount
        let start = Date()
        _ = try LlamaModel.layerStep(layer, config: cfg, x: x, dout: dout, batch: o.batch, seq: o.seqLen) { bytes in
            // The matmuls' scratch grows with the tokens; it is reused, not kept for backward.
            let scratch = shared.byteCount - scratch0
            kept = (bytes, MemoryProbe.allocatedBytes() - a0 - scratch, MemoryProbe.resident().rss - r0 - scratch)
        }
        let seconds = Date().timeIntervalSince(start)
        let peak = MemoryProbe.resident().peak - r0
        // The same forward with checkpointing: only the layer's input stays.
        MemoryProbe.resetPeak()
        var c0 = 0
        var checkpointed = (exact: 0, allocated: 0)
        try LlamaModel.layerForwardKeeping(layer, config: cfg, x: x, batch: o.batch, seq: o.seqLen, checkpointing: true,
                                           beforeForward: { c0 = MemoryProbe.allocatedBytes() }) { bytes in
            checkpointed = (bytes, MemoryProbe.allocatedBytes() - c0)
        }
        return LayerStep(keptExact: kept.exact, keptAllocated: kept.allocated, keptRSS: kept.rss, stepPeakRSS: peak,
                         checkpointedExact: checkpointed.exact, checkpointedAllocated: checkpointed.allocated,
                         tokensPerSecond: Double(o.tokens) / seconds, seconds: seconds)
    }
}
