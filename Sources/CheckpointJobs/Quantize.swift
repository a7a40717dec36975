import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors

/// Which tensors `quantizeCheckpoint` turns into 4-bit, and how.
public struct QuantizeOptions: Sendable {
    public var quantType: QuantType = .nf4
    public var blocksize: Int = 64
    public var doubleQuant: Bool = true
    /// `bnb_4bit_quant_storage`: the dtype the packed bytes are stored as (U8, BF16, F16 or F32;
    /// `BnB4BitFormat.quantStorages`). FSDP and DeepSpeed QLoRA need BF16 (or the model's dtype).
    public var quantStorage: DType = .u8
    /// `bnb_4bit_compute_dtype` recorded in config.json: what transformers' 4-bit matmul computes
    /// in after loading (bf16, the QLoRA recipe; fp16 or fp32). The stored bytes do not depend on it.
    public var computeDtype: ElementType = .bfloat16
    /// When set, only 2-D float tensors whose name matches are quantized (the default
    /// name exclusions then do not apply).
    public var include: String? = nil
    /// 2-D float tensors whose name matches are copied unchanged.
    public var exclude: String? = nil
    /// Name fragments left unquantized by default: embeddings, the output head and norms.
    public static let defaultSkipFragments = ["embed", "lm_head", "norm"]
    /// More fragments left unquantized by default: a mixture of experts' experts and router, as
    /// transformers 5 + bitsandbytes leave them (`ModelArchitecture.sixteenBitFragments`; set
    /// from the checkpoint's config.json).
    public var modelSkipFragments: [String] = []

    public init(quantType: QuantType = .nf4, blocksize: Int = 64, doubleQuant: Bool = true, include: String? = nil, exclude: String? = nil,
                quantStorage: DType = .u8, computeDtype: ElementType = .bfloat16) {
        (self.quantType, self.blocksize, self.doubleQuant, self.include, self.exclude) = (quantType, blocksize, doubleQuant, include, exclude)
        (self.quantStorage, self.computeDtype) = (quantStorage, computeDtype)
    }

    /// Whether tensor `info` is quantized under these options. A tensor with no elements is
    /// copied: it has no block to take a scale from (its nested offset would be the mean of
    /// nothing, NaN).
    public func selects(_ info: TensorInfo) throws -> Bool {
        guard info.shape.count == 2, info.elementCount > 0, [DType.f32, .bf16, .f16].contains(info.dtype) else { return false }
        if let include {
            guard try matches(include, info.name) else { return false }
        } else if (Self.defaultSkipFragments + modelSkipFragments).contains(where: { info.name.contains($0) }) {
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

/// Quantizes every selected tensor of a checkpoint (a .safetensors file, or a directory with
/// a sharded or single checkpoint) into bitsandbytes' 4-bit layout, copying the rest.
///
/// Streams one tensor at a time on `CheckpointRewrite`; peak memory is about the largest tensor
/// plus its 4-bit form. The safetensors header is written first and a quant-state tensor's
/// byte length depends on the double-quant offset, so with double quantization each selected
/// tensor is read once more beforehand, while planning, to compute its absmax
/// (`blockAbsmax4Bit`, no quantization). Output appears only when complete.
/// - Returns: a summary of what was written.
@discardableResult
public func quantizeCheckpoint(input: String, output: String, options: QuantizeOptions,
                               overwrite: Bool = false, progress: ProgressHandler? = nil) throws -> JobSummary {
    var options = options
    if let described = try describedModel(checkpoint: input) {
        options.modelSkipFragments = described.model?.sixteenBitFragments ?? []
        if described.model != nil, let q = described.config["quantization_config"], case .string(let method)? = q["quant_method"] {
            // gpt-oss ships MXFP4 experts: transformers refuses a bitsandbytes config on it (moe.json).
            throw CheckpointError.invalidPath(path: described.path, problem: "is already quantized (quantization_config quant_method \(method)); quantize a 16-bit checkpoint"
                                              + (method == "mxfp4" ? " (`qlora dequantize` turns gpt-oss' MXFP4 experts into one)" : ""))
        }
    }
    let job = try CheckpointRewrite(input: input)
    let reader = job.reader
    guard BnB4BitFormat.groups(in: reader.tensorNames).isEmpty else {
        throw CheckpointError.invalidPath(path: input, problem: "already holds 4-bit quantized tensors")
    }
    guard BnB4BitFormat.quantStorages.values.contains(options.quantStorage) else {
        throw CheckpointError.invalidPath(path: input, problem: "quant storage \(options.quantStorage.rawValue) is not one of uint8, bfloat16, float16, float32")
    }
    var summary = JobSummary()
    summary.bytesWritten = try job.run(output: output, layout: .input, overwrite: overwrite, progress: progress, planningCost: { e in
        (try? options.selects(e.info)) == true && options.doubleQuant ? e.info.byteCount : 0
    }, plan: { e in
        guard try options.selects(e.info) else {
            summary.copied += 1
            return .copy(e.info)
        }
        let file = job.file(of: e)
        guard BnB4BitFormat.packedShape(elementCount: e.info.elementCount, storage: options.quantStorage) != nil else {
            throw CheckpointError.invalidTensor(file: file, tensor: e.name, problem: "its \((e.info.elementCount + 1) / 2) packed bytes are not a whole number of "
                                                + "\(options.quantStorage.rawValue) elements (bitsandbytes cannot store it so either); use --exclude or another quant storage")
        }
        // The offset decides the quant-state JSON's length, which the header holds.
        let offset = options.doubleQuant ? try doubleQuantOffset(e.info, reader: reader, file: file, options: options) : nil
        let json = BnB4BitFormat.quantStateJSON(quantType: options.quantType, blocksize: options.blocksize,
                                                dtype: ElementType(e.info.dtype)!, shape: e.info.shape, nestedOffset: offset)
        let outputs = BnB4BitFormat.declarations(name: e.name, quantType: options.quantType, blocksize: options.blocksize,
                                                 elementCount: e.info.elementCount, doubleQuant: options.doubleQuant, jsonByteCount: json.count,
                                                 quantStorage: options.quantStorage)
        return TensorPlan(outputs: outputs.map { OutputTensor(name: $0.name, dtype: $0.dtype, shape: $0.shape) }) { sink in
            let q = try quantize(e.info, reader: reader, file: file, options: options)
            for bytes in BnB4BitFormat.payloads(q) { try sink.write(bytes) }
            summary.quantized += 1
            summary.parameters4Bit += q.state.elementCount
        }
    }, quantization: {
        BnBQuantizationConfig(quantType: options.quantType, doubleQuant: options.doubleQuant, computeDtype: options.computeDtype, quantStorage: options.quantStorage)
    })
    return summary
}

/// The double-quant offset `quantize` will record for this tensor, from a read-only pass.
func doubleQuantOffset(_ info: TensorInfo, reader: CheckpointReader, file: String, options: QuantizeOptions) throws -> Float {
    let type = ElementType(info.dtype)!
    do {
        let absmax = try reader.withBytes(of: info.name) { unaligned in
            try withAlignedBytes(unaligned, alignment: type.byteSize) { raw in
                try blockAbsmax4Bit(.view(raw, as: type), blocksize: options.blocksize)
            }
        }
        return TorchMean.mean(absmax)
    } catch let e as QuantizationError {
        throw CheckpointError.quantization(file: file, tensor: info.name, error: e)
    }
}

func quantize(_ info: TensorInfo, reader: CheckpointReader, file: String, options: QuantizeOptions) throws -> Quantized4Bit {
    let type = ElementType(info.dtype)!
    do {
        return try reader.withBytes(of: info.name) { unaligned in
            try withAlignedBytes(unaligned, alignment: type.byteSize) { raw in
                try quantize4Bit(.view(raw, as: type), shape: info.shape, quantType: options.quantType,
                                 blocksize: options.blocksize, doubleQuant: options.doubleQuant)
            }
        }
    } catch let e as QuantizationError {
        throw CheckpointError.quantization(file: file, tensor: info.name, error: e)
    }
}
