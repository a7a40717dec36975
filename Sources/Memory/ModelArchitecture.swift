import Foundation

/// The shape-deciding fields of a decoder-only transformer's config.json (Llama, Mistral,
/// Qwen2 families): enough to list every parameter tensor exactly.
public struct ModelArchitecture: Sendable, Equatable, Codable {
    public var name: String
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layers: Int
    public var attentionHeads: Int
    public var keyValueHeads: Int
    public var vocabSize: Int
    /// lm_head shares the embedding matrix (no separate tensor).
    public var tiedEmbeddings = false
    /// q/k/v projections carry biases (Qwen2).
    public var attentionQKVBias = false
    /// Every attention projection carries a bias (Llama's `attention_bias`).
    public var attentionBias = false
    /// MLP projections carry biases (Llama's `mlp_bias`).
    public var mlpBias = false

    public init(name: String, hiddenSize: Int, intermediateSize: Int, layers: Int, attentionHeads: Int,
                keyValueHeads: Int? = nil, vocabSize: Int, tiedEmbeddings: Bool = false, attentionQKVBias: Bool = false) {
        self.name = name
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.layers = layers
        self.attentionHeads = attentionHeads
        self.keyValueHeads = keyValueHeads ?? attentionHeads
        self.vocabSize = vocabSize
        self.tiedEmbeddings = tiedEmbeddings
        self.attentionQKVBias = attentionQKVBias
    }

    public var headDim: Int { hiddenSize / attentionHeads }
    /// Rows of k_proj and v_proj.
    public var keyValueDim: Int { keyValueHeads * headDim }

    /// The seven projections of a decoder layer, in HF's names.
    public static let projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    /// [out, in] of projection `p`.
    public func projectionShape(_ p: String) -> (out: Int, in: Int) {
        switch p {
        case "q_proj", "o_proj": return (hiddenSize, hiddenSize)
        case "k_proj", "v_proj": return (keyValueDim, hiddenSize)
        case "gate_proj", "up_proj": return (intermediateSize, hiddenSize)
        case "down_proj": return (hiddenSize, intermediateSize)
        default: preconditionFailure("unknown projection \(p)")
        }
    }

    public enum TensorKind: String, Sendable, Codable {
        /// A decoder layer's linear weight (quantized by QLoRA).
        case projection
        case embedding
        case lmHead = "lm_head"
        case norm
        case bias
    }

    /// One parameter tensor pattern (`*` for the layer index) and how many times it occurs.
    public struct TensorGroup: Sendable, Equatable {
        public var name: String
        public var shape: [Int]
        public var count: Int
        public var kind: TensorKind
        /// The projection this weight or bias belongs to.
        public var projection: String?
        public var elements: Int { shape.reduce(1, *) * count }
    }

    /// Every parameter, as transformers' model class creates it (`Vectors/memory/presets.json`
    /// pins the presets to transformers' own counts).
    public var tensorGroups: [TensorGroup] {
        let h = hiddenSize, l = layers
        var g: [TensorGroup] = [TensorGroup(name: "model.embed_tokens.weight", shape: [vocabSize, h], count: 1, kind: .embedding)]
        for p in Self.projections {
            let s = projectionShape(p)
            let attention = ["q_proj", "k_proj", "v_proj", "o_proj"].contains(p)
            let prefix = "model.layers.*." + (attention ? "self_attn." : "mlp.") + p
            g.append(TensorGroup(name: prefix + ".weight", shape: [s.out, s.in], count: l, kind: .projection, projection: p))
            let hasBias = attention ? (attentionBias || (attentionQKVBias && p != "o_proj")) : mlpBias
            if hasBias { g.append(TensorGroup(name: prefix + ".bias", shape: [s.out], count: l, kind: .bias, projection: p)) }
        }
        g.append(TensorGroup(name: "model.layers.*.input_layernorm.weight", shape: [h], count: l, kind: .norm))
        g.append(TensorGroup(name: "model.layers.*.post_attention_layernorm.weight", shape: [h], count: l, kind: .norm))
        g.append(TensorGroup(name: "model.norm.weight", shape: [h], count: 1, kind: .norm))
        if !tiedEmbeddings { g.append(TensorGroup(name: "lm_head.weight", shape: [vocabSize, h], count: 1, kind: .lmHead)) }
        return g
    }

    public var totalParameters: Int { tensorGroups.reduce(0) { $0 + $1.elements } }

    /// Built-in presets with their exact published configs.
    public static let presets: [ModelArchitecture] = [
        ModelArchitecture(name: "llama-2-7b", hiddenSize: 4096, intermediateSize: 11008, layers: 32, attentionHeads: 32, vocabSize: 32000),
        ModelArchitecture(name: "llama-2-13b", hiddenSize: 5120, intermediateSize: 13824, layers: 40, attentionHeads: 40, vocabSize: 32000),
        ModelArchitecture(name: "llama-2-70b", hiddenSize: 8192, intermediateSize: 28672, layers: 80, attentionHeads: 64, keyValueHeads: 8, vocabSize: 32000),
        ModelArchitecture(name: "llama-65b", hiddenSize: 8192, intermediateSize: 22016, layers: 80, attentionHeads: 64, vocabSize: 32000),
        ModelArchitecture(name: "llama-3.1-8b", hiddenSize: 4096, intermediateSize: 14336, layers: 32, attentionHeads: 32, keyValueHeads: 8, vocabSize: 128256),
        ModelArchitecture(name: "llama-3.1-70b", hiddenSize: 8192, intermediateSize: 28672, layers: 80, attentionHeads: 64, keyValueHeads: 8, vocabSize: 128256),
        ModelArchitecture(name: "mistral-7b", hiddenSize: 4096, intermediateSize: 14336, layers: 32, attentionHeads: 32, keyValueHeads: 8, vocabSize: 32000),
        ModelArchitecture(name: "qwen2.5-7b", hiddenSize: 3584, intermediateSize: 18944, layers: 28, attentionHeads: 28, keyValueHeads: 4, vocabSize: 152064, attentionQKVBias: true),
        ModelArchitecture(name: "qwen2.5-14b", hiddenSize: 5120, intermediateSize: 13824, layers: 48, attentionHeads: 40, keyValueHeads: 8, vocabSize: 152064, attentionQKVBias: true),
        ModelArchitecture(name: "qwen2.5-32b", hiddenSize: 5120, intermediateSize: 27648, layers: 64, attentionHeads: 40, keyValueHeads: 8, vocabSize: 152064, attentionQKVBias: true),
    ]

    public static func preset(_ name: String) -> ModelArchitecture? { presets.first { $0.name == name.lowercased() } }

    /// Reads a Hugging Face config.json (`model_type` llama, mistral or qwen2, or any config with
    /// the same fields). Errors name the file and the field.
    public init(configFile path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else { throw MemoryError.badConfig(path, "cannot be read") }
        guard let c = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { throw MemoryError.badConfig(path, "is not a JSON object") }
        func int(_ k: String) throws -> Int {
            guard let v = c[k] as? Int, v > 0 else { throw MemoryError.badConfig(path, "\(k) is missing or not a positive integer") }
            return v
        }
        let type = (c["model_type"] as? String) ?? "llama"
        self.init(name: (c["_name_or_path"] as? String) ?? (path as NSString).lastPathComponent,
                  hiddenSize: try int("hidden_size"), intermediateSize: try int("intermediate_size"), layers: try int("num_hidden_layers"),
                  attentionHeads: try int("num_attention_heads"), keyValueHeads: (c["num_key_value_heads"] as? Int) ?? (c["num_attention_heads"] as? Int),
                  vocabSize: try int("vocab_size"), tiedEmbeddings: (c["tie_word_embeddings"] as? Bool) ?? false,
                  attentionQKVBias: type == "qwen2")
        attentionBias = (c["attention_bias"] as? Bool) ?? false
        mlpBias = (c["mlp_bias"] as? Bool) ?? false
        guard hiddenSize % attentionHeads == 0, attentionHeads % keyValueHeads == 0 else {
            throw MemoryError.badConfig(path, "hidden_size must be a multiple of num_attention_heads, and that of num_key_value_heads")
        }
    }
}

public enum MemoryError: Error, CustomStringConvertible {
    case badConfig(String, String)
    case badOption(String)

    public var description: String {
        switch self {
        case .badConfig(let path, let problem): return "\(path): \(problem)"
        case .badOption(let problem): return problem
        }
    }
}
