import ArgumentParser
import CheckpointJobs
import Foundation

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List a checkpoint's tensors: dtype, shape, bytes, and 4-bit quantization details.")

    @Argument(help: "A .safetensors file or a checkpoint directory.") var path: String
    @Flag(help: "Print JSON instead of a table.") var json = false

    func run() {
        runReportingErrors {
            let r = try inspectCheckpoint(path: path)
            if json {
                try printJSON(r)
                return
            }
            let width = max(6, r.tensors.map(\.name.count).max() ?? 0)
            func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
            print(pad("tensor", width), pad("dtype", 6), pad("shape", 14), pad("bytes", 12), "4-bit")
            for t in r.tensors {
                var q = ""
                if let z = t.quantization {
                    q = "\(z.quantType) bs=\(z.blocksize) dq=\(z.doubleQuant ? "on" : "off") from \(z.originalDtype); "
                        + String(format: "%.3f data + %.4f constant bits/param", z.dataBitsPerParameter, z.constantBitsPerParameter)
                }
                print(pad(t.name, width), pad(t.dtype, 6), pad("[" + t.shape.map(String.init).joined(separator: ", ") + "]", 14), pad(String(t.bytes), 12), q)
            }
            print("total: \(r.tensors.count) tensors, \(r.totalParameters) parameters (\(r.quantizedParameters) in 4-bit), \(r.totalBytes) bytes in \(r.shards.count) file(s)")
        }
    }
}
