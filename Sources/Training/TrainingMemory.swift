import CheckpointFormats
import Foundation
import Memory
import QLoRA

/// What a `qlora train` run will allocate, worked out from config.json and the options before
/// anything is allocated, so that a run that cannot fit (`--seq-len 100000000`, `--rank 1000000`)
/// is refused with the bytes it needs instead of aborting in the allocator. A lower bound: it
/// counts the arrays the run certainly holds at once, not allocator overhead or temporaries.
public struct TrainingMemory: Sendable, Equatable {
    /// The loaded model: each projection in NF4 (n/2 bytes) with fp32 block scales (4 bytes per
    /// 64 values), everything else (embeddings, lm_head, norms, biases) as fp32 values; where the
    /// CPU has AVX512-BF16, the frozen lm_head's two bf16 packings for the loss (`HeadLoss`, 4
    /// bytes per weight).
    public var modelBytes: Int
    /// Adapter parameters, their gradients and AdamW's two moments, fp32:
    /// rank × (in + out) × modules × layers × 4 B × 4.
    public var adapterBytes: Int
    /// What one micro-batch keeps for backward: per token and decoder layer what qlora's layer
    /// keeps (`MemoryEstimate.qloraLayerActivationBytesPerToken`: bf16 x, q, k, v, the attention
    /// residual, gate and up, the fp32 adapter inputs and A·x; with gradient checkpointing only
    /// each layer's bf16 input plus one layer); per token the final norm's bf16 input, its fp32
    /// 1/rms and its output's bf16 gradient (4 × hidden + 4); and the head's block (`HeadLoss`):
    /// fp32 logits and their bf16 gradient (6 × vocab) for `headRows(_:tokens:chunked:)` rows.
    public var activationBytes: Int
    /// Tokens per micro-batch (batch × seq-len).
    public var tokens: Int

    public var totalBytes: Int { modelBytes + adapterBytes + activationBytes }

    /// The run's sizes, or nil when some byte count does not fit in `Int` (far beyond any machine).
    /// `rank`: the adapters' rank (the option, or the rank of the adapter a run starts from).
    /// Rows the head's loss runs at once: all the micro-batch's tokens, or with the chunked loss
    /// `HeadLoss.defaultChunkRows`.
    public static func headRows(_ a: ModelArchitecture, tokens: Int, chunked: Bool) -> Int {
        chunked ? min(tokens, HeadLoss.defaultChunkRows(vocab: a.vocabSize)) : tokens
    }

    public static func estimate(_ a: ModelArchitecture, rank: Int, batch: Int, seqLen: Int, checkpointing: Bool,
                                chunkedLoss: Bool = true) -> TrainingMemory? {
        guard a.sizeProblem == nil, rank > 0, rank <= ModelArchitecture.maxDimension else { return nil }
        // With the architecture's sizes bounded (`sizeProblem`), per-parameter and per-token
        // byte counts fit; what scales with the options is multiplied with checks.
        let groups = a.tensorGroups
        let projection = groups.filter { $0.kind == .projection }.reduce(0) { $0 + $1.elements }
        let other = groups.filter { $0.kind != .projection }.reduce(0) { $0 + $1.elements }
        let headPacks = KernelLevel.active == .avx512bf16 ? 4 * a.vocabSize * a.hiddenSize : 0
        let model = projection / 2 + projection / 16 + 4 * other + headPacks
        let modules = a.projections
        let width = modules.reduce(0) { $0 + $1.inFeatures + $1.outFeatures }
        guard let adapters = CheckedSize.product(rank, width, a.layers, 16), let tokens = CheckedSize.product(batch, seqLen) else { return nil }
        let h = a.hiddenSize
        // qlora's own decoder layer, counted in one place (Qwen3's q/k norms included).
        let layer = MemoryEstimate.qloraLayerActivationBytesPerToken(a, MemoryOptions(method: .qlora, rank: rank, targets: ModelArchitecture.projectionNames))
        let kept = checkpointing ? CheckedSize.sum(CheckedSize.product(a.layers, 2 * h) ?? .max, layer) : CheckedSize.product(a.layers, layer)
        guard let kept, let perToken = CheckedSize.sum(kept, 4 * h + 4), let layersAndNorm = CheckedSize.product(tokens, perToken),
              let head = CheckedSize.product(headRows(a, tokens: tokens, chunked: chunkedLoss), 6, a.vocabSize),
              let activations = CheckedSize.sum(layersAndNorm, head), CheckedSize.sum(model, adapters, activations) != nil else { return nil }
        return TrainingMemory(modelBytes: model, adapterBytes: adapters, activationBytes: activations, tokens: tokens)
    }

    /// Memory this process can still allocate without swapping: `MemAvailable` of /proc/meminfo,
    /// or the machine's physical memory where there is no /proc (bytes).
    public static func availableBytes() -> Int {
        MemoryProbe.availableBytes() ?? Int(clamping: ProcessInfo.processInfo.physicalMemory)
    }

    /// Refuses a run that cannot fit in `available` bytes, naming what it would need.
    public static func check(_ a: ModelArchitecture, rank: Int, batch: Int, seqLen: Int, checkpointing: Bool, chunkedLoss: Bool = true,
                             available: Int = availableBytes()) throws {
        let shape = "rank \(rank), batch \(batch) × seq-len \(seqLen)"
        guard let m = estimate(a, rank: rank, batch: batch, seqLen: seqLen, checkpointing: checkpointing, chunkedLoss: chunkedLoss) else {
            throw TrainingError("\(shape): the run would need more bytes than a 64-bit count holds; lower --seq-len, --batch or --rank")
        }
        guard m.totalBytes <= available else {
            throw TrainingError("\(shape): the run would need at least \(gigabytes(m.totalBytes)) (model \(gigabytes(m.modelBytes)), "
                                + "adapters with gradients and AdamW state \(gigabytes(m.adapterBytes)), activations for \(m.tokens) tokens "
                                + "\(gigabytes(m.activationBytes))) but \(gigabytes(available)) is available (MemAvailable); lower --seq-len, --batch or --rank"
                                + (checkpointing ? "" : ", or add --grad-checkpointing"))
        }
    }
}

/// A training run that cannot start: one line.
public struct TrainingError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
