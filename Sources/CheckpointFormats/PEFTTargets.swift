import Foundation

/// Which base modules a LoRA config adapts, by PEFT 0.21.2's own rules
/// (`peft/tuners/tuners_utils.py`: `check_target_module_exists`,
/// `_maybe_include_all_linear_layers`; `LoraConfig.__post_init__` for the combinations it
/// refuses). A module is named by its path in the base model (`model.layers.0.self_attn.q_proj`),
/// as PEFT's `named_modules()` keys are. `Vectors/peft_targets.json` records what PEFT adapts for
/// a tiny Llama and several configs; `PEFTTargetsTests` holds this type to it.
public struct PEFTTargets: Sendable, Equatable {
    public enum Modules: Sendable, Equatable {
        /// A list: a module is targeted when its name equals an entry or ends with "." + entry.
        case names([String])
        /// A string: a Python regular expression the whole name must match (`re.fullmatch`).
        case regex(String)
        /// `"all-linear"` (any case): every linear layer but the output embedding (`lm_head`).
        case allLinear
    }

    public enum Exclusion: Sendable, Equatable {
        case names([String])
        case regex(String)
    }

    public var modules: Modules
    /// `layers_to_transform` (an int is a one-element list); applies to `.names` only, and not to
    /// an entry that is a module's whole name.
    public var layers: [Int]?
    /// `layers_pattern`: the name of the module list holding the layers (`layers`, `h`, ...);
    /// nil: the first `.<name>.<index>.` in the module's name.
    public var layersPatterns: [String]?
    public var exclude: Exclusion?

    public init(modules: Modules, layers: [Int]? = nil, layersPatterns: [String]? = nil, exclude: Exclusion? = nil) {
        (self.modules, self.layers, self.layersPatterns, self.exclude) = (modules, layers, layersPatterns, exclude)
    }

    /// The names of the output embeddings that `"all-linear"` leaves out: transformers'
    /// `get_output_embeddings()` of every family qlora reads is `lm_head`. Input embeddings are
    /// `nn.Embedding`, not linear, and are never targeted by it either.
    public static let outputEmbeddings: Set<String> = ["lm_head"]
    public static let inputEmbeddings: Set<String> = ["embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_positions"]

    /// Whether PEFT adapts module `key` (a linear layer of the base; `.allLinear` cannot tell a
    /// linear layer from an embedding by name beyond `inputEmbeddings`).
    public func selects(_ key: String) throws -> Bool {
        let last = key.split(separator: ".").last.map(String.init) ?? key
        switch exclude {
        case .regex(let p)?: if try Self.fullMatch(p, key, field: "exclude_modules") { return false }
        case .names(let list)?: if list.contains(where: { key == $0 || key.hasSuffix("." + $0) }) { return false }
        case nil: break
        }
        switch modules {
        case .allLinear:
            // PEFT replaces "all-linear" by the set of linear module names and then matches by
            // equality, so the layer filter does not apply (LoraConfig refuses it with a string).
            return !Self.outputEmbeddings.contains(key) && !Self.inputEmbeddings.contains(last)
        case .regex(let p):
            return try Self.fullMatch(p, key, field: "target_modules")
        case .names(let list):
            if list.contains(key) { return true }
            guard list.contains(where: { key.hasSuffix("." + $0) }) else { return false }
            guard let layers, !layers.isEmpty else { return true }
            guard let index = try layerIndex(key) else { return false }
            return layers.contains(index)
        }
    }

    /// The layer index PEFT reads from `key`: the first `.<segment>.<digits>.` (lazy `.*?`), or
    /// with `layers_pattern` the first `<pattern>.<digits>.` after the start or a dot.
    func layerIndex(_ key: String) throws -> Int? {
        let patterns: [String] = (layersPatterns ?? []).isEmpty ? [#".*?\.[^.]*\.(\d+)\."#] : layersPatterns!.map { #"(?:^|.*?\.)"# + $0 + #"\.(\d+)\."# }
        for p in patterns {
            let re = try Self.regex("^(?:" + p + ")", field: "layers_pattern")
            let ns = key as NSString
            if let m = re.firstMatch(in: key, range: NSRange(location: 0, length: ns.length)), m.range(at: 1).location != NSNotFound {
                return Int(ns.substring(with: m.range(at: 1)))
            }
        }
        return nil
    }

    /// Python's `re.fullmatch(pattern, key)` with ICU (NSRegularExpression): the same syntax for
    /// what configs use, Python's named groups (`(?P<name>…)`, `(?P=name)`) translated.
    static func fullMatch(_ pattern: String, _ key: String, field: String) throws -> Bool {
        let re = try regex(#"^(?:"# + pattern + #")\z"#, field: field)
        return re.firstMatch(in: key, range: NSRange(location: 0, length: (key as NSString).length)) != nil
    }

    static func regex(_ pattern: String, field: String) throws -> NSRegularExpression {
        var p = pattern.replacingOccurrences(of: "(?P<", with: "(?<")
        if let re = try? NSRegularExpression(pattern: #"\(\?P=(\w+)\)"#) {
            p = re.stringByReplacingMatches(in: p, range: NSRange(location: 0, length: (p as NSString).length), withTemplate: #"\\k<$1>"#)
        }
        do { return try NSRegularExpression(pattern: p) } catch {
            throw PEFTTargetsError("\(field) is not a regular expression qlora can read: \(pattern)")
        }
    }

    /// Reads `target_modules`, `layers_to_transform`, `layers_pattern` and `exclude_modules`
    /// from an adapter_config.json object, refusing what `LoraConfig` refuses. Errors are the
    /// problem only; the caller names the file.
    public static func read(_ c: [String: Any]) throws -> PEFTTargets {
        func present(_ k: String) -> Any? { c[k].flatMap { $0 is NSNull ? nil : $0 } }
        func strings(_ k: String, _ v: Any) throws -> [String] {
            guard let list = v as? [Any], let s = list as? [String], s.count == list.count else {
                throw PEFTTargetsError("\(k) is \(JSONField.describe(v)), not a string or a list of strings")
            }
            return s
        }
        let modules: Modules
        switch present("target_modules") {
        case nil: throw PEFTTargetsError("target_modules is missing (PEFT infers it from the model type; qlora needs it written)")
        case let s as String: modules = s.lowercased() == "all-linear" ? .allLinear : .regex(s)
        case let v?: modules = .names(try strings("target_modules", v))
        }
        var layers: [Int]? = nil
        if let v = present("layers_to_transform") {
            if let i = JSONField.integer(v) { layers = [i] } else if let list = v as? [Any] {
                layers = try list.map { e in
                    guard let i = JSONField.integer(e) else { throw PEFTTargetsError("layers_to_transform holds \(JSONField.describe(e)), not an integer") }
                    return i
                }
            } else { throw PEFTTargetsError("layers_to_transform is \(JSONField.describe(v)), not an integer or a list of integers") }
        }
        var patterns: [String]? = nil
        if let v = present("layers_pattern") { patterns = v is String ? [v as! String] : try strings("layers_pattern", v) }
        if case .names = modules {} else if layers != nil || patterns != nil {
            throw PEFTTargetsError("layers_to_transform and layers_pattern cannot be used when target_modules is a string (PEFT's LoraConfig refuses it)")
        }
        if let p = patterns, !p.isEmpty, layers == nil {
            throw PEFTTargetsError("layers_pattern needs layers_to_transform (PEFT's LoraConfig refuses it without)")
        }
        var exclude: Exclusion? = nil
        if let v = present("exclude_modules") { exclude = v is String ? .regex(v as! String) : .names(try strings("exclude_modules", v)) }
        let t = PEFTTargets(modules: modules, layers: layers, layersPatterns: patterns, exclude: exclude)
        // Compile every pattern now, so a bad one is reported on load.
        _ = try t.selects("model.layers.0.self_attn.q_proj")
        return t
    }
}

/// A target specification PEFT would refuse or qlora cannot read: the problem, one line.
public struct PEFTTargetsError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension PEFTTargets {
    /// The selecting fields as adapter_config.json spells them, for error messages.
    public var summary: String {
        var parts: [String] = []
        switch modules {
        case .names(let l): parts.append("target_modules [\(l.joined(separator: ", "))]")
        case .regex(let p): parts.append("target_modules \"\(p)\"")
        case .allLinear: parts.append("target_modules \"all-linear\"")
        }
        if let layers { parts.append("layers_to_transform \(layers)") }
        if let layersPatterns { parts.append("layers_pattern [\(layersPatterns.joined(separator: ", "))]") }
        switch exclude {
        case .names(let l)?: parts.append("exclude_modules [\(l.joined(separator: ", "))]")
        case .regex(let p)?: parts.append("exclude_modules \"\(p)\"")
        case nil: break
        }
        return parts.joined(separator: ", ")
    }
}
