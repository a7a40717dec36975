import CheckpointFormats
import FileOutput
import Foundation
import GGUF
import QLoRA
import SafeTensors

/// Where each merged weight goes on llama.cpp's serving path: the converter's type under
/// `--outtype auto`, and llama-quantize's type per mixture (for the report's columns).
struct ServingPlan {
    var convertedAs: [String: GGMLType] = [:]
    var types: [String: [LlamaQuantizeMixture: GGMLType]] = [:]

    /// The dense checkpoint that merge + dequantize would write: each 4-bit weight once, as its
    /// recorded dtype or (merged) as `mergedDType`, its constants dropped.
    static func denseTensors(_ reader: CheckpointReader, _ plan: MergePlan, mergedDType: ElementType) throws -> [GGUFExport.DenseTensor] {
        var companions = Set<String>()
        for g in plan.groups.values { for m in g.members where m != g.name { companions.insert(m) } }
        var dense: [GGUFExport.DenseTensor] = []
        for e in reader.entries where !companions.contains(e.name) {
            let file = reader.filePath(of: e.name)
            if let g = plan.groups[e.name] {
                let state = try BnB4BitFormat.state(of: g, from: reader)
                for m in g.members { reader.releasePages(of: m) }  // read again, one at a time, when written
                dense.append(.init(name: e.name, shard: e.shardIndex, shape: state.shape, dtype: plan.weights[e.name] != nil ? mergedDType : state.dtype, file: file))
            } else {
                guard let t = ElementType(e.info.dtype) else {
                    throw CheckpointError.invalidTensor(file: file, tensor: e.name, problem: "dtype \(e.info.dtype) is not a float type")
                }
                dense.append(.init(name: e.name, shard: e.shardIndex, shape: e.info.shape, dtype: t, file: file))
            }
        }
        return dense
    }

    init(dense: [GGUFExport.DenseTensor], _ a: ModelArchitecture, _ family: GGUFArchitecture) throws {
        let planned = try GGUFExport.plan(dense, a, family, outType: GGUFExport.autoOutType(dense))
        let sorted = LlamaQuantize.loaderOrder(planned.map(\.name))
        for t in planned { for hf in t.members { convertedAs[hf] = t.type } }
        for mixture in LlamaQuantizeMixture.allCases {
            let types = LlamaQuantize.types(names: sorted.map { planned[$0].name }, ne: sorted.map { planned[$0].ne }, current: sorted.map { planned[$0].type },
                                            mixture: mixture, model: .init(a))
            for (k, i) in sorted.enumerated() { for hf in planned[i].members { self.types[hf, default: [:]][mixture] = types[k] } }
        }
    }

    /// The plan for a merge's base when it is a checkpoint directory of a family llama.cpp runs
    /// (its config.json says which) and the converter would take every tensor; nil otherwise: the
    /// serving columns are an extra, and never stop a merge.
    static func forMerge(_ reader: CheckpointReader, _ plan: MergePlan, mergedDType: ElementType) -> ServingPlan? {
        guard StagedOutput.isDirectory(reader.path), let checkpoint = try? GGUFArchitecture.load(config: reader.directory + "/config.json") else { return nil }
        return try? ServingPlan(dense: denseTensors(reader, plan, mergedDType: mergedDType), checkpoint.arch, checkpoint.family)
    }
}

/// The formats a merged fine-tune is served in, side by side in `qlora export --report`.
public enum ServingFormat: String, CaseIterable, Sendable, Codable {
    /// The merged checkpoint as the export reads it ("merged_16bit": bf16 unless the base is f16
    /// or f32, or --merged-dtype says otherwise).
    case merged
    /// bitsandbytes NF4 with double quantization, blocksize 64 (PEFT's merge into a 4-bit model).
    case nf4
    /// llama.cpp's mixtures: the merged checkpoint (as the export stores it), converted with
    /// `--outtype auto`, then quantized to the type llama-quantize picks for that tensor.
    case q8_0, q4_k_m, iq4_nl

    var mixture: LlamaQuantizeMixture? {
        switch self {
        case .q8_0: return .q8_0
        case .q4_k_m: return .q4_k_m
        case .iq4_nl: return .iq4_nl
        default: return nil
        }
    }
}

/// What survives serving, for one merged weight or pooled over all of them: per format, with
/// W the base (as stored; dequantized for a 4-bit base), ΔW the adapters' fp32 delta, S = W+ΔW in
/// fp32 and Q(S) what the format holds (dequantized back to fp32):
/// - errorToDelta: ‖Q(S) − S‖ / ‖ΔW‖, the serving error in units of the fine-tune's change;
/// - deltaCosine: cos(Q(S) − W, ΔW), how much of the delta's direction the served weight applies.
public struct ServingReportRow: Sendable, Codable, PooledSums {
    public var name: String
    /// llama.cpp's type of this tensor per mixture (e.g. q4_k_m: "Q6_K"); empty for the total.
    public var ggmlTypes: [String: String] = [:]
    public var errorToDelta: [String: Double] = [:]
    public var deltaCosine: [String: Double] = [:]
    /// Per format, in `ServingFormat.allCases` order: [Σerr², ΣΔW², ΣS², Σapplied·ΔW, Σapplied²].
    var sums = [Double](repeating: 0, count: 5 * ServingFormat.allCases.count)

    init(name: String) { self.name = name }

    mutating func finish() {
        for (k, f) in ServingFormat.allCases.enumerated() {
            let (errSq, deltaSq, _, dot, appliedSq) = (sums[5 * k], sums[5 * k + 1], sums[5 * k + 2], sums[5 * k + 3], sums[5 * k + 4])
            errorToDelta[f.rawValue] = deltaSq > 0 ? (errSq / deltaSq).squareRoot() : 0
            deltaCosine[f.rawValue] = deltaSq > 0 && appliedSq > 0 ? dot / (deltaSq * appliedSq).squareRoot() : 0
        }
    }

    enum CodingKeys: String, CodingKey { case name, ggmlTypes, errorToDelta, deltaCosine }

    /// `x` rounded to a dtype's precision (nearest even), as fp32.
    static func rounded(_ x: Float, to t: ElementType) -> Float {
        switch t {
        case .float32: return x
        case .bfloat16: return HalfPrecision.roundedToBFloat16(x)
        case .float16: return HalfPrecision.float(float16Bits: HalfPrecision.float16Bits(x))
        }
    }

    /// The row of one weight [rows, columns] (row-major): `base` W and `delta` ΔW in fp32,
    /// `merged` the merged checkpoint's values (W+ΔW as PEFT's merge stores it); `convertedAs` the
    /// converter's type, `types` llama-quantize's type for it per mixture.
    static func of(name: String, base: [Float], delta: [Float], merged: [Float], rows: Int, columns: Int,
                   convertedAs: GGMLType, types: [LlamaQuantizeMixture: GGMLType], threads: Int) throws -> ServingReportRow {
        let n = base.count
        precondition(delta.count == n && rows * columns == n, "serving report: sizes differ")
        var sum = [Float](repeating: 0, count: n)
        for i in 0..<n { sum[i] = base[i] + delta[i] }
        var row = ServingReportRow(name: name)
        for (k, format) in ServingFormat.allCases.enumerated() {
            let served: [Float]
            switch format {
            case .merged:
                served = merged
            case .nf4:
                served = try sum.withUnsafeBytes { raw in
                    let q = try quantize4Bit(FloatElements.view(raw, as: .float32), shape: [rows, columns], quantType: .nf4, blocksize: 64, doubleQuant: true)
                    return q.dequantizedBytes(as: .float32).withUnsafeBytes { loadFloats($0, as: .float32) }
                }
            case .q8_0, .q4_k_m, .iq4_nl:
                let mixture = format.mixture!, type = types[mixture]!
                row.ggmlTypes[format.rawValue] = type.description
                let bytes = try GGUFExportEncoding.encode(merged, ne: [columns, rows], convertedAs: convertedAs, final: type, threads: threads)
                served = bytes.withUnsafeBytes { GGMLQuants.decode($0, as: LlamaQuantize.encoding(type), count: n) }
            }
            // The merge report's sums (its C kernel): s = fl(base + delta) as above.
            let s = base.withUnsafeBytes { b in delta.withUnsafeBufferPointer { d in served.withUnsafeBytes {
                LoRAMerge.reportSums(base: b, baseType: .float32, delta: d, written: $0, writtenType: .float32) } } }
            for j in 0..<5 { row.sums[5 * k + j] = s[j] }
        }
        row.finish()
        return row
    }
}
