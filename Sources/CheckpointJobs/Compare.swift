import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors

/// One tensor's error statistics.
public struct TensorComparison: Codable, Sendable {
    public var name: String
    public var statistics: ErrorStatistics
}

/// Per-tensor error between two dense checkpoints with the same tensor names and shapes.
/// Non-float tensors (same dtype on both sides) are skipped.
public func compareCheckpoints(reference: String, actual: String) throws -> [TensorComparison] {
    let a = try CheckpointReader(path: reference), b = try CheckpointReader(path: actual)
    var out: [TensorComparison] = []
    for e in a.entries {
        guard let other = b.info(named: e.name) else {
            throw CheckpointError.invalidTensor(file: actual, tensor: e.name, problem: "missing (present in \(reference))")
        }
        guard other.shape == e.info.shape else {
            throw CheckpointError.invalidTensor(file: actual, tensor: e.name, problem: "shape \(other.shape) differs from \(e.info.shape)")
        }
        if ElementType(e.info.dtype) == nil && other.dtype == e.info.dtype { continue }  // not numeric: skipped
        guard let ta = ElementType(e.info.dtype), let tb = ElementType(other.dtype) else {
            throw CheckpointError.invalidTensor(file: actual, tensor: e.name, problem: "not a float tensor (\(e.info.dtype.rawValue) vs \(other.dtype.rawValue))")
        }
        let stats = a.withBytes(of: e.name) { ua in
            b.withBytes(of: e.name) { ub in
                withAlignedBytes(ua, alignment: ta.byteSize) { ra in
                    withAlignedBytes(ub, alignment: tb.byteSize) { rb in
                        ErrorStatistics(reference: .view(ra, as: ta), actual: .view(rb, as: tb))
                    }
                }
            }
        }
        out.append(TensorComparison(name: e.name, statistics: stats))
    }
    return out
}
