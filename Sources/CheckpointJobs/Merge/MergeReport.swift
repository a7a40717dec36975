import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors

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
