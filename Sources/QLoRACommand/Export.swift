import ArgumentParser
import CheckpointJobs
import FileOutput
import Foundation
import QLoRA
import SafeTensors

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a Llama, Mistral, Qwen2, Qwen3, Phi-3, Qwen3-MoE, Mixtral or gpt-oss checkpoint (dense or bitsandbytes 4-bit, adapters merged) as llama.cpp's GGUF.",
        discussion: """
            The bytes llama.cpp's own tools write: f32, f16 and bf16 as convert_hf_to_gguf.py --outtype; \
            q8_0, q4_0, q4_k_m and iq4_nl as convert_hf_to_gguf.py --outtype auto followed by llama-quantize \
            with that type (its per-tensor choices included). A 4-bit BASE is dequantized exactly (llama.cpp's \
            converter cannot read it); each --adapter is merged with PEFT's numerics as qlora merge does, in \
            order. BASE must hold config.json and a tokenizer (SentencePiece tokenizer.model or a BPE tokenizer.json). Streamed tensor by tensor; \
            OUTPUT appears only when complete.
            """)

    @Argument(help: ArgumentHelp("Base checkpoint directory (config.json, tokenizer.model or tokenizer.json, dense or bnb-4bit safetensors); with --lora-only, the PEFT adapter directory.",
                                 valueName: "base-or-adapter"))
    var input: String
    @Argument(help: "The GGUF file to write.") var output: String
    @Option(help: "f32, f16, bf16, q8_0, q4_0, q4_k_m or iq4_nl (with --lora-only: f32, f16, bf16 or q8_0; default f32).") var type: GGUFExportType?
    @Flag(help: "Write the adapter alone as llama.cpp's LoRA GGUF (llama-cli --lora), as convert_lora_to_gguf.py does; needs --base.")
    var loraOnly = false
    @Option(help: ArgumentHelp("With --lora-only: the base checkpoint directory (only its config.json is read).", valueName: "dir")) var base: String?
    @Option(name: .customLong("adapter"), help: ArgumentHelp("A PEFT adapter to merge first (DIR or DIR=WEIGHT); repeat for more, merged in order.", valueName: "dir[=weight]"))
    var adapters: [String] = []
    @Option(help: "The dtype merged 4-bit weights take before conversion (as qlora merge --dtype): bf16, f16 or f32.") var mergedDtype: OutputDType = .bf16
    @Flag(help: "Per merged weight and in total: what each serving format (the merged checkpoint, NF4, Q8_0, Q4_K_M, IQ4_NL) keeps of the fine-tune.")
    var report = false
    @Flag(help: "Print the summary as JSON.") var json = false
    @Flag(help: "Replace an existing OUTPUT (never an input), once the new one is complete.") var overwrite = false

    func validate() throws {
        if loraOnly {
            guard let base, !base.isEmpty else { throw ValidationError("--lora-only needs --base DIR (the base checkpoint's config.json)") }
            guard adapters.isEmpty, !report else { throw ValidationError("--lora-only writes one adapter as it is: --adapter and --report do not apply") }
            guard (type ?? .f32).convertType != nil || type == .q8_0 else { throw ValidationError("--lora-only writes f32, f16, bf16 or q8_0") }
        } else {
            guard type != nil else { throw ValidationError("Missing expected argument '--type <type>'") }
            guard base == nil else { throw ValidationError("--base is for --lora-only; the base is the first argument") }
        }
    }

    func run() {
        runReportingErrors {
            StagedOutput.installSignalCleanup()
            if loraOnly {
                let outType: GGUFOutType = type.flatMap { $0.convertType } ?? (type == .q8_0 ? .q8_0 : .f32)
                let s = try exportLoRAGGUF(adapter: input, base: base!, output: output, type: outType, overwrite: overwrite)
                for w in s.warnings { FileHandle.standardError.write(Data("qlora: warning: \(escapingControlCharacters(w))\n".utf8)) }
                if json { try printJSON(s); return }
                print("exported \(s.modules) LoRA modules as convert_lora_to_gguf.py --outtype \(outType.rawValue); wrote \(s.bytesWritten) bytes to \(output)")
                return
            }
            let type = type!
            let base = input
            let specs = try adapters.map(parseAdapter)
            let line = ProgressLine("export")
            let s = try exportGGUF(base: base, adapters: specs, output: output, type: type, mergedDType: mergedDtype.elementType, report: report, overwrite: overwrite, progress: line.update)
            line.finish()
            for w in s.warnings { FileHandle.standardError.write(Data("qlora: warning: \(escapingControlCharacters(w))\n".utf8)) }
            if json {
                try printJSON(s)
                return
            }
            let how = type.convertType != nil ? "convert_hf_to_gguf.py --outtype \(type.rawValue)"
                : "convert_hf_to_gguf.py --outtype auto (\(s.convertedAs)), then llama-quantize \(type.mixture!.rawValue)"
            let types = s.typeCounts.sorted { $0.value > $1.value || ($0.value == $1.value && $0.key < $1.key) }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
            print("exported \(s.tensors) tensors (\(types)) as \(how); merged \(s.merged), dequantized \(s.dequantized) 4-bit; wrote \(s.bytesWritten) bytes to \(output)")
            if report { printServingReport(s.serving, total: s.servingTotal) }
        }
    }
}

extension GGUFExportType: ExpressibleByArgument {}

/// The serving-format table: per merged weight and in total, ‖Q(W+ΔW) − (W+ΔW)‖/‖ΔW‖ and
/// cos(Q(W+ΔW) − W, ΔW) for each format (llama.cpp's type of the tensor beside its mixture).
func printServingReport(_ rows: [ServingReportRow], total: ServingReportRow) {
    guard !rows.isEmpty else {
        print("\nno adapter was merged: nothing to report on what serving keeps of a fine-tune")
        return
    }
    let formats = ServingFormat.allCases
    let width = max(6, rows.map { escapingControlCharacters($0.name).count }.max() ?? 0)
    func pad(_ t: String, _ w: Int) -> String { t.padding(toLength: w, withPad: " ", startingAt: 0) }
    print("\nWhat each serving format keeps of the fine-tune: ‖Q(W+ΔW) − (W+ΔW)‖/‖ΔW‖ and cos(Q(W+ΔW) − W, ΔW)")
    print(pad("tensor", width) + formats.map { "   " + pad($0.rawValue, 22) }.joined())
    for r in rows + [total] {
        let cells = formats.map { f -> String in
            let type = r.ggmlTypes[f.rawValue].map { " \($0)" } ?? ""
            return "   " + pad(String(format: "%7.4f %7.4f", r.errorToDelta[f.rawValue] ?? 0, r.deltaCosine[f.rawValue] ?? 0) + type, 22)
        }
        print(pad(escapingControlCharacters(r.name), width) + cells.joined())
    }
}
