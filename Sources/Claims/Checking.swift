import Foundation
import QLoRA
import Memory

/// One published claim (../shared/claims.md) and the project's check of it.
public struct ClaimCheck: Sendable, Codable {
    public enum Verdict: String, Sendable, Codable {
        case holds
        case off
        case notCheckable = "not checkable here"
    }

    public var id: String
    public var claim: String
    public var source: String
    /// The project's own figure: computed from exact parameter counts and/or measured.
    public var figure: String
    public var verdict: Verdict
    /// "holds", "off by +33%", or why it cannot be checked here, with the reasoning.
    public var detail: String
}

/// One row of the claims table: the claim as ../shared/claims.md words it, and how the
/// project computes its figure and verdict.
public struct Claim: Sendable {
    public let id: String
    /// The claim's text, exactly as in ../shared/claims.md.
    public let claim: String
    /// The articles' short labels, exactly as in ../shared/claims.md.
    public let source: String
    let finding: @Sendable (ClaimContext) throws -> Finding

    init(_ id: String, _ claim: String, _ source: String, finding: @escaping @Sendable (ClaimContext) throws -> Finding) {
        self.id = id
        self.claim = claim
        self.source = source
        self.finding = finding
    }
}

/// A claim's figure and verdict, as a row's computation returns them.
struct Finding {
    var figure: String
    var verdict: ClaimCheck.Verdict
    var detail: String

    init(_ figure: String, _ verdict: ClaimCheck.Verdict, _ detail: String) {
        (self.figure, self.verdict, self.detail) = (figure, verdict, detail)
    }

    init(_ figure: String, _ judged: (ClaimCheck.Verdict, String)) {
        self.init(figure, judged.0, judged.1)
    }
}

/// What several rows share: the measured precision figures and llama-2-7b ("7B") estimates at
/// r=16 on all linear layers, 2048 tokens × batch 1.
struct ClaimContext {
    let precision: PrecisionFigures
    let l7 = ModelArchitecture.preset("llama-2-7b")!
    /// llama-2-7b in 16-bit: 2 B per parameter.
    var fp16Size: Int { 2 * l7.totalParameters }
    /// QLoRA with and without gradient checkpointing.
    let q7: MemoryEstimate, q7noGC: MemoryEstimate
    /// Full fine-tune (mixed precision) and LoRA, with gradient checkpointing.
    let full: MemoryEstimate, lora: MemoryEstimate

    init(precision: PrecisionFigures) throws {
        self.precision = precision
        q7 = try Claims.estimate("llama-2-7b", .qlora)
        q7noGC = try Claims.estimate("llama-2-7b", .qlora, gc: false)
        full = try Claims.estimate("llama-2-7b", .full)
        lora = try Claims.estimate("llama-2-7b", .lora)
    }

    /// Bytes as a multiple of llama-2-7b's 16-bit size.
    func multiple(_ bytes: Int) -> Double { Double(bytes) / Double(fp16Size) }
}

/// Checks every claim of ../shared/claims.md: the rows are data (`table`), this is the checking.
public enum Claims {
    public static let ids = (1...6).map { "Q\($0)" } + (1...30).map { "M\($0)" }

    /// Every row, in the order of ../shared/claims.md.
    public static let table: [Claim] = quantizationClaims + memoryClaims + hardwareClaims

    /// Runs every row's computation.
    /// - Parameters:
    ///   - precision: the measured figures behind Q2, Q4, Q5 and Q6.
    public static func check(precision: PrecisionFigures) throws -> [ClaimCheck] {
        let context = try ClaimContext(precision: precision)
        return try table.map { row in
            let f = try row.finding(context)
            return ClaimCheck(id: row.id, claim: row.claim, source: row.source, figure: f.figure, verdict: f.verdict, detail: f.detail)
        }
    }

    // MARK: Verdicts

    /// Holds when `ours` is within `tolerance` (relative) of `claimed`.
    static func within(_ ours: Double, _ claimed: Double, _ tolerance: Double = 0.15) -> (ClaimCheck.Verdict, String) {
        let off = ours / claimed - 1
        return abs(off) <= tolerance ? (.holds, "holds (\(pct(off)))") : (.off, "off by \(pct(off))")
    }

    /// `ours` lies in [lo, hi], with 5% of slack either side.
    static func inRange(_ ours: Double, _ lo: Double, _ hi: Double) -> Bool { ours >= lo * 0.95 && ours <= hi * 1.05 }

    // MARK: Formatting

    static let gb = 1e9
    static func pct(_ x: Double) -> String { String(format: "%+.0f%%", 100 * x) }

    // MARK: Estimates

    /// Estimate helper: totals in bytes.
    static func estimate(_ model: String, _ method: TrainingMethod, rank: Int = 16, targets: [String] = ModelArchitecture.projectionNames,
                         seq: Int = 2048, batch: Int = 1, gc: Bool = true) throws -> MemoryEstimate {
        try estimate(ModelArchitecture.preset(model)!, method, rank: rank, targets: targets, seq: seq, batch: batch, gc: gc)
    }

    static func estimate(_ model: ModelArchitecture, _ method: TrainingMethod, rank: Int = 16, targets: [String] = ModelArchitecture.projectionNames,
                         seq: Int = 2048, batch: Int = 1, gc: Bool = true) throws -> MemoryEstimate {
        try MemoryEstimate(model: model, options: MemoryOptions(method: method, rank: rank, targets: targets, seqLen: seq, batch: batch,
                                                                gradientCheckpointing: gc))
    }

    static func bytes(_ m: MemoryEstimate, _ names: String...) -> Int { names.reduce(0) { $0 + (m.component($1)?.estimatedBytes ?? 0) } }
    static func withoutActivations(_ m: MemoryEstimate) -> Int { m.totalEstimatedBytes - bytes(m, "activations") }

    /// The longest sequence searched for (tokens).
    static let longestSeqLen = Memory.Fit.longestSeqLen

    /// The options every fit is asked with: r=16 on all linear layers, gradient checkpointing,
    /// batch 1, the LoRA methods with torch's AdamW (`qlora fit`'s defaults).
    static func fitOptions(_ method: TrainingMethod) -> MemoryOptions {
        MemoryOptions(method: method, rank: 16, targets: ModelArchitecture.projectionNames, batch: 1, gradientCheckpointing: true)
    }

    /// The sequence length a fit must reach to count as fitting: the length the other rows use.
    static let fitSeqLen = 2048

    /// A model in an amount of memory: whether it fits `fitSeqLen` tokens, the largest length
    /// that fits (nil: not even one token), and that as text, e.g. "7B llama-2-7b in 24 GB: up to
    /// 9,787 tokens".
    struct Fit {
        var fits: Bool
        var tokens: Int?
        var text: String
    }

    /// Whether a model trains on `gpus` GPUs of `memoryGB` each (GB = 10⁹ B), by the largest
    /// sequence length at batch 1 whose step fits: `Memory.Fit.largestSeqLen`, the one search and
    /// criterion `qlora fit` answers with (several GPUs shard as FSDP's full shard).
    static func fit(_ label: String, _ model: ModelArchitecture, _ method: TrainingMethod, in memory: String, _ memoryGB: Double, gpus: Int = 1,
                    options: MemoryOptions? = nil) throws -> Fit {
        let o = options ?? fitOptions(method)
        let n = try Memory.Fit.largestSeqLen(model, o, memory: Int(memoryGB * gb), gpus: gpus, parallelism: gpus > 1 ? .fsdp : .ddp)
        let head = "\(label) \(model.name) in \(memory)"
        guard let n else { return Fit(fits: false, tokens: nil, text: "\(head): no (\(gigabytes(withoutActivations(try MemoryEstimate(model: model, options: o)))) before activations)") }
        let tokens = n == longestSeqLen ? "over \(n.formatted()) tokens" : "up to \(n.formatted()) tokens"
        return Fit(fits: n >= fitSeqLen, tokens: n, text: "\(head): " + (n >= fitSeqLen ? tokens : "only \(tokens)"))
    }

    /// What every fit states: the setting that decides it.
    static func fitSetting(_ run: String) -> String {
        "\(run), gradient checkpointing, batch 1: the largest sequence length that fits, as `qlora fit` answers it (the step's peak per GPU; \(Stack.default.description)); GB = 10⁹ B"
    }

    /// Fits as one figure and a verdict: holds when every one fits at `fitSeqLen` tokens.
    static func fits(_ rows: [Fit], setting: String) -> Finding {
        let n = rows.filter(\.fits).count
        return Finding(rows.map(\.text).joined(separator: "; ") + " (\(setting))", n == rows.count ? .holds : .off,
                       (n == rows.count ? "holds: " : "off: ") + "\(n) of \(rows.count) fit at \(fitSeqLen) tokens × batch 1 or more")
    }
}
