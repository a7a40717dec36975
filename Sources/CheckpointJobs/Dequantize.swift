import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors

/// Turns every 4-bit weight of a bitsandbytes checkpoint back into a dense tensor of
/// `dtype` (default: the dtype recorded in its quant state); other tensors pass through.
/// Every quant state is read and checked while planning, before anything is written.
@discardableResult
public func dequantizeCheckpoint(input: String, output: String, dtype: ElementType? = nil,
                                 overwrite: Bool = false, progress: ProgressHandler? = nil) throws -> JobSummary {
    let job = try CheckpointRewrite(input: input)
    let reader = job.reader
    var owner: [String: BnB4BitFormat.Group] = [:]
    for g in try BnB4BitFormat.groups(of: reader) { for m in g.members { owner[m] = g } }
    var summary = JobSummary()
    summary.bytesWritten = try job.run(output: output, layout: .input, overwrite: overwrite, progress: progress, plan: { e in
        guard let g = owner[e.name] else {
            summary.copied += 1
            return .copy(e.info)
        }
        guard g.name == e.name else { return .drop }  // a constant of the weight
        let state = try BnB4BitFormat.state(of: g, from: reader)
        return TensorPlan(outputs: [OutputTensor(name: e.name, dtype: DType(dtype ?? state.dtype), shape: state.shape)]) { sink in
            let q = try BnB4BitFormat.load(g, from: reader)
            try sink.write(q.dequantizedBytes(as: dtype))
            summary.dequantized += 1
            summary.parameters4Bit += q.state.elementCount
        }
    }, quantization: { nil })
    return summary
}

/// What a job did.
public struct JobSummary: Sendable, Codable {
    public var quantized = 0
    public var dequantized = 0
    public var copied = 0
    public var parameters4Bit = 0
    public var bytesWritten = 0
}
