import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `model.safetensors.index.json`, the index of a sharded checkpoint in the `transformers`
/// layout:
///
///     {
///       "metadata": {
///         "total_size": 123456
///       },
///       "weight_map": {
///         "lm_head.weight": "model-00002-of-00002.safetensors",
///         ...
///       }
///     }
///
/// Shard names are file names relative to the index's directory.
public struct ShardIndex: Sendable, Equatable {
    /// The index file name `transformers` uses.
    public static let fileName = "model.safetensors.index.json"

    /// `metadata.total_size`: sum of all tensors' data bytes (headers not included), or nil
    /// when the index does not record it. Other metadata entries are ignored.
    public var totalSize: Int?
    /// Tensor name -> shard file name.
    public var weightMap: [String: String]

    public init(totalSize: Int?, weightMap: [String: String]) {
        self.totalSize = totalSize
        self.weightMap = weightMap
    }

    /// Distinct shard file names, sorted (for `model-0000i-of-0000n` names: shard order).
    public var shardFileNames: [String] { Set(weightMap.values).sorted(by: scalarOrder) }

    /// Reads and decodes the index at `url`.
    public init(contentsOf url: URL) throws {
        let path = url.path
        let region = try ByteRegion(mapping: path)
        try self.init(json: region.bytes, source: path)
    }

    /// Decodes index JSON. Strict about what is used (`weight_map` must map strings to plain file
    /// names, no duplicate keys, `total_size` a non-negative integer when present), lenient about
    /// extra keys.
    ///
    /// - Parameter source: the path named in error messages.
    public init(json bytes: UnsafeRawBufferPointer, source: String = "<memory>") throws {
        func invalid(_ reason: String) -> SafeTensorsError { .invalidIndex(file: source, reason: reason) }
        if let bad = firstInvalidUTF8Index(bytes) { throw invalid("not valid UTF-8 at byte offset \(bad)") }
        let root: JSONValue
        do {
            root = try JSONParser.parse(bytes)
        } catch {
            switch error.kind {
            case .syntax(let reason): throw invalid("malformed JSON at byte offset \(error.offset): \(reason)")
            case .duplicateKey(let key, _): throw invalid("duplicate key \(quoted(key))")
            }
        }
        guard case .object(let members) = root else { throw invalid("top level is \(root.kindDescription), expected an object") }
        func member(_ object: [JSONMember], _ key: String) -> JSONValue? { object.first { $0.key == key }?.value }

        var totalSize: Int? = nil
        if let metadata = member(members, "metadata") {
            guard case .object(let entries) = metadata else { throw invalid("'metadata' is \(metadata.kindDescription), expected an object") }
            if let total = member(entries, "total_size") {
                guard case .number(let text) = total, case .value(let size) = JSONValue.integer(text) else {
                    throw invalid("'metadata.total_size' is not a non-negative integer")
                }
                totalSize = size
            }
        }
        guard let map = member(members, "weight_map") else { throw invalid("missing 'weight_map'") }
        guard case .object(let entries) = map else { throw invalid("'weight_map' is \(map.kindDescription), expected an object") }
        var weightMap: [String: String] = [:]
        for entry in entries {
            guard case .string(let shard) = entry.value else {
                throw invalid("'weight_map' entry \(quoted(entry.key)) is \(entry.value.kindDescription), expected a shard file name")
            }
            guard Self.isPlainFileName(shard) else {
                throw invalid("'weight_map' entry \(quoted(entry.key)) names \(quoted(shard)), which is not a plain file name")
            }
            weightMap[entry.key] = shard
        }
        self.init(totalSize: totalSize, weightMap: weightMap)
    }

    /// `init(json:source:)` for an array.
    public init(json bytes: [UInt8], source: String = "<memory>") throws {
        self = try bytes.withUnsafeBytes { try ShardIndex(json: $0, source: source) }
    }

    /// Shard names must stay inside the checkpoint directory: no separators, no `.`/`..`.
    static func isPlainFileName(_ name: String) -> Bool {
        !name.isEmpty && name != "." && name != ".." && !name.contains("/") && !name.unicodeScalars.contains("\0")
    }

    /// The index as `transformers` writes it: `json.dumps(index, indent=2, sort_keys=True)`
    /// plus a newline (non-ASCII escaped as `\uXXXX`, keys in code-point order).
    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        out.appendASCII("{\n  \"metadata\": ")
        if let totalSize {
            out.appendASCII("{\n    \"total_size\": \(totalSize)\n  }")
        } else {
            out.appendASCII("{}")
        }
        out.appendASCII(",\n  \"weight_map\": ")
        if weightMap.isEmpty {
            out.appendASCII("{}")
        } else {
            out.appendASCII("{\n")
            for (i, name) in weightMap.keys.sorted(by: scalarOrder).enumerated() {
                if i > 0 { out.appendASCII(",\n") }
                out.appendASCII("    ")
                appendJSONString(name, to: &out, asciiOnly: true)
                out.appendASCII(": ")
                appendJSONString(weightMap[name]!, to: &out, asciiOnly: true)
            }
            out.appendASCII("\n  }")
        }
        out.appendASCII("\n}\n")
        return out
    }
}
