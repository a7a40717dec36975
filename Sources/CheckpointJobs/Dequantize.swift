import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors

/// Turns every 4-bit weight of a bitsandbytes checkpoint back into a dense tensor of
/// `dtype` (default: the dtype recorded in its quant state), and every MXFP4 pair of a gpt-oss
/// checkpoint into bf16 (`MXFP4`); other tensors pass through.
/// Every quant state is read and checked while planning, before anything is written.
@discardableResult
public func dequantizeCheckpoint(input: String, output: String, dtype: ElementType? = nil,
                                 overwrite: Bool = false, progress: ProgressHandler? = nil) throws -> JobSummary {
    let job = try CheckpointRewrite(input: input)
    let reader = job.reader
    var owner: [String: BnB4BitFormat.Group] = [:]
    for g in try BnB4BitFormat.groups(of: reader) { for m in g.members { owner[m] = g } }
    // gpt-oss' MXFP4 experts: decoded to bf16 as transformers' Mxfp4Config(dequantize=True) holds them.
    let mxfp4: [MXFP4.Pair]
    do {
        mxfp4 = try MXFP4.pairs(reader.tensorNames.map { n in let i = reader.info(named: n)!; return (n, i.dtype, i.shape) })
    } catch let e as MXFP4Error { throw CheckpointError.invalidPath(path: input, problem: e.description) }
    var pairOf: [String: (MXFP4.Pair, first: Bool)] = [:]
    for p in mxfp4 { (pairOf[p.blocks], pairOf[p.scales]) = ((p, true), (p, false)) }
    var summary = JobSummary()
    summary.bytesWritten = try job.run(output: output, layout: .input, overwrite: overwrite, progress: progress, plan: { e in
        if let (p, first) = pairOf[e.name] {
            guard first else { return .drop }
            let type = dtype ?? .bfloat16
            return TensorPlan(outputs: [OutputTensor(name: p.name, dtype: DType(type), shape: p.shape)]) { sink in
                // One expert at a time: gpt-oss-120b's gate_up_proj is 4 GB in bf16.
                for e in 0..<p.experts {
                    let bits = reader.withBytes(of: p.blocks) { b in reader.withBytes(of: p.scales) { s in MXFP4.decode(p, expert: e, blocks: b, scales: s) } }
                    let bytes = type == .bfloat16 ? bits.withUnsafeBytes { Array($0) } : encode(bits.map { HalfPrecision.float(bfloat16Bits: $0) }, as: type)
                    try bytes.withUnsafeBytes { try sink.write($0, partial: e < p.experts - 1) }
                }
                summary.dequantized += 1
                summary.parameters4Bit += p.shape.reduce(1, *)
            }
        }
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
