import Foundation

/// Everything of a GGUF before its tensor data: metadata in order, tensor infos with their offsets.
/// `encoded()` gives the bytes gguf-py's GGUFWriter writes for the same metadata and tensors (the
/// header padded to the alignment); the data section follows, each tensor at its offset and
/// zero-padded to the alignment, the last one too.
public struct GGUFHeader: Sendable {
    public var metadata: [(key: String, value: GGUFValue)]
    public var tensors: [GGUFTensorInfo]
    public var alignment: Int

    /// Lays the tensors out in order. The alignment is `general.alignment` where the metadata
    /// sets it (a power of two), else 32.
    public init(metadata: [(key: String, value: GGUFValue)], tensors: [(name: String, ne: [Int], type: GGMLType)]) throws {
        self.metadata = metadata
        // llama.cpp refuses a file that repeats a key or a tensor name; so does the writer.
        var keys = Set<String>(), names = Set<String>()
        for (k, _) in metadata where !keys.insert(k).inserted { throw GGUFError(file: "GGUF header", problem: "metadata key \(k) appears twice") }
        for t in tensors where !names.insert(t.name).inserted { throw GGUFError(file: "GGUF header", problem: "tensor \(t.name) appears twice") }
        var alignment = GGUF.defaultAlignment
        if let a = metadata.first(where: { $0.key == "general.alignment" })?.value {
            guard case .uint32(let v) = a, v > 0, v & (v - 1) == 0 else {
                throw GGUFError(file: "GGUF header", problem: "general.alignment must be a uint32 power of two")
            }
            alignment = Int(v)
        }
        self.alignment = alignment
        var infos: [GGUFTensorInfo] = []
        var offset = 0
        for t in tensors {
            guard let bytes = t.type.byteCount(t.ne), t.ne.count <= 4 else {
                throw GGUFError(file: "GGUF header", problem: "tensor \(t.name): dimensions \(t.ne) do not fit \(t.type) (ne[0] a multiple of \(t.type.block.elements), at most 4 dimensions)")
            }
            infos.append(GGUFTensorInfo(name: t.name, ne: t.ne, type: t.type, offset: offset, byteCount: bytes))
            guard let next = Self.padded(offset, bytes, alignment) else { throw GGUFError(file: "GGUF header", problem: "tensor data past 2^63 bytes") }
            offset = next
        }
        self.tensors = infos
    }

    /// `offset + bytes` rounded up to `alignment`, or nil on overflow.
    static func padded(_ offset: Int, _ bytes: Int, _ alignment: Int) -> Int? {
        let (end, o1) = offset.addingReportingOverflow(bytes)
        let (up, o2) = end.addingReportingOverflow(alignment - 1)
        return o1 || o2 ? nil : up / alignment * alignment
    }

    /// Bytes of the data section: every tensor, each padded to the alignment.
    public var dataByteCount: Int {
        guard let last = tensors.last else { return 0 }
        return Self.padded(last.offset, last.byteCount, alignment)!
    }

    /// The header's bytes, padded to the alignment (the data section starts right after); a
    /// vocabulary-only file (no tensors) is not padded, as gguf-py writes one.
    public func encoded() -> [UInt8] {
        var out: [UInt8] = GGUF.magic
        Self.put(GGUF.version, &out)
        Self.put(UInt64(tensors.count), &out)
        Self.put(UInt64(metadata.count), &out)
        for (k, v) in metadata {
            Self.put(k, &out)
            Self.put(v.typeCode, &out)
            Self.put(v, &out)
        }
        for t in tensors {
            Self.put(t.name, &out)
            Self.put(UInt32(t.ne.count), &out)
            for d in t.ne { Self.put(UInt64(d), &out) }
            Self.put(t.type.rawValue, &out)
            Self.put(UInt64(t.offset), &out)
        }
        let pad = tensors.isEmpty ? 0 : (alignment - out.count % alignment) % alignment
        out += [UInt8](repeating: 0, count: pad)
        return out
    }

    static func put<T: FixedWidthInteger>(_ v: T, _ out: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { out += $0 }
    }

    /// Appends an integer's little-endian bytes (for building headers by hand, as tests do).
    public static func append<T: FixedWidthInteger>(_ v: T, to out: inout [UInt8]) { put(v, &out) }

    static func put(_ s: String, _ out: inout [UInt8]) {
        put(UInt64(s.utf8.count), &out)
        out += s.utf8
    }

    static func put(_ v: GGUFValue, _ out: inout [UInt8]) {
        switch v {
        case .uint8(let x): put(x, &out)
        case .int8(let x): put(x, &out)
        case .uint16(let x): put(x, &out)
        case .int16(let x): put(x, &out)
        case .uint32(let x): put(x, &out)
        case .int32(let x): put(x, &out)
        case .float32(let x): put(x.bitPattern, &out)
        case .bool(let x): out.append(x ? 1 : 0)
        case .string(let s): put(s, &out)
        case .array(let type, let items):
            put(type, &out)
            put(UInt64(items.count), &out)
            for i in items { put(i, &out) }
        case .uint64(let x): put(x, &out)
        case .int64(let x): put(x, &out)
        case .float64(let x): put(x.bitPattern, &out)
        }
    }
}
