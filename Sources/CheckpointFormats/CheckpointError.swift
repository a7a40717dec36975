import QLoRA

/// Errors about checkpoints: one line, naming the file and the problem.
public enum CheckpointError: Error, CustomStringConvertible {
    case invalidTensor(file: String, tensor: String, problem: String)
    case invalidPath(path: String, problem: String)
    case quantization(file: String, tensor: String, error: QuantizationError)

    public var description: String {
        switch self {
        case .invalidTensor(let f, let t, let p): return "\(f): tensor '\(t)': \(p)"
        case .invalidPath(let f, let p): return "\(f): \(p)"
        case .quantization(let f, let t, let e): return "\(f): tensor '\(t)': \(e)"
        }
    }
}
