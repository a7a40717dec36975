import Foundation
import QLoRA
import SafeTensors

/// How `mergeCheckpoint` writes merged 4-bit weights.
public struct MergeOptions: Sendable {
    /// 16-bit (or fp32) output type for a merged 4-bit weight ("merged_16bit"); dense bases keep
    /// their own dtype, as PEFT's in-place `W += delta` does.
    public var dtype: ElementType = .bfloat16
    /// Re-quantize merged 4-bit weights to the base's 4-bit format (PEFT's merge_and_unload on a
    /// bnb-4bit model) instead of writing them dense.
    public var requantize = false
    /// Compute `MergeSummary.report` (a Float64 pass over every merged tensor; off by default).
    public var report = false
    public init() {}
}

public struct MergeSummary: Sendable, Codable {
    public var merged = 0
    public var copied = 0
    public var bytesWritten = 0
    /// With `MergeOptions.report`: one row per merged tensor, and their pooled total (norms in Float64).
    public var report: [MergeReportRow] = []
    public var total = MergeReportRow(name: "total")
}

/// What writing a merged tensor in its output format costs. W: the base as stored (dequantized
/// for a 4-bit base), ΔW: the adapter's delta, W+ΔW: their exact fp32 sum, Q(W+ΔW): what was
/// written (re-quantized and dequantized, or rounded to the output dtype).
public struct MergeReportRow: Sendable, Codable {
    public var name: String
    /// ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖: the error writing adds, relative to the fine-tune's change.
    public var errorToDelta = 0.0
    /// ‖Q(W+ΔW) − (W+ΔW)‖ / ‖W+ΔW‖.
    public var errorToWeight = 0.0
    /// cos(Q(W+ΔW) − W, ΔW): how much of the delta's direction survives (1 = all).
    public var deltaCosine = 0.0
    var errSq = 0.0, deltaSq = 0.0, sumSq = 0.0, dot = 0.0, appliedSq = 0.0

    init(name: String) { self.name = name }

    init(name: String, base: [Float], delta: [Float], sum: [Float], written: [Float]) {
        self.name = name
        for i in sum.indices {
            let e = Double(written[i]) - Double(sum[i]), applied = Double(written[i]) - Double(base[i]), d = Double(delta[i])
            errSq += e * e; deltaSq += d * d; sumSq += Double(sum[i]) * Double(sum[i]); dot += applied * d; appliedSq += applied * applied
        }
        finish()
    }

    mutating func add(_ r: MergeReportRow) {
        errSq += r.errSq; deltaSq += r.deltaSq; sumSq += r.sumSq; dot += r.dot; appliedSq += r.appliedSq
        finish()
    }

    mutating func finish() {
        errorToDelta = deltaSq > 0 ? (errSq / deltaSq).squareRoot() : 0
        errorToWeight = sumSq > 0 ? (errSq / sumSq).squareRoot() : 0
        deltaCosine = deltaSq > 0 && appliedSq > 0 ? dot / (deltaSq * appliedSq).squareRoot() : 0
    }

    enum CodingKeys: String, CodingKey { case name, errorToDelta, errorToWeight, deltaCosine }
}

/// Merges a PEFT LoRA adapter into a base checkpoint (a .safetensors file or a directory, dense
/// or bitsandbytes-4bit), streaming shard by shard and tensor by tensor, with PEFT's numerics
/// (`LoRAMerge`). Every adapter module must match a base weight of the right shape, and a merged
/// value that is not finite stops the merge (PEFT's safe_merge check); nothing is written then.
@discardableResult
public func mergeCheckpoint(base: String, adapter adapterDir: String, output: String, options: MergeOptions,
                            progress: ProgressHandler? = nil) throws -> MergeSummary {
    let reader = try CheckpointReader(path: base)
    let adapter = try PEFTAdapter.load(directory: adapterDir)
    let groups = Dictionary(uniqueKeysWithValues: BnB4BitFormat.groups(in: reader.tensorNames).map { ($0.name, $0) })
    var companionOf: [String: String] = [:]
    for g in groups.values { for m in g.members where m != g.name { companionOf[m] = g.name } }

    // Which base weight each adapter module merges into, with the base's shape.
    var shapes: [String: (out: Int, in: Int)] = [:]
    var quantized: [String: Quantized4Bit] = [:]
    for path in adapter.modules.keys {
        let name = path + ".weight"
        if let g = groups[name] {
            let q = try BnB4BitFormat.load(g, from: reader)
            if q.state.shape.count == 2 { shapes[path] = (q.state.shape[0], q.state.shape[1]) }
            quantized[name] = q
        } else if let info = reader.info(named: name), info.shape.count == 2 {
            shapes[path] = (info.shape[0], info.shape[1])  // nn.Linear [out, in] (fan_in_fan_out adapters are refused on load)
        }
    }
    try adapter.validate(againstBase: shapes, baseName: base)

    let job = try OutputJob(input: base, output: output, isDirectory: reader.index != nil || isDirectory(base))
    var summary = MergeSummary()
    do {
        let total = reader.entries.reduce(0) { $0 + $1.info.byteCount }
        var done = 0
        var weightMap: [String: String] = [:]
        var totalSize = 0
        var requantizedWith: QuantizeOptions? = nil
        for (s, shardName) in reader.shardFileNames.enumerated() {
            let entries = reader.entries.filter { $0.shardIndex == s }
            let shardPath = reader.directory + "/" + shardName

            /// The merged tensor `e` as output payloads (in declaration order) and its report row.
            func merge(_ e: CheckpointReader.Entry, _ m: PEFTAdapter.Module) throws -> ([[UInt8]], MergeReportRow?) {
                let path = String(e.name.dropLast(".weight".count))
                let config = adapter.config(for: path)
                if let q = quantized[e.name] {
                    let (out, inF) = (q.state.shape[0], q.state.shape[1])
                    let delta = LoRAMerge.delta(loraA: m.loraA, loraB: m.loraB, rank: m.rank, inFeatures: inF, outFeatures: out,
                                                scaling: config.scaling, adapterType: m.storedType)
                    let base16 = q.dequantizedBytes()  // the recorded dtype, as bitsandbytes dequantizes
                    let baseF = base16.withUnsafeBytes { raw in (0..<(out * inF)).map { FloatElements.view(raw, as: q.state.dtype)[$0] } }
                    var sum = [Float](repeating: 0, count: out * inF)
                    baseF.withUnsafeBufferPointer { b in sum.withUnsafeMutableBufferPointer { LoRAMerge.add(base: .float32(b), delta: delta, into: .float32($0)) } }
                    if let bad = sum.firstIndex(where: { !$0.isFinite }) {
                        throw CheckpointError.invalidTensor(file: shardPath, tensor: e.name, problem: "merged value \(bad) is not finite; nothing written")
                    }
                    if options.requantize {
                        let r: Quantized4Bit
                        do {
                            r = try sum.withUnsafeBufferPointer {
                                try quantize4Bit(.float32($0), shape: [out, inF], quantType: q.state.quantType,
                                                 blocksize: q.state.blocksize, doubleQuant: q.state.isDoubleQuantized)
                            }
                        } catch let qe as QuantizationError { throw CheckpointError.quantization(file: shardPath, tensor: e.name, error: qe) }
                        return (BnB4BitFormat.payloads(r), options.report ? MergeReportRow(name: e.name, base: baseF, delta: delta, sum: sum, written: r.dequantizedFloat32()) : nil)
                    }
                    let bytes = encode(sum, as: options.dtype)
                    guard options.report else { return ([bytes], nil) }
                    let written = bytes.withUnsafeBytes { raw in (0..<(out * inF)).map { FloatElements.view(raw, as: options.dtype)[$0] } }
                    return ([bytes], MergeReportRow(name: e.name, base: baseF, delta: delta, sum: sum, written: written))
                }
                guard let type = elementType(e.info.dtype) else {
                    throw CheckpointError.invalidTensor(file: shardPath, tensor: e.name, problem: "adapter targets a non-float weight (\(e.info.dtype.rawValue))")
                }
                let delta = LoRAMerge.delta(loraA: m.loraA, loraB: m.loraB, rank: m.rank, inFeatures: m.inFeatures, outFeatures: m.outFeatures,
                                            scaling: config.scaling, adapterType: m.storedType)
                let baseF: [Float] = reader.withBytes(of: e.name) { unaligned in
                    withAlignedBytes(unaligned, alignment: type.byteSize) { raw in
                        let b = FloatElements.view(raw, as: type)
                        return (0..<b.count).map { b[$0] }
                    }
                }
                var bytes = [UInt8](repeating: 0, count: e.info.byteCount)
                baseF.withUnsafeBufferPointer { b in bytes.withUnsafeMutableBytes { LoRAMerge.add(base: .float32(b), delta: delta, into: .view($0, as: type)) } }
                let written = bytes.withUnsafeBytes { raw in (0..<baseF.count).map { FloatElements.view(raw, as: type)[$0] } }
                if let bad = written.firstIndex(where: { !$0.isFinite }) {
                    throw CheckpointError.invalidTensor(file: shardPath, tensor: e.name, problem: "merged value \(bad) is not finite; nothing written")
                }
                guard options.report else { return ([bytes], nil) }
                let sum = zip(baseF, delta).map { $0 + $1 }
                return ([bytes], MergeReportRow(name: e.name, base: baseF, delta: delta, sum: sum, written: written))
            }

            func module(_ e: CheckpointReader.Entry) -> PEFTAdapter.Module? {
                e.name.hasSuffix(".weight") ? adapter.modules[String(e.name.dropLast(".weight".count))] : nil
            }

            // Pass 1: the output declarations. Only a re-quantized weight must be merged now: its
            // quant-state JSON length (in the header) depends on the new double-quant offset.
            var decls: [(name: String, dtype: DType, shape: [Int])] = []
            var early: [String: ([[UInt8]], MergeReportRow?)] = [:]
            for e in entries {
                if let owner = companionOf[e.name], quantized[owner] != nil { continue }  // regenerated or dropped
                guard let m = module(e) else { decls.append((e.name, e.info.dtype, e.info.shape)); continue }
                if let q = quantized[e.name] {
                    if options.requantize {
                        let result = try merge(e, m)
                        early[e.name] = result
                        var qo = QuantizeOptions()
                        qo.quantType = q.state.quantType
                        qo.blocksize = q.state.blocksize
                        qo.doubleQuant = q.state.isDoubleQuantized
                        requantizedWith = qo
                        decls += BnB4BitFormat.declarations(name: e.name, quantType: q.state.quantType, blocksize: q.state.blocksize,
                                                            elementCount: q.state.elementCount, doubleQuant: q.state.isDoubleQuantized,
                                                            jsonByteCount: result.0.last!.count)
                    } else {
                        decls.append((e.name, dt(options.dtype), q.state.shape))
                    }
                } else {
                    decls.append((e.name, e.info.dtype, e.info.shape))
                }
            }
            // Pass 2: merge (if not done) and write, one tensor at a time.
            let outName = reader.index != nil || job.isDirectory ? shardName : job.outputFileName
            let writer = try SafeTensorsWriter(url: job.stagingURL(for: outName), tensors: decls, metadata: reader.shards[s].metadata)
            var next = 0
            for e in entries {
                defer { done += e.info.byteCount; progress?(done, total, e.name) }
                if let owner = companionOf[e.name], quantized[owner] != nil { continue }
                if let m = module(e) {
                    let (payloads, row) = try early.removeValue(forKey: e.name) ?? merge(e, m)
                    for bytes in payloads {
                        try writer.write(decls[next].name, bytes: bytes)
                        weightMap[decls[next].name] = outName
                        totalSize += bytes.count
                        next += 1
                    }
                    if let row {
                        summary.report.append(row)
                        summary.total.add(row)
                    }
                    summary.merged += 1
                } else {
                    try reader.withBytes(of: e.name) { try writer.write(e.name, bytes: $0) }
                    weightMap[e.name] = outName
                    totalSize += e.info.byteCount
                    next += 1
                    summary.copied += 1
                }
            }
            try writer.finish()
            summary.bytesWritten += writer.fileSize
        }
        let keepQuantization = options.requantize || quantized.count < groups.count ? (requantizedWith ?? quantizeOptions(of: groups, reader)) : nil
        try job.complete(reader: reader, index: ShardIndex(totalSize: totalSize, weightMap: weightMap), quantization: keepQuantization)
    } catch {
        job.abort()
        throw error
    }
    return summary
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
