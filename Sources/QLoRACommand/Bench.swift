import ArgumentParser
import Foundation
import KernelBench

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Time the 4-bit kernels against this machine's memcpy, sgemm and sgemv, in one run.",
        discussion: "Default shapes are real layers (4096x4096, 11008x4096, 4096x11008; tokens 1, 8, 64, 512).")

    @Flag(help: "A seconds-long run: one shape, tokens 1 and 64, fewer repeats.") var quick = false
    @Option(help: "Threads for OpenBLAS and the fused kernel (default: all cores).") var threads: Int?
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
    }

    func run() {
        runReportingErrors {
            var o = quick ? KernelBenchOptions.quick : KernelBenchOptions()
            if let threads { o.threads = threads }
            let line = ProgressLine("bench")
            let r = try KernelBench.run(o) { line.update(done: 0, total: 0, tensor: $0) }
            line.finish()
            if json {
                try printJSON(r)
                return
            }
            print("OpenBLAS core \(r.openblasCore), \(r.threads) thread(s); qlora kernels \(r.kernelLevel); last-level cache \(r.lastLevelCacheBytes >> 20) MiB")
            print("\ndequantize (NF4, cold)   G params/s   vs memcpy of the same output bytes")
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
            print("\nGEMV  1 token (cold)       4-bit ms   sgemv ms   speedup   4-bit G params/s")
            for g in r.gemv {
                print(String(format: "  %5d x %5d           %8.3f   %8.3f     %5.2fx     %6.1f", g.n, g.k, g.seconds * 1e3, g.sgemvSeconds * 1e3, g.speedup, g.paramsPerS / 1e9))
            }
        }
    }
}
