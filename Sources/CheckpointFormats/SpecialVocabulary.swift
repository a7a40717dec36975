import FileOutput
import Foundation
import SafeTensors

/// What a checkpoint's tokenizer side files add to a SentencePiece vocabulary in llama.cpp's
/// converter: gguf-py's `SpecialVocab` (vocab.py; no merges for SentencePiece) with
/// `_try_load_from_tokenizer_json` and `_try_load_from_config_json`, plus `LlamaModel.set_vocab`'s
/// add_prefix_space and `_create_vocab_sentencepiece`'s added tokens (added_tokens.json, then
/// tokenizer_config.json's added_tokens_decoder). Vectors/gguf/llama-tiny/special holds it to the
/// converter's output.
///
/// Files read (each optional): tokenizer.json, tokenizer_config.json, chat_template.jinja with
/// additional_chat_templates/*.jinja (sorted by name; Python globs them in directory order),
/// chat_template.json, added_tokens.json, config.json. A file that is not JSON is an error naming it.
public struct SpecialVocabulary: Sendable, Equatable {
    /// One metadata entry, in the order `SpecialVocab.add_to_gguf` writes them.
    public enum Entry: Sendable, Equatable {
        /// tokenizer.ggml.merges (BPE).
        case merges([String])
        /// tokenizer.ggml.<kind>_token_id (kinds bos, eos, unk, sep, pad, mask, eot, eom).
        case tokenID(kind: String, id: Int)
        /// tokenizer.ggml.add_<kind>_token (bos, eos, sep).
        case addToken(kind: String, Bool)
        /// tokenizer.chat_template.<name>, before the names and the default.
        case namedChatTemplate(name: String, template: String)
        /// tokenizer.chat_templates: the names above.
        case chatTemplateNames([String])
        case chatTemplate(String)
        case normalizerLowercase(Bool)
        case normalizerStripAccents(Bool)
    }

    /// How an added token enters the vocabulary (scores −1000).
    public enum AddedTokenType: Int32, Sendable { case control = 3, userDefined = 4 }

    /// tokenizer_config.json's add_prefix_space (tokenizer.ggml.add_space_prefix, written before
    /// the vocabulary), when it is a boolean.
    public var addSpacePrefix: Bool?
    /// Added tokens to set in the vocabulary, in order (a later one replaces an earlier one).
    public var addedTokens: [(id: Int, content: String, type: AddedTokenType)] = []
    public var entries: [Entry] = []

    public static func == (a: SpecialVocabulary, b: SpecialVocabulary) -> Bool {
        a.addSpacePrefix == b.addSpacePrefix && a.entries == b.entries && a.addedTokens.elementsEqual(b.addedTokens, by: ==)
    }

    /// The kinds with an id key in gguf-py's writer, and those with an add_ flag.
    static let idKinds: Set<String> = ["bos", "eos", "unk", "sep", "pad", "mask", "eot", "eom"]
    static let addKinds: Set<String> = ["bos", "eos", "sep"]

    /// The vocabulary with the added tokens set (score −1000, their type).
    public func apply(to v: (tokens: [String], scores: [Float], types: [Int32])) -> (tokens: [String], scores: [Float], types: [Int32]) {
        var v = v
        for t in addedTokens where t.id < v.tokens.count {
            v.tokens[t.id] = t.content
            v.scores[t.id] = -1000
            v.types[t.id] = t.type.rawValue
        }
        return v
    }

    /// Whose rules set the added tokens in the vocabulary.
    public enum AddedTokenRules: Sendable {
        /// `_create_vocab_sentencepiece`: added_tokens.json, then added_tokens_decoder (special or
        /// special-looking → control; otherwise user-defined with ▁ as space).
        case sentencePiece
        /// Phi3MiniModel.set_vocab: added_tokens.json, added_tokens_decoder, then tokenizer.json's
        /// added_tokens, each user-defined unless marked special (control), text as is.
        case phi3
        /// `_set_vocab_gpt2`: the BPE vocabulary carries the added tokens itself; merges are loaded,
        /// and special-token ids are not checked against the vocabulary size.
        case bpe
    }

    /// Reads `directory`'s side files for a vocabulary of `vocabSize` tokens.
    public init(directory: String, vocabSize: Int, addedTokens rules: AddedTokenRules = .sentencePiece) throws {
        func json(_ name: String) throws -> JSONValue? {
            let path = directory + "/" + name
            return FileManager.default.fileExists(atPath: path) ? try ConfigJSON.read(path) : nil
        }
        func text(_ path: String) throws -> String {
            let data = try InputFile.read(path)
            guard let s = String(data: data, encoding: .utf8) else { throw CheckpointError.invalidPath(path: path, problem: "is not UTF-8 text") }
            return s
        }
        let tokenizer = try json("tokenizer.json")
        var tokenizerConfig = try json("tokenizer_config.json")
        let config = try json("config.json")
        let addedTokensJSON = try json("added_tokens.json")

        // _create_vocab_sentencepiece: added_tokens.json, then added_tokens_decoder.
        if rules != .bpe, case .object(let members)? = addedTokensJSON {
            for m in members {
                guard let id = Self.int(m.value), id >= 0, id < vocabSize else { continue }
                addedTokens.append((id, m.key, .userDefined))
            }
        }
        if rules != .bpe, case .object(let members)? = tokenizerConfig?["added_tokens_decoder"] {
            for m in members {
                guard let id = Int(m.key), id >= 0, id < vocabSize, case .string(var content)? = m.value["content"] else { continue }
                let special = Self.truthy(m.value["special"])
                if rules == .phi3 {
                    addedTokens.append((id, content, special ? .control : .userDefined))
                } else if special || Self.looksSpecial(content) {
                    addedTokens.append((id, content, .control))
                } else {
                    content = content.replacingOccurrences(of: "\u{2581}", with: " ")  // pre-normalized user-defined spaces
                    addedTokens.append((id, content, .userDefined))
                }
            }
        }
        if rules == .phi3, case .array(let list)? = tokenizer?["added_tokens"] {
            for t in list {
                guard let id = Self.int(t["id"]), id >= 0, id < vocabSize, case .string(let content)? = t["content"] else { continue }
                addedTokens.append((id, content, Self.truthy(t["special"]) ? .control : .userDefined))
            }
        }
        // LlamaModel.set_vocab's (Phi3MiniModel does not read it).
        if rules != .phi3, case .bool(let b)? = tokenizerConfig?["add_prefix_space"] { addSpacePrefix = b }

        var kinds = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"]
        var ids: [(String, Int)] = []
        var adds: [(String, Bool)] = []
        var lowercase: Bool?, stripAccents: Bool?
        func setID(_ kind: String, _ value: JSONValue?) {
            guard let id = Self.int(value) else { return }
            // A negative id (some configs say pad_token_id -1) stops the converter with a
            // ValueError; the export leaves that kind out instead.
            guard id >= 0, rules == .bpe || id < vocabSize, !ids.contains(where: { $0.0 == kind }) else { return }
            ids.append((kind, id))
        }
        func setAdd(_ kind: String, _ value: Bool, onlyIfUnset: Bool) {
            if let i = adds.firstIndex(where: { $0.0 == kind }) {
                if !onlyIfUnset { adds[i].1 = value }
            } else {
                adds.append((kind, value))
            }
        }
        func parseNormalizer(_ n: JSONValue) {
            switch n["type"] {
            case .string("Lowercase")?: lowercase = true
            case .string("StripAccents")?: stripAccents = true
            case .string("BertNormalizer")?:
                if case .bool(let b)? = n["lowercase"] { lowercase = b }
                if case .bool(let b)? = n["strip_accents"] { stripAccents = b }
            case .string("Sequence")?:
                if case .array(let list)? = n["normalizers"] { list.forEach(parseNormalizer) }
            default: break
            }
        }
        // tokenizer_config.json's *_token values (strings, objects or anything else) as Python holds them.
        func configValue(_ key: String) -> JSONValue? { tokenizerConfig?[key] }
        func setConfig(_ key: String, _ value: JSONValue) {
            guard case .object(var members)? = tokenizerConfig else { return }
            if let i = members.firstIndex(where: { $0.key == key }) { members[i].value = value } else { members.append(JSONMember(key: key, value: value)) }
            tokenizerConfig = .object(members)
        }
        let configIsTruthy = Self.truthy(tokenizerConfig)

        var addedTokenList: [JSONValue] = []
        var templateEntries: [Entry] = []
        var merges: [String] = []
        if let tokenizer, Self.truthy(tokenizer) {
            if rules == .bpe, case .array(let list)? = tokenizer["model"]?["merges"], let first = list.first {
                // Strings as they are; pairs (transformers 4.45 and later) joined by a space, a
                // space inside a part written as U+0120 (gguf-py's encoding).
                for m in list {
                    switch (m, first) {
                    case (.string(let t), .string): merges.append(t)
                    case (.array(let pair), .array):
                        guard pair.count == 2, case .string(let a) = pair[0], case .string(let b) = pair[1] else {
                            throw CheckpointError.invalidPath(path: directory + "/tokenizer.json", problem: "a merge is not a pair of strings")
                        }
                        func enc(_ x: String) -> String { x.replacingOccurrences(of: " ", with: "\u{0120}") }
                        merges.append(enc(a) + " " + enc(b))
                    default:
                        throw CheckpointError.invalidPath(path: directory + "/tokenizer.json", problem: "model.merges mixes strings and pairs")
                    }
                }
            }
            if let n = tokenizer["normalizer"], Self.truthy(n) { parseNormalizer(n) }
            if case .array(let list)? = tokenizer["added_tokens"] { addedTokenList = list }
            var bos = configValue("bos_token"), cls = configValue("cls_token"), eos = configValue("eos_token"), sep = configValue("sep_token")
            if !Self.truthy(bos), Self.truthy(cls), configIsTruthy { bos = cls; setConfig("bos_token", cls!) }
            if !Self.truthy(eos), Self.truthy(sep), configIsTruthy { eos = sep; setConfig("eos_token", sep!) }
            if let post = tokenizer["post_processor"], Self.truthy(post) {
                let processors: [JSONValue]
                if case .array(let p)? = post["processors"] { processors = p } else { processors = [post] }
                for processor in processors {
                    switch processor["type"] {
                    case .string("ByteLevel")?:
                        setAdd("bos", false, onlyIfUnset: true)
                        setAdd("eos", false, onlyIfUnset: true)
                    case .string("RobertaProcessing")?:
                        setAdd("bos", true, onlyIfUnset: false)
                        setAdd("eos", true, onlyIfUnset: false)
                        setAdd("sep", true, onlyIfUnset: false)
                        if !Self.truthy(cls), configIsTruthy {
                            cls = Self.firstOf(processor["cls"]) ?? bos ?? .null
                            setConfig("cls_token", cls!)
                        }
                        if !Self.truthy(sep), configIsTruthy {
                            sep = Self.firstOf(processor["sep"]) ?? eos ?? .null
                            setConfig("sep_token", sep!)
                        }
                    case .string("TemplateProcessing")?:
                        var single: [JSONValue] = [], pair: [JSONValue] = []
                        if case .array(let s)? = processor["single"] { single = s }
                        if case .array(let p)? = processor["pair"] { pair = p }
                        var first: JSONValue?, last: JSONValue?
                        if single.count > 1 {
                            first = single[0]["SpecialToken"]?["id"]
                            if let f = first, Self.truthy(f) {
                                if !configIsTruthy {
                                    bos = f
                                } else if !Self.equal(f, bos), !Self.equal(f, cls) {
                                    if !Self.truthy(bos) { bos = f; setConfig("bos_token", f) }
                                    if !Self.truthy(cls) { cls = f; setConfig("cls_token", f) }
                                }
                                setAdd("bos", Self.equal(f, bos) || Self.equal(f, cls), onlyIfUnset: false)
                            } else { first = nil }
                            last = single[single.count - 1]["SpecialToken"]?["id"]
                            if let l = last, Self.truthy(l) {
                                if !configIsTruthy {
                                    eos = l
                                } else if !Self.equal(l, eos) {
                                    if !kinds.contains("eot") {
                                        kinds.append("eot")
                                        setConfig("eot_token", eos ?? .null)
                                    } else if !kinds.contains("eom") {
                                        kinds.append("eom")
                                        setConfig("eom_token", eos ?? .null)
                                    }
                                    eos = l
                                    setConfig("eos_token", l)
                                }
                                setAdd("eos", Self.equal(l, eos), onlyIfUnset: false)
                            } else { last = nil }
                        }
                        if !pair.isEmpty {
                            let start = first != nil && Self.equal(pair[0]["SpecialToken"]?["id"], first) ? 1 : 0
                            let stop = last != nil && Self.equal(pair[pair.count - 1]["SpecialToken"]?["id"], last) ? pair.count - 1 : pair.count
                            var middle = start < stop ? Array(pair[start..<stop]) : []
                            if !middle.isEmpty {
                                let a = middle[0]["Sequence"]?["id"], b = middle[middle.count - 1]["Sequence"]?["id"]
                                if a == .string("A"), b == .string("B"), middle.count > 2 {
                                    middle = Array(middle[1..<(middle.count - 1)])
                                    var addSep = false
                                    if let e = middle[0]["SpecialToken"]?["id"], Self.truthy(e) {
                                        if (Self.equal(e, sep) || Self.equal(e, eos)) && last == nil { addSep = true }
                                    }
                                    if middle.count == 2, let e = middle[1]["SpecialToken"]?["id"], Self.truthy(e) {
                                        if Self.equal(e, sep) || Self.equal(e, eos) { addSep = true }
                                    }
                                    setAdd("sep", addSep, onlyIfUnset: false)
                                    if addSep, !Self.truthy(sep), configIsTruthy { setConfig("sep_token", eos ?? .null) }
                                }
                            }
                        }
                    default: break
                    }
                }
            }
        }
        if configIsTruthy {
            // The chat template: tokenizer_config.json's, else chat_template.jinja (with named
            // additional templates), else chat_template.json's.
            var alternative: JSONValue?
            let jinja = directory + "/chat_template.jinja"
            if FileManager.default.fileExists(atPath: jinja) {
                alternative = .string(try text(jinja))
                let extraDir = directory + "/additional_chat_templates"
                let extra = ((try? FileManager.default.contentsOfDirectory(atPath: extraDir)) ?? []).filter { $0.hasSuffix(".jinja") }.sorted()
                if !extra.isEmpty {
                    var list: [JSONValue] = [.object([JSONMember(key: "name", value: .string("default")), JSONMember(key: "template", value: alternative!)])]
                    for f in extra {
                        list.append(.object([JSONMember(key: "name", value: .string(String(f.dropLast(6)))),
                                             JSONMember(key: "template", value: .string(try text(extraDir + "/" + f)))]))
                    }
                    alternative = .array(list)
                }
            } else if let j = try json("chat_template.json") {
                alternative = j["chat_template"]
            }
            var template: JSONValue? = alternative
            if case .object(let members)? = tokenizerConfig, let m = members.first(where: { $0.key == "chat_template" }) { template = m.value }
            templateEntries = Self.chatTemplateEntries(template)
            for kind in kinds {
                if case .bool(let b)? = configValue("add_\(kind)_token") { setAdd(kind, b, onlyIfUnset: true) }
                let content: String
                switch configValue("\(kind)_token") {
                case .string(let s)?: content = s
                case .object?:
                    guard case .string(let s)? = configValue("\(kind)_token")?["content"] else { continue }
                    content = s
                default: continue
                }
                let id = addedTokenList.first { $0["content"] == .string(content) }?["id"]
                setID(kind, id)
            }
        }
        if let config {
            for kind in kinds {
                var id = config["\(kind)_token_id"]
                if id == nil || id == .null, let text = config["text_config"] { id = text["\(kind)_token_id"] }
                setID(kind, id)
            }
        }
        entries = (merges.isEmpty ? [] : [.merges(merges)])
            + ids.filter { Self.idKinds.contains($0.0) }.map { .tokenID(kind: $0.0, id: $0.1) }
            + adds.filter { Self.addKinds.contains($0.0) }.map { .addToken(kind: $0.0, $0.1) }
            + templateEntries
        if let lowercase { entries.append(.normalizerLowercase(lowercase)) }
        if let stripAccents { entries.append(.normalizerStripAccents(stripAccents)) }
    }

    /// gguf-py's add_chat_template: a string, or a list of {name, template} (names sanitized to
    /// [A-Za-z0-9_]; "default" is the plain key; the others' names listed after them). Two that
    /// sanitize to one name are one key holding the later template, as gguf-py overwrites it.
    static func chatTemplateEntries(_ v: JSONValue?) -> [Entry] {
        switch v {
        case .string(let s)?: return [.chatTemplate(s)]
        case .array(let choices)?:
            var out: [Entry] = [], names: [String] = [], fallback: String?
            for c in choices {
                guard case .string(let raw)? = c["name"] ?? .string(""), case .string(let t)? = c["template"] else { continue }
                let name = String(raw.unicodeScalars.map { ($0.isASCII && (CharacterSet.alphanumerics.contains($0))) ? Character($0) : "_" })
                guard !name.isEmpty else { continue }
                if name == "default" {
                    fallback = t
                } else if let i = out.firstIndex(where: { if case .namedChatTemplate(name, _) = $0 { return true }; return false }) {
                    out[i] = .namedChatTemplate(name: name, template: t)
                } else {
                    names.append(name)
                    out.append(.namedChatTemplate(name: name, template: t))
                }
            }
            if !names.isEmpty { out.append(.chatTemplateNames(names)) }
            if let fallback { out.append(.chatTemplate(fallback)) }
            return out
        default: return []
        }
    }

    /// Python's isinstance(v, int) for a JSON value (an integer literal).
    static func int(_ v: JSONValue?) -> Int? { if case .number(let s)? = v { return Int(s) }; return nil }

    /// Python truthiness of a JSON value (nil is None).
    static func truthy(_ v: JSONValue?) -> Bool {
        switch v {
        case nil, .null?: return false
        case .bool(let b)?: return b
        case .number(let s)?: return (Double(s) ?? 0) != 0
        case .string(let s)?: return !s.isEmpty
        case .array(let a)?: return !a.isEmpty
        case .object(let o)?: return !o.isEmpty
        }
    }

    /// Python == between two JSON values as json.load gives them (None == None).
    static func equal(_ a: JSONValue?, _ b: JSONValue?) -> Bool { (a ?? .null) == (b ?? .null) }

    /// `processor.get(key, [default])[0]`: the first element of a list.
    static func firstOf(_ v: JSONValue?) -> JSONValue? { if case .array(let a)? = v, let f = a.first { return f }; return nil }

    /// The converter's does_token_look_special.
    public static func looksSpecial(_ t: String) -> Bool {
        ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(t) || (t.hasPrefix("<|") && t.hasSuffix("|>"))
            || (t.hasPrefix("<｜") && t.hasSuffix("｜>")) || (t.hasPrefix("<unused") && t.hasSuffix(">"))
    }
}
