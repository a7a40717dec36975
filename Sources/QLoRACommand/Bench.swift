import ArgumentParser
import Foundation
import KernelBench
import Memory
import QLoRA

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Time the 4-bit kernels against this machine's memcpy, sgemm and sgemv, in one run.",
        discussion: """
            Default shapes are real layers (4096x4096, 11008x4096, 4096x11008; tokens 1, 8, 64, 512), and a training \
            step of one llama-2-7b layer at 512 and 2048 tokens against its compute-bound limits (its FLOPs at the \
            fastest sgemm and 4-bit bf16 GEMM rates of the same run).
            """)

    @Flag(help: "A seconds-long run: one shape, tokens 1, 64 and 512, fewer repeats, a 128-token training step.") var quick = false
    @Option(help: "Threads for OpenBLAS and the fused kernel (default: all cores).") var threads: Int?
    @Option(name: .customLong("shape"), help: ArgumentHelp("A weight shape OUTxIN (repeatable), e.g. 14336x4096.", valueName: "OUTxIN"))
    var shapes: [String] = []
    @Option(help: ArgumentHelp("Token counts for the GEMV/GEMM rows, e.g. 1,512.", valueName: "list")) var tokens: String?
    @Option(help: ArgumentHelp("Token counts of the training-step row, or none.", valueName: "list")) var stepTokens: String?
    @Option(help: "The training-step rows' model preset (one decoder layer of it, and the whole-model row's shapes and vocabulary).") var stepModel: String?
    @Option(help: "Decoder layers of the whole-model training-step row (the preset's real vocabulary and head), 0 for none (default 2; 1 with --quick).")
    var stepLayers: Int?
    @Flag(help: "Weights cold (cycled through copies exceeding twice the last-level cache; the default) or warm (one copy).")
    var weights: Temperature = .cold
    @Flag(help: "Print JSON.") var json = false

    enum Temperature: String, EnumerableFlag { case cold, warm }

    /// Bounds on what the bench allocates from its options: activations of tokens × width and
    /// dense fp32 copies of each weight.
    static let maxTokens = 8192, maxParameters = 1 << 28
    /// The whole-model row holds every layer's NF4 weights and adapters: up to a small model's depth.
    static let maxStepLayers = 32

    static func counts(_ text: String, _ flag: String) throws -> [Int] {
        if text == "none" { return [] }
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !parts.isEmpty, parts.allSatisfy({ ($0 ?? 0) > 0 && $0! <= maxTokens }) else {
            throw ValidationError("\(flag) takes positive token counts up to \(maxTokens) separated by commas, such as 1,512 (got '\(text)')")
        }
        return parts.map { $0! }
    }

    static func shape(_ text: String) throws -> (out: Int, in: Int) {
        let parts = text.lowercased().split(separator: "x").map { Int($0) }
        guard parts.count == 2, let out = parts[0], let inF = parts[1], out > 0, inF > 0, out <= 1 << 17, inF <= 1 << 17, inF % 64 == 0,
              out * inF <= maxParameters else {
            throw ValidationError("--shape takes OUTxIN with both sides positive, at most 131072, IN a multiple of 64 and OUT·IN at most 2^28 (a 1 GiB fp32 weight: the bench holds dense copies of it), such as 14336x4096 (got '\(text)')")
        }
        return (out, inF)
    }

    func validate() throws {
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        for s in shapes { _ = try Self.shape(s) }
        if let tokens { _ = try Self.counts(tokens, "--tokens") }
        if let stepTokens { _ = try Self.counts(stepTokens, "--step-tokens") }
        if let stepLayers, !(0...Self.maxStepLayers).contains(stepLayers) { throw ValidationError("--step-layers takes 0 to \(Self.maxStepLayers), got \(stepLayers)") }
        if let stepModel, ModelArchitecture.preset(stepModel) == nil {
            throw ValidationError("unknown --step-model '\(stepModel)'; presets are \(ModelArchitecture.presets.map(\.name).joined(separator: ", "))")
        }
    }

    func run() {
        runReportingErrors {
            var o = quick ? KernelBenchOptions.quick : KernelBenchOptions()
            if let threads { o.threads = threads }
            if !shapes.isEmpty { o.shapes = try shapes.map(Self.shape) }
            if let tokens { o.tokens = try Self.counts(tokens, "--tokens") }
            if let stepTokens { o.stepTokens = try Self.counts(stepTokens, "--step-tokens") }
            if let stepModel { o.stepModel = ModelArchitecture.preset(stepModel)! }
            if let stepLayers { o.stepLayers = stepLayers }
            o.cold = weights == .cold
            HeapReuse.keepFreedMemory()  // as qlora train runs: a step reuses the last one's buffers
            let line = ProgressLine("bench")
            let r = try KernelBench.run(o) { line.update(done: 0, total: 0, tensor: $0) }
            line.finish()
            if json {
                try printJSON(r)
                return
            }
            print("OpenBLAS core \(r.openblasCore), \(r.threads) thread(s); qlora kernels \(r.kernelLevel); last-level cache \(r.lastLevelCacheBytes >> 20) MiB")
            print("\ndequantize (NF4, \(r.cold ? "cold" : "warm"))   G params/s   vs memcpy of the same output bytes")
            for d in r.dequant {
                print(String(format: "  %5dx%-5d -> %-8@  %8.2f     %.2fx", d.out, d.in, d.dtype, d.paramsPerS / 1e9, d.ratioToMemcpy))
            }
            print("\nGEMM  y = x·Wᵀ            4-bit ms   sgemm ms   4-bit/sgemm   4-bit GFLOP/s")
            for g in r.gemm {
                print(String(format: "  %4d x %5d x %5d %-10@ %8.2f   %8.2f      %5.2f        %6.1f", g.m, g.n, g.k, g.path, g.seconds * 1e3, g.sgemmSeconds * 1e3, g.ratio, g.gflops))
            }
            print("\nLoRA training step (fwd + bwd + AdamW)   step ms   base fwd+bwd ms   step/base")
            for l in r.loraStep {
                print(String(format: "  %4d tokens, %5dx%-5d r=%-3d        %8.2f     %8.2f          %5.2f", l.tokens, l.out, l.in, l.rank, l.seconds * 1e3, l.baseSeconds * 1e3, l.ratio))
            }
            if !r.trainStep.isEmpty {
                print("\nQLoRA training step, one decoder layer and a whole model with its vocabulary (fwd + bwd + AdamW, r=16 on all seven projections)")
                print("  model                       tokens     GFLOP   tokens/s   sgemm-bound   bf16-bound   of bf16-bound")
                for t in r.trainStep {
                    func f(_ v: Double?) -> String { v.map { String(format: "%.0f", $0) } ?? "-" }
                    let share = t.bf16BoundTokensPerS.map { String(format: "%.2f", t.tokensPerS / $0) } ?? "-"
                    print("  " + t.model.padding(toLength: 26, withPad: " ", startingAt: 0)
                          + String(format: " %6d  %8.1f   %8.0f", t.tokens, t.flops / 1e9, t.tokensPerS)
                          + "   " + f(t.sgemmBoundTokensPerS).leftPadded(11) + "   " + f(t.bf16BoundTokensPerS).leftPadded(10) + "   " + share.leftPadded(13))
                }
                print("  bounds: the step's FLOPs at the fastest sgemm / 4-bit bf16 GEMM rate measured above")
            }
            print("\nGEMV  1 token (\(r.cold ? "cold" : "warm"))       4-bit ms   sgemv ms   speedup   4-bit G params/s")
            for g in r.gemv {
                print(String(format: "  %5d x %5d           %8.3f   %8.3f     %5.2fx     %6.1f", g.n, g.k, g.seconds * 1e3, g.sgemvSeconds * 1e3, g.speedup, g.paramsPerS / 1e9))
            }
        }
    }
}

extension String {
    func leftPadded(_ width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}
