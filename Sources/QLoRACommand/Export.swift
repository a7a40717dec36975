import ArgumentParser
import CheckpointJobs
import FileOutput
import Foundation
import QLoRA

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a Llama checkpoint (dense or bitsandbytes 4-bit, adapters merged) as llama.cpp's GGUF.",
        discussion: """
            The bytes llama.cpp's own tools write: f32, f16 and bf16 as convert_hf_to_gguf.py --outtype; \
            q8_0, q4_0, q4_k_m and iq4_nl as convert_hf_to_gguf.py --outtype auto followed by llama-quantize \
            with that type (its per-tensor choices included). A 4-bit BASE is dequantized exactly (llama.cpp's \
            converter cannot read it); each --adapter is merged with PEFT's numerics as qlora merge does, in \
            order. BASE must hold config.json and a SentencePiece tokenizer.model. Streamed tensor by tensor; \
            OUTPUT appears only when complete.
            """)

    @Argument(help: "Base checkpoint directory (config.json, tokenizer.model, dense or bnb-4bit safetensors).") var base: String
    @Argument(help: "The GGUF file to write.") var output: String
    @Option(help: "f32, f16, bf16, q8_0, q4_0, q4_k_m or iq4_nl.") var type: GGUFExportType
    @Option(name: .customLong("adapter"), help: ArgumentHelp("A PEFT adapter to merge first (DIR or DIR=WEIGHT); repeat for more, merged in order.", valueName: "dir[=weight]"))
    var adapters: [String] = []
    @Option(help: "The dtype merged 4-bit weights take before conversion (as qlora merge --dtype): bf16, f16 or f32.") var mergedDtype: OutputDType = .bf16
    @Flag(help: "Print the summary as JSON.") var json = false
    @Flag(help: "Replace an existing OUTPUT (never an input), once the new one is complete.") var overwrite = false

    func run() {
        runReportingErrors {
            StagedOutput.installSignalCleanup()
            let specs = try adapters.map(parseAdapter)
            let line = ProgressLine("export")
            let s = try exportGGUF(base: base, adapters: specs, output: output, type: type, mergedDType: mergedDtype.elementType, overwrite: overwrite, progress: line.update)
            line.finish()
            if json {
                try printJSON(s)
                return
            }
            let how = type.convertType != nil ? "convert_hf_to_gguf.py --outtype \(type.rawValue)"
                : "convert_hf_to_gguf.py --outtype auto (\(s.convertedAs)), then llama-quantize \(type.mixture!.rawValue)"
            let types = s.typeCounts.sorted { $0.value > $1.value || ($0.value == $1.value && $0.key < $1.key) }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
            print("exported \(s.tensors) tensors (\(types)) as \(how); merged \(s.merged), dequantized \(s.dequantized) 4-bit; wrote \(s.bytesWritten) bytes to \(output)")
        }
    }
}

extension GGUFExportType: ExpressibleByArgument {}
