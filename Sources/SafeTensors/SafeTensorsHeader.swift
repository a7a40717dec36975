/// The validated header of a safetensors file.
///
/// File layout (all integers little-endian):
///
///     bytes 0..<8              u64 N: header length in bytes
///     bytes 8..<8+N            UTF-8 JSON object (may be padded with trailing spaces)
///     bytes 8+N..<file size    data buffer; tensor bytes live at data_offsets within it
///
/// The JSON maps tensor names to `{"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}`
/// plus an optional `"__metadata__": {string: string}` (null is accepted as empty).
///
/// Validation is strict where the Rust implementation is strict (duplicate names, unknown
/// dtypes, non-integer or negative numbers, byte count vs. dtype x shape, overlapping or
/// out-of-bounds ranges) and tolerant in two places, documented here: gaps between tensors and
/// trailing bytes after the last tensor are accepted, and unknown fields in a tensor entry are
/// ignored (as serde does). Tensor names are compared as Swift strings (Unicode canonical
/// equivalence), so two names differing only in normalization are rejected as duplicates
/// rather than becoming ambiguous lookups.
public struct SafeTensorsHeader: Sendable, Equatable {
    /// Tensors sorted by file offset (ties, possible only for empty tensors, by name).
    public var tensors: [TensorInfo]
    /// The `__metadata__` string map (empty when absent).
    public var metadata: [String: String]
    /// File offset of the data buffer: 8 + header length.
    public var dataStart: Int
    /// Bytes in the data buffer: buffer length - `dataStart`.
    public var dataByteCount: Int

    /// Upper bound on the header length N, as in the Rust library (100 MB); headers of real
    /// checkpoints with tens of thousands of tensors are a few MB.
    public static let maxHeaderLength = 100_000_000

    public init(tensors: [TensorInfo], metadata: [String: String], dataStart: Int, dataByteCount: Int) {
        self.tensors = tensors
        self.metadata = metadata
        self.dataStart = dataStart
        self.dataByteCount = dataByteCount
    }

    /// Parses and validates the header of a complete safetensors file held in `bytes`
    /// (the whole file: the prefix, the header and the data buffer, which bounds the offsets).
    ///
    /// - Parameter source: the path named in error messages (`"<memory>"` by default).
    /// - Throws: `SafeTensorsError`; never traps, loops forever or recurses without bound on any
    ///   input.
    public static func parse(_ bytes: UnsafeRawBufferPointer, source: String = "<memory>") throws -> SafeTensorsHeader {
        let file = source
        guard bytes.count >= 8 else { throw SafeTensorsError.fileTooShort(file: file, byteCount: bytes.count) }
        let declared = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        guard declared <= UInt64(bytes.count - 8) else {
            throw SafeTensorsError.headerLengthBeyondFile(file: file, headerLength: declared, fileSize: bytes.count)
        }
        let headerLength = Int(declared)
        guard headerLength <= maxHeaderLength else {
            throw SafeTensorsError.headerTooLarge(file: file, headerLength: headerLength, limit: maxHeaderLength)
        }
        let dataStart = 8 + headerLength
        let json = UnsafeRawBufferPointer(rebasing: bytes[8..<dataStart])
        if let bad = firstInvalidUTF8Index(json) {
            throw SafeTensorsError.headerNotUTF8(file: file, offset: 8 + bad)
        }

        let root: JSONValue
        do {
            root = try JSONParser.parse(json)
        } catch {
            switch error.kind {
            case .syntax(let reason):
                throw SafeTensorsError.malformedHeader(file: file, offset: 8 + error.offset, reason: reason)
            case .duplicateKey(let key, let path):
                if path.isEmpty && key != metadataKey {
                    throw SafeTensorsError.duplicateTensor(file: file, tensor: key)
                }
                let context = path.isEmpty ? "the header object" : "header object at " + path.map(quoted).joined(separator: " > ")
                throw SafeTensorsError.duplicateKey(file: file, key: key, context: context)
            }
        }
        guard case .object(let members) = root else {
            throw SafeTensorsError.headerNotObject(file: file, found: root.kindDescription)
        }

        let dataByteCount = bytes.count - dataStart
        var metadata: [String: String] = [:]
        var tensors: [TensorInfo] = []
        tensors.reserveCapacity(members.count)
        for member in members {
            let (name, value) = (member.key, member.value)
            if name == metadataKey {
                metadata = try parseMetadata(value, file: file)
            } else {
                tensors.append(try parseTensor(name: name, value, dataByteCount: dataByteCount, file: file))
            }
        }

        // Offset order; then any non-empty range starting before the furthest end seen so far
        // overlaps the tensor that owns that end. Empty ranges cannot overlap anything.
        tensors.sort { a, b in
            if a.dataOffsets.lowerBound != b.dataOffsets.lowerBound {
                return a.dataOffsets.lowerBound < b.dataOffsets.lowerBound
            }
            if a.dataOffsets.upperBound != b.dataOffsets.upperBound {
                return a.dataOffsets.upperBound < b.dataOffsets.upperBound
            }
            return scalarOrder(a.name, b.name)
        }
        var furthest: TensorInfo? = nil
        for tensor in tensors where !tensor.dataOffsets.isEmpty {
            if let previous = furthest, tensor.dataOffsets.lowerBound < previous.dataOffsets.upperBound {
                throw SafeTensorsError.overlappingTensors(
                    file: file, tensor: tensor.name, range: tensor.dataOffsets,
                    other: previous.name, otherRange: previous.dataOffsets)
            }
            if tensor.dataOffsets.upperBound > (furthest?.dataOffsets.upperBound ?? 0) {
                furthest = tensor
            }
        }
        return SafeTensorsHeader(tensors: tensors, metadata: metadata, dataStart: dataStart, dataByteCount: dataByteCount)
    }

    /// Convenience for `[UInt8]` buffers.
    public static func parse(_ bytes: [UInt8], source: String = "<memory>") throws -> SafeTensorsHeader {
        try bytes.withUnsafeBytes { try parse($0, source: source) }
    }

    /// The reserved key of the metadata map.
    static let metadataKey = "__metadata__"

    private static func parseMetadata(_ value: JSONValue, file: String) throws -> [String: String] {
        switch value {
        case .null:
            return [:]
        case .object(let members):
            var metadata: [String: String] = [:]
            for member in members {
                let (key, entry) = (member.key, member.value)
                guard case .string(let text) = entry else {
                    throw SafeTensorsError.metadataValueNotString(file: file, key: key, found: entry.kindDescription)
                }
                metadata[key] = text
            }
            return metadata
        default:
            throw SafeTensorsError.metadataNotObject(file: file, found: value.kindDescription)
        }
    }

    private static func parseTensor(name: String, _ value: JSONValue, dataByteCount: Int, file: String) throws -> TensorInfo {
        guard case .object(let members) = value else {
            throw SafeTensorsError.wrongType(file: file, tensor: name, field: nil, expected: "an object", found: value.kindDescription)
        }
        func field(_ key: String) throws -> JSONValue {
            guard let member = members.first(where: { $0.key == key }) else {
                throw SafeTensorsError.missingField(file: file, tensor: name, field: key)
            }
            return member.value
        }
        func integers(_ key: String, _ value: JSONValue, count: Int?) throws -> [Int] {
            let expected = count.map { "an array of \($0) integers" } ?? "an array of integers"
            guard case .array(let elements) = value else {
                throw SafeTensorsError.wrongType(file: file, tensor: name, field: key, expected: expected, found: value.kindDescription)
            }
            if let count, elements.count != count {
                throw SafeTensorsError.wrongType(file: file, tensor: name, field: key, expected: expected,
                                                 found: "an array of \(elements.count) elements")
            }
            return try elements.map { element in
                guard case .number(let text) = element else {
                    throw SafeTensorsError.wrongType(file: file, tensor: name, field: key, expected: expected,
                                                     found: "an array containing \(element.kindDescription)")
                }
                let parsed = JSONValue.integer(text)
                guard case .value(let integer) = parsed else {
                    throw SafeTensorsError.invalidInteger(file: file, tensor: name, field: key, value: text, reason: parsed.problem ?? "")
                }
                return integer
            }
        }

        let dtypeValue = try field("dtype")
        let shapeValue = try field("shape")
        let offsetsValue = try field("data_offsets")
        guard case .string(let dtypeName) = dtypeValue else {
            throw SafeTensorsError.wrongType(file: file, tensor: name, field: "dtype", expected: "a string", found: dtypeValue.kindDescription)
        }
        guard let dtype = DType(rawValue: dtypeName) else {
            throw SafeTensorsError.unknownDType(file: file, tensor: name, dtype: dtypeName)
        }
        let shape = try integers("shape", shapeValue, count: nil)
        let offsets = try integers("data_offsets", offsetsValue, count: 2)
        let (begin, end) = (offsets[0], offsets[1])
        guard begin <= end else {
            throw SafeTensorsError.beginAfterEnd(file: file, tensor: name, begin: begin, end: end)
        }
        guard end <= dataByteCount else {
            throw SafeTensorsError.endBeyondBuffer(file: file, tensor: name, begin: begin, end: end, dataByteCount: dataByteCount)
        }
        guard let needed = dtype.byteCount(shape: shape) else {
            throw SafeTensorsError.shapeTooLarge(file: file, tensor: name, shape: shape)
        }
        guard needed == end - begin else {
            throw SafeTensorsError.byteCountMismatch(file: file, tensor: name, dtype: dtype, shape: shape,
                                                     expected: needed, actual: end - begin)
        }
        return TensorInfo(name: name, dtype: dtype, shape: shape, dataOffsets: begin..<end)
    }

    /// Looks a tensor up by name (linear; `SafeTensorsFile` keeps a dictionary).
    public func tensor(named name: String) -> TensorInfo? { tensors.first { $0.name == name } }

    // MARK: Encoding

    /// Encodes the 8-byte length prefix and JSON header for `tensors` (whose `dataOffsets` are
    /// written as given) and `metadata`, exactly as the Rust library lays it out: compact JSON,
    /// `__metadata__` first (keys sorted; omitted when empty), then tensors in the given order
    /// with fields `dtype`, `shape`, `data_offsets`, padded with spaces so that the data buffer
    /// starts at a multiple of 8 bytes. The result's count is the data start offset.
    public static func encode(tensors: [TensorInfo], metadata: [String: String]) -> [UInt8] {
        var json: [UInt8] = []
        json.appendASCII("{")
        var first = true
        if !metadata.isEmpty {
            json.appendASCII("\"__metadata__\":{")
            for (i, key) in metadata.keys.sorted(by: scalarOrder).enumerated() {
                if i > 0 { json.appendASCII(",") }
                appendJSONString(key, to: &json)
                json.appendASCII(":")
                appendJSONString(metadata[key]!, to: &json)
            }
            json.appendASCII("}")
            first = false
        }
        for tensor in tensors {
            if !first { json.appendASCII(",") }
            first = false
            appendJSONString(tensor.name, to: &json)
            json.appendASCII(":{\"dtype\":\"\(tensor.dtype.rawValue)\",\"shape\":[")
            json.appendASCII(tensor.shape.map(String.init).joined(separator: ","))
            json.appendASCII("],\"data_offsets\":[\(tensor.dataOffsets.lowerBound),\(tensor.dataOffsets.upperBound)]}")
        }
        json.appendASCII("}")
        let padding = (8 - json.count % 8) % 8
        json.append(contentsOf: repeatElement(UInt8(ascii: " "), count: padding))

        var out: [UInt8] = []
        out.reserveCapacity(8 + json.count)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: json)
        return out
    }
}
