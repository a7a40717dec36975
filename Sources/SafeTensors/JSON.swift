// A small, strict JSON reader and writer for safetensors headers and shard indexes.
//
// Why not JSONSerialization / JSONDecoder: they silently keep one of two duplicate keys (a
// header with two entries named "w" must be rejected, not resolved), they turn integers into
// NSNumber/Double (so 2^53 + 1 and 1.0 become indistinguishable from valid offsets), and they
// are not something to point a fuzzer at. This parser works on raw bytes, keeps object members
// in document order, rejects duplicate keys, bounds nesting depth (so recursion cannot exhaust
// the stack), and only ever advances `position`, so it terminates on any input.

/// A parsed JSON value. Numbers keep their exact source text; see `JSONValue.integer(_:)`.
/// Public for config files (CheckpointFormats' ConfigJSON), which must pass every number
/// through with its text unchanged (`6.0` stays `6.0`, `1e-05` stays `1e-05`).
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSONValue])
    /// Members in document order; keys are unique (the parser rejects duplicates).
    case object([JSONMember])

    /// "an object", "a string", ... for error messages.
    public var kindDescription: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .number: return "a number"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }

    /// Outcome of reading a JSON number as a non-negative `Int`.
    enum Integer: Equatable {
        case value(Int)
        case negative
        case notInteger
        case tooLarge

        /// Words for error messages ("is negative", ...); nil for `.value`.
        var problem: String? {
            switch self {
            case .value: return nil
            case .negative: return "is negative"
            case .notInteger: return "is not an integer"
            case .tooLarge: return "is too large"
            }
        }
    }

    /// Reads JSON number text (already validated by the parser) as a non-negative integer.
    /// Fractions and exponents are rejected even when integral (`1.0`, `1e3`), as serde_json
    /// does for `usize` fields; overflow is detected rather than wrapped.
    static func integer(_ text: String) -> Integer {
        let utf8 = text.utf8
        if utf8.first == UInt8(ascii: "-") { return .negative }
        var value = 0
        for byte in utf8 {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return .notInteger }
            let (times10, o1) = value.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(Int(byte - UInt8(ascii: "0")))
            if o1 || o2 { return .tooLarge }
            value = sum
        }
        return .value(value)
    }
}

/// One `"key": value` pair of an object.
public struct JSONMember: Sendable, Equatable {
    public var key: String
    public var value: JSONValue

    public init(key: String, value: JSONValue) {
        self.key = key
        self.value = value
    }
}

/// Why parsing failed, at which byte offset (relative to the parsed buffer).
public struct JSONParseError: Error, CustomStringConvertible {
    public enum Kind: Sendable {
        case syntax(String)
        /// `path` lists the keys of the enclosing objects (outermost first; `[]` marks an array).
        case duplicateKey(key: String, path: [String])
    }
    public var kind: Kind
    public var offset: Int

    /// "malformed JSON at byte offset 12: expected ':' after object key", ...
    public var description: String {
        switch kind {
        case .syntax(let reason): return "malformed JSON at byte offset \(offset): \(reason)"
        case .duplicateKey(let key, _): return "duplicate key \"\(key)\""
        }
    }
}

extension JSONValue {
    /// Parses a whole JSON document (UTF-8 checked first), with this file's strict parser:
    /// duplicate keys refused, members in document order, numbers as their source text.
    public static func parse(document bytes: UnsafeRawBufferPointer) throws(JSONParseError) -> JSONValue {
        if let bad = firstInvalidUTF8Index(bytes) { throw JSONParseError(kind: .syntax("not valid UTF-8"), offset: bad) }
        return try JSONParser.parse(bytes)
    }

    /// `parse(document:)` of an array of bytes.
    public static func parse(document bytes: [UInt8]) throws(JSONParseError) -> JSONValue {
        let result: Result<JSONValue, JSONParseError> = bytes.withUnsafeBytes { raw in
            do throws(JSONParseError) { return .success(try parse(document: raw)) } catch { return .failure(error) }
        }
        return try result.get()
    }

    /// An object's member, nil when absent or when this is not an object.
    public subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.key == key }?.value
    }
}

/// Recursive-descent parser over a byte buffer. Recursion depth is bounded by `maxDepth`.
struct JSONParser {
    /// Deepest nesting of arrays/objects accepted. Headers need 3 levels; 64 leaves room for
    /// arbitrary extra fields while keeping stack use tiny (also under AddressSanitizer).
    static let maxDepth = 64

    private let bytes: UnsafeRawBufferPointer
    private var position = 0
    /// Keys of the objects enclosing the current value, for duplicate-key messages.
    private var path: [String] = []

    private init(bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    /// Parses one JSON document filling all of `bytes` (surrounding whitespace allowed).
    /// The caller must have validated `bytes` as UTF-8: string contents are decoded as-is.
    static func parse(_ bytes: UnsafeRawBufferPointer) throws(JSONParseError) -> JSONValue {
        var parser = JSONParser(bytes: bytes)
        parser.skipWhitespace()
        let value = try parser.parseValue(depth: 0)
        parser.skipWhitespace()
        guard parser.position == bytes.count else {
            throw parser.error("unexpected data after the top-level value")
        }
        return value
    }

    private func error(_ message: String) -> JSONParseError {
        JSONParseError(kind: .syntax(message), offset: position)
    }

    private var atEnd: Bool { position >= bytes.count }

    private func peek() -> UInt8? { position < bytes.count ? bytes[position] : nil }

    private mutating func skipWhitespace() {
        while position < bytes.count {
            switch bytes[position] {
            case 0x20, 0x09, 0x0A, 0x0D: position += 1
            default: return
            }
        }
    }

    private mutating func expect(_ byte: UInt8, _ what: String) throws(JSONParseError) {
        guard peek() == byte else { throw error("expected \(what)") }
        position += 1
    }

    private mutating func parseValue(depth: Int) throws(JSONParseError) -> JSONValue {
        guard let byte = peek() else { throw error("unexpected end of input") }
        switch byte {
        case UInt8(ascii: "{"): return try parseObject(depth: depth + 1)
        case UInt8(ascii: "["): return try parseArray(depth: depth + 1)
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        case UInt8(ascii: "t"): try parseLiteral("true"); return .bool(true)
        case UInt8(ascii: "f"): try parseLiteral("false"); return .bool(false)
        case UInt8(ascii: "n"): try parseLiteral("null"); return .null
        default: throw error("unexpected character")
        }
    }

    private mutating func parseLiteral(_ word: StaticString) throws(JSONParseError) {
        let count = word.utf8CodeUnitCount
        guard bytes.count - position >= count else { throw error("invalid literal") }
        for i in 0..<count where bytes[position + i] != word.utf8Start[i] {
            throw error("invalid literal")
        }
        position += count
    }

    private mutating func parseObject(depth: Int) throws(JSONParseError) -> JSONValue {
        guard depth <= Self.maxDepth else { throw error("nesting deeper than \(Self.maxDepth) levels") }
        position += 1  // "{"
        var members: [JSONMember] = []
        var keys = Set<String>()
        skipWhitespace()
        if peek() == UInt8(ascii: "}") {
            position += 1
            return .object(members)
        }
        while true {
            skipWhitespace()
            guard peek() == UInt8(ascii: "\"") else { throw error("expected a string key") }
            let keyOffset = position
            let key = try parseString()
            guard keys.insert(key).inserted else {
                throw JSONParseError(kind: .duplicateKey(key: key, path: path), offset: keyOffset)
            }
            skipWhitespace()
            try expect(UInt8(ascii: ":"), "':' after object key")
            skipWhitespace()
            path.append(key)
            let value = try parseValue(depth: depth)
            path.removeLast()
            members.append(JSONMember(key: key, value: value))
            skipWhitespace()
            switch peek() {
            case UInt8(ascii: ","): position += 1
            case UInt8(ascii: "}"): position += 1; return .object(members)
            default: throw error("expected ',' or '}' in object")
            }
        }
    }

    private mutating func parseArray(depth: Int) throws(JSONParseError) -> JSONValue {
        guard depth <= Self.maxDepth else { throw error("nesting deeper than \(Self.maxDepth) levels") }
        position += 1  // "["
        var elements: [JSONValue] = []
        skipWhitespace()
        if peek() == UInt8(ascii: "]") {
            position += 1
            return .array(elements)
        }
        path.append("[]")
        defer { path.removeLast() }
        while true {
            skipWhitespace()
            elements.append(try parseValue(depth: depth))
            skipWhitespace()
            switch peek() {
            case UInt8(ascii: ","): position += 1
            case UInt8(ascii: "]"): position += 1; return .array(elements)
            default: throw error("expected ',' or ']' in array")
            }
        }
    }

    /// JSON number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    private mutating func parseNumber() throws(JSONParseError) -> JSONValue {
        let start = position
        if peek() == UInt8(ascii: "-") { position += 1 }
        guard let first = peek(), isDigit(first) else { throw error("invalid number") }
        position += 1
        if first != UInt8(ascii: "0") { skipDigits() }
        if peek() == UInt8(ascii: ".") {
            position += 1
            guard let d = peek(), isDigit(d) else { throw error("invalid number: digit expected after '.'") }
            skipDigits()
        }
        if peek() == UInt8(ascii: "e") || peek() == UInt8(ascii: "E") {
            position += 1
            if peek() == UInt8(ascii: "+") || peek() == UInt8(ascii: "-") { position += 1 }
            guard let d = peek(), isDigit(d) else { throw error("invalid number: digit expected in exponent") }
            skipDigits()
        }
        return .number(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self))
    }

    private func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }

    private mutating func skipDigits() {
        while let b = peek(), isDigit(b) { position += 1 }
    }

    private mutating func parseString() throws(JSONParseError) -> String {
        position += 1  // opening quote
        let start = position
        // Fast path: no escapes, decode the slice directly.
        while let b = peek() {
            if b == UInt8(ascii: "\"") {
                let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
                position += 1
                return text
            }
            if b == UInt8(ascii: "\\") { break }
            guard b >= 0x20 else { throw error("unescaped control character in string") }
            position += 1
        }
        var utf8 = Array(bytes[start..<position])
        while true {
            guard let b = peek() else { throw error("unterminated string") }
            position += 1
            switch b {
            case UInt8(ascii: "\""):
                return String(decoding: utf8, as: UTF8.self)
            case UInt8(ascii: "\\"):
                guard let e = peek() else { throw error("unterminated string") }
                position += 1
                switch e {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): utf8.append(e)
                case UInt8(ascii: "b"): utf8.append(0x08)
                case UInt8(ascii: "f"): utf8.append(0x0C)
                case UInt8(ascii: "n"): utf8.append(0x0A)
                case UInt8(ascii: "r"): utf8.append(0x0D)
                case UInt8(ascii: "t"): utf8.append(0x09)
                case UInt8(ascii: "u"):
                    var value = try parseHex4()
                    if (0xD800...0xDBFF).contains(value) {
                        // A UTF-16 surrogate pair spelled as two escapes.
                        guard peek() == UInt8(ascii: "\\") else { throw error("lone leading surrogate in \\u escape") }
                        position += 1
                        guard peek() == UInt8(ascii: "u") else { throw error("lone leading surrogate in \\u escape") }
                        position += 1
                        let low = try parseHex4()
                        guard (0xDC00...0xDFFF).contains(low) else { throw error("invalid trailing surrogate in \\u escape") }
                        value = 0x10000 + ((value - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00...0xDFFF).contains(value) {
                        throw error("lone trailing surrogate in \\u escape")
                    }
                    // Cannot fail: surrogates were excluded and value <= 0x10FFFF.
                    guard let scalar = Unicode.Scalar(value) else { throw error("invalid \\u escape") }
                    utf8.append(contentsOf: String(Character(scalar)).utf8)
                default:
                    throw error("invalid escape character in string")
                }
            default:
                guard b >= 0x20 else { throw error("unescaped control character in string") }
                utf8.append(b)
            }
        }
    }

    private mutating func parseHex4() throws(JSONParseError) -> UInt32 {
        guard bytes.count - position >= 4 else { throw error("truncated \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let b = bytes[position]
            let digit: UInt32
            switch b {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(b - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(b - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(b - UInt8(ascii: "A") + 10)
            default: throw error("invalid hex digit in \\u escape")
            }
            value = value << 4 | digit
            position += 1
        }
        return value
    }
}

// MARK: - UTF-8 validation

/// Index of the first byte that does not start a well-formed UTF-8 sequence (RFC 3629: no
/// overlong forms, no surrogates, nothing above U+10FFFF), or nil when all of `bytes` is valid.
func firstInvalidUTF8Index(_ bytes: UnsafeRawBufferPointer) -> Int? {
    var i = 0
    let n = bytes.count
    while i < n {
        let b0 = bytes[i]
        if b0 < 0x80 {
            i += 1
            continue
        }
        // Allowed range of the second byte narrows for E0/ED/F0/F4 to exclude overlongs,
        // surrogates and code points above U+10FFFF.
        var low: UInt8 = 0x80
        var high: UInt8 = 0xBF
        let length: Int
        switch b0 {
        case 0xC2...0xDF: length = 2
        case 0xE0: length = 3; low = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED: length = 3; high = 0x9F
        case 0xF0: length = 4; low = 0x90
        case 0xF1...0xF3: length = 4
        case 0xF4: length = 4; high = 0x8F
        default: return i
        }
        guard n - i >= length else { return i }
        let b1 = bytes[i + 1]
        guard b1 >= low, b1 <= high else { return i }
        for k in 2..<length where bytes[i + k] & 0xC0 != 0x80 {
            return i
        }
        i += length
    }
    return nil
}

// MARK: - Writing

/// Appends `text` as a JSON string literal. Escapes `"`, `\` and control characters like
/// serde_json / Python's json (short forms for \b \f \n \r \t, `\u00XX` otherwise). With
/// `asciiOnly`, everything outside printable ASCII is escaped as `\uXXXX` (UTF-16, surrogate
/// pairs), matching Python's `json.dumps(ensure_ascii=True)`.
func appendJSONString(_ text: String, to out: inout [UInt8], asciiOnly: Bool = false) {
    out.append(UInt8(ascii: "\""))
    func appendHex4(_ unit: UInt16) {
        let digits = Array("0123456789abcdef".utf8)
        out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "u")])
        for shift in stride(from: 12, through: 0, by: -4) {
            out.append(digits[Int((unit >> UInt16(shift)) & 0xF)])
        }
    }
    for scalar in text.unicodeScalars {
        switch scalar.value {
        case 0x22: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\"")])
        case 0x5C: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\")])
        case 0x08: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "b")])
        case 0x0C: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "f")])
        case 0x0A: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "n")])
        case 0x0D: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "r")])
        case 0x09: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "t")])
        case 0..<0x20: appendHex4(UInt16(scalar.value))
        case 0x20..<0x7F: out.append(UInt8(scalar.value))
        default:
            if asciiOnly {
                for unit in String(Character(scalar)).utf16 { appendHex4(unit) }
            } else {
                out.append(contentsOf: String(Character(scalar)).utf8)
            }
        }
    }
    out.append(UInt8(ascii: "\""))
}

extension Array where Element == UInt8 {
    mutating func appendASCII(_ text: String) { append(contentsOf: text.utf8) }
}

/// Orders strings by Unicode scalar values (what Python's `sorted` and Rust's `BTreeMap` do),
/// not by Swift's canonical-equivalence ordering, so encoded files are byte-for-byte stable.
func scalarOrder(_ a: String, _ b: String) -> Bool {
    a.unicodeScalars.lexicographicallyPrecedes(b.unicodeScalars)
}

// MARK: - Python's layout

extension JSONValue {
    /// The text Python's `json.dumps(value, indent=indent, sort_keys=sortKeys,
    /// ensure_ascii=asciiOnly)` writes (no trailing newline): each element and member on its own
    /// line (with an indent the item separator is `","` + newline), `": "` after keys, `{}` and
    /// `[]` for empty containers, keys in code-point order, non-ASCII as lowercase `\uXXXX`
    /// UTF-16 escapes. Numbers are written as their source text.
    public func pythonJSON(indent: Int = 2, sortKeys: Bool = true, asciiOnly: Bool = true) -> [UInt8] {
        var out: [UInt8] = []
        appendPython(to: &out, level: 0, indent: indent, sortKeys: sortKeys, asciiOnly: asciiOnly)
        return out
    }

    private func appendPython(to out: inout [UInt8], level: Int, indent: Int, sortKeys: Bool, asciiOnly: Bool) {
        func newline(_ level: Int) {
            out.append(UInt8(ascii: "\n"))
            out.append(contentsOf: repeatElement(UInt8(ascii: " "), count: level * indent))
        }
        switch self {
        case .null: out.appendASCII("null")
        case .bool(let b): out.appendASCII(b ? "true" : "false")
        case .number(let text): out.appendASCII(text)
        case .string(let s): appendJSONString(s, to: &out, asciiOnly: asciiOnly)
        case .array(let elements):
            guard !elements.isEmpty else { out.appendASCII("[]"); return }
            out.append(UInt8(ascii: "["))
            for (i, e) in elements.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                newline(level + 1)
                e.appendPython(to: &out, level: level + 1, indent: indent, sortKeys: sortKeys, asciiOnly: asciiOnly)
            }
            newline(level)
            out.append(UInt8(ascii: "]"))
        case .object(let members):
            guard !members.isEmpty else { out.appendASCII("{}"); return }
            out.append(UInt8(ascii: "{"))
            let ordered = sortKeys ? members.sorted { scalarOrder($0.key, $1.key) } : members
            for (i, m) in ordered.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                newline(level + 1)
                appendJSONString(m.key, to: &out, asciiOnly: asciiOnly)
                out.appendASCII(": ")
                m.value.appendPython(to: &out, level: level + 1, indent: indent, sortKeys: sortKeys, asciiOnly: asciiOnly)
            }
            newline(level)
            out.append(UInt8(ascii: "}"))
        }
    }
}
