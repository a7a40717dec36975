import COpenBLAS
import Dispatch
import Foundation
import QLoRA

/// `qlora bench`: how fast the 4-bit kernels run on this machine next to its own limits
/// (memcpy, OpenBLAS sgemm and sgemv on the dense weight), measured in the same run, with the
/// same OpenBLAS core and thread count. Timings are medians after a warm-up. GEMV and
/// dequantize are timed cold: they cycle through distinct copies of the weights whose total
/// exceeds twice the last-level cache, as a forward pass through many layers does.
public struct KernelBenchReport: Codable, Sendable {
    public struct Dequant: Codable, Sendable {
        public var out: Int, `in`: Int
        public var dtype: String
        public var seconds: Double
        public var paramsPerS: Double
        public var memcpySeconds: Double
        /// Bytes written per second by dequantize / by memcpy of the same output bytes.
        public var ratioToMemcpy: Double
    }
    public struct Gemm: Codable, Sendable {
        public var m: Int, n: Int, k: Int
        public var path: String
        public var seconds: Double
        public var sgemmSeconds: Double
        /// 4-bit time / sgemm time (lower is better; 1.0 = as fast as the dense fp32 GEMM).
        public var ratio: Double
        public var gflops: Double
    }
    public struct Gemv: Codable, Sendable {
        public var n: Int, k: Int
        public var seconds: Double
        public var sgemvSeconds: Double
        /// sgemv time / 4-bit time (higher is better).
        public var speedup: Double
        public var paramsPerS: Double
    }
    /// One LoRA training step (forward, backward, AdamW on A and B) against the frozen base's
    /// forward + backward alone (issue target: ratio <= 1.3).
    public struct LoRAStep: Codable, Sendable {
        public var tokens: Int, out: Int, `in`: Int, rank: Int
        public var seconds: Double
        public var baseSeconds: Double
        public var ratio: Double
    }
    /// One QLoRA training step of one decoder layer (forward, backward, AdamW on its adapters)
    /// against the step's compute-bound limits: its FLOPs at the fastest dense sgemm rate and at the
    /// fastest 4-bit bf16 GEMM rate measured in the same run.
    public struct TrainStep: Codable, Sendable {
        public var model: String
        public var tokens: Int, rank: Int
        public var seconds: Double
        public var tokensPerS: Double
        /// The projections' forward and backward to the input (2·params·tokens each), LoRA's
        /// matmuls and causal attention's (forward 2, backward 5 products of d·s(s+1)/2 per head).
        public var flops: Double
        public var sgemmBoundTokensPerS: Double?
        public var bf16BoundTokensPerS: Double?
    }
    public var openblasCore: String
    public var threads: Int
    public var kernelLevel: String
    public var lastLevelCacheBytes: Int
    public var dequant: [Dequant] = []
    public var gemm: [Gemm] = []
    public var gemv: [Gemv] = []
    public var loraStep: [LoRAStep] = []
    public var trainStep: [TrainStep] = []
    /// Weights cycled through copies exceeding twice the last-level cache (cold), or one copy (warm).
    public var cold = true

    /// The fastest rates of the run's GEMM rows, FLOP/s: OpenBLAS sgemm and the 4-bit bf16 GEMM.
    public var fastestSgemmFlops: Double? { gemm.map { 2 * Double($0.m * $0.n * $0.k) / $0.sgemmSeconds }.max() }
    public var fastestBF16Flops: Double? { gemm.filter { $0.path == "bf16-gemm" }.map { $0.gflops * 1e9 }.max() }
}

public struct KernelBenchOptions: Sendable {
    /// Weight shapes as (out, in), nn.Linear layout.
    public var shapes: [(out: Int, in: Int)] = [(4096, 4096), (11008, 4096), (4096, 11008)]
    public var tokens: [Int] = [1, 8, 64, 512]
    public var threads = ProcessInfo.processInfo.activeProcessorCount
    public var repeats = 7
    /// LoRA step shapes: (tokens, out, in, rank).
    public var loraSteps: [(tokens: Int, out: Int, in: Int, rank: Int)] = [(512, 4096, 4096, 16)]
    /// The decoder layer of the training-step row, and its tokens (none: no row).
    public var stepModel = ModelArchitecture.preset("llama-2-7b")!
    public var stepTokens: [Int] = [512, 2048]
    /// Decoder layers of the whole-model row (the preset's real vocabulary and head), 0: no row.
    public var stepLayers = 2
    public var stepRepeats = 3
    /// Cycle the weights through copies exceeding twice the last-level cache (a forward through
    /// many layers), or reuse one copy (warm: what fits in cache stays there).
    public var cold = true
    public init() {}

    /// A seconds-long run: one shape, fewer tokens and repeats.
    public static var quick: KernelBenchOptions {
        var o = KernelBenchOptions()
        o.shapes = [(4096, 4096)]
        o.tokens = [1, 64, 512]
        o.repeats = 3
        o.loraSteps = [(64, 4096, 4096, 16)]
        o.stepTokens = [128]
        o.stepRepeats = 1
        o.stepLayers = 1
        return o
    }
}

public enum KernelBench {
    /// The last-level cache size: Linux's sysfs for cpu0 (one CPU's share, e.g. "32768K"),
    /// else 32 MiB. glibc's sysconf is not used: in VMs it reports the host's total (384 MiB here).
    public static var lastLevelCacheBytes: Int {
        for index in [3, 2] {
            if let text = try? String(contentsOfFile: "/sys/devices/system/cpu/cpu0/cache/index\(index)/size", encoding: .utf8) {
                let t = text.trimmingCharacters(in: .whitespacesAndNewlines)
                let scale = t.hasSuffix("K") ? 1 << 10 : t.hasSuffix("M") ? 1 << 20 : 1
                if let v = Int(t.trimmingCharacters(in: CharacterSet.decimalDigits.inverted)), v > 0 { return v * scale }
            }
        }
        return 32 << 20
    }

    /// Median seconds of `repeats` runs of `body(i)` after one warm-up.
    static func median(_ repeats: Int, _ body: (Int) throws -> Void) rethrows -> Double {
        try body(0)
        var times: [Double] = []
        for i in 0..<max(1, repeats) {
            let t0 = DispatchTime.now().uptimeNanoseconds
            try body(i + 1)
            times.append(Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-9)
        }
        times.sort()
        return times[times.count / 2]
    }

    /// Runs the benchmark; `progress` gets a short label before each measurement.
    public static func run(_ o: KernelBenchOptions, progress: (String) -> Void = { _ in }) throws -> KernelBenchReport {
        BLAS.setThreads(o.threads)
        LlamaOps.setThreadCount(o.threads)  // the training-step rows' layer ops and LoRA kernels too
        let llc = lastLevelCacheBytes
        var report = KernelBenchReport(openblasCore: BLAS.coreName, threads: BLAS.threads,
                                       kernelLevel: KernelLevel.active.description, lastLevelCacheBytes: llc)
        report.cold = o.cold
        for shape in o.shapes {
            let (n, k) = (shape.out, shape.in)
            progress("preparing \(n)x\(k)")
            var rng = SplitMix64(seed: UInt64(n * 31 + k))
            let dense = (0..<(n * k)).map { _ in rng.normal() * 0.02 }
            let q = try dense.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [n, k]) }
            // Enough distinct copies that each side's weights exceed twice the LLC.
            let qCopies = o.cold ? max(1, (2 * llc + q.packed.count - 1) / q.packed.count) : 1
            let weights = try (0..<qCopies).map { _ in try Linear4BitWeight(q) }  // separate buffers
            let wbf = weights[0]
            var denseW = [Float](repeating: 0, count: n * k)  // bf16-valued fp32: sgemm's operand
            denseW.withUnsafeMutableBufferPointer { wbf.dequantizeRowsBF16(0..<n, into: $0.baseAddress!) }
            let fCopies = o.cold ? max(1, (2 * llc + n * k * 4 - 1) / (n * k * 4)) : 1
            let denseCopies = [denseW] + (1..<fCopies).map { _ in denseW.map { $0 } }

            // Dequantize, fp32 and bf16 out, against memcpy of the same output bytes.
            if shape == o.shapes.last! {
                let count = n * k
                let src = UnsafeMutableRawBufferPointer.allocate(byteCount: count * 4, alignment: 64)
                let dst = UnsafeMutableRawBufferPointer.allocate(byteCount: count * 4, alignment: 64)
                defer { src.deallocate(); dst.deallocate() }
                src.initializeMemory(as: UInt8.self, repeating: 1)
                dst.initializeMemory(as: UInt8.self, repeating: 0)
                for type in [ElementType.float32, .bfloat16] {
                    progress("dequantize \(n)x\(k) -> \(type.rawValue)")
                    let bytes = count * type.byteSize
                    let out = FloatOutput.view(UnsafeMutableRawBufferPointer(rebasing: dst[0..<bytes]), as: type)
                    let t = median(o.repeats) { i in
                        let w = weights[i % weights.count]
                        w.packed.withUnsafeBufferPointer { p in
                            w.absmax.withUnsafeBufferPointer { a in dequantize4Bit(p, absmax: a, quantType: .nf4, blocksize: w.blocksize, into: out) }
                        }
                    }
                    let tm = median(o.repeats) { _ in memcpy(dst.baseAddress!, src.baseAddress!, bytes) }
                    report.dequant.append(.init(out: n, in: k, dtype: type.rawValue, seconds: t, paramsPerS: Double(count) / t,
                                                memcpySeconds: tm, ratioToMemcpy: tm / t))
                }
            }

            for m in o.tokens {
                var x = [Float](repeating: 0, count: m * k)
                for i in x.indices { x[i] = HalfPrecision.roundedToBFloat16(rng.normal()) }
                var y = [Float](repeating: 0, count: m * n)
                let scratch = Matmul4BitScratch()
                if m == 1 {
                    progress("gemv \(n)x\(k)")
                    let t = median(o.repeats) { i in
                        x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer {
                            Matmul4Bit.forward(x: xp, tokens: 1, weight: weights[i % weights.count], y: $0, threads: o.threads, scratch: scratch) } }
                    }
                    let ts = median(o.repeats) { i in
                        denseCopies[i % denseCopies.count].withUnsafeBufferPointer { w in
                            cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(n), Int32(k), 1, w.baseAddress, Int32(k), x, 1, 0, &y, 1)
                        }
                    }
                    report.gemv.append(.init(n: n, k: k, seconds: t, sgemvSeconds: ts, speedup: ts / t, paramsPerS: Double(n * k) / t))
                } else {
                    progress("gemm \(m)x\(n)x\(k)")
                    let pathName: String
                    switch Matmul4Bit.resolvedPath(tokens: m, weight: weights[0]) {
                    case .fused: pathName = "fused"
                    case .bf16GEMM: pathName = "bf16-gemm"
                    default: pathName = "panel-gemm"
                    }
                    let t = median(o.repeats) { i in
                        x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer {
                            Matmul4Bit.forward(x: xp, tokens: m, weight: weights[i % weights.count], y: $0, threads: o.threads, scratch: scratch) } }
                    }
                    let ts = median(o.repeats) { i in
                        denseCopies[i % denseCopies.count].withUnsafeBufferPointer { w in
                            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1, x, Int32(k),
                                        w.baseAddress, Int32(k), 0, &y, Int32(n))
                        }
                    }
                    report.gemm.append(.init(m: m, n: n, k: k, path: pathName, seconds: t, sgemmSeconds: ts,
                                             ratio: t / ts, gflops: 2 * Double(m * n * k) / t * 1e-9))
                }
            }
        }
        for step in o.loraSteps {
            progress("LoRA step \(step.tokens)x\(step.out)x\(step.in) r=\(step.rank)")
            report.loraStep.append(try loraStep(step, repeats: o.repeats, threads: o.threads))
        }
        for t in o.stepTokens {
            progress("training step of one \(o.stepModel.name) layer at \(t) tokens")
            var row = try trainStep(o.stepModel, tokens: t, rank: 16, repeats: o.stepRepeats)
            row.sgemmBoundTokensPerS = report.fastestSgemmFlops.map { Double(t) * $0 / row.flops }
            row.bf16BoundTokensPerS = report.fastestBF16Flops.map { Double(t) * $0 / row.flops }
            report.trainStep.append(row)
        }
        for t in o.stepTokens where o.stepLayers > 0 {
            progress("training step of \(o.stepModel.name) with \(o.stepLayers) layers and its \(o.stepModel.vocabSize)-token vocabulary at \(t) tokens")
            var row = try modelStep(o.stepModel, layers: o.stepLayers, tokens: t, rank: 16, repeats: o.stepRepeats)
            row.sgemmBoundTokensPerS = report.fastestSgemmFlops.map { Double(t) * $0 / row.flops }
            row.bf16BoundTokensPerS = report.fastestBF16Flops.map { Double(t) * $0 / row.flops }
            report.trainStep.append(row)
        }
        return report
    }

    /// FLOPs of one decoder layer's QLoRA step at `tokens` tokens (one sequence): see `TrainStep.flops`.
    public static func trainStepFlops(_ a: ModelArchitecture, tokens t: Int, rank r: Int) -> Double {
        let projections = a.moduleNames.map { a.projectionShape($0) }
        let base = projections.reduce(0.0) { $0 + Double($1.out * $1.in) }
        // LoRA: x·Aᵀ and (x·Aᵀ)·Bᵀ forward; backward dB, d(xAᵀ), dA and dx: six rank-r products.
        let lora = projections.reduce(0.0) { $0 + Double(r * ($1.out + $1.in)) }
        let causal = Double(t) * Double(t + 1) / 2
        let attention = 7 * 2 * Double(a.headDim) * causal * Double(a.attentionHeads)
        return 4 * Double(t) * base + 6 * Double(t) * lora + attention
    }

    /// FLOPs of a whole model's step: its layers' (`trainStepFlops`) less what the first layer
    /// skips (the input gradient of q, k and v, base and LoRA: the embedding is frozen, see
    /// `LlamaModel.layerBackward`), and the head's logits and their input gradient (2 · tokens ·
    /// vocab · hidden each).
    public static func modelStepFlops(_ a: ModelArchitecture, layers: Int, tokens t: Int, rank r: Int) -> Double {
        let qkv = a.moduleNames.prefix(a.fusedProjections ? 1 : 3).map { a.projectionShape($0) }
        let skipped = qkv.reduce(0.0) { $0 + 2 * Double(t) * Double($1.out * $1.in + r * $1.in) }
        return Double(layers) * trainStepFlops(a, tokens: t, rank: r) - skipped + 4 * Double(t) * Double(a.vocabSize) * Double(a.hiddenSize)
    }

    /// `layers` decoder layers of `a` with its real vocabulary (bf16 embedding and lm_head, tied
    /// where `a` ties them), one sequence of `tokens` random ids: `LlamaTrainer.step` as `qlora
    /// train` runs it (the chunked loss), median seconds of `repeats` after a warm-up step.
    static func modelStep(_ a: ModelArchitecture, layers n: Int, tokens: Int, rank: Int, repeats: Int) throws -> KernelBenchReport.TrainStep {
        var rng = SplitMix64(seed: 29)
        let largest = a.moduleNames.map { a.projectionShape($0) }.map { $0.out * $0.in }.max() ?? 0
        let source = (0..<largest).map { _ in rng.normal() * 0.02 }
        var cfg = a
        cfg.layers = n
        let layers = try (0..<n).map { l in try LlamaLayer.quantized(a, source: source, lora: LoRAConfig(rank: rank, alpha: Double(2 * rank)), seed: UInt64(l + 1)) }
        let table = (0..<(a.vocabSize * a.hiddenSize)).map { _ in HalfPrecision.roundedToBFloat16(rng.normal() * 0.02) }
        let head = a.tiedEmbeddings ? nil : (0..<(a.vocabSize * a.hiddenSize)).map { _ in HalfPrecision.roundedToBFloat16(rng.normal() * 0.02) }
        let model = LlamaModel(config: cfg, embedTokens: table, layers: layers, finalNorm: [Float](repeating: 1, count: a.hiddenSize), lmHead: head)
        let trainer = LlamaTrainer(model: model, optimizer: AdamWConfig())
        let ids = (0..<tokens).map { _ in Int(rng.next() % UInt64(a.vocabSize)) }
        let batch = [[TrainingExample(inputIds: ids, labels: ids)]]
        let seconds = try median(repeats) { _ in _ = try trainer.step(batch, seq: tokens) }
        return .init(model: "\(a.name) \(n) layer\(n == 1 ? "" : "s")+head", tokens: tokens, rank: rank, seconds: seconds, tokensPerS: Double(tokens) / seconds,
                     flops: modelStepFlops(a, layers: n, tokens: tokens, rank: rank))
    }

    /// One decoder layer of `a` (NF4 + double quant, r on every projection): forward, backward and
    /// AdamW on the adapters, median seconds of `repeats` after a warm-up at the same length.
    static func trainStep(_ a: ModelArchitecture, tokens: Int, rank: Int, repeats: Int) throws -> KernelBenchReport.TrainStep {
        var rng = SplitMix64(seed: 23)
        let largest = a.moduleNames.map { a.projectionShape($0) }.map { $0.out * $0.in }.max() ?? 0
        let source = (0..<largest).map { _ in rng.normal() * 0.02 }
        let layer = try LlamaLayer.quantized(a, source: source, lora: LoRAConfig(rank: rank, alpha: Double(2 * rank)), seed: 1)
        for p in layer.projections { for i in p.loraB.indices { p.loraB[i] = rng.normal() * 0.01 } }
        var cfg = a
        cfg.layers = 1
        let x = (0..<(tokens * a.hiddenSize)).map { _ in HalfPrecision.roundedToBFloat16(rng.normal()) }
        let dout = (0..<(tokens * a.hiddenSize)).map { _ in HalfPrecision.roundedToBFloat16(rng.normal() * 1e-3) }
        var states = layer.projections.map { (AdamWState(count: $0.loraA.count), AdamWState(count: $0.loraB.count)) }
        let seconds = try median(repeats) { _ in
            for p in layer.projections { p.zeroGrad() }
            _ = try LlamaModel.layerStep(layer, config: cfg, x: x, dout: dout, batch: 1, seq: tokens)
            for (i, p) in layer.projections.enumerated() {
                AdamW.step(param: &p.loraA, grad: p.gradA, state: &states[i].0, config: AdamWConfig())
                AdamW.step(param: &p.loraB, grad: p.gradB, state: &states[i].1, config: AdamWConfig())
            }
        }
        return .init(model: "\(a.name) layer", tokens: tokens, rank: rank, seconds: seconds, tokensPerS: Double(tokens) / seconds,
                     flops: trainStepFlops(a, tokens: tokens, rank: rank))
    }

    static func loraStep(_ s: (tokens: Int, out: Int, in: Int, rank: Int), repeats: Int, threads: Int) throws -> KernelBenchReport.LoRAStep {
        var rng = SplitMix64(seed: 17)
        let w = (0..<(s.out * s.in)).map { _ in rng.normal() * 0.02 }
        let base = try Linear4BitWeight(w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [s.out, s.in]) })
        let layer = try LoRALinear(base: base, config: LoRAConfig(rank: s.rank, alpha: Double(2 * s.rank)), seed: 1)
        for i in layer.loraB.indices { layer.loraB[i] = rng.normal() * 0.01 }
        let x = (0..<(s.tokens * s.in)).map { _ in rng.normal() }, dy = (0..<(s.tokens * s.out)).map { _ in rng.normal() }
        var y = [Float](repeating: 0, count: s.tokens * s.out), dx = [Float](repeating: 0, count: s.tokens * s.in)
        let scratch = Matmul4BitScratch()
        let baseTime = median(repeats) { _ in
            x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer {
                Matmul4Bit.forward(x: xp, tokens: s.tokens, weight: base, y: $0, threads: threads, scratch: scratch, roundOutputToBF16: true) } }
            dy.withUnsafeBufferPointer { d in dx.withUnsafeMutableBufferPointer {
                Matmul4Bit.backwardInput(dy: d, tokens: s.tokens, weight: base, dx: $0, threads: threads, scratch: scratch, roundOutputToBF16: true) } }
        }
        var stateA = AdamWState(count: layer.loraA.count), stateB = AdamWState(count: layer.loraB.count)
        let stepTime = try median(repeats) { _ in
            layer.zeroGrad()
            let (_, saved) = try layer.forward(x, tokens: s.tokens)
            _ = try layer.backward(dy, saved: saved)
            AdamW.step(param: &layer.loraA, grad: layer.gradA, state: &stateA, config: AdamWConfig())
            AdamW.step(param: &layer.loraB, grad: layer.gradB, state: &stateB, config: AdamWConfig())
        }
        return .init(tokens: s.tokens, out: s.out, in: s.in, rank: s.rank, seconds: stepTime, baseSeconds: baseTime, ratio: stepTime / baseTime)
    }
}
