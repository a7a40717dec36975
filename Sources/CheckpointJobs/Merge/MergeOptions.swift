import CheckpointFormats
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

    public init(dtype: ElementType = .bfloat16, requantize: Bool = false, report: Bool = false, compareOriginal: String? = nil,
                maxShardSize: Int? = nil, threads: Int = ProcessInfo.processInfo.activeProcessorCount) {
        (self.dtype, self.requantize, self.report, self.compareOriginal, self.maxShardSize, self.threads) = (dtype, requantize, report, compareOriginal, maxShardSize, threads)
    }
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
    /// Tensors an adapter replaced whole or wrote token rows into, in the order written.
    public var replaced: [Replacement] = []
    /// Tokenizer files taken from the adapter directories.
    public var tokenizerFiles: [String] = []

    public struct Replacement: Sendable, Codable {
        public var name: String
        public var how: String
    }
    public var bytesWritten = 0
    /// With `MergeOptions.report`: one row per merged tensor, and their pooled total (norms in Float64).
    public var report: [MergeReportRow] = []
    public var total = MergeReportRow(name: "total")
    /// With `MergeOptions.compareOriginal`: one row per merged tensor, and their pooled total.
    public var comparison: [MergeComparisonRow] = []
    public var comparisonTotal = MergeComparisonRow(name: "total")
    /// With `MergeOptions.report` and a base llama.cpp runs (a checkpoint directory whose
    /// config.json names a family): what each serving format keeps, per merged weight, and in total.
    public var serving: [ServingReportRow] = []
    public var servingTotal = ServingReportRow(name: "total")
}
