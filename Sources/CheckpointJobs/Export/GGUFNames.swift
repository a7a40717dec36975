import CheckpointFormats
import FileOutput
import Foundation
import GGUF
import SafeTensors

/// gguf-py's Metadata heuristics (metadata.py), which the converter uses for the general.* keys:
/// a model id (config.json's `_name_or_path` when it names a model, else the directory's name)
/// split into name, organization, basename, finetune, version and size label, and
/// generation_config.json's sampling settings, and the model card's keys (README.md's front
/// matter: license, tags, languages, base models, datasets, names; `ModelCard`).
/// Vectors/gguf/names.json holds it to gguf-py and the converter.
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
        // The model card first (its values win), then config.json's _name_or_path, then the directory's name.
        var meta: [String: String] = [:]
        var license: String?, tags: [String]?, languages: [String]?
        var baseModels: [[String: String]]?, datasets: [[String: String]]?
        if let card = ModelCard(directory: directory) {
            func use(_ key: String, _ cardKey: String) {
                if meta[key] == nil, case .string(let v)? = card.values[cardKey] { meta[key] = v }
            }
            for k in ["name", "author", "version", "organization", "description", "finetune", "basename", "size_label"] { use(k, k) }
            for k in ["url", "doi", "uuid", "repo_url"] { use("source_" + k, k) }
            for k in ["name", "author", "version", "organization", "description", "finetune", "basename", "size_label"] { use(k, "model_" + k) }
            for k in ["url", "doi", "uuid", "repo_url"] { use("source_" + k, "model_" + k) }
            use("name", "model_name")
            use("author", "model_creator")
            use("basename", "model_type")
            func sources(_ keys: [String]) -> [[String: String]]? {
                guard let key = keys.first(where: { card.values[$0] != nil }) else { return nil }
                let ids: [String]
                switch card.values[key]! {
                case .string(let s): ids = [s]
                case .list(let l): ids = l
                default: ids = []
                }
                return ids.map { entry(for: $0, totalParameters: parameters) }
            }
            baseModels = sources(["base_model", "base_models", "base_model_sources"])
            datasets = sources(["datasets", "dataset", "dataset_sources"])
            switch card.values["license"] {
            case .string(let s)?: license = s
            case .list(let l)?: license = l.joined(separator: ",")
            default: break
            }
            use("license_name", "license_name")
            use("license_link", "license_link")
            func array(_ keys: [String]) -> [String]? {
                var out: [String]?
                for k in keys {
                    switch card.values[k] {
                    case .string(let s)?: out = (out ?? []) + [s]
                    case .list(let l)?: out = (out ?? []) + l
                    default: break
                    }
                }
                return out
            }
            tags = array(["tags", "pipeline_tag"])
            languages = array(["languages", "language"])
        }
        func take(_ c: Components) {
            if meta["name"] == nil, let f = c.fullName { meta["name"] = idToTitle(f) }
            if meta["organization"] == nil, let o = c.organization { meta["organization"] = idToTitle(o) }
            meta["basename"] = meta["basename"] ?? c.basename
            meta["finetune"] = meta["finetune"] ?? c.finetune
            meta["version"] = meta["version"] ?? c.version
            meta["size_label"] = meta["size_label"] ?? c.sizeLabel
        }
        if case .string(let id)? = config["_name_or_path"], id.filter({ $0 == "/" }).count <= 1 { take(components(id, totalParameters: parameters)) }
        let dir = URL(fileURLWithPath: directory).standardizedFileURL.lastPathComponent
        take(components(dir, totalParameters: parameters))
        m.append(("general.name", .string(meta["name"] ?? dir)))
        for k in ["author", "version", "organization", "finetune", "basename", "description"] {
            if let v = meta[k] { m.append(("general." + k, .string(v))) }
        }
        // The converter counts parameters from the tensors it writes (none with --vocab-only: no label).
        if let label = meta["size_label"] ?? (parameters > 0 ? sizeLabel(parameters) : nil) { m.append(("general.size_label", .string(label))) }
        if let license { m.append(("general.license", .string(license))) }
        if let v = meta["license_name"] { m.append(("general.license.name", .string(v))) }
        if let v = meta["license_link"] { m.append(("general.license.link", .string(v))) }
        for k in ["url", "doi", "uuid", "repo_url"] { if let v = meta["source_" + k] { m.append(("general.source." + k, .string(v))) } }
        for (kind, list) in [("base_model", baseModels), ("dataset", datasets)] {
            guard let list else { continue }
            m.append(("general.\(kind).count", .uint32(UInt32(list.count))))
            for (i, e) in list.enumerated() {
                for k in ["name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url"] {
                    if let v = e[k] { m.append(("general.\(kind).\(i).\(k)", .string(v))) }
                }
            }
        }
        if let tags { m.append(("general.tags", .strings(tags))) }
        if let languages { m.append(("general.languages", .strings(languages))) }
        return GGUFExport.withoutEmptyStrings(m)
    }

    /// A base model or dataset entry from a model card's id or URL (gguf-py's rules).
    static func entry(for id: String, totalParameters: Int) -> [String: String] {
        var e: [String: String] = [:]
        func fill(_ c: Components, repo: Bool) {
            if let f = c.fullName { e["name"] = idToTitle(f) }
            if let o = c.organization { e["organization"] = idToTitle(o) }
            if let v = c.version { e["version"] = v }
            if repo, let o = c.organization, let f = c.fullName { e["repo_url"] = "https://huggingface.co/\(o)/\(f)" }
        }
        if id.hasPrefix("http://") || id.hasPrefix("https://") || id.hasPrefix("ssh://") {
            e["repo_url"] = id
            if id.contains("huggingface.co"), let r = id.range(of: #"^https?://huggingface.co/[^/]+/[^/]+$"#, options: .regularExpression) {
                let path = id[r].split(separator: "/", maxSplits: 4, omittingEmptySubsequences: false)
                if path.count == 5 { fill(components(path[3] + "/" + path[4], totalParameters: totalParameters), repo: false) }
            }
        } else {
            fill(components(id, totalParameters: totalParameters), repo: true)
        }
        return e
    }

    /// A warning naming the model card's keys the converter would use but this reader skipped.
    public static func cardWarning(directory: String) -> String? {
        guard let card = ModelCard(directory: directory), !card.unreadable.isEmpty else { return nil }
        return "\(directory)/README.md: the model card's \(card.unreadable.joined(separator: ", ")) not read (a value other than text or a list of text); llama.cpp's converter would write them as general.* keys"
    }
}
