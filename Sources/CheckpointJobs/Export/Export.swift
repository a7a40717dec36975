import CheckpointFormats
import Dispatch
import FileOutput
import Foundation
import GGUF
import QLoRA
import SafeTensors

/// `qlora export`'s types, by llama.cpp's names: f32, f16 and bf16 as convert_hf_to_gguf.py's
/// `--outtype`; the rest as `--outtype auto` followed by llama-quantize with that mixture.
public enum GGUFExportType: String, CaseIterable, Sendable, Codable {
    case f32, f16, bf16, q8_0, q4_0, q4_k_m, iq4_nl

    /// The converter's own outtype, or nil when llama-quantize makes the file.
    public var convertType: GGUFOutType? {
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        default: return nil
        }
    }

    public var mixture: LlamaQuantizeMixture? {
        switch self {
        case .q8_0: return .q8_0
        case .q4_0: return .q4_0
        case .q4_k_m: return .q4_k_m
        case .iq4_nl: return .iq4_nl
        default: return nil
        }
    }
}

public struct ExportSummary: Sendable, Codable {
    public var tensors = 0
    /// Weights with an adapter merged in.
    public var merged = 0
    /// bitsandbytes 4-bit weights dequantized.
    public var dequantized = 0
    public var bytesWritten = 0
    /// The converter's type the file went through ("bf16" or "f16" before llama-quantize).
    public var convertedAs = ""
    /// Tensors per ggml type, e.g. ["Q4_K": 193, "Q6_K": 33, "F32": 65].
    public var typeCounts: [String: Int] = [:]
    /// Parameters (elements of every tensor), as gguf-py counts them for general.size_label.
    public var parameters = 0
    /// What the file leaves out that llama.cpp's converter would write (one line each).
    public var warnings: [String] = []
    /// With `report`: per merged weight, what each serving format keeps of the fine-tune, and their pooled total.
    public var serving: [ServingReportRow] = []
    public var servingTotal = ServingReportRow(name: "total")
}

/// Writes a Hugging Face Llama checkpoint directory as llama.cpp's GGUF: the bytes that
/// convert_hf_to_gguf.py writes for `type` f32/f16/bf16, or that it writes with `--outtype auto`
/// and llama-quantize then makes of that for q8_0/q4_0/q4_k_m/iq4_nl (Vectors/gguf holds both
/// to those tools' output).
///
/// The checkpoint may be dense or bitsandbytes 4-bit, with PEFT adapters merged on the fly: the
/// file is what the tools make of the dense checkpoint `qlora merge` (4-bit weights an adapter
/// touches written as `mergedDType`) followed by `qlora dequantize` would hold; llama.cpp's
/// converter cannot read bitsandbytes' 4-bit layout at all.
///
/// Streamed: the header is planned from the checkpoint's header, then each tensor is read,
/// merged or dequantized, encoded and written in turn; memory is one tensor in fp32 and its
/// encoding. Nothing is written until the plan holds; OUTPUT appears only when complete.
@discardableResult
public func exportGGUF(base: String, adapters specs: [MergeAdapter] = [], output: String, type: GGUFExportType, mergedDType: ElementType = .bfloat16,
                       report: Bool = false, overwrite: Bool = false, threads: Int = ProcessInfo.processInfo.activeProcessorCount,
                       progress: ProgressHandler? = nil) throws -> ExportSummary {
    guard StagedOutput.isDirectory(base) else {
        throw CheckpointError.invalidPath(path: base, problem: FileManager.default.fileExists(atPath: base)
            ? "export needs a checkpoint directory (config.json, tokenizer.model and the weights), not a file" : "does not exist")
    }
    let configPath = base + "/config.json"
    let (config, family, arch) = try GGUFArchitecture.load(config: configPath)
    var warnings: [String] = []

    let reader = try CheckpointReader(path: base)
    // The vocabulary is as long as config.json's vocab_size (the converter's rule), which must be
    // the embedding's rows: llama.cpp checks one against the other, and a hostile vocab_size would
    // otherwise size the token list.
    if let embedding = reader.info(named: "model.embed_tokens.weight"), embedding.shape.count == 2, embedding.shape[0] != arch.vocabSize {
        throw CheckpointError.invalidPath(path: configPath, problem: "vocab_size \(arch.vocabSize) is not model.embed_tokens.weight's \(embedding.shape[0]) rows")
    }
    guard reader.info(named: "model.embed_tokens.weight") != nil else {
        throw CheckpointError.invalidPath(path: base, problem: "has no model.embed_tokens.weight")
    }
    let tokenizer = try GGUFExport.Tokenizer(directory: base, family, vocabSize: arch.vocabSize)
    let plan = try MergePlan(reader: reader, base: base, adapters: specs)
    if !plan.configEdits.isEmpty {
        // The GGUF's vocabulary comes from the tokenizer files and vocab_size of one directory.
        throw CheckpointError.invalidPath(path: specs.last!.directory, problem: "resizes the vocabulary (added tokens): merge it first (qlora merge BASE ADAPTER MERGED), "
                                          + "which writes vocab_size and the adapter's tokenizer files, then export MERGED")
    }
    let context = MergeContext(reader: reader, original: nil, options: MergeOptions(dtype: mergedDType, threads: threads))
    let dense = try ServingPlan.denseTensors(reader, plan, mergedDType: mergedDType)
    let convertedAs = type.convertType ?? GGUFExport.autoOutType(dense)
    let longRoPE = family == .phi3 ? try GGUFExport.LongRoPE(config: config, arch, file: configPath) : nil
    let planned = try GGUFExport.plan(dense, arch, family, outType: convertedAs, longRoPE: longRoPE)
    var summary = ExportSummary()
    summary.convertedAs = convertedAs.rawValue
    summary.parameters = planned.reduce(0) { $0 + $1.ne.reduce(1, *) }
    if let w = GGUFNames.cardWarning(directory: base) { warnings.append(w) }
    if family == .qwen3MoE, arch.experts?.normalizesTopK == false {
        // src/models/qwen3moe.cpp passes norm_w = true to build_moe_ffn whatever the file says.
        warnings.append("config.json's norm_topk_prob is false, but llama.cpp's qwen3moe always renormalizes the chosen experts' weights: the file computes another model "
                        + "(llama.cpp's converter writes it all the same)")
    }
    summary.warnings = warnings
    let sizeLabel = GGUFExport.sizeLabel(of: planned)
    let general = GGUFNames.generalKeys(directory: base, config: config, parameters: summary.parameters) { _ in sizeLabel }
    var metadata = GGUFExport.metadata(config: config, arch, family, name: "", parameters: summary.parameters, outType: convertedAs,
                                       vocabulary: tokenizer.sentencePiece, special: tokenizer.special, bpe: tokenizer.bpe, general: general,
                                       longRoPE: longRoPE)
    // The file's tensors in order with their final types.
    var order = Array(planned.indices)
    var finalTypes = planned.map(\.type)
    if let mixture = type.mixture {
        order = LlamaQuantize.loaderOrder(planned.map(\.name))
        let types = LlamaQuantize.types(names: order.map { planned[$0].name }, ne: order.map { planned[$0].ne }, current: order.map { planned[$0].type },
                                        mixture: mixture, model: .init(arch))
        for (k, i) in order.enumerated() { finalTypes[i] = types[k] }
        metadata = LlamaQuantize.metadata(metadata, mixture: mixture)
    }
    // The file a tensor comes from, for messages (generated tensors: config.json).
    func file(of t: GGUFExport.PlannedTensor) -> String { t.source.map(reader.filePath(of:)) ?? configPath }
    for i in order {
        guard finalTypes[i].byteCount(planned[i].ne) != nil else {
            throw CheckpointError.invalidTensor(file: file(of: planned[i]), tensor: planned[i].source ?? planned[i].name, problem: "too large for a GGUF tensor")
        }
    }
    let header = try GGUFHeader(metadata: metadata, tensors: order.map { (planned[$0].name, planned[$0].ne, finalTypes[$0]) })
    summary.tensors = planned.count
    for i in order { summary.typeCounts[finalTypes[i].description, default: 0] += 1 }

    let serving = report ? try ServingPlan(dense: dense, arch, family) : nil

    // fp32 values of a dense-checkpoint tensor: merged, dequantized, or read.
    func load(_ hf: String) throws -> [Float] {
        let e = reader.entry(named: hf)!
        if let weight = plan.weights[hf] {
            summary.merged += 1
            // A fan_in_fan_out weight is stored [in, out]: its rows are not the GGUF's, so no serving row.
            let reporting = serving != nil && !weight.fanInFanOut
            let m = try context.merge(e, weight, file: reader.filePath(of: hf), sizingOnly: false, keepingBase: reporting)
            reader.releasePages(of: hf)  // as the merge job does after each tensor: the base's pages leave the resident set
            let merged = m.payloads[0].withUnsafeBytes { loadFloats($0, as: weight.quantized != nil ? mergedDType : ElementType(e.info.dtype)!) }
            if reporting, let serving {
                let row = try ServingReportRow.of(name: hf, base: m.base!, delta: m.delta!, merged: merged, rows: weight.out, columns: weight.in,
                                                  convertedAs: serving.convertedAs[hf]!, types: serving.types[hf]!, threads: threads)
                summary.serving.append(row)
                summary.servingTotal.add(row)
            }
            return merged
        }
        if let r = plan.replacements[hf] {
            // A modules_to_save module's weights or trainable-token rows, as the merge writes them.
            let dtype = r.whole?.dtype ?? e.info.dtype
            let bytes = r.bytes(dtype: dtype) { reader.withBytes(of: hf) { Array($0) } }
            reader.releasePages(of: hf)
            return bytes.withUnsafeBytes { loadFloats($0, as: ElementType(dtype)!) }
        }
        if let g = plan.groups[hf] {
            summary.dequantized += 1
            let w = try BnB4BitFormat.load(g, from: reader)
            for m in g.members { reader.releasePages(of: m) }
            return w.dequantizedBytes().withUnsafeBytes { loadFloats($0, as: w.state.dtype) }
        }
        defer { reader.releasePages(of: hf) }
        return reader.withBytes(of: hf) { loadFloats($0, as: ElementType(e.info.dtype)!) }
    }

    let staged = try StagedOutput(output, kind: .file, overwrite: overwrite, inputs: [base] + specs.map(\.directory))
    do {
        let out = try BufferedOutput(creating: staged.url.path, reportedAs: output, capacity: 8 << 20)
        let headerBytes = header.encoded()
        try headerBytes.withUnsafeBytes { try out.append($0) }
        summary.bytesWritten = headerBytes.count
        let zeros = [UInt8](repeating: 0, count: header.alignment)
        let total = order.reduce(0) { $0 + planned[$1].ne.reduce(1, *) }
        var done = 0
        for i in order {
            let t = planned[i]
            let x = try GGUFExport.values(of: t, arch, family, load: load)
            let bytes: [UInt8]
            do { bytes = try GGUFExportEncoding.encode(x, ne: t.ne, convertedAs: t.type, final: finalTypes[i], threads: threads) } catch let e as GGUFExportEncoding.NonFinite {
                throw CheckpointError.invalidTensor(file: file(of: t), tensor: t.source ?? t.name, problem: "\(e)")
            }
            let pad = (header.alignment - bytes.count % header.alignment) % header.alignment
            try bytes.withUnsafeBytes { try out.append($0) }
            try zeros.withUnsafeBytes { try out.append(UnsafeRawBufferPointer(rebasing: $0[0..<pad])) }
            summary.bytesWritten += bytes.count + pad
            done += t.ne.reduce(1, *)
            progress?(done, total, t.source ?? t.name)
        }
        try out.syncAndClose()
        try staged.commit()
    } catch {
        staged.abort()
        throw error
    }
    return summary
}

/// The encoding step of an export: the converter's type, then llama-quantize's where it differs.
public enum GGUFExportEncoding {
    /// A value llama-quantize refuses (it validates every row): the converter's file held it, or
    /// its 16-bit read-back overflowed to it.
    public struct NonFinite: Error, CustomStringConvertible {
        public var index: Int
        public var value: Float
        public var description: String { "element \(index) is \(value) as llama-quantize reads it; llama-quantize refuses non-finite values" }
    }

    /// `x` as the converter stores it (`convertedAs`: F32, F16, BF16 or its Q8_0), then, when
    /// `final` differs, read back as fp32 and quantized to `final` as llama-quantize does (a
    /// non-finite value there is refused: `NonFinite`). Rows are split over `threads` (each row is
    /// quantized on its own, so the bytes do not depend on it).
    public static func encode(_ x: [Float], ne: [Int], convertedAs: GGMLType, final: GGMLType, threads: Int = 1) throws -> [UInt8] {
        var values = x
        if final != convertedAs {
            switch convertedAs {
            case .bf16: values = x.map { HalfPrecision.float(bfloat16Bits: GGMLQuants.bf16Bits($0)) }
            case .f16: values = x.map { HalfPrecision.float(float16Bits: HalfPrecision.float16Bits($0)) }
            default: break  // F32: read back as it is
            }
            if let bad = values.firstIndex(where: { !$0.isFinite }) { throw NonFinite(index: bad, value: values[bad]) }
        }
        let encoding = LlamaQuantize.encoding(final)
        let columns = ne.first ?? 1, rows = values.count / max(columns, 1)
        var out = [UInt8](repeating: 0, count: GGMLQuants.byteCount(values.count, as: encoding))
        let rowBytes = rows > 0 ? out.count / rows : 0
        let chunks = max(1, min(threads, rows / 16))
        values.withUnsafeBufferPointer { v in
            out.withUnsafeMutableBytes { o in
                // Addresses cross into the worker threads as integers; each chunk writes its own rows.
                let (va, oa) = (Int(bitPattern: v.baseAddress), Int(bitPattern: o.baseAddress))
                let run: @Sendable (Int) -> Void = { c in
                    let part = Parallel.range(c, of: chunks, count: rows), (r0, r1) = (part.lowerBound, part.upperBound)
                    GGMLQuants.encode(UnsafeBufferPointer(start: UnsafePointer<Float>(bitPattern: va).map { $0 + r0 * columns }, count: (r1 - r0) * columns),
                                      as: encoding,
                                      into: UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: oa).map { $0 + r0 * rowBytes }, count: (r1 - r0) * rowBytes))
                }
                Parallel.run(parts: chunks, run)
            }
        }
        return out
    }
}
