import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors

/// What merging one weight produced.
struct MergedWeight {
    /// Output payloads in declaration order (one dense tensor, or the bnb-4bit group).
    var payloads: [[UInt8]]
    var report: MergeReportRow?
    var comparison: MergeComparisonRow?
    /// With `keepingBase`: the base as the merge read it (dequantized for 4-bit) and ΔW, in fp32.
    var base: [Float]?
    var delta: [Float]?
}

/// The per-tensor arithmetic of a merge.
final class MergeContext {
    let reader: CheckpointReader
    let original: CheckpointReader?
    let options: MergeOptions
    /// ΔW of the tensor at hand, and the fp32 sum a re-quantization starts from, reused across
    /// tensors: a fresh buffer over 32 MiB costs a page fault per 4 KiB, as glibc maps it anew.
    private var deltaStorage = UnsafeMutableBufferPointer<Float>(start: nil, count: 0)
    private var sumStorage = UnsafeMutableBufferPointer<Float>(start: nil, count: 0)

    init(reader: CheckpointReader, original: CheckpointReader?, options: MergeOptions) {
        self.reader = reader
        self.original = original
        self.options = options
    }

    deinit {
        deltaStorage.deallocate()
        sumStorage.deallocate()
    }

    private func deltaBuffer(_ n: Int) -> UnsafeMutableBufferPointer<Float> { Self.grow(&deltaStorage, n) }


    private static func grow(_ storage: inout UnsafeMutableBufferPointer<Float>, _ n: Int) -> UnsafeMutableBufferPointer<Float> {
        if storage.count < n {
            storage.deallocate()
            storage = .allocate(capacity: n)
        }
        return UnsafeMutableBufferPointer(rebasing: storage[0..<n])
    }

    enum Target {
        case dense(ElementType)
        case requantize(QuantType, blocksize: Int, doubleQuant: Bool)

        var isDense: Bool { if case .dense = self { return true } else { return false } }
    }

    /// The result of applying every step to a starting weight.
    struct Applied {
        /// The final weight: dense bytes of `type`, or the re-quantized weight.
        var bytes: [UInt8]
        var type: ElementType
        var quantized: Quantized4Bit?
        /// The final weight as stored elements: dense bytes, or the re-quantized weight dequantized to fp32.
        func written() -> (bytes: [UInt8], type: ElementType) {
            quantized.map { ($0.dequantizedBytes(as: .float32), .float32) } ?? (bytes, type)
        }
    }

    /// Merges one weight. `keepingBase` also hands back the base it read and ΔW (the serving
    /// report's inputs), so that no caller reads or dequantizes the base a second time.
    func merge(_ e: CheckpointReader.Entry, _ plan: WeightPlan, file: String, sizingOnly: Bool, keepingBase: Bool = false) throws -> MergedWeight {
        let n = plan.out * plan.in
        let wantsDelta = !sizingOnly && (options.report || original != nil || keepingBase)
        let delta = UnsafeBufferPointer(wantsDelta ? deltaBuffer(n) : UnsafeMutableBufferPointer(start: nil, count: 0))
        if let q = plan.quantized {
            let base4 = try BnB4BitFormat.load(plan.group!, from: reader)
            for m in plan.group!.members { reader.releasePages(of: m) }
            let base16 = base4.dequantizedBytes()  // the recorded dtype, as bitsandbytes dequantizes
            let baseType = base4.state.dtype
            let requantize = Target.requantize(q.type, blocksize: q.blocksize, doubleQuant: q.doubleQuant)
            let target = options.requantize ? requantize : .dense(options.dtype)
            let applied = try base16.withUnsafeBytes { b in
                try apply(plan, base: b, baseType: baseType, target: target, delta: wantsDelta ? UnsafeMutableBufferPointer(mutating: delta) : nil, file: file, tensor: e.name)
            }
            let payloads = applied.quantized.map(BnB4BitFormat.payloads) ?? [applied.bytes]
            guard wantsDelta else { return MergedWeight(payloads: payloads) }
            let w = (bytes: base16, type: baseType)
            let written = applied.written()
            var result = MergedWeight(payloads: payloads)
            if keepingBase { (result.base, result.delta) = (base16.withUnsafeBytes { loadFloats($0, as: baseType) }, Array(delta)) }
            if options.report { result.report = MergeReportRow(name: e.name, sums: sums(w, delta, written)) }
            if let original {
                let other = try base16.withUnsafeBytes {
                    try apply(plan, base: $0, baseType: baseType, target: options.requantize ? .dense(options.dtype) : requantize, delta: nil, file: file, tensor: e.name)
                }.written()
                let (deq16, req4) = options.requantize ? (other, written) : (written, other)
                let oType = ElementType(original.info(named: e.name)!.dtype)!
                let (o16, w16) = try original.withBytes(of: e.name) { raw in
                    (try apply(plan, base: raw, baseType: oType, target: .dense(oType), delta: nil, file: original.path, tensor: e.name).written(),
                     (bytes: Array(raw), type: oType))
                }
                original.releasePages(of: e.name)
                let zeros = [Float](repeating: 0, count: n)
                result.comparison = MergeComparisonRow(name: e.name, sums: [
                    sums(w, delta, o16)[0], sums(w, delta, deq16)[0], sums(w, delta, req4)[0], zeros.withUnsafeBufferPointer { sums(w, $0, w16)[0] }, sums(w, delta, deq16)[1],
                ])
            }
            return result
        }
        guard let type = ElementType(e.info.dtype) else {
            throw CheckpointError.invalidTensor(file: file, tensor: e.name, problem: "adapter targets a non-float weight (\(e.info.dtype.rawValue))")
        }
        return try reader.withBytes(of: e.name) { raw in
            let applied = try apply(plan, base: raw, baseType: type, target: .dense(type),
                                    delta: wantsDelta ? UnsafeMutableBufferPointer(mutating: delta) : nil, file: file, tensor: e.name)
            var result = MergedWeight(payloads: [applied.bytes])
            if keepingBase { (result.base, result.delta) = (loadFloats(raw, as: type), Array(delta)) }
            if options.report {
                result.report = MergeReportRow(name: e.name, sums: applied.bytes.withUnsafeBytes { out in
                    LoRAMerge.reportSums(base: raw, baseType: type, delta: delta, written: out, writtenType: type)
                })
            }
            return result
        }
    }

    /// Applies the plan's steps in order to `base`; `delta` (if given) receives ΔW, their sum.
    func apply(_ plan: WeightPlan, base: UnsafeRawBufferPointer, baseType: ElementType, target: Target,
               delta: UnsafeMutableBufferPointer<Float>?, file: String, tensor: String) throws -> Applied {
        let n = plan.out * plan.in
        var current: Applied? = nil
        var stepDelta = delta != nil && plan.steps.count > 1 ? [Float](repeating: 0, count: n) : []
        for (i, step) in plan.steps.enumerated() {
            let outType: ElementType
            switch target {
            case .dense(let t): outType = t
            case .requantize: outType = .float32
            }
            // A dense result is the payload; a sum to re-quantize is scratch.
            var out = target.isDense ? [UInt8](unsafeUninitializedCapacity: n * outType.byteSize) { _, count in count = n * outType.byteSize } : []
            let sum = target.isDense ? UnsafeMutableRawBufferPointer(start: nil, count: 0) : UnsafeMutableRawBufferPointer(Self.grow(&sumStorage, n))
            let m = step.module
            if let magnitude = m.magnitude {
                // DoRA (the plan allows it as a weight's only step): PEFT rounds the rescaled
                // weight to the weight's own dtype (the dequantized dtype of a 4-bit base) before
                // a 4-bit base re-quantizes it or a dense merge writes it.
                let wType: ElementType
                switch target {
                case .dense(let t): wType = plan.quantized != nil ? baseType : t
                case .requantize: wType = baseType
                }
                var w = [UInt8](repeating: 0, count: n * wType.byteSize)
                let bad = w.withUnsafeMutableBytes { wb in
                    LoRAMerge.doraMerge(loraA: m.loraA, loraB: m.loraB, rank: m.rank, inFeatures: m.inFeatures, outFeatures: m.outFeatures,
                                        scaling: step.scaling, adapterType: m.storedType, magnitude: magnitude, base: base, baseType: baseType,
                                        into: wb, outType: wType, deltaOut: delta, threads: options.threads)
                }
                if let bad {
                    throw CheckpointError.invalidTensor(file: file, tensor: tensor, problem: "merged value \(bad) is not finite; nothing written")
                }
                switch target {
                case .dense(let t):
                    return Applied(bytes: t == wType ? w : w.withUnsafeBytes { encode(loadFloats($0, as: wType), as: t) }, type: t, quantized: nil)
                case .requantize(let qt, let bs, let dq):
                    let q: Result<Quantized4Bit, QuantizationError> = w.withUnsafeBytes { raw in
                        Result { () throws(QuantizationError) in
                            try quantize4Bit(FloatElements.view(raw, as: wType), shape: [plan.out, plan.in], quantType: qt, blocksize: bs, doubleQuant: dq)
                        }
                    }
                    switch q {
                    case .success(let q): return Applied(bytes: [], type: q.state.dtype, quantized: q)
                    case .failure(let error): throw CheckpointError.quantization(file: file, tensor: tensor, error: error)
                    }
                }
            }
            let bad = withCurrent(current, base) { cur, curType in
                out.withUnsafeMutableBytes { array in
                    stepDelta.withUnsafeMutableBufferPointer { sd in
                        LoRAMerge.merge(loraA: m.loraA, loraB: m.loraB, rank: m.rank, inFeatures: m.inFeatures, outFeatures: m.outFeatures,
                                        scaling: step.scaling, adapterType: m.storedType, fanInFanOut: step.fanInFanOut,
                                        base: cur, baseType: curType ?? baseType, into: target.isDense ? array : sum, outType: outType,
                                        deltaOut: plan.steps.count > 1 ? (delta == nil ? nil : sd) : delta, threads: options.threads)
                    }
                }
            }
            if let bad {
                throw CheckpointError.invalidTensor(file: file, tensor: tensor, problem: "merged value \(bad) is not finite; nothing written")
            }
            if let delta, plan.steps.count > 1 {
                if i == 0 { for j in 0..<n { delta[j] = stepDelta[j] } } else { for j in 0..<n { delta[j] += stepDelta[j] } }
            }
            if case .requantize(let qt, let bs, let dq) = target {
                let q: Quantized4Bit
                let values = FloatElements.view(UnsafeRawBufferPointer(sum), as: .float32)
                do {
                    q = try quantize4Bit(values, shape: [plan.out, plan.in], quantType: qt, blocksize: bs, doubleQuant: dq)
                } catch {
                    throw CheckpointError.quantization(file: file, tensor: tensor, error: error)
                }
                // PEFT re-quantizes after each adapter; the next one starts from its dequantized form.
                current = Applied(bytes: i + 1 < plan.steps.count ? q.dequantizedBytes() : [], type: q.state.dtype, quantized: q)
            } else {
                current = Applied(bytes: out, type: outType, quantized: nil)
            }
        }
        return current!
    }

    private func withCurrent<R>(_ current: Applied?, _ base: UnsafeRawBufferPointer,
                                _ body: (UnsafeRawBufferPointer, ElementType?) throws -> R) rethrows -> R {
        guard let current else { return try body(base, nil) }
        return try current.bytes.withUnsafeBytes { try body($0, current.type) }
    }

    /// `LoRAMerge.reportSums` of a base and a written weight (stored elements) and fp32 delta.
    func sums(_ base: (bytes: [UInt8], type: ElementType), _ delta: UnsafeBufferPointer<Float>, _ written: (bytes: [UInt8], type: ElementType)) -> [Double] {
        base.bytes.withUnsafeBytes { b in
            written.bytes.withUnsafeBytes { LoRAMerge.reportSums(base: b, baseType: base.type, delta: delta, written: $0, writtenType: written.type) }
        }
    }
}
