import ArgumentParser
import CheckpointJobs
import FileOutput
import Foundation
import QLoRA
import SafeTensors

struct Merge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Merge PEFT LoRA adapters into a dense or bitsandbytes-4bit base checkpoint.",
        discussion: """
            Numerics as PEFT's merge_and_unload: delta = (B·A)·scaling in fp32 (cast back to a 16-bit \
            adapter's dtype), W += delta with torch's type promotion; DoRA rescales each row of W + delta \
            to its magnitude; modules_to_save and saved embedding layers replace the base's tensors \
            (a resized vocabulary sets vocab_size), trainable-token rows are written in, and tokenizer \
            files in an adapter directory replace the base's. A dense base keeps its dtype. A 4-bit \
            base is dequantized exactly and written as --dtype (default bf16, the "merged_16bit" export), \
            or with --requantize re-quantized to its 4-bit format. ADAPTER is merged first, then each \
            --adapter in order; DIR=WEIGHT scales that adapter's delta. OUTPUT appears only when complete.
            """)

    @Argument(help: "Base: a .safetensors file or a checkpoint directory (dense or bnb-4bit).") var base: String
    @Argument(help: ArgumentHelp("A PEFT adapter directory (adapter_config.json + adapter_model.safetensors), optionally DIR=WEIGHT.", valueName: "adapter"))
    var adapter: String
    @Argument(help: "Output file (for a file BASE) or new directory (for a directory BASE or --max-shard-size).") var output: String
    @Option(name: .customLong("adapter"), help: ArgumentHelp("Another adapter (DIR or DIR=WEIGHT), merged after the ones before it.", valueName: "dir[=weight]"))
    var moreAdapters: [String] = []
    @Option(help: "Output dtype of merged 4-bit weights: bf16, f16 or f32.") var dtype: OutputDType = .bf16
    @Flag(help: "Re-quantize merged 4-bit weights to the base's 4-bit format.") var requantize = false
    @Flag(help: "Per merged tensor: the error writing adds relative to ΔW and to W+ΔW, and how much of ΔW survives; and what each serving format (NF4, Q8_0, Q4_K_M, IQ4_NL) keeps.") var report = false
    @Option(help: ArgumentHelp("With a 4-bit BASE: the 16-bit checkpoint it was quantized from. Reports how far merging into it, into the dequantized base (--dtype) and re-quantizing land from dequant(W4)+ΔW.", valueName: "original-base"))
    var compareOriginal: String?
    @Option(help: ArgumentHelp("Write shards of at most this size with an index, e.g. 5GB, 500MB, 2GiB or bytes.", valueName: "size"))
    var maxShardSize: String?
    @Flag(help: "With --report or --compare-original: print the results as JSON.") var json = false
    @Flag(help: "Replace an existing OUTPUT (never an input), once the new one is complete.") var overwrite = false

    func run() {
        runReportingErrors {
            StagedOutput.installSignalCleanup()
            let o = MergeOptions(dtype: dtype.elementType, requantize: requantize, report: report, compareOriginal: compareOriginal,
                                 maxShardSize: try maxShardSize.map(parseByteSize))
            let adapters = try ([adapter] + moreAdapters).map(parseAdapter)
            let line = ProgressLine("merge")
            let s = try mergeCheckpoint(base: base, adapters: adapters, output: output, options: o, overwrite: overwrite, progress: line.update)
            line.finish()
            if json && (report || compareOriginal != nil) {
                try printJSON(s)
                return
            }
            print("merged \(s.merged) tensors, copied \(s.copied); wrote \(s.bytesWritten) bytes to \(output)")
            for r in s.replaced { print("  \(escapingControlCharacters(r.name)): \(escapingControlCharacters(r.how))") }
            if !s.tokenizerFiles.isEmpty { print("  tokenizer files from the adapter: \(s.tokenizerFiles.joined(separator: ", "))") }
            let width = max(6, s.report.map { escapingControlCharacters($0.name).count }.max() ?? 0,
                            s.comparison.map { escapingControlCharacters($0.name).count }.max() ?? 0)
            func pad(_ t: String) -> String { escapingControlCharacters(t).padding(toLength: width, withPad: " ", startingAt: 0) }
            if report {
                print("\n" + pad("tensor") + "   ‖err‖/‖ΔW‖   ‖err‖/‖W+ΔW‖   cos(applied, ΔW)")
                for r in s.report + [s.total] {
                    print(pad(r.name) + String(format: "   %10.4f   %12.3e   %16.4f", r.errorToDelta, r.errorToWeight, r.deltaCosine))
                }
                if s.serving.isEmpty {
                    print("\n(what each serving format keeps: needs a checkpoint directory whose config.json names a family llama.cpp runs)")
                } else {
                    printServingReport(s.serving, total: s.servingTotal)
                }
            }
            if compareOriginal != nil {
                print("\nDistance from dequant(W4) + ΔW, the weights the adapter was trained against, in units of ‖ΔW‖:")
                print(pad("tensor") + "   original 16-bit   dequantized \(dtype.rawValue)   re-quantized 4-bit   (‖W16 − dequant(W4)‖)")
                for r in s.comparison + [s.comparisonTotal] {
                    print(pad(r.name) + String(format: "   %15.4f   %16.4f   %18.4f   %22.4f", r.original16, r.dequantized16, r.requantized4, r.baseShift))
                }
            }
        }
    }
}

/// DIR or DIR=WEIGHT (a directory whose own name ends in =NUMBER is taken as a whole when it exists).
func parseAdapter(_ spec: String) throws -> MergeAdapter {
    var isDir: ObjCBool = false
    if let eq = spec.lastIndex(of: "="), !(FileManager.default.fileExists(atPath: spec, isDirectory: &isDir) && isDir.boolValue) {
        let w = String(spec[spec.index(after: eq)...])
        guard let weight = Double(w), weight.isFinite else {
            throw ValidationError("adapter '\(spec)': the weight after '=' must be a number")
        }
        return MergeAdapter(String(spec[..<eq]), weight: weight)
    }
    return MergeAdapter(spec)
}

/// "5GB" (10^9), "500MB", "2GiB" (2^30), "64KiB", or a plain byte count.
func parseByteSize(_ text: String) throws -> Int {
    let units: [(String, Int)] = [("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30), ("TIB", 1 << 40),
                                  ("KB", 1_000), ("MB", 1_000_000), ("GB", 1_000_000_000), ("TB", 1_000_000_000_000), ("B", 1)]
    let t = text.trimmingCharacters(in: .whitespaces).uppercased()
    for (suffix, factor) in units where t.hasSuffix(suffix) {
        if let v = Double(t.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)), v > 0, v * Double(factor) < 9e18 {
            return Int(v * Double(factor))
        }
    }
    if let v = Int(t), v > 0 { return v }
    throw ValidationError("size '\(text)' is not a positive size such as 5GB, 500MB, 2GiB or a byte count")
}
