import ArgumentParser
import CheckpointJobs
import Foundation
import SafeTensors

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
            let names = r.tensors.map { escapingControlCharacters($0.name) }
            let width = max(6, names.map(\.count).max() ?? 0)
            func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
            print(pad("tensor", width), pad("dtype", 6), pad("shape", 14), pad("bytes", 12), "4-bit")
            for (t, name) in zip(r.tensors, names) {
                var q = ""
                if let z = t.quantization {
                    q = "\(z.quantType) bs=\(z.blocksize) dq=\(z.doubleQuant ? "on" : "off") from \(z.originalDtype); "
                        + String(format: "%.3f data + %.4f constant bits/param", z.dataBitsPerParameter, z.constantBitsPerParameter)
                    if let bad = z.nonFiniteScales { q += "; \(bad) NON-FINITE block scales (dequantize refuses it)" }
                }
                print(pad(name, width), pad(t.dtype, 6), pad("[" + t.shape.map(String.init).joined(separator: ", ") + "]", 14), pad(String(t.bytes), 12), q)
            }
            for t in r.tensors { if let p = t.quantization?.nonFiniteScalesProblem { print("warning: " + escapingControlCharacters(p)) } }
            print("total: \(r.tensors.count) tensors, \(r.totalParameters) parameters (\(r.quantizedParameters) in 4-bit), \(r.totalBytes) bytes in \(r.shards.count) file(s)")
        }
    }
}
