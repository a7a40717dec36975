import FileOutput
import Foundation

/// A model card's front matter (README.md's YAML between two "---" lines), read as far as gguf-py's
/// Metadata needs it: top-level keys whose values are scalars, flow sequences of scalars
/// (`[a, b]`), or block sequences of scalars (`- a`). Anything else (nested mappings such as
/// `model-index` or `widget`, block scalars, anchors) is skipped; `unreadable` lists the keys the
/// converter would use that were skipped that way, so the export can say so.
struct ModelCard {
    enum Value: Equatable {
        case null
        case string(String)
        case list([String])
        /// A value this reader does not take (a number, a boolean, a mapping, ...).
        case other
    }

    var values: [String: Value] = [:]

    /// The keys gguf-py's Metadata reads from a card.
    static let used: Set<String> = ["name", "author", "version", "organization", "description", "finetune", "basename", "size_label", "url", "doi", "uuid",
                                    "repo_url", "model_name", "model_author", "model_version", "model_organization", "model_description", "model_finetune",
                                    "model_basename", "model_size_label", "model_url", "model_doi", "model_uuid", "model_repo_url", "model_creator",
                                    "model_type", "base_model", "base_models", "base_model_sources", "datasets", "dataset", "dataset_sources", "license",
                                    "license_name", "license_link", "tags", "pipeline_tag", "languages", "language"]

    var unreadable: [String] { values.filter { Self.used.contains($0.key) && $0.value == .other }.map(\.key).sorted() }

    /// The card of `directory`/README.md, or nil without one (or without front matter).
    init?(directory: String) {
        guard let data = try? InputFile.read(directory + "/README.md"), let text = String(data: data, encoding: .utf8) else { return nil }
        // Lines split on the scalar "\n" ("\r\n" is one Character to Swift), a trailing "\r" dropped.
        let lines = text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
            var scalars = String.UnicodeScalarView(line)
            if scalars.last == "\r" { scalars.removeLast() }
            return String(scalars)
        }
        guard lines.first == "---" else { return nil }
        var yaml: [String] = []
        for line in lines.dropFirst() {
            if line == "---" { break }
            yaml.append(line)
        }
        // gguf-py's two fixes before yaml.safe_load: "- no" stays a string, tabs become two spaces.
        let body = (yaml.joined(separator: "\n") + "\n").replacingOccurrences(of: "- no\n", with: "- \"no\"\n").replacingOccurrences(of: "\t", with: "  ")
        parse(body.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false).map { String(String.UnicodeScalarView($0)) })
    }

    private mutating func parse(_ lines: [String]) {
        var i = 0
        while i < lines.count {
            let line = lines[i]
            i += 1
            guard let (key, inline) = Self.topLevelKey(line) else { continue }
            if !inline.isEmpty {
                values[key] = Self.inlineValue(inline)
                continue
            }
            // A block: the lines up to the next top-level key.
            var block: [String] = []
            while i < lines.count, Self.topLevelKey(lines[i]) == nil {
                block.append(lines[i])
                i += 1
            }
            let content = block.filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty && !$0.trimmingCharacters(in: .whitespaces).hasPrefix("#") }
            if content.isEmpty { values[key] = .null; continue }
            let indent = content[0].prefix { $0 == " " }.count
            var items: [String] = []
            for l in content {
                let stripped = l.dropFirst(indent)
                guard l.prefix(while: { $0 == " " }).count == indent, stripped.hasPrefix("- ") || stripped == "-",
                      case .string(let s) = Self.scalar(String(stripped.dropFirst(1)).trimmingCharacters(in: .whitespaces)) else {
                    items = []
                    values[key] = .other
                    break
                }
                items.append(s)
            }
            if values[key] != .other { values[key] = .list(items) }
        }
    }

    /// "key: value" at column 0 (not a comment, a sequence item or a continuation).
    static func topLevelKey(_ line: String) -> (String, String)? {
        guard let first = line.first, !first.isWhitespace, !"#-[{'\"".contains(first), let colon = line.range(of: ":") else { return nil }
        let rest = line[colon.upperBound...]
        guard rest.isEmpty || rest.first == " " else { return nil }
        let key = String(line[..<colon.lowerBound]).trimmingCharacters(in: .whitespaces)
        return (key, stripComment(String(rest)).trimmingCharacters(in: .whitespaces))
    }

    /// A plain value's trailing " # comment".
    static func stripComment(_ s: String) -> String {
        guard !s.trimmingCharacters(in: .whitespaces).hasPrefix("\""), !s.trimmingCharacters(in: .whitespaces).hasPrefix("'"),
              let r = s.range(of: " #") else { return s }
        return String(s[..<r.lowerBound])
    }

    static func inlineValue(_ s: String) -> Value {
        if s.hasPrefix("[") {
            guard s.hasSuffix("]") else { return .other }
            let inner = s.dropFirst().dropLast()
            if inner.trimmingCharacters(in: .whitespaces).isEmpty { return .list([]) }
            var items: [String] = []
            for part in splitFlow(String(inner)) {
                guard case .string(let v) = scalar(part.trimmingCharacters(in: .whitespaces)) else { return .other }
                items.append(v)
            }
            return .list(items)
        }
        return scalar(s)
    }

    /// A flow sequence's items, split on commas outside quotes.
    static func splitFlow(_ s: String) -> [String] {
        var parts: [String] = [], current = "", quote: Character?
        for ch in s {
            if let q = quote {
                current.append(ch)
                if ch == q { quote = nil }
            } else if ch == "\"" || ch == "'" {
                quote = ch
                current.append(ch)
            } else if ch == "," {
                parts.append(current)
                current = ""
            } else {
                current.append(ch)
            }
        }
        parts.append(current)
        return parts
    }

    /// A scalar as PyYAML's safe_load resolves it (YAML 1.1): null, a string, or something else
    /// (booleans, numbers, dates, and anything structured).
    static func scalar(_ s: String) -> Value {
        if s.count >= 2, s.first == "'", s.last == "'" { return .string(String(s.dropFirst().dropLast()).replacingOccurrences(of: "''", with: "'")) }
        if s.count >= 2, s.first == "\"", s.last == "\"" {
            let inner = String(s.dropFirst().dropLast())
            guard !inner.contains("\\") else { return inner.contains("\\u") || inner.contains("\\x") ? .other : .string(inner.replacingOccurrences(of: "\\\"", with: "\"").replacingOccurrences(of: "\\\\", with: "\\")) }
            return .string(inner)
        }
        if ["", "~", "null", "Null", "NULL"].contains(s) { return .null }
        if let f = s.first, "[{|>&*!%@`\"'".contains(f) { return .other }
        let booleans: Set<String> = ["yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF", "y", "Y", "n", "N"]
        if booleans.contains(s) { return .other }
        // int, float (with _ separators, exponents, .inf, .nan), sexagesimal and dates resolve to non-strings.
        let numeric = #"^[-+]?(0|[1-9][0-9_]*|0b[01_]+|0[0-7_]+|0x[0-9a-fA-F_]+|[1-9][0-9_]*(:[0-5]?[0-9])+)$|^[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)?$|^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]*$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$|^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"#
        if s.range(of: numeric, options: .regularExpression) != nil { return .other }
        if s.contains(": ") || s.hasSuffix(":") || s.contains(" #") { return .other }
        return .string(s)
    }
}
