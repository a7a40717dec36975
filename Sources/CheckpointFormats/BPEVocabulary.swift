import FileOutput
import Foundation
import SafeTensors

/// A byte-level BPE tokenizer's tokenizer.json (Qwen2, Qwen3, Llama 3) as llama.cpp's converter
/// turns it into a GGUF vocabulary (`TextModel.get_vocab_base` and `_set_vocab_gpt2`): every id
/// below the config's vocab_size as its token, [PADi] where no token has the id; types NORMAL,
/// CONTROL (special or special-looking added tokens), USER_DEFINED (other added tokens, ▁ as
/// space), UNUSED; and the pre-tokenizer's llama.cpp name.
///
/// The converter names the pre-tokenizer by hashing the Hugging Face tokenizer's output on a test
/// text, for the models it lists. qlora names it by its definition: the normalizer and the Split
/// regex before ByteLevel. Vectors/generate_gguf_bpe.py shows that these definitions, applied to
/// llama.cpp's own Qwen1.5 and Llama 3 vocabularies, give the hashes the converter names "qwen2"
/// and "llama-bpe". A tokenizer with one of these definitions but a vocabulary the converter does
/// not list is named where the converter would stop.
public struct BPEVocabulary: Sendable, Equatable {
    /// model.vocab in document order.
    public var vocab: [(token: String, id: Int)]
    /// added_tokens: id, content, special.
    public var added: [(id: Int, content: String, special: Bool)]
    /// llama.cpp's name of the pre-tokenizer (tokenizer.ggml.pre).
    public var preTokenizer: String

    public static func == (a: BPEVocabulary, b: BPEVocabulary) -> Bool {
        a.preTokenizer == b.preTokenizer && a.vocab.elementsEqual(b.vocab, by: ==) && a.added.elementsEqual(b.added, by: ==)
    }

    /// The Split regexes of the pre-tokenizers qlora names, with the normalizer each has.
    static let known: [(name: String, normalizer: String?, regex: String)] = [
        ("qwen2", "NFC", #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#),
        ("llama-bpe", nil, #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#),
    ]

    /// Reads `directory`/tokenizer.json.
    public init(directory: String) throws {
        let path = directory + "/tokenizer.json"
        try self.init(json: try ConfigJSON.read(path), file: path)
    }

    public init(json: JSONValue, file: String) throws {
        func fail(_ problem: String) -> CheckpointError { .invalidPath(path: file, problem: problem) }
        guard let model = json["model"], model["type"] == .string("BPE") else { throw fail("is not a BPE tokenizer (model.type)") }
        guard case .object(let members)? = model["vocab"] else { throw fail("has no model.vocab object") }
        vocab = try members.map { m in
            guard case .number(let s) = m.value, let id = Int(s), id >= 0 else { throw fail("model.vocab[\(m.key)] is not an id") }
            return (m.key, id)
        }
        var added: [(Int, String, Bool)] = []
        if case .array(let list)? = json["added_tokens"] {
            for t in list {
                guard case .number(let s)? = t["id"], let id = Int(s), id >= 0, case .string(let content)? = t["content"] else {
                    throw fail("an added_tokens entry has no id or content")
                }
                added.append((id, content, t["special"] == .bool(true)))
            }
        }
        self.added = added
        guard let name = Self.preTokenizerName(json) else {
            throw fail("its pre-tokenizer is not one qlora names yet (Qwen2/Qwen3's and Llama 3's are); llama.cpp's converter names it by a hash of the tokenizer's output")
        }
        preTokenizer = name
    }

    /// llama.cpp's name for the tokenizer's normalizer and pre-tokenizer, or nil.
    static func preTokenizerName(_ json: JSONValue) -> String? {
        var normalizer: String?
        switch json["normalizer"] {
        case nil, .null?: normalizer = nil
        case .object?:
            guard case .string(let t)? = json["normalizer"]?["type"] else { return nil }
            normalizer = t
        default: return nil
        }
        guard let pre = json["pre_tokenizer"], pre["type"] == .string("Sequence"), case .array(let steps)? = pre["pretokenizers"], steps.count == 2 else { return nil }
        let split = steps[0], byteLevel = steps[1]
        guard split["type"] == .string("Split"), case .string(let regex)? = split["pattern"]?["Regex"], split["behavior"] == .string("Isolated"),
              split["invert"] == .bool(false) || split["invert"] == nil,
              byteLevel["type"] == .string("ByteLevel"), byteLevel["add_prefix_space"] == .bool(false), byteLevel["use_regex"] == .bool(false) else { return nil }
        return known.first { $0.regex == regex && $0.normalizer == normalizer }?.name
    }

    /// `get_vocab_base`'s tokens and types for a model of `vocabSize` ids (the converter asserts
    /// every id is below it).
    public func ggufVocabulary(vocabSize: Int, file: String) throws -> (tokens: [String], types: [Int32]) {
        var reverse: [Int: String] = [:]
        for v in vocab { reverse[v.id] = v.token }
        var addedByContent: [String: Bool] = [:]
        for a in added {
            reverse[a.id] = a.content
            addedByContent[a.content] = a.special
        }
        if let top = reverse.keys.max(), top >= vocabSize {
            throw CheckpointError.invalidPath(path: file, problem: "token id \(top) is not below config.json's vocab_size \(vocabSize)")
        }
        var tokens: [String] = [], types: [Int32] = []
        tokens.reserveCapacity(vocabSize)
        types.reserveCapacity(vocabSize)
        for i in 0..<vocabSize {
            guard var token = reverse[i] else {
                tokens.append("[PAD\(i)]")
                types.append(5)
                continue
            }
            if let special = addedByContent[token] {
                if special || SpecialVocabulary.looksSpecial(token) {
                    types.append(3)
                } else {
                    token = token.replacingOccurrences(of: "\u{2581}", with: " ")
                    types.append(4)
                }
            } else {
                types.append(1)
            }
            tokens.append(token)
        }
        return (tokens, types)
    }
}
