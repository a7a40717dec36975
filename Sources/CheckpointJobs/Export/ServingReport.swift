import CheckpointFormats
import Foundation
import GGUF
import QLoRA

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

    /// The row of one weight [rows, columns] (row-major): `base` W and `delta` ΔW in fp32,
    /// `merged` the merged checkpoint's values (W+ΔW as PEFT's merge stores it); `convertedAs` the
    /// converter's type, `types` llama-quantize's type for it per mixture.
    static func of(name: String, base: [Float], delta: UnsafeBufferPointer<Float>, merged: [Float], rows: Int, columns: Int,
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
                let bytes = GGUFExportEncoding.encode(merged, ne: [columns, rows], convertedAs: convertedAs, final: type, threads: threads)
                served = bytes.withUnsafeBytes { GGMLQuants.decode($0, as: LlamaQuantize.encoding(type), count: n) }
            }
            var s = [Double](repeating: 0, count: 5)
            for i in 0..<n {
                let err = Double(served[i]) - Double(sum[i]), d = Double(delta[i]), applied = Double(served[i]) - Double(base[i])
                s[0] += err * err
                s[1] += d * d
                s[2] += Double(sum[i]) * Double(sum[i])
                s[3] += applied * d
                s[4] += applied * applied
            }
            for j in 0..<5 { row.sums[5 * k + j] = s[j] }
        }
        row.finish()
        return row
    }
}
