import Foundation

/// A parsed GGUF: the header (metadata, tensor infos) and where each tensor's bytes are.
/// Untrusted input: every count, length and offset is checked against the bytes there are, and
/// a problem is one `GGUFError` naming the file.
public struct GGUFFile: Sendable {
    public let version: UInt32
    public let header: GGUFHeader
    /// Where the data section starts in the file.
    public let dataOffset: Int
    public let bytes: Data

    public var metadata: [(key: String, value: GGUFValue)] { header.metadata }
    public func value(_ key: String) -> GGUFValue? { header.metadata.first { $0.key == key }?.value }
    public func tensor(_ name: String) -> GGUFTensorInfo? { header.tensors.first { $0.name == name } }

    /// The bytes of one tensor.
    public func data(of t: GGUFTensorInfo) -> Data {
        let start = bytes.startIndex + dataOffset + t.offset  // a Data slice keeps its parent's indices
        return bytes.subdata(in: start..<(start + t.byteCount))
    }

    /// Nesting of arrays in arrays the reader follows (gguf-py writes one level; deeper input is refused).
    static let maxArrayDepth = 4

    public init(bytes: Data, file: String) throws {
        var r = Reader(bytes: [UInt8](bytes), file: file)
        guard r.bytes.count >= 4, Array(r.bytes[0..<4]) == GGUF.magic else { throw r.fail("not a GGUF file (no GGUF magic)") }
        r.at = 4
        let version: UInt32 = try r.int()
        guard version == 2 || version == 3 else { throw r.fail("GGUF version \(version); qlora reads versions 2 and 3") }
        let tensorCount: UInt64 = try r.int(), kvCount: UInt64 = try r.int()
        // Each entry takes at least 8 bytes (a key or name length), so a count beyond that is a lie.
        guard tensorCount <= UInt64(r.bytes.count / 8), kvCount <= UInt64(r.bytes.count / 8) else {
            throw r.fail("header claims \(tensorCount) tensors and \(kvCount) metadata entries in \(r.bytes.count) bytes")
        }
        var metadata: [(key: String, value: GGUFValue)] = []
        for _ in 0..<Int(kvCount) {
            let key = try r.string()
            let type: UInt32 = try r.int()
            metadata.append((key, try r.value(type: type, depth: 0)))
        }
        var tensors: [(name: String, ne: [Int], type: GGMLType)] = []
        var offsets: [Int] = []
        for _ in 0..<Int(tensorCount) {
            let name = try r.string()
            let dims: UInt32 = try r.int()
            guard (1...4).contains(dims) else { throw r.fail("tensor \(name) has \(dims) dimensions (1 to 4)") }
            var ne: [Int] = []
            for _ in 0..<dims {
                let d: UInt64 = try r.int()
                guard let v = Int(exactly: d), v <= 1 << 40 else { throw r.fail("tensor \(name) has a dimension of \(d)") }
                ne.append(v)
            }
            let raw: UInt32 = try r.int()
            guard let type = GGMLType(rawValue: raw) else { throw r.fail("tensor \(name) has ggml type \(raw), which qlora does not read") }
            let offset: UInt64 = try r.int()
            guard let o = Int(exactly: offset) else { throw r.fail("tensor \(name) has offset \(offset)") }
            tensors.append((name, ne, type))
            offsets.append(o)
        }
        // The layout ggml reads (gguf.cpp): each tensor right after the one before, padded to the
        // alignment. GGUFHeader lays tensors out so; a file whose offsets differ is refused.
        let header: GGUFHeader
        do { header = try GGUFHeader(metadata: metadata, tensors: tensors) } catch let e as GGUFError { throw r.fail(e.problem) }
        var dataOffset = (r.at + header.alignment - 1) / header.alignment * header.alignment
        // A file without tensors may end right after its header, as gguf-py's vocab-only
        // files do (they never reach write_tensors_to_file, which pads).
        if tensors.isEmpty && r.at == r.bytes.count { dataOffset = r.at }
        guard dataOffset <= r.bytes.count else { throw r.fail("the file ends inside the header's padding") }
        for (t, o) in zip(header.tensors, offsets) {
            guard o == t.offset else {
                throw r.fail("tensor \(t.name) starts at data offset \(o), not \(t.offset) where the tensors before it and the alignment \(header.alignment) put it")
            }
            guard t.offset + t.byteCount <= r.bytes.count - dataOffset else {
                throw r.fail("tensor \(t.name) (\(t.byteCount) bytes at data offset \(o)) runs past the end of the file (\(r.bytes.count - dataOffset) data bytes)")
            }
        }
        self.version = version
        self.header = header
        self.dataOffset = dataOffset
        self.bytes = bytes
    }

    struct Reader {
        let bytes: [UInt8]
        let file: String
        var at = 0

        func fail(_ problem: String) -> GGUFError { GGUFError(file: file, problem: problem) }

        mutating func int<T: FixedWidthInteger>() throws -> T {
            let n = MemoryLayout<T>.size
            guard bytes.count - at >= n else { throw fail("the file ends at byte \(bytes.count) inside the header (reading \(n) bytes at \(at))") }
            var v = T.zero
            withUnsafeMutableBytes(of: &v) { for i in 0..<n { $0[i] = bytes[at + i] } }
            at += n
            return T(littleEndian: v)
        }

        mutating func string() throws -> String {
            let n: UInt64 = try int()
            guard n <= UInt64(bytes.count - at) else { throw fail("a string of \(n) bytes at \(at) runs past the end of the file") }
            let s = bytes[at..<(at + Int(n))]
            at += Int(n)
            guard let text = String(validating: s, as: UTF8.self) else { throw fail("a string at \(at - Int(n)) is not UTF-8") }
            return text
        }

        mutating func value(type: UInt32, depth: Int) throws -> GGUFValue {
            switch type {
            case 0: return .uint8(try int())
            case 1: return .int8(try int())
            case 2: return .uint16(try int())
            case 3: return .int16(try int())
            case 4: return .uint32(try int())
            case 5: return .int32(try int())
            case 6: return .float32(Float(bitPattern: try int()))
            case 7:
                let b: UInt8 = try int()
                guard b <= 1 else { throw fail("a bool of value \(b) at \(at - 1)") }
                return .bool(b == 1)
            case 8: return .string(try string())
            case 9:
                guard depth < GGUFFile.maxArrayDepth else { throw fail("arrays nested deeper than \(GGUFFile.maxArrayDepth)") }
                let elementType: UInt32 = try int()
                guard elementType <= 12 else { throw fail("an array of value type \(elementType) (0 to 12)") }
                let count: UInt64 = try int()
                guard count <= UInt64(bytes.count - at) else { throw fail("an array of \(count) elements at \(at) runs past the end of the file") }
                var items: [GGUFValue] = []
                items.reserveCapacity(Int(count))
                for _ in 0..<Int(count) { items.append(try value(type: elementType, depth: depth + 1)) }
                return .array(elementType: elementType, items)
            case 10: return .uint64(try int())
            case 11: return .int64(try int())
            case 12: return .float64(Double(bitPattern: try int()))
            default: throw fail("metadata value type \(type) (0 to 12)")
            }
        }
    }
}
