#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Everything that can go wrong reading or writing safetensors files and sharded checkpoints.
///
/// Every case carries `file`: the path the problem is about (as given to the API), or
/// `"<memory>"` for in-memory buffers. `description` is always a single line of the form
/// `<file>: <problem>`, e.g.
/// `model.safetensors: tensor 'w' data_offsets [0, 12] end beyond data buffer of 8 bytes`.
/// Names taken from files are quoted with control characters escaped, so a hostile header
/// cannot break the one-line guarantee.
public enum SafeTensorsError: Error, CustomStringConvertible, Equatable, Sendable {
    // MARK: Container layout
    /// The file is shorter than the 8-byte little-endian header length prefix.
    case fileTooShort(file: String, byteCount: Int)
    /// The header length prefix points past the end of the file.
    case headerLengthBeyondFile(file: String, headerLength: UInt64, fileSize: Int)
    /// The header is longer than `SafeTensorsHeader.maxHeaderLength` (a sanity limit, as in the
    /// Rust implementation).
    case headerTooLarge(file: String, headerLength: Int, limit: Int)
    /// The header bytes are not valid UTF-8; `offset` is the file offset of the first bad byte.
    case headerNotUTF8(file: String, offset: Int)
    /// The header is not well-formed JSON (or nests deeper than the parser allows); `offset` is
    /// the file offset where parsing stopped.
    case malformedHeader(file: String, offset: Int, reason: String)
    /// The header is valid JSON but not an object.
    case headerNotObject(file: String, found: String)
    /// A JSON object repeats a key; `context` says which object (e.g. `__metadata__`).
    case duplicateKey(file: String, key: String, context: String)
    /// Two header entries have the same tensor name.
    case duplicateTensor(file: String, tensor: String)

    // MARK: Tensor entries
    /// A tensor entry lacks `dtype`, `shape` or `data_offsets`.
    case missingField(file: String, tensor: String, field: String)
    /// A tensor entry (`field == nil`) or one of its fields has the wrong JSON type.
    case wrongType(file: String, tensor: String, field: String?, expected: String, found: String)
    /// The `dtype` string is not one of `DType`'s raw values.
    case unknownDType(file: String, tensor: String, dtype: String)
    /// A `shape` or `data_offsets` element is negative, fractional / exponent-form, or too large
    /// for `Int`. `value` is the JSON text.
    case invalidInteger(file: String, tensor: String, field: String, value: String, reason: String)
    /// `shape`'s element count times the dtype size overflows `Int`.
    case shapeTooLarge(file: String, tensor: String, shape: [Int])
    /// `data_offsets` has begin > end.
    case beginAfterEnd(file: String, tensor: String, begin: Int, end: Int)
    /// `data_offsets` ends past the data buffer (`dataByteCount` = file size - data start).
    case endBeyondBuffer(file: String, tensor: String, begin: Int, end: Int, dataByteCount: Int)
    /// Two tensors' byte ranges share at least one byte.
    case overlappingTensors(file: String, tensor: String, range: Range<Int>, other: String, otherRange: Range<Int>)
    /// `dtype` x `shape` needs `expected` bytes but `data_offsets` spans `actual`.
    case byteCountMismatch(file: String, tensor: String, dtype: DType, shape: [Int], expected: Int, actual: Int)
    /// `__metadata__` is not an object (or null).
    case metadataNotObject(file: String, found: String)
    /// A `__metadata__` value is not a string.
    case metadataValueNotString(file: String, key: String, found: String)

    // MARK: I/O
    /// A system call failed; `errno` is the C errno (0 when not applicable, e.g. "not a regular
    /// file" reported with `EISDIR`/`EINVAL` already mapped).
    case io(file: String, operation: String, errno: Int32)
    /// The path is a FIFO, a device, a directory or a socket: only regular files are read (a FIFO
    /// would block the open, a device never end).
    case notRegularFile(file: String, kind: String)

    // MARK: Writing
    /// A declared tensor is named `__metadata__`, which the format reserves.
    case reservedTensorName(file: String, tensor: String)
    /// A declared shape has a negative dimension.
    case invalidShape(file: String, tensor: String, shape: [Int])
    /// `write` named a tensor that was not declared.
    case undeclaredTensor(file: String, tensor: String)
    /// `write` named a tensor that was already completed (tensors are written in declaration order).
    case tensorOutOfOrder(file: String, tensor: String, expected: String)
    /// A tensor was left with fewer bytes than `dtype` x `shape` requires (on moving on to a later
    /// tensor, or on `finish`).
    case incompleteTensor(file: String, tensor: String, expected: Int, written: Int)
    /// `write` would give a tensor more bytes than `dtype` x `shape` requires.
    case tooManyBytes(file: String, tensor: String, expected: Int, received: Int)
    /// The writer was already finished, aborted, or failed.
    case writerClosed(file: String)

    // MARK: Sharded checkpoints
    /// A directory holds neither `model.safetensors.index.json` nor `model.safetensors`.
    case noCheckpoint(file: String)
    /// `model.safetensors.index.json` is malformed.
    case invalidIndex(file: String, reason: String)
    /// The index names a shard file that does not exist.
    case missingShard(file: String, shard: String)
    /// The index maps a tensor to a shard that does not contain it.
    case tensorMissingFromShard(file: String, tensor: String, shard: String)
    /// A tensor is stored in more than one shard.
    case tensorInMultipleShards(file: String, tensor: String, shards: [String])
    /// A shard contains a tensor that the index does not list (or lists under another shard).
    case tensorNotInIndex(file: String, tensor: String, shard: String)

    /// The path (or `"<memory>"`) the error is about.
    public var file: String {
        switch self {
        case .fileTooShort(let f, _), .headerLengthBeyondFile(let f, _, _), .headerTooLarge(let f, _, _),
             .headerNotUTF8(let f, _), .malformedHeader(let f, _, _), .headerNotObject(let f, _),
             .duplicateKey(let f, _, _), .duplicateTensor(let f, _), .missingField(let f, _, _),
             .wrongType(let f, _, _, _, _), .unknownDType(let f, _, _), .invalidInteger(let f, _, _, _, _),
             .shapeTooLarge(let f, _, _), .beginAfterEnd(let f, _, _, _), .endBeyondBuffer(let f, _, _, _, _),
             .overlappingTensors(let f, _, _, _, _), .byteCountMismatch(let f, _, _, _, _, _),
             .metadataNotObject(let f, _), .metadataValueNotString(let f, _, _), .io(let f, _, _), .notRegularFile(let f, _),
             .reservedTensorName(let f, _), .invalidShape(let f, _, _), .undeclaredTensor(let f, _),
             .tensorOutOfOrder(let f, _, _), .incompleteTensor(let f, _, _, _), .tooManyBytes(let f, _, _, _),
             .writerClosed(let f), .noCheckpoint(let f), .invalidIndex(let f, _), .missingShard(let f, _),
             .tensorMissingFromShard(let f, _, _), .tensorInMultipleShards(let f, _, _),
             .tensorNotInIndex(let f, _, _):
            return f
        }
    }

    public var description: String { "\(oneLine(file)): \(problem)" }

    /// The part of the description after `<file>: `.
    public var problem: String {
        switch self {
        case .fileTooShort(_, let n):
            return "file is \(n) bytes, shorter than the 8-byte header length prefix"
        case .headerLengthBeyondFile(_, let length, let size):
            return "header length \(length) bytes extends beyond the file (\(size) bytes in all)"
        case .headerTooLarge(_, let length, let limit):
            return "header length \(length) bytes exceeds the limit of \(limit) bytes"
        case .headerNotUTF8(_, let offset):
            return "header is not valid UTF-8 (bad byte at file offset \(offset))"
        case .malformedHeader(_, let offset, let reason):
            return "malformed JSON header at file offset \(offset): \(oneLine(reason))"
        case .headerNotObject(_, let found):
            return "JSON header is \(found), expected an object"
        case .duplicateKey(_, let key, let context):
            return "duplicate key \(quoted(key)) in \(oneLine(context))"
        case .duplicateTensor(_, let tensor):
            return "duplicate tensor name \(quoted(tensor))"
        case .missingField(_, let tensor, let field):
            return "tensor \(quoted(tensor)) is missing field '\(field)'"
        case .wrongType(_, let tensor, let field, let expected, let found):
            if let field {
                return "tensor \(quoted(tensor)) field '\(field)' is \(found), expected \(expected)"
            }
            return "tensor \(quoted(tensor)) entry is \(found), expected \(expected)"
        case .unknownDType(_, let tensor, let dtype):
            return "tensor \(quoted(tensor)) has unknown dtype \(quoted(dtype))"
        case .invalidInteger(_, let tensor, let field, let value, let reason):
            return "tensor \(quoted(tensor)) \(field) value \(oneLine(value)) \(reason); expected a non-negative integer"
        case .shapeTooLarge(_, let tensor, let shape):
            return "tensor \(quoted(tensor)) shape \(list(shape)) byte count overflows a 64-bit integer"
        case .beginAfterEnd(_, let tensor, let begin, let end):
            return "tensor \(quoted(tensor)) data_offsets [\(begin), \(end)] begin is after end"
        case .endBeyondBuffer(_, let tensor, let begin, let end, let size):
            return "tensor \(quoted(tensor)) data_offsets [\(begin), \(end)] end beyond data buffer of \(size) bytes"
        case .overlappingTensors(_, let tensor, let range, let other, let otherRange):
            return "tensor \(quoted(tensor)) data_offsets [\(range.lowerBound), \(range.upperBound)] overlaps tensor \(quoted(other)) data_offsets [\(otherRange.lowerBound), \(otherRange.upperBound)]"
        case .byteCountMismatch(_, let tensor, let dtype, let shape, let expected, let actual):
            return "tensor \(quoted(tensor)) dtype \(dtype.rawValue) shape \(list(shape)) needs \(expected) bytes but data_offsets span \(actual) bytes"
        case .metadataNotObject(_, let found):
            return "__metadata__ is \(found), expected an object of strings"
        case .metadataValueNotString(_, let key, let found):
            return "__metadata__ value for key \(quoted(key)) is \(found), expected a string"
        case .io(_, let operation, let code):
            return "\(operation) failed: \(errorString(code)) (errno \(code))"
        case .notRegularFile(_, let kind):
            return "is not a regular file (\(kind)); only regular files are read"
        case .reservedTensorName(_, let tensor):
            return "tensor name \(quoted(tensor)) is reserved for metadata"
        case .invalidShape(_, let tensor, let shape):
            return "tensor \(quoted(tensor)) shape \(list(shape)) has a negative dimension"
        case .undeclaredTensor(_, let tensor):
            return "tensor \(quoted(tensor)) was not declared when the writer was created"
        case .tensorOutOfOrder(_, let tensor, let expected):
            return "tensor \(quoted(tensor)) written out of order (already complete; next is \(quoted(expected)))"
        case .incompleteTensor(_, let tensor, let expected, let written):
            return "tensor \(quoted(tensor)) is incomplete: \(written) of \(expected) bytes written"
        case .tooManyBytes(_, let tensor, let expected, let received):
            return "tensor \(quoted(tensor)) given \(received) bytes but its dtype and shape need \(expected)"
        case .writerClosed:
            return "writer is already finished, aborted or failed"
        case .noCheckpoint:
            return "directory holds neither model.safetensors.index.json nor model.safetensors"
        case .invalidIndex(_, let reason):
            return "invalid shard index: \(oneLine(reason))"
        case .missingShard(_, let shard):
            return "shard file \(quoted(shard)) named in the index does not exist"
        case .tensorMissingFromShard(_, let tensor, let shard):
            return "tensor \(quoted(tensor)) is mapped to shard \(quoted(shard)) but that shard does not contain it"
        case .tensorInMultipleShards(_, let tensor, let shards):
            return "tensor \(quoted(tensor)) is present in several shards: \(shards.map(quoted).joined(separator: ", "))"
        case .tensorNotInIndex(_, let tensor, let shard):
            return "tensor \(quoted(tensor)) in shard \(quoted(shard)) is not mapped to that shard by the index"
        }
    }
}

// MARK: - Formatting helpers

/// Text from a file made safe for a terminal line: control characters (C0, DEL, C1 — ESC and
/// CSI start terminal escape sequences — and the Unicode line separators) are written as
/// `\u{1b}`, newline, return and tab as `\n`, `\r`, `\t`; beyond `limit` scalars the text is cut
/// with "...". The one helper every human-readable output (tables, error messages) puts names
/// from files through; JSON output escapes on its own.
public func escapingControlCharacters(_ text: String, limit: Int = .max) -> String {
    var out = ""
    var count = 0
    for scalar in text.unicodeScalars {
        if count == limit {
            out += "..."
            break
        }
        count += 1
        switch scalar.value {
        case 0x0A: out += "\\n"
        case 0x0D: out += "\\r"
        case 0x09: out += "\\t"
        case 0..<0x20, 0x7F, 0x80..<0xA0, 0x2028, 0x2029:
            out += "\\u{" + String(scalar.value, radix: 16) + "}"
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out
}

/// Escapes control characters (and truncates very long text) so a message stays on one line.
func oneLine(_ text: String, limit: Int = 200) -> String { escapingControlCharacters(text, limit: limit) }

/// `'name'` with control characters escaped.
func quoted(_ name: String) -> String { "'" + oneLine(name) + "'" }

private func list(_ values: [Int]) -> String {
    "[" + values.map(String.init).joined(separator: ", ") + "]"
}

private func errorString(_ code: Int32) -> String {
    guard let text = strerror(code) else { return "unknown error" }
    return String(cString: text)
}
