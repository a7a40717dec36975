import Foundation
import QLoRA
import SafeTensors

/// Precision measurements behind claims Q2, Q4 and Q6.
public struct PrecisionFigures: Sendable, Codable {
    /// Relative L2 error, blocksize 64, no double quant, on N(0, 1) samples and on real trained weights.
    public var nf4Normal = 0.0, fp4Normal = 0.0, int4Normal = 0.0
    public var nf4Real: Double?, fp4Real: Double?, int4Real: Double?
    public var realWeights: String?
    /// Bits per parameter of data + constants, measured from quantized bytes (4096×4096 weight).
    public var bitsNoDoubleQuant = 0.0, bitsDoubleQuant = 0.0
    /// A rank-16 merge into a 4-bit base, re-quantized: error / ‖ΔW‖ and cos(applied, ΔW).
    public var requantErrorToDelta = 0.0, requantCosine = 0.0
    /// bf16 rounding of dequantized weights, relative L2 (what the on-the-fly matmul computes with).
    public var bf16DequantError = 0.0
}

/// Int4 absmax quantization at the same blocksize (15 levels, round to nearest), dequantized.
public func int4AbsmaxRoundTrip(_ x: [Float], blocksize: Int) -> [Float] {
    var out = [Float](repeating: 0, count: x.count)
    var start = 0
    while start < x.count {
        let end = min(x.count, start + blocksize)
        let absmax = x[start..<end].reduce(Float(0)) { max($0, abs($1)) }
        if absmax > 0 {
            for i in start..<end { out[i] = (x[i] / absmax * 7).rounded() / 7 * absmax }
        }
        start = end
    }
    return out
}

func relativeL2(_ a: [Float], _ b: [Float]) -> Double {
    var e = 0.0, n = 0.0
    for i in a.indices { let d = Double(a[i]) - Double(b[i]); e += d * d; n += Double(a[i]) * Double(a[i]) }
    return n > 0 ? (e / n).squareRoot() : 0
}

extension PrecisionFigures {
    /// Measures every figure. `realWeights`: trained fp32 tensors (e.g. the committed MiniLM slice).
    public static func measure(realWeights: (label: String, values: [Float])?) throws -> PrecisionFigures {
        var f = PrecisionFigures()
        var rng = SplitMix64(seed: 2026)
        let normal = (0..<(1 << 20)).map { _ in rng.normal() }
        func errors(_ x: [Float]) throws -> (Double, Double, Double) {
            func roundTrip(_ t: QuantType) throws -> [Float] {
                try x.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [x.count], quantType: t, blocksize: 64, doubleQuant: false) }.dequantizedFloat32()
            }
            return (relativeL2(x, try roundTrip(.nf4)), relativeL2(x, try roundTrip(.fp4)), relativeL2(x, int4AbsmaxRoundTrip(x, blocksize: 64)))
        }
        (f.nf4Normal, f.fp4Normal, f.int4Normal) = try errors(normal)
        if let r = realWeights {
            let e = try errors(r.values)
            (f.nf4Real, f.fp4Real, f.int4Real) = (e.0, e.1, e.2)
            f.realWeights = r.label
        }

        // Bits per parameter from real quantized bytes.
        let n = 4096 * 4096
        let w = (0..<n).map { _ in rng.normal() * 0.02 }
        func bits(_ dq: Bool) throws -> (Double, Quantized4Bit) {
            let q = try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [4096, 4096], doubleQuant: dq) }
            var bytes = q.packed.count
            switch q.state.absmax {
            case .nested(let nested): bytes += nested.quantized.count + 4 * nested.absmax.count + 4 * 256  // + nested code table
            case .plain(let a): bytes += 4 * a.count
            }
            bytes += 4 * 16  // code table
            return (8 * Double(bytes) / Double(n), q)
        }
        let (b0, _) = try bits(false)
        let (b1, q) = try bits(true)
        (f.bitsNoDoubleQuant, f.bitsDoubleQuant) = (b0, b1)

        let deq = q.dequantizedFloat32()
        f.bf16DequantError = relativeL2(deq, deq.map { HalfPrecision.roundedToBFloat16($0) })

        // A merge into the 4-bit base, re-quantized (1024×1024 slice of it, rank 16, alpha 32;
        // B ~ N(0, 0.01²) as after some training, so ΔW is a few percent of W).
        let (out, k, r) = (1024, 1024, 16)
        let base = Array(deq[0..<(out * k)])
        let a = (0..<(r * k)).map { _ in Float((rng.unit() * 2 - 1) / Double(k).squareRoot()) }
        let b = (0..<(out * r)).map { _ in rng.normal() * 0.01 }
        let delta = LoRAMerge.delta(loraA: a, loraB: b, rank: r, inFeatures: k, outFeatures: out, scaling: 2)
        let sum = zip(base, delta).map { $0 + $1 }
        let requant = try sum.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [out, k]) }.dequantizedFloat32()
        var e2 = 0.0, d2 = 0.0, dot = 0.0, a2 = 0.0
        for i in sum.indices {
            let e = Double(requant[i]) - Double(sum[i]), ap = Double(requant[i]) - Double(base[i]), d = Double(delta[i])
            e2 += e * e; d2 += d * d; dot += ap * d; a2 += ap * ap
        }
        f.requantErrorToDelta = (e2 / d2).squareRoot()
        f.requantCosine = dot / (d2 * a2).squareRoot()
        return f
    }
}

extension PrecisionFigures {
    /// Every fp32 tensor of a safetensors file, as the real trained weights of Q4 (e.g. the
    /// committed slice of all-MiniLM-L6-v2, Data/all-MiniLM-L6-v2/slice.safetensors). The
    /// library does not look for the file; the caller passes its path.
    /// - Parameters:
    ///   - path: the .safetensors file, or nil for no real weights (returns nil).
    public static func loadRealWeights(path: String?) throws -> (label: String, values: [Float])? {
        guard let path else { return nil }
        let f = try SafeTensorsFile(path: path)
        var values: [Float] = []
        for t in f.tensors where t.dtype == .f32 {
            f.withBytes(of: t.name) { raw in values += (0..<(raw.count / 4)).map { raw.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self) } }
        }
        return ("\(values.count.formatted()) trained weights of all-MiniLM-L6-v2", values)
    }
}
