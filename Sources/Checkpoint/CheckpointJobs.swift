import Foundation
import QLoRA
import SafeTensors

/// Which tensors `quantizeCheckpoint` turns into 4-bit, and how.
public struct QuantizeOptions: Sendable {
    public var quantType: QuantType = .nf4
    public var blocksize: Int = 64
    public var doubleQuant: Bool = true
    /// When set, only 2-D float tensors whose name matches are quantized (the default
    /// name exclusions then do not apply).
    public var include: String? = nil
    /// 2-D float tensors whose name matches are copied unchanged.
    public var exclude: String? = nil
    /// Name fragments left unquantized by default: embeddings, the output head and norms.
    public static let defaultSkipFragments = ["embed", "lm_head", "norm"]

    public init() {}

    /// Whether tensor `info` is quantized under these options.
    public func selects(_ info: TensorInfo) throws -> Bool {
        guard info.shape.count == 2, [DType.f32, .bf16, .f16].contains(info.dtype) else { return false }
        if let include {
            guard try matches(include, info.name) else { return false }
        } else if Self.defaultSkipFragments.contains(where: { info.name.contains($0) }) {
            return false
        }
        if let exclude, try matches(exclude, info.name) { return false }
        return true
    }

    func matches(_ pattern: String, _ name: String) throws -> Bool {
        let re: NSRegularExpression
        do { re = try NSRegularExpression(pattern: pattern) } catch {
            throw CheckpointError.invalidPath(path: pattern, problem: "invalid regular expression")
        }
        return re.firstMatch(in: name, range: NSRange(name.startIndex..., in: name)) != nil
    }
}

/// Progress of a long job: bytes of work done of the total, and the tensor at hand.
public typealias ProgressHandler = (_ done: Int, _ total: Int, _ tensor: String) -> Void

/// Quantizes every selected tensor of a checkpoint (a .safetensors file, or a directory with
/// a sharded or single checkpoint) into bitsandbytes' 4-bit layout, copying the rest.
///
/// Streams one shard and one tensor at a time; peak memory is about the largest tensor
/// plus its 4-bit form. The safetensors header is written first and a quant-state tensor's
/// byte length depends on the double-quant offset, so with double quantization each selected
/// tensor is read once more beforehand to compute its absmax (`blockAbsmax4Bit`, no
/// quantization). Output appears only when complete.
/// - Returns: a summary of what was written.
@discardableResult
public func quantizeCheckpoint(input: String, output: String, options: QuantizeOptions,
                               progress: ProgressHandler? = nil) throws -> JobSummary {
    let reader = try CheckpointReader(path: input)
    guard BnB4BitFormat.groups(in: reader.tensorNames).isEmpty else {
        throw CheckpointError.invalidPath(path: input, problem: "already holds 4-bit quantized tensors")
    }
    let job = try OutputJob(input: input, output: output, isDirectory: reader.index != nil || isDirectory(input))
    var summary = JobSummary()
    do {
        let total = reader.entries.reduce(0) { $0 + $1.info.byteCount * ((try? options.selects($1.info)) == true && options.doubleQuant ? 2 : 1) }
        var done = 0
        var weightMap: [String: String] = [:]
        var totalSize = 0
        for (s, shardName) in reader.shardFileNames.enumerated() {
            let entries = reader.entries.filter { $0.shardIndex == s }
            let shardFile = reader.shards[s]
            // Pass 1 (read only, double quant only): the offset, which the JSON length depends on.
            var decls: [(name: String, dtype: DType, shape: [Int])] = []
            var weightDecls: [String: [(name: String, dtype: DType, shape: [Int])]] = [:]
            for e in entries {
                if try options.selects(e.info) {
                    let offset = options.doubleQuant ? try doubleQuantOffset(e.info, file: shardFile, path: reader.directory + "/" + shardName, options: options) : nil
                    let json = BnB4BitFormat.quantStateJSON(quantType: options.quantType, blocksize: options.blocksize,
                                                            dtype: elementType(e.info.dtype)!, shape: e.info.shape, nestedOffset: offset)
                    let d = BnB4BitFormat.declarations(name: e.name, quantType: options.quantType, blocksize: options.blocksize,
                                                       elementCount: e.info.elementCount, doubleQuant: options.doubleQuant,
                                                       jsonByteCount: json.count)
                    weightDecls[e.name] = d
                    decls += d
                    if options.doubleQuant { done += e.info.byteCount; progress?(done, total, e.name) }
                } else {
                    decls.append((e.name, e.info.dtype, e.info.shape))
                }
            }
            // Pass 2: write.
            let outName = reader.index != nil || job.isDirectory ? shardName : job.outputFileName
            let writer = try SafeTensorsWriter(url: job.stagingURL(for: outName), tensors: decls, metadata: shardFile.metadata)
            for e in entries {
                if try options.selects(e.info) {
                    let q = try quantize(e.info, file: shardFile, path: reader.directory + "/" + shardName, options: options)
                    for (d, bytes) in zip(weightDecls[e.name]!, BnB4BitFormat.payloads(q)) {
                        guard d.shape.reduce(1, *) * d.dtype.byteSize == bytes.count else {
                            throw CheckpointError.invalidTensor(file: reader.directory + "/" + shardName, tensor: d.name,
                                                               problem: "internal error: sizing pass and quantization disagree")
                        }
                        try writer.write(d.name, bytes: bytes)
                        weightMap[d.name] = outName
                        totalSize += bytes.count
                    }
                    summary.quantized += 1
                    summary.parameters4Bit += q.state.elementCount
                } else {
                    try shardFile.withBytes(of: e.name) { try writer.write(e.name, bytes: $0) }
                    weightMap[e.name] = outName
                    totalSize += e.info.byteCount
                    summary.copied += 1
                }
                done += e.info.byteCount
                progress?(done, total, e.name)
            }
            try writer.finish()
            summary.bytesWritten += writer.fileSize
        }
        try job.complete(reader: reader, index: reader.index == nil ? nil : ShardIndex(totalSize: totalSize, weightMap: weightMap), quantization: options)
    } catch {
        job.abort()
        throw error
    }
    return summary
}

/// The double-quant offset `quantize` will record for this tensor, from a read-only pass.
func doubleQuantOffset(_ info: TensorInfo, file: SafeTensorsFile, path: String, options: QuantizeOptions) throws -> Float {
    let type = elementType(info.dtype)!
    do {
        let absmax = try file.withBytes(of: info.name) { unaligned in
            try withAlignedBytes(unaligned, alignment: type.byteSize) { raw in
                try blockAbsmax4Bit(.view(raw, as: type), blocksize: options.blocksize)
            }
        }
        return TorchMean.mean(absmax)
    } catch let e as QuantizationError {
        throw CheckpointError.quantization(file: path, tensor: info.name, error: e)
    }
}

func quantize(_ info: TensorInfo, file: SafeTensorsFile, path: String, options: QuantizeOptions) throws -> Quantized4Bit {
    let type: ElementType = info.dtype == .f32 ? .float32 : info.dtype == .bf16 ? .bfloat16 : .float16
    do {
        return try file.withBytes(of: info.name) { unaligned in
            try withAlignedBytes(unaligned, alignment: type.byteSize) { raw in
                try quantize4Bit(.view(raw, as: type), shape: info.shape, quantType: options.quantType,
                                 blocksize: options.blocksize, doubleQuant: options.doubleQuant)
            }
        }
    } catch let e as QuantizationError {
        throw CheckpointError.quantization(file: path, tensor: info.name, error: e)
    }
}

/// Turns every 4-bit weight of a bitsandbytes checkpoint back into a dense tensor of
/// `dtype` (default: the dtype recorded in its quant state); other tensors pass through.
@discardableResult
public func dequantizeCheckpoint(input: String, output: String, dtype: ElementType? = nil,
                                 progress: ProgressHandler? = nil) throws -> JobSummary {
    let reader = try CheckpointReader(path: input)
    let groups = BnB4BitFormat.groups(in: reader.tensorNames)
    let job = try OutputJob(input: input, output: output, isDirectory: reader.index != nil || isDirectory(input))
    var summary = JobSummary()
    do {
        var owner: [String: BnB4BitFormat.Group] = [:]
        for g in groups { for m in g.members { owner[m] = g } }
        let total = reader.entries.reduce(0) { $0 + $1.info.byteCount }
        var done = 0
        var weightMap: [String: String] = [:]
        var totalSize = 0
        for (s, shardName) in reader.shardFileNames.enumerated() {
            let entries = reader.entries.filter { $0.shardIndex == s }
            var decls: [(name: String, dtype: DType, shape: [Int])] = []
            var loaded: [String: Quantized4Bit] = [:]
            for e in entries {
                if let g = owner[e.name] {
                    guard g.name == e.name else { continue }
                    let q = try BnB4BitFormat.load(g, from: reader)
                    let t = dtype ?? q.state.dtype
                    decls.append((e.name, t == .float32 ? .f32 : t == .bfloat16 ? .bf16 : .f16, q.state.shape))
                    loaded[e.name] = q
                } else {
                    decls.append((e.name, e.info.dtype, e.info.shape))
                }
            }
            let outName = reader.index != nil || job.isDirectory ? shardName : job.outputFileName
            let writer = try SafeTensorsWriter(url: job.stagingURL(for: outName), tensors: decls, metadata: reader.shards[s].metadata)
            for e in entries {
                defer { done += e.info.byteCount; progress?(done, total, e.name) }
                if owner[e.name] != nil {
                    guard let q = loaded.removeValue(forKey: e.name) else { continue }
                    let bytes = q.dequantizedBytes(as: dtype)
                    try writer.write(e.name, bytes: bytes)
                    totalSize += bytes.count
                    summary.dequantized += 1
                    summary.parameters4Bit += q.state.elementCount
                } else {
                    try reader.withBytes(of: e.name) { try writer.write(e.name, bytes: $0) }
                    totalSize += e.info.byteCount
                    summary.copied += 1
                }
                weightMap[e.name] = outName
            }
            try writer.finish()
            summary.bytesWritten += writer.fileSize
        }
        try job.complete(reader: reader, index: reader.index == nil ? nil : ShardIndex(totalSize: totalSize, weightMap: weightMap), quantization: nil)
    } catch {
        job.abort()
        throw error
    }
    return summary
}

/// What a job did.
public struct JobSummary: Sendable, Codable {
    public var quantized = 0
    public var dequantized = 0
    public var copied = 0
    public var parameters4Bit = 0
    public var bytesWritten = 0
}

func isDirectory(_ path: String) -> Bool {
    var d: ObjCBool = false
    return FileManager.default.fileExists(atPath: path, isDirectory: &d) && d.boolValue
}
