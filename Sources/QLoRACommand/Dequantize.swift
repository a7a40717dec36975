import ArgumentParser
import CheckpointJobs
import FileOutput
import Foundation
import QLoRA

struct Dequantize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Turn a bitsandbytes 4-bit checkpoint back into dense tensors.",
        discussion: "Non-quantized tensors pass through. OUTPUT appears only when complete.")

    @Argument(help: "A .safetensors file or a checkpoint directory.") var input: String
    @Argument(help: "Output file (for a file INPUT) or new directory (for a directory INPUT).") var output: String
    @Option(help: "Output dtype: f32, bf16 or f16 (default: each tensor's recorded dtype).") var dtype: OutputDType?
    @Flag(help: "Replace an existing OUTPUT (never an input), once the new one is complete.") var overwrite = false

    func run() {
        runReportingErrors {
            StagedOutput.installSignalCleanup()
            let progress = ProgressLine("dequantize")
            let s = try dequantizeCheckpoint(input: input, output: output, dtype: dtype?.elementType, overwrite: overwrite, progress: progress.update)
            progress.finish()
            print("dequantized \(s.dequantized) tensors (\(s.parameters4Bit) parameters), copied \(s.copied); wrote \(s.bytesWritten) bytes to \(output)")
        }
    }
}
