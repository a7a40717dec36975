import ArgumentParser
import Checkpoint
import Foundation
import QLoRA

struct Merge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Merge a PEFT LoRA adapter into a dense or bitsandbytes-4bit base checkpoint.",
        discussion: """
            Numerics as PEFT's merge_and_unload: delta = (B·A)·scaling in fp32 (cast back to a 16-bit \
            adapter's dtype), W += delta with torch's type promotion. A dense base keeps its dtype. A 4-bit \
            base is dequantized exactly and written as --dtype (default bf16, the "merged_16bit" export), \
            or with --requantize re-quantized to its 4-bit format. OUTPUT appears only when complete.
            """)

    enum DType: String, ExpressibleByArgument, CaseIterable {
        case bf16, f16, f32
        var elementType: ElementType { self == .f32 ? .float32 : self == .bf16 ? .bfloat16 : .float16 }
    }

    @Argument(help: "Base: a .safetensors file or a checkpoint directory (dense or bnb-4bit).") var base: String
    @Argument(help: "A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).") var adapter: String
    @Argument(help: "Output file (for a file BASE) or new directory (for a directory BASE).") var output: String
    @Option(help: "Output dtype of merged 4-bit weights: bf16, f16 or f32.") var dtype: DType = .bf16
    @Flag(help: "Re-quantize merged 4-bit weights to the base's 4-bit format.") var requantize = false
    @Flag(help: "Per merged tensor: the error writing adds relative to ΔW and to W+ΔW, and how much of ΔW survives.") var report = false
    @Flag(help: "With --report: print the report as JSON.") var json = false

    func run() {
        runReportingErrors {
            var o = MergeOptions()
            o.dtype = dtype.elementType
            o.requantize = requantize
            o.report = report
            let line = ProgressLine("merge")
            let s = try mergeCheckpoint(base: base, adapter: adapter, output: output, options: o, progress: line.update)
            line.finish()
            if report && json {
                let enc = JSONEncoder()
                enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                enc.keyEncodingStrategy = .convertToSnakeCase
                print(String(decoding: try enc.encode(s), as: UTF8.self))
                return
            }
            print("merged \(s.merged) tensors, copied \(s.copied); wrote \(s.bytesWritten) bytes to \(output)")
            if report {
                let width = max(6, s.report.map(\.name.count).max() ?? 0)
                print("\n" + "tensor".padding(toLength: width, withPad: " ", startingAt: 0) + "   ‖err‖/‖ΔW‖   ‖err‖/‖W+ΔW‖   cos(applied, ΔW)")
                for r in s.report + [s.total] {
                    print(r.name.padding(toLength: width, withPad: " ", startingAt: 0) + String(format: "   %10.4f   %12.3e   %16.4f", r.errorToDelta, r.errorToWeight, r.deltaCosine))
                }
            }
        }
    }
}
