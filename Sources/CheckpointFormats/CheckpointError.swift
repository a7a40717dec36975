import QLoRA
import SafeTensors

/// Errors about checkpoints: one line, naming the file and the problem. A value quoted from the
/// file (a dtype, a tensor name) may hold control characters: they are escaped, so the line
/// stays one line and cannot drive a terminal.
public enum CheckpointError: Error, CustomStringConvertible {
    case invalidTensor(file: String, tensor: String, problem: String)
    case invalidPath(path: String, problem: String)
    case quantization(file: String, tensor: String, error: QuantizationError)

    public var description: String { escapingControlCharacters(unescaped) }

    private var unescaped: String {
        switch self {
        case .invalidTensor(let f, let t, let p): return "\(f): tensor '\(t)': \(p)"
        case .invalidPath(let f, let p): return "\(f): \(p)"
        case .quantization(let f, let t, let e): return "\(f): tensor '\(t)': \(e)"
        }
    }
}
