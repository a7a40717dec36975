import CheckpointFormats
import FileOutput
import Foundation
import GGUF
import SafeTensors

/// gguf-py's Metadata heuristics (metadata.py), which the converter uses for the general.* keys:
/// a model id (config.json's `_name_or_path` when it names a model, else the directory's name)
/// split into name, organization, basename, finetune, version and size label, and
/// generation_config.json's sampling settings. Vectors/gguf/names.json holds it to gguf-py.
/// The model card (README.md's YAML front matter: license, tags, base models, datasets, ...) is
/// not read; `cardWarning` says so when there is one.
public enum GGUFNames {
    /// The parts `Metadata.get_model_id_components` finds in a model id.
    public struct Components: Equatable, Sendable {
        public var fullName: String?
        public var organization: String?
        public var basename: String?
        public var finetune: String?
        public var version: String?
        public var sizeLabel: String?
        public init(fullName: String? = nil, organization: String? = nil, basename: String? = nil, finetune: String? = nil, version: String? = nil,
                    sizeLabel: String? = nil) {
            (self.fullName, self.organization, self.basename, self.finetune, self.version, self.sizeLabel) = (fullName, organization, basename, finetune, version, sizeLabel)
        }
    }

    static func fullMatch(_ pattern: String, _ s: String) -> Bool {
        guard let re = try? NSRegularExpression(pattern: "^(?:" + pattern + ")$", options: [.caseInsensitive]) else { return false }
        return re.firstMatch(in: s, range: NSRange(s.startIndex..., in: s)) != nil
    }

    /// `get_model_id_components(model_id, total_params)`.
    public static func components(_ id: String, totalParameters total: Int) -> Components {
        if id.contains(" ") { return Components(fullName: id) }
        var org: String?, full = id
        if let slash = id.firstIndex(of: "/") {
            org = String(id[..<slash])
            full = String(id[id.index(after: slash)...])
        }
        if let o = org, o.first == "." { org = nil }
        var parts = full.split(separator: "-", omittingEmptySubsequences: true).map(String.init)
        var types = [Set<String>](repeating: [], count: parts.count)
        for (i, original) in parts.enumerated() {
            var part = original
            if fullMatch(#"(v|iter)?\d+([.]\d+)*"#, part) {
                types[i].insert("version")
            } else if fullMatch(#"i?q\d(_\w)*|b?fp?(16|32)"#, part) {
                types[i].insert("type")
                parts[i] = part.uppercased()
            } else if i > 0, fullMatch(#"(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)"#, part) {
                part = part.replacingOccurrences(of: "_", with: ".")
                var chars = Array(part)
                if let last = chars.last, last.isNumber, chars.count >= 2 {  // bloom-7b1 → 7.1b
                    chars = Array(chars.dropLast(2)) + ["."] + [chars[chars.count - 1], chars[chars.count - 2]]
                }
                if chars.count > 1, chars[chars.count - 2].isNumber, "kmbt".contains(chars[chars.count - 1]) {
                    chars[chars.count - 1] = Character(chars[chars.count - 1].uppercased())
                }
                part = String(chars)
                if total != 0, let value = Double(String(part.dropLast())), let unit = " KMBT".firstIndex(of: part.last!) {
                    let label = value * pow(1000, Double(" KMBT".distance(from: " KMBT".startIndex, to: unit)))
                    // Python: label_params < abs(total) // 8 (LoRA) or abs(label - total) > 7 * total // 8.
                    let far = total < 0 ? label < Double(abs(total) / 8) : abs(label - Double(total)) > Double(7 * total / 8)
                    if far {
                        types[i].insert("finetune")  // a context length, most likely
                        part = String(part.dropLast()) + part.last!.lowercased()
                    }
                }
                if types[i].isEmpty { types[i].insert("size_label") }
                parts[i] = part
            } else if i > 0, fullMatch("chat|instruct|vision|lora", part) {
                types[i].insert(total < 0 && part.lowercased() == "lora" ? "type" : "finetune")
            }
        }
        // Word size labels give way to numeric ones.
        if zip(parts, types).contains(where: { $1.contains("size_label") && $0.contains { $0.isNumber && $0.isASCII } }) {
            for i in parts.indices where types[i].contains("size_label") && parts[i].allSatisfy(\.isLetter) { types[i].remove("size_label") }
        }
        var atStart = true
        for i in parts.indices {
            if atStart && ((types[i].isEmpty && parts[i].first?.isLetter == true) || types[i].contains("version")) {
                types[i].insert("basename")
            } else {
                atStart = false
                if types[i].isEmpty { types[i].insert("finetune") }
            }
        }
        for i in parts.indices.reversed() {
            guard types[i].contains("basename"), types[i].count > 1 else { break }
            types[i].remove("basename")
        }
        func joined(_ kind: String, excluding: String? = nil) -> String? {
            var seen: [String] = []
            for (p, t) in zip(parts, types) where t.contains(kind) && !(excluding.map(t.contains) ?? false) {
                if kind != "size_label" || !seen.contains(p) { seen.append(p) }
            }
            return seen.isEmpty ? nil : seen.joined(separator: "-")
        }
        var c = Components(fullName: full, organization: org, basename: joined("basename"), finetune: joined("finetune"),
                           version: joined("version", excluding: "basename"), sizeLabel: joined("size_label"))
        if c.sizeLabel == nil && c.finetune == nil && c.version == nil { c.basename = nil }
        return c
    }

    /// `Metadata.id_to_title`: words split on '-' and whitespace; an all-lowercase word that is not
    /// a version or a number is title-cased as Python's str.title() does it.
    public static func idToTitle(_ s: String) -> String {
        let words = s.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "-", with: " ").split(whereSeparator: \.isWhitespace).map(String.init)
        return words.map { w -> String in
            let cased = w.filter(\.isCased)
            let isLower = !cased.isEmpty && cased.allSatisfy(\.isLowercase)
            let versionOrNumber = fullMatchCaseSensitive(#"v\d+(?:\.\d+)*|\d.*"#, w)
            guard isLower, !versionOrNumber else { return w }
            var out = "", previousCased = false
            for ch in w {
                out += ch.isCased ? (previousCased ? ch.lowercased() : ch.uppercased()) : String(ch)
                previousCased = ch.isCased
            }
            return out
        }.joined(separator: " ")
    }

    static func fullMatchCaseSensitive(_ pattern: String, _ s: String) -> Bool {
        guard let re = try? NSRegularExpression(pattern: "^(?:" + pattern + ")$") else { return false }
        return re.firstMatch(in: s, range: NSRange(s.startIndex..., in: s)) != nil
    }

    /// The general.* keys between general.type and the architecture's keys, in the converter's
    /// order: the sampling settings, name, version, organization, finetune, basename, size label.
    public static func generalKeys(directory: String, config: JSONValue, parameters: Int, sizeLabel: (Int) -> String) -> [(key: String, value: GGUFValue)] {
        var m: [(key: String, value: GGUFValue)] = []
        // generation_config.json (an unreadable one is skipped, as gguf-py does).
        if let data = try? InputFile.read(directory + "/generation_config.json"), let g = try? JSONValue.parse(document: [UInt8](data)) {
            func float(_ key: String, _ v: JSONValue?) { if case .number(let s)? = v, let d = Double(s) { m.append((key, .float32(Float(d)))) } }
            func int(_ key: String, _ v: JSONValue?) { if case .number(let s)? = v, let i = Int32(s) { m.append((key, .int32(i))) } }
            if case .string(let s)? = g["sequence"] { m.append(("general.sampling.sequence", .string(s))) }
            int("general.sampling.top_k", g["top_k"])
            float("general.sampling.top_p", g["top_p"])
            float("general.sampling.min_p", g["min_p"])
            float("general.sampling.xtc_probability", g["xtc_probability"])
            float("general.sampling.xtc_threshold", g["xtc_threshold"])
            float("general.sampling.temp", g["temperature"])
            int("general.sampling.penalty_last_n", g["penalty_last_n"])
            float("general.sampling.penalty_repeat", g["penalty_repeat"] ?? g["repetition_penalty"])
            int("general.sampling.mirostat", g["mirostat"])
            float("general.sampling.mirostat_tau", g["mirostat_tau"])
            float("general.sampling.mirostat_eta", g["mirostat_eta"])
        }
        var name: String?, org: String?, basename: String?, finetune: String?, version: String?, size: String?
        func take(_ c: Components) {
            if name == nil, let f = c.fullName { name = idToTitle(f) }
            if org == nil, let o = c.organization { org = idToTitle(o) }
            basename = basename ?? c.basename
            finetune = finetune ?? c.finetune
            version = version ?? c.version
            size = size ?? c.sizeLabel
        }
        if case .string(let id)? = config["_name_or_path"], id.filter({ $0 == "/" }).count <= 1 { take(components(id, totalParameters: parameters)) }
        let dir = URL(fileURLWithPath: directory).standardizedFileURL.lastPathComponent
        take(components(dir, totalParameters: parameters))
        m.append(("general.name", .string(name ?? dir)))
        if let version { m.append(("general.version", .string(version))) }
        if let org { m.append(("general.organization", .string(org))) }
        if let finetune { m.append(("general.finetune", .string(finetune))) }
        if let basename { m.append(("general.basename", .string(basename))) }
        // The converter counts parameters from the tensors it writes (none with --vocab-only: no label).
        if let label = size ?? (parameters > 0 ? sizeLabel(parameters) : nil) { m.append(("general.size_label", .string(label))) }
        return m
    }

    /// A warning when README.md has model-card front matter, whose keys the export leaves out.
    public static func cardWarning(directory: String) -> String? {
        guard let data = try? InputFile.read(directory + "/README.md"), let text = String(data: data, encoding: .utf8),
              text.split(separator: "\n", omittingEmptySubsequences: false).first.map({ $0.trimmingCharacters(in: .init(charactersIn: "\r")) == "---" }) == true
        else { return nil }
        return "\(directory)/README.md: the model card's metadata (license, tags, languages, base models, datasets) is not carried; llama.cpp's converter writes it as general.* keys"
    }
}
