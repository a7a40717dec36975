import ArgumentParser
import CheckpointFormats
import CheckpointJobs
import FileOutput
import Foundation
import QLoRA

struct Quantize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Quantize a checkpoint to bitsandbytes 4-bit (the layout transformers writes).",
        discussion: """
            INPUT is a .safetensors file or a directory with a (sharded) checkpoint. By default every \
            2-D floating tensor whose name contains none of 'embed', 'lm_head', 'norm' is quantized; \
            --include restricts quantization to matching names instead, --exclude removes matches. \
            Everything else is copied unchanged. OUTPUT appears only when complete.
            """)

    @Argument(help: "A .safetensors file or a checkpoint directory.") var input: String
    @Argument(help: "Output file (for a file INPUT) or new directory (for a directory INPUT).") var output: String
    @Option(help: "4-bit data type: nf4 or fp4.") var quantType: QuantType = .nf4
    @Option(help: "Elements per absmax block: 32, 64, 128, ..., 4096.") var blocksize: Int = 64
    @Flag(inversion: .prefixedNo, help: "Quantize the absmax again (bnb_4bit_use_double_quant).") var doubleQuant = true
    @Option(help: "Quantize only tensors whose name matches this regular expression.") var include: String?
    @Option(help: "Do not quantize tensors whose name matches this regular expression.") var exclude: String?
    @Option(help: "dtype the packed 4-bit bytes are stored as (bnb_4bit_quant_storage): uint8, bfloat16, float16 or float32. FSDP and DeepSpeed QLoRA need bfloat16.")
    var quantStorage: String = "uint8"
    @Flag(help: "Replace an existing OUTPUT (never an input), once the new one is complete.") var overwrite = false
    @Option(help: "Compute dtype recorded in config.json (bnb_4bit_compute_dtype): bf16, f16 or f32.") var computeDtype: OutputDType = .bf16

    func validate() throws {
        guard QuantState.validBlocksizes.contains(blocksize) else {
            throw ValidationError("invalid blocksize \(blocksize); expected one of \(QuantState.validBlocksizes.map(String.init).joined(separator: ", "))")
        }
        guard BnB4BitFormat.quantStorages[quantStorage] != nil else {
            throw ValidationError("invalid quant storage '\(quantStorage)'; expected one of uint8, bfloat16, float16, float32")
        }
        for re in [include, exclude].compactMap({ $0 }) where (try? NSRegularExpression(pattern: re)) == nil {
            throw ValidationError("invalid regular expression '\(re)'")
        }
    }

    func run() {
        runReportingErrors {
            StagedOutput.installSignalCleanup()
            let options = QuantizeOptions(quantType: quantType, blocksize: blocksize, doubleQuant: doubleQuant, include: include, exclude: exclude,
                                          quantStorage: BnB4BitFormat.quantStorages[quantStorage]!, computeDtype: computeDtype.elementType)
            let progress = ProgressLine("quantize")
            let s = try quantizeCheckpoint(input: input, output: output, options: options, overwrite: overwrite, progress: progress.update)
            progress.finish()
            print("quantized \(s.quantized) tensors (\(s.parameters4Bit) parameters, \(quantType.rawValue), blocksize \(blocksize), double quant \(doubleQuant ? "on" : "off")\(quantStorage == "uint8" ? "" : ", stored as \(quantStorage)")), copied \(s.copied); wrote \(s.bytesWritten) bytes to \(output)")
        }
    }
}

extension QuantType: ExpressibleByArgument {}
