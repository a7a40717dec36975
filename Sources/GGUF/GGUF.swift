import Foundation
import SafeTensors

/// GGUF, llama.cpp's model file (version 3, little-endian), as gguf-py's GGUFWriter lays it out:
///
///     "GGUF" · u32 version 3 · u64 tensor count · u64 metadata count
///     metadata: string key · u32 value type · value        (strings: u64 byte count · UTF-8 bytes)
///     tensor infos: string name · u32 dims · u64 ne[0..dims) · u32 ggml type · u64 data offset
///     zero padding to `general.alignment` (32 unless the metadata says otherwise)
///     tensor data, each tensor at its offset from there, zero-padded to the alignment
///
/// ne[0] is the innermost (contiguous) dimension: a row-major [out, in] weight is ne = [in, out].
/// The reader parses untrusted bytes with every count and offset checked (Fuzz/ has its harness).
public enum GGUF {
    public static let magic: [UInt8] = Array("GGUF".utf8)
    public static let version: UInt32 = 3
    public static let defaultAlignment = 32
}

/// ggml's tensor types that qlora reads or writes (ggml.h's enum ggml_type).
public enum GGMLType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case f32 = 0, f16 = 1, q4_0 = 2, q5_0 = 6, q5_1 = 7, q8_0 = 8, q4_K = 12, q5_K = 13, q6_K = 14, iq4_nl = 20, bf16 = 30

    /// Elements per block and bytes per block.
    public var block: (elements: Int, bytes: Int) {
        switch self {
        case .f32: return (1, 4)
        case .f16, .bf16: return (1, 2)
        case .q4_0: return (32, 18)
        case .q5_0: return (32, 22)
        case .q5_1: return (32, 24)
        case .q8_0: return (32, 34)
        case .q4_K: return (256, 144)
        case .q5_K: return (256, 176)
        case .q6_K: return (256, 210)
        case .iq4_nl: return (32, 18)
        }
    }

    /// The names llama.cpp prints and llama-quantize takes.
    public var description: String {
        switch self {
        case .f32: return "F32"
        case .f16: return "F16"
        case .bf16: return "BF16"
        case .q4_0: return "Q4_0"
        case .q5_0: return "Q5_0"
        case .q5_1: return "Q5_1"
        case .q8_0: return "Q8_0"
        case .q4_K: return "Q4_K"
        case .q5_K: return "Q5_K"
        case .q6_K: return "Q6_K"
        case .iq4_nl: return "IQ4_NL"
        }
    }

    /// Bytes of a tensor of these dimensions (ggml order), or nil when ne[0] is not a whole
    /// number of blocks or the size overflows.
    public func byteCount(_ ne: [Int]) -> Int? {
        let (qk, size) = block
        guard let first = ne.first, ne.allSatisfy({ $0 >= 0 }), first % qk == 0 else { return nil }
        var rows = 1
        for d in ne.dropFirst() {
            let (p, o) = rows.multipliedReportingOverflow(by: d)
            if o { return nil }
            rows = p
        }
        let (rowBytes, o1) = (first / qk).multipliedReportingOverflow(by: size)
        let (total, o2) = rowBytes.multipliedReportingOverflow(by: rows)
        return o1 || o2 ? nil : total
    }
}

/// A metadata value: gguf-py's GGUFValueType, the type numbers the file stores.
public enum GGUFValue: Equatable, Sendable {
    case uint8(UInt8), int8(Int8), uint16(UInt16), int16(Int16), uint32(UInt32), int32(Int32), float32(Float), bool(Bool)
    case string(String)
    /// Elements of one type (`elementType`), as the file stores them.
    case array(elementType: UInt32, [GGUFValue])
    case uint64(UInt64), int64(Int64), float64(Double)

    public var typeCode: UInt32 {
        switch self {
        case .uint8: return 0
        case .int8: return 1
        case .uint16: return 2
        case .int16: return 3
        case .uint32: return 4
        case .int32: return 5
        case .float32: return 6
        case .bool: return 7
        case .string: return 8
        case .array: return 9
        case .uint64: return 10
        case .int64: return 11
        case .float64: return 12
        }
    }

    /// An array of strings (tokens, merges).
    public static func strings(_ s: [String]) -> GGUFValue { .array(elementType: 8, s.map { .string($0) }) }
    public static func float32s(_ v: [Float]) -> GGUFValue { .array(elementType: 6, v.map { .float32($0) }) }
    public static func int32s(_ v: [Int32]) -> GGUFValue { .array(elementType: 5, v.map { .int32($0) }) }

    public var string: String? { if case .string(let s) = self { return s }; return nil }
    /// Any integer type's value, where it fits in Int.
    public var integer: Int? {
        switch self {
        case .uint8(let v): return Int(v)
        case .int8(let v): return Int(v)
        case .uint16(let v): return Int(v)
        case .int16(let v): return Int(v)
        case .uint32(let v): return Int(v)
        case .int32(let v): return Int(v)
        case .uint64(let v): return Int(exactly: v)
        case .int64(let v): return Int(exactly: v)
        default: return nil
        }
    }
}

/// One tensor's entry in the header.
public struct GGUFTensorInfo: Equatable, Sendable {
    public var name: String
    /// Dimensions, innermost first (ggml's ne).
    public var ne: [Int]
    public var type: GGMLType
    /// From the start of the data section.
    public var offset: Int
    public var byteCount: Int

    public init(name: String, ne: [Int], type: GGMLType, offset: Int, byteCount: Int) {
        (self.name, self.ne, self.type, self.offset, self.byteCount) = (name, ne, type, offset, byteCount)
    }
}

public struct GGUFError: Error, CustomStringConvertible, Equatable {
    public var file: String
    public var problem: String
    public init(file: String, problem: String) { (self.file, self.problem) = (file, problem) }
    /// One line: names and keys from the file may hold control characters.
    public var description: String { "\(escapingControlCharacters(file)): \(escapingControlCharacters(problem, limit: 400))" }
}
