import Foundation
import QLoRA
import SafeTensors

/// How `mergeCheckpoint` writes merged weights.
public struct MergeOptions: Sendable {
    /// 16-bit (or fp32) output type for a merged 4-bit weight ("merged_16bit"); dense bases keep
    /// their own dtype, as PEFT's in-place `W += delta` does.
    public var dtype: ElementType = .bfloat16
    /// Re-quantize merged 4-bit weights to the base's 4-bit format (PEFT's merge_and_unload on a
    /// bnb-4bit model) instead of writing them dense.
    public var requantize = false
    /// Compute `MergeSummary.report` (Float64 sums over every merged tensor; off by default).
    public var report = false
    /// With a 4-bit base: the 16-bit checkpoint it was quantized from. Fills
    /// `MergeSummary.comparison`: how far each choice of base lands from what the adapter was
    /// trained against.
    public var compareOriginal: String? = nil
    /// Write shards of at most this many data bytes, with an index (transformers'
    /// `max_shard_size`; OUTPUT is then a directory). nil keeps the base's own layout.
    public var maxShardSize: Int? = nil
    /// Threads for the merge arithmetic.
    public var threads = ProcessInfo.processInfo.activeProcessorCount
    public init() {}
}

/// One adapter of a merge and the factor on its delta (PEFT's `scale_layer`: scaling × weight).
public struct MergeAdapter: Sendable {
    /// A PEFT adapter directory.
    public var directory: String
    public var weight: Double
    public init(_ directory: String, weight: Double = 1) {
        self.directory = directory
        self.weight = weight
    }
}

public struct MergeSummary: Sendable, Codable {
    public var merged = 0
    public var copied = 0
    public var bytesWritten = 0
    /// With `MergeOptions.report`: one row per merged tensor, and their pooled total (norms in Float64).
    public var report: [MergeReportRow] = []
    public var total = MergeReportRow(name: "total")
    /// With `MergeOptions.compareOriginal`: one row per merged tensor, and their pooled total.
    public var comparison: [MergeComparisonRow] = []
    public var comparisonTotal = MergeComparisonRow(name: "total")
}

/// A table row whose figures derive from Float64 sums: a tensor's own, or pooled over tensors
/// (the total), so that a total weighs each tensor by its size.
protocol PooledSums {
    var sums: [Double] { get set }
    init(name: String)
    /// Recomputes the figures from `sums`.
    mutating func finish()
}

extension PooledSums {
    init(name: String, sums: [Double]) {
        self.init(name: name)
        self.sums = sums
        finish()
    }

    mutating func add(_ r: Self) {
        for i in sums.indices { sums[i] += r.sums[i] }
        finish()
    }
}

/// What writing a merged tensor in its output format costs. W: the base as stored (dequantized
/// for a 4-bit base), ΔW: the adapters' delta (their sum, with several), W+ΔW: their fp32 sum,
/// Q(W+ΔW): what was written (re-quantized and dequantized, or rounded to the output dtype).
public struct MergeReportRow: Sendable, Codable, PooledSums {
    public var name: String
    /// ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖: the error writing adds, relative to the fine-tune's change.
    public var errorToDelta = 0.0
    /// ‖Q(W+ΔW) − (W+ΔW)‖ / ‖W+ΔW‖.
    public var errorToWeight = 0.0
    /// cos(Q(W+ΔW) − W, ΔW): how much of the delta's direction survives (1 = all).
    public var deltaCosine = 0.0
    /// [Σerr², ΣΔW², Σ(W+ΔW)², Σapplied·ΔW, Σapplied²] (`LoRAMerge.reportSums`).
    var sums = [Double](repeating: 0, count: 5)

    init(name: String) { self.name = name }

    mutating func finish() {
        let (errSq, deltaSq, sumSq, dot, appliedSq) = (sums[0], sums[1], sums[2], sums[3], sums[4])
        errorToDelta = deltaSq > 0 ? (errSq / deltaSq).squareRoot() : 0
        errorToWeight = sumSq > 0 ? (errSq / sumSq).squareRoot() : 0
        deltaCosine = deltaSq > 0 && appliedSq > 0 ? dot / (deltaSq * appliedSq).squareRoot() : 0
    }

    enum CodingKeys: String, CodingKey { case name, errorToDelta, errorToWeight, deltaCosine }
}

/// Which base to merge into after QLoRA, for one tensor: the distance of each choice from the
/// weights the adapter was trained against, T = dequant(W4) + ΔW (fp32), relative to ‖ΔW‖.
public struct MergeComparisonRow: Sendable, Codable, PooledSums {
    public var name: String
    /// The original 16-bit base + ΔW, in its dtype.
    public var original16 = 0.0
    /// dequant(W4) + ΔW saved as `MergeOptions.dtype` (the "merged_16bit" export).
    public var dequantized16 = 0.0
    /// dequant(W4) + ΔW re-quantized to the base's 4-bit format.
    public var requantized4 = 0.0
    /// ‖original16 − dequant(W4)‖ / ‖ΔW‖: how far the quantization moved the base, in units of the fine-tune.
    public var baseShift = 0.0
    /// [Σ(original16 − T)², Σ(dequantized16 − T)², Σ(requantized4 − T)², Σ(W16 − dequant(W4))², ΣΔW²].
    var sums = [Double](repeating: 0, count: 5)

    init(name: String) { self.name = name }

    mutating func finish() {
        let d = sums[4]
        func rel(_ x: Double) -> Double { d > 0 ? (x / d).squareRoot() : 0 }
        (original16, dequantized16, requantized4, baseShift) = (rel(sums[0]), rel(sums[1]), rel(sums[2]), rel(sums[3]))
    }

    enum CodingKeys: String, CodingKey { case name, original16, dequantized16, requantized4, baseShift }
}

/// Merges one PEFT LoRA adapter; see `mergeCheckpoint(base:adapters:output:options:progress:)`.
@discardableResult
public func mergeCheckpoint(base: String, adapter: String, output: String, options: MergeOptions,
                            progress: ProgressHandler? = nil) throws -> MergeSummary {
    try mergeCheckpoint(base: base, adapters: [MergeAdapter(adapter)], output: output, options: options, progress: progress)
}

/// Merges PEFT LoRA adapters, in order, into a base checkpoint (a .safetensors file or a
/// directory, dense or bitsandbytes-4bit) with PEFT's numerics (`LoRAMerge`), streaming tensor
/// by tensor.
///
/// Several adapters on one weight are merged one after another as PEFT does: the weight is
/// rounded to its type (re-quantized, for `requantize`) after each. Every adapter module must
/// match a base weight of the right shape, and a merged value that is not finite stops the merge
/// (PEFT's safe_merge check); nothing is written then.
///
/// Memory: the tensor at hand, its merged form and the delta (with a report or comparison, a few
/// fp32 copies of it), plus the adapters. Base pages read through the mapping are released after
/// each tensor. With `requantize` and double quantization each merged weight is computed twice:
/// its quant-state JSON length (in the header, written first) depends on the new offset.
@discardableResult
public func mergeCheckpoint(base: String, adapters specs: [MergeAdapter], output: String, options: MergeOptions,
                            progress: ProgressHandler? = nil) throws -> MergeSummary {
    precondition(!specs.isEmpty, "mergeCheckpoint needs at least one adapter")
    if let m = options.maxShardSize, m <= 0 { throw CheckpointError.invalidPath(path: output, problem: "max shard size must be positive") }
    let reader = try CheckpointReader(path: base)
    let adapters = try specs.map { try PEFTAdapter.load(directory: $0.directory) }
    let groups = Dictionary(uniqueKeysWithValues: BnB4BitFormat.groups(in: reader.tensorNames).map { ($0.name, $0) })
    var companionOf: [String: String] = [:]
    for g in groups.values { for m in g.members where m != g.name { companionOf[m] = g.name } }

    // Each adapted weight, its layout, and the merge steps that apply to it, in adapter order.
    var plans: [String: WeightPlan] = [:]
    for (a, adapter) in adapters.enumerated() {
        var shapes: [String: (out: Int, in: Int)] = [:]
        for path in adapter.modules.keys {
            let name = path + ".weight"
            if let g = groups[name] {
                let q = try BnB4BitFormat.load(g, from: reader)
                for m in g.members { reader.releasePages(of: m) }  // read again, one at a time, in pass 2
                guard q.state.shape.count == 2 else { continue }
                if adapter.fanInFanOut {
                    throw CheckpointError.invalidPath(path: specs[a].directory, problem: "a fan_in_fan_out adapter cannot target the 4-bit weight \(name) (bitsandbytes layers are [out, in])")
                }
                shapes[path] = (q.state.shape[0], q.state.shape[1])
                if plans[name] == nil {
                    plans[name] = WeightPlan(out: q.state.shape[0], in: q.state.shape[1], fanInFanOut: false,
                                             quantized: (q.state.quantType, q.state.blocksize, q.state.isDoubleQuantized), group: g)
                }
            } else if let info = reader.info(named: name), info.shape.count == 2 {
                let (o, i) = adapter.fanInFanOut ? (info.shape[1], info.shape[0]) : (info.shape[0], info.shape[1])
                shapes[path] = (o, i)
                if let p = plans[name], p.fanInFanOut != adapter.fanInFanOut {
                    throw CheckpointError.invalidPath(path: specs[a].directory, problem: "fan_in_fan_out disagrees with an earlier adapter on \(name)")
                }
                if plans[name] == nil { plans[name] = WeightPlan(out: o, in: i, fanInFanOut: adapter.fanInFanOut, quantized: nil) }
            }
        }
        try adapter.validate(againstBase: shapes, baseName: base)
        for (path, m) in adapter.modules {
            plans[path + ".weight"]!.steps.append(MergeStep(module: m, scaling: adapter.config(for: path).scaling * specs[a].weight,
                                                            fanInFanOut: adapter.fanInFanOut))
        }
    }

    var original: CheckpointReader? = nil
    if let o = options.compareOriginal {
        original = try CheckpointReader(path: o)
        for (name, p) in plans.sorted(by: { $0.key < $1.key }) {
            guard p.quantized != nil else {
                throw CheckpointError.invalidTensor(file: base, tensor: name, problem: "--compare-original needs a 4-bit base; this weight is dense")
            }
            guard let info = original!.info(named: name), elementType(info.dtype) != nil, info.shape == [p.out, p.in] else {
                throw CheckpointError.invalidTensor(file: o, tensor: name, problem: "the original base needs this weight as a float [\(p.out), \(p.in)] tensor")
            }
        }
    }

    let sharded = options.maxShardSize != nil
    let job = try OutputJob(input: base, output: output, isDirectory: reader.index != nil || isDirectory(base) || sharded)
    var summary = MergeSummary()
    do {
        let requantizing = options.requantize && plans.values.contains { $0.quantized != nil }
        let total = reader.entries.reduce(0) { $0 + $1.info.byteCount } + (requantizing ? plans.keys.reduce(0) { $0 + reader.info(named: $1)!.byteCount } : 0)
        var done = 0
        func shardPath(_ e: CheckpointReader.Entry) -> String { reader.index != nil || isDirectory(base) ? reader.directory + "/" + e.shard : reader.path }
        func skipped(_ e: CheckpointReader.Entry) -> Bool {
            if let owner = companionOf[e.name], plans[owner] != nil { return true }  // regenerated or dropped
            return false
        }
        let context = MergeContext(reader: reader, original: original, options: options)

        // Pass 1: the output declarations. A re-quantized weight is merged here once to learn
        // its quant-state JSON length, then dropped.
        var decls: [(name: String, dtype: DType, shape: [Int])] = []
        var declShard: [Int] = []
        for e in reader.entries where !skipped(e) {
            guard let plan = plans[e.name] else {
                decls.append((e.name, e.info.dtype, e.info.shape)); declShard.append(e.shardIndex)
                continue
            }
            if let q = plan.quantized {
                if options.requantize {
                    let json = try context.merge(e, plan, file: shardPath(e), sizingOnly: true).payloads.last!.count
                    done += e.info.byteCount
                    progress?(done, total, e.name)
                    decls += BnB4BitFormat.declarations(name: e.name, quantType: q.type, blocksize: q.blocksize,
                                                        elementCount: plan.out * plan.in, doubleQuant: q.doubleQuant, jsonByteCount: json)
                    declShard += Array(repeating: e.shardIndex, count: decls.count - declShard.count)
                } else {
                    decls.append((e.name, dt(options.dtype), [plan.out, plan.in])); declShard.append(e.shardIndex)
                }
            } else {
                decls.append((e.name, e.info.dtype, e.info.shape)); declShard.append(e.shardIndex)
            }
        }

        // Pass 2: merge and write, one tensor at a time.
        let sink = try MergeSink(job: job, reader: reader, decls: decls, declShard: declShard, maxShardSize: options.maxShardSize)
        for e in reader.entries {
            defer {
                reader.releasePages(of: e.name)
                done += e.info.byteCount
                progress?(done, total, e.name)
            }
            if skipped(e) { continue }
            if let plan = plans[e.name] {
                let merged = try context.merge(e, plan, file: shardPath(e), sizingOnly: false)
                for bytes in merged.payloads { try bytes.withUnsafeBytes { try sink.write($0) } }
                if let row = merged.report {
                    summary.report.append(row)
                    summary.total.add(row)
                }
                if let row = merged.comparison {
                    summary.comparison.append(row)
                    summary.comparisonTotal.add(row)
                }
                summary.merged += 1
            } else {
                // In chunks, each released once written: a large copied tensor (embeddings,
                // lm_head) never sits whole in the resident set.
                try reader.withBytes(of: e.name) { raw in
                    try sink.write(raw) { reader.releasePages(of: e.name, bytes: $0) }
                }
                summary.copied += 1
            }
        }
        summary.bytesWritten = try sink.finish()
        let requantizedFormat = plans.values.compactMap(\.quantized).first
        let keepQuantization = options.requantize || plans.values.filter({ $0.quantized != nil }).count < groups.count
            ? (requantizedFormat.map { q in
                var o = QuantizeOptions()
                (o.quantType, o.blocksize, o.doubleQuant) = (q.type, q.blocksize, q.doubleQuant)
                return o
            } ?? quantizeOptions(of: groups, reader))
            : nil
        try job.complete(reader: reader, index: sharded ? nil : (reader.index != nil ? sink.index : nil), quantization: keepQuantization)
    } catch {
        job.abort()
        throw error
    }
    return summary
}

/// One adapter's contribution to a weight.
struct MergeStep {
    var module: PEFTAdapter.Module
    /// The adapter's scaling for this module times the adapter's weight.
    var scaling: Double
    var fanInFanOut: Bool
}

/// An adapted weight: its logical [out, in] shape, storage, and steps.
struct WeightPlan {
    var out: Int
    var `in`: Int
    var fanInFanOut: Bool
    /// The base's 4-bit format, for a bnb-4bit weight.
    var quantized: (type: QuantType, blocksize: Int, doubleQuant: Bool)?
    /// The stored tensors of a bnb-4bit weight.
    var group: BnB4BitFormat.Group? = nil
    var steps: [MergeStep] = []
}

/// What merging one weight produced.
struct MergedWeight {
    /// Output payloads in declaration order (one dense tensor, or the bnb-4bit group).
    var payloads: [[UInt8]]
    var report: MergeReportRow?
    var comparison: MergeComparisonRow?
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

    func merge(_ e: CheckpointReader.Entry, _ plan: WeightPlan, file: String, sizingOnly: Bool) throws -> MergedWeight {
        let n = plan.out * plan.in
        let wantsDelta = !sizingOnly && (options.report || original != nil)
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
            if options.report { result.report = MergeReportRow(name: e.name, sums: sums(w, delta, written)) }
            if let original {
                let other = try base16.withUnsafeBytes {
                    try apply(plan, base: $0, baseType: baseType, target: options.requantize ? .dense(options.dtype) : requantize, delta: nil, file: file, tensor: e.name)
                }.written()
                let (deq16, req4) = options.requantize ? (other, written) : (written, other)
                let oType = elementType(original.info(named: e.name)!.dtype)!
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
        guard let type = elementType(e.info.dtype) else {
            throw CheckpointError.invalidTensor(file: file, tensor: e.name, problem: "adapter targets a non-float weight (\(e.info.dtype.rawValue))")
        }
        return try reader.withBytes(of: e.name) { raw in
            let applied = try apply(plan, base: raw, baseType: type, target: .dense(type),
                                    delta: wantsDelta ? UnsafeMutableBufferPointer(mutating: delta) : nil, file: file, tensor: e.name)
            var result = MergedWeight(payloads: [applied.bytes])
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
            let bad = try withCurrent(current, base) { cur, curType in
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

/// Where merged tensors go: one output file per base shard (the base's layout), or
/// `ShardedWriter`'s shards of at most `maxShardSize` bytes. Tensors arrive in `decls` order.
final class MergeSink {
    private let job: OutputJob
    private let reader: CheckpointReader
    private let decls: [(name: String, dtype: DType, shape: [Int])]
    private let declShard: [Int]
    private var sharded: ShardedWriter?
    private var writer: SafeTensorsWriter?
    private var writerShard = -1
    private var next = 0
    private var weightMap: [String: String] = [:]
    private var totalSize = 0
    private var bytesWritten = 0

    init(job: OutputJob, reader: CheckpointReader, decls: [(name: String, dtype: DType, shape: [Int])], declShard: [Int], maxShardSize: Int?) throws {
        self.job = job
        self.reader = reader
        self.decls = decls
        self.declShard = declShard
        if let maxShardSize {
            sharded = try ShardedWriter(directory: job.stagingDirectory!, tensors: decls, maxShardSize: maxShardSize,
                                        metadata: reader.shards.first?.metadata ?? ["format": "pt"])
        }
    }

    /// Bytes per write when a caller releases what was written.
    static let chunkSize = 8 << 20

    /// The next declared tensor's bytes; with `release`, written in chunks and each chunk's byte
    /// range handed to `release` once written.
    func write(_ bytes: UnsafeRawBufferPointer, release: ((Range<Int>) -> Void)? = nil) throws {
        guard let release else { return try write(chunk: bytes, last: true) }
        var start = 0
        repeat {
            let end = min(bytes.count, start + Self.chunkSize)
            try write(chunk: UnsafeRawBufferPointer(rebasing: bytes[start..<end]), last: end == bytes.count)
            release(start..<end)
            start = end
        } while start < bytes.count
    }

    private func write(chunk bytes: UnsafeRawBufferPointer, last: Bool) throws {
        let d = decls[next]
        if let sharded {
            try sharded.write(d.name, bytes: bytes)
        } else {
            let s = declShard[next]
            if s != writerShard {
                if let w = writer { try w.finish(); bytesWritten += w.fileSize }
                let shardName = reader.shardFileNames[s]
                let outName = reader.index != nil || job.isDirectory ? shardName : job.outputFileName
                let mine = decls.indices.filter { declShard[$0] == s }.map { decls[$0] }
                writer = try SafeTensorsWriter(url: job.stagingURL(for: outName), tensors: mine, metadata: reader.shards[s].metadata)
                writerShard = s
            }
            try writer!.write(d.name, bytes: bytes)
            weightMap[d.name] = reader.index != nil || job.isDirectory ? reader.shardFileNames[s] : job.outputFileName
        }
        totalSize += bytes.count
        if last { next += 1 }
    }

    /// Completes the files; returns the bytes written.
    func finish() throws -> Int {
        if let sharded {
            try sharded.finish()
            return sharded.shards.reduce(0) { total, s in
                total + ((try? FileManager.default.attributesOfItem(atPath: job.stagingURL(for: s.fileName).path)[.size] as? Int) ?? 0)
            }
        }
        if let w = writer { try w.finish(); bytesWritten += w.fileSize }
        return bytesWritten
    }

    /// The index of a base-layout output.
    var index: ShardIndex { ShardIndex(totalSize: totalSize, weightMap: weightMap) }
}

/// fp32 values rounded once to `type` (sign of zero kept), as raw bytes.
func encode(_ v: [Float], as type: ElementType) -> [UInt8] {
    switch type {
    case .float32: return v.withUnsafeBytes { Array($0) }
    case .bfloat16: return v.map { HalfPrecision.bfloat16Bits($0) }.withUnsafeBytes { Array($0) }
    case .float16: return v.map { HalfPrecision.float16Bits($0) }.withUnsafeBytes { Array($0) }
    }
}

func quantizeOptions(of groups: [String: BnB4BitFormat.Group], _ reader: CheckpointReader) -> QuantizeOptions? {
    guard let g = groups.values.first, let q = try? BnB4BitFormat.load(g, from: reader) else { return nil }
    var o = QuantizeOptions()
    o.quantType = q.state.quantType
    o.blocksize = q.state.blocksize
    o.doubleQuant = q.state.isDoubleQuantized
    return o
}
