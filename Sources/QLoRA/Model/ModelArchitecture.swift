import Foundation

/// A decoder-only transformer (Llama, Mistral, Qwen2, Qwen3 and Phi-3 families) as its
/// config.json describes it:
/// the one description of a model that the decoder (`LlamaModel`), the memory estimate, the
/// checkpoint loader and the sample writer share. Every parameter tensor, its shape and its
/// module path follow from these fields (`projections`, `tensorGroups`, `layerTensors`).
///
/// The config.json reader lives beside the file formats (`ModelArchitecture(configFile:)` in
/// CheckpointFormats); this type does no I/O.
public struct ModelArchitecture: Sendable, Equatable, Codable {
    /// Llama 3's frequency-dependent rope scaling (`rope_type: "llama3"`).
    public struct Llama3RopeScaling: Sendable, Equatable, Codable {
        public var factor: Double
        public var lowFreqFactor: Double
        public var highFreqFactor: Double
        public var originalMaxPositions: Int
        public init(factor: Double, lowFreqFactor: Double, highFreqFactor: Double, originalMaxPositions: Int) {
            (self.factor, self.lowFreqFactor, self.highFreqFactor, self.originalMaxPositions) = (factor, lowFreqFactor, highFreqFactor, originalMaxPositions)
        }
    }

    /// Rotary-embedding scaling of the config.
    public enum RopeScaling: Sendable, Equatable, Codable {
        case llama3(Llama3RopeScaling)
        /// A rope type this project does not implement, by its config name.
        case unsupported(String)
    }

    public var name: String
    /// config.json's `model_type` ("llama", "mistral", "qwen2", ...).
    public var modelType = "llama"
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layers: Int
    public var attentionHeads: Int
    public var keyValueHeads: Int
    /// Per-head width (`head_dim`; hidden / heads unless the config says otherwise).
    public var headDim: Int
    public var vocabSize: Int
    /// lm_head shares the embedding matrix (no separate tensor).
    public var tiedEmbeddings = false
    public var rmsNormEps = 1e-6
    public var ropeTheta = 10000.0
    public var ropeScaling: RopeScaling? = nil
    /// q/k/v projections carry biases (Qwen2).
    public var attentionQKVBias = false
    /// Every attention projection carries a bias (Llama's `attention_bias`).
    public var attentionBias = false
    /// MLP projections carry biases (Llama's `mlp_bias`).
    public var mlpBias = false
    /// RMSNorm of each head's query and key before rope (Qwen3's `q_norm`, `k_norm`, [headDim]).
    public var qkNorm = false
    /// q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj` (Phi-3, Phi-4).
    public var fusedProjections = false
    /// Attention sees only this many previous tokens (Mistral v0.1, Phi-3 mini); nil: all.
    public var slidingWindow: Int? = nil
    /// Share of each head's dimensions that rope rotates (Phi-4-mini: 0.75).
    public var partialRotaryFactor = 1.0
    /// Features of the config that no part of qlora models, by name (mixture of experts, a
    /// vision tower), found by the config reader.
    public var unmodelledFeatures: [String] = []

    public init(name: String, modelType: String = "llama", hiddenSize: Int, intermediateSize: Int, layers: Int, attentionHeads: Int,
                keyValueHeads: Int? = nil, headDim: Int? = nil, vocabSize: Int, tiedEmbeddings: Bool = false, attentionQKVBias: Bool = false) {
        self.name = name
        self.modelType = modelType
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.layers = layers
        self.attentionHeads = attentionHeads
        self.keyValueHeads = keyValueHeads ?? attentionHeads
        self.headDim = headDim ?? (attentionHeads > 0 ? hiddenSize / attentionHeads : 0)
        self.vocabSize = vocabSize
        self.tiedEmbeddings = tiedEmbeddings
        self.attentionQKVBias = attentionQKVBias
    }

    /// Rows of k_proj and v_proj.
    public var keyValueDim: Int { keyValueHeads * headDim }
    /// Rows of q_proj (columns of o_proj): hidden size unless head_dim says otherwise (Qwen3).
    public var queryDim: Int { attentionHeads * headDim }

    /// Llama 3 rope scaling, when the config has it.
    public var llama3RopeScaling: Llama3RopeScaling? {
        if case .llama3(let s) = ropeScaling { return s }
        return nil
    }

    // MARK: Projections

    /// The seven projections of a decoder layer, in HF's names and in forward order.
    public static let projectionNames = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    /// Named groups of projections for `targetProjections(_:)`.
    public static let attentionProjections = ["q_proj", "k_proj", "v_proj", "o_proj"]
    public static let mlpProjections = ["gate_proj", "up_proj", "down_proj"]

    /// One linear layer of a decoder layer.
    public struct Projection: Sendable, Equatable {
        /// HF's name (`q_proj`, or `qkv_proj` when fused).
        public var name: String
        /// The submodule holding it: `self_attn` or `mlp`.
        public var block: String
        public var outFeatures: Int
        public var inFeatures: Int
        public var hasBias: Bool

        /// `model.layers.<layer>.self_attn.q_proj`: the module path PEFT and the checkpoint use.
        public func modulePath(layer: Int) -> String { "model.layers.\(layer).\(block).\(name)" }
    }

    /// The fused modules and what each holds, in order along its output rows.
    public static let fusedModules: [(name: String, parts: [String])] = [("qkv_proj", ["q_proj", "k_proj", "v_proj"]), ("gate_up_proj", ["gate_proj", "up_proj"])]

    /// The names of this architecture's linear modules in a decoder layer, in forward order: the
    /// seven projections, or with `fusedProjections` qkv_proj, o_proj, gate_up_proj, down_proj.
    public var moduleNames: [String] { fusedProjections ? ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] : Self.projectionNames }

    /// The linear modules with their shapes and biases, in `moduleNames` order.
    public var projections: [Projection] { moduleNames.map(projection) }

    /// Projection `name` (one of `projectionNames`, or a fused module).
    public func projection(_ name: String) -> Projection {
        let h = hiddenSize, i = intermediateSize
        let attention = Self.attentionProjections.contains(name) || name == "qkv_proj"
        let (out, inF): (Int, Int)
        switch name {
        case "q_proj": (out, inF) = (queryDim, h)
        case "o_proj": (out, inF) = (h, queryDim)
        case "k_proj", "v_proj": (out, inF) = (keyValueDim, h)
        case "qkv_proj": (out, inF) = (queryDim + 2 * keyValueDim, h)
        case "gate_proj", "up_proj": (out, inF) = (i, h)
        case "gate_up_proj": (out, inF) = (2 * i, h)
        case "down_proj": (out, inF) = (h, i)
        default: preconditionFailure("unknown projection \(name)")
        }
        let bias = attention ? (attentionBias || (attentionQKVBias && name != "o_proj")) : mlpBias
        return Projection(name: name, block: attention ? "self_attn" : "mlp", outFeatures: out, inFeatures: inF, hasBias: bias)
    }

    /// [out, in] of projection `p`.
    public func projectionShape(_ p: String) -> (out: Int, in: Int) {
        let s = projection(p)
        return (s.outFeatures, s.inFeatures)
    }

    /// Module path of layer `l`'s projection number `p` (`projectionNames` order).
    public static func modulePath(layer l: Int, projection p: Int) -> String {
        "model.layers.\(l)." + (p < 4 ? "self_attn." : "mlp.") + projectionNames[p]
    }

    /// The modules of this architecture that a target list (projection names, fused or not)
    /// adapts, in `moduleNames` order: with fused projections q/k/v select qkv_proj and gate/up
    /// gate_up_proj; without, a fused name selects its parts.
    public func adaptedModules(_ targets: [String]) -> [String] {
        var wanted = Set<String>()
        for t in targets {
            if let fused = Self.fusedModules.first(where: { $0.name == t || $0.parts.contains(t) }) {
                if fusedProjections { wanted.insert(fused.name) } else { wanted.formUnion(t == fused.name ? fused.parts : [t]) }
            } else {
                wanted.insert(t)
            }
        }
        return moduleNames.filter(wanted.contains)
    }

    /// Modules fed the same tensor: q/k/v (or qkv) the normed input, o the attention output,
    /// gate/up (or gate_up) the normed residual, down the SwiGLU product.
    public var sharedInputGroups: [[String]] {
        fusedProjections ? [["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]]
                         : [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    }

    /// The projections a target list names: `all`, `attention`, `mlp`, or a comma-separated list
    /// such as `q,v` or `q_proj,v_proj`; returned in `projectionNames` order.
    public static func targetProjections(_ text: String) throws -> [String] {
        switch text.lowercased() {
        case "all": return projectionNames
        case "attention": return attentionProjections
        case "mlp": return mlpProjections
        default:
            let names = try text.split(separator: ",").map { part -> String in
                let t = part.trimmingCharacters(in: .whitespaces).lowercased()
                let name = t.hasSuffix("_proj") ? t : t + "_proj"
                guard projectionNames.contains(name) || fusedModules.contains(where: { $0.name == name }) else {
                    throw ArchitectureError("unknown target '\(part)'; use all, attention, mlp or names from \(projectionNames.joined(separator: ", ")) (qkv_proj, gate_up_proj when fused)")
                }
                return name
            }
            guard !names.isEmpty else { throw ArchitectureError("--targets is empty") }
            return (projectionNames + fusedModules.map(\.name)).filter(names.contains)
        }
    }

    // MARK: Parameter tensors

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

    /// The parameter tensors of decoder layer `l`, named, in forward order: the input norm, the
    /// attention projections (each weight then its bias), the post-attention norm, the MLP.
    public func layerTensors(_ l: Int) -> [TensorGroup] {
        func norm(_ n: String, _ size: Int) -> TensorGroup { TensorGroup(name: "model.layers.\(l).\(n).weight", shape: [size], count: 1, kind: .norm) }
        func block(_ names: [String]) -> [TensorGroup] {
            names.flatMap { p -> [TensorGroup] in
                let s = projection(p)
                let path = s.modulePath(layer: l)
                let w = TensorGroup(name: path + ".weight", shape: [s.outFeatures, s.inFeatures], count: 1, kind: .projection, projection: p)
                return s.hasBias ? [w, TensorGroup(name: path + ".bias", shape: [s.outFeatures], count: 1, kind: .bias, projection: p)] : [w]
            }
        }
        let attention = moduleNames.filter { projection($0).block == "self_attn" }, mlp = moduleNames.filter { projection($0).block == "mlp" }
        let qk = qkNorm ? [norm("self_attn.q_norm", headDim), norm("self_attn.k_norm", headDim)] : []
        return [norm("input_layernorm", hiddenSize)] + block(attention) + qk + [norm("post_attention_layernorm", hiddenSize)] + block(mlp)
    }

    /// Every parameter, layer tensors as patterns with `*` for the layer, as transformers' model
    /// class creates them (`Vectors/memory/presets.json` pins the presets to transformers' own counts).
    public var tensorGroups: [TensorGroup] {
        var g = [TensorGroup(name: "model.embed_tokens.weight", shape: [vocabSize, hiddenSize], count: 1, kind: .embedding)]
        for t in layerTensors(0) {
            g.append(TensorGroup(name: t.name.replacingOccurrences(of: "model.layers.0.", with: "model.layers.*."), shape: t.shape,
                                 count: layers, kind: t.kind, projection: t.projection))
        }
        g.append(TensorGroup(name: "model.norm.weight", shape: [hiddenSize], count: 1, kind: .norm))
        if !tiedEmbeddings { g.append(TensorGroup(name: "lm_head.weight", shape: [vocabSize, hiddenSize], count: 1, kind: .lmHead)) }
        return g
    }

    public var totalParameters: Int { tensorGroups.reduce(0) { $0 + $1.elements } }

    // MARK: Size limits

    /// The largest dimension (hidden size, heads × head_dim, vocabulary, layers, LoRA rank) qlora
    /// computes with: 2^40. Small multiples and sums of such numbers fit in `Int`.
    public static let maxDimension = 1 << 40
    /// The largest parameter count qlora computes with: 2^48 (about 281 trillion, a thousand
    /// times the largest published models), so that 16 bytes per parameter still fits in `Int`.
    public static let maxParameters = 1 << 48

    /// Why this architecture's sizes cannot be computed with, or nil: a dimension that is not
    /// positive or above `maxDimension`, or a parameter count above `maxParameters` (every
    /// product checked, so numbers from any config.json are safe to pass). Names the fields as
    /// config.json spells them.
    public var sizeProblem: String? {
        let fields: [(String, Int)] = [("hidden_size", hiddenSize), ("intermediate_size", intermediateSize), ("num_hidden_layers", layers),
                                       ("num_attention_heads", attentionHeads), ("num_key_value_heads", keyValueHeads), ("head_dim", headDim),
                                       ("vocab_size", vocabSize)]
        for (name, v) in fields {
            guard v > 0 else { return "\(name) is \(v); it must be a positive integer" }
            guard v <= Self.maxDimension else { return "\(name) is \(v), above qlora's limit of 2^40 (\(Self.maxDimension))" }
        }
        for (name, heads) in [("num_attention_heads", attentionHeads), ("num_key_value_heads", keyValueHeads)] {
            guard let d = CheckedSize.product(heads, headDim), d <= Self.maxDimension else {
                return "\(name) \(heads) × head_dim \(headDim) is above qlora's limit of 2^40 (\(Self.maxDimension))"
            }
        }
        // Every dimension is now at most 2^40, so the shapes below (sums of a few) fit; their
        // products may not.
        var total = 0
        for g in tensorGroups {
            guard let n = CheckedSize.product(g.shape + [g.count]), let t = CheckedSize.sum(total, n), t <= Self.maxParameters else {
                return "the parameters exceed qlora's limit of 2^48 (\(Self.maxParameters)) at \(g.name) \(g.shape)" + (g.count > 1 ? " × \(g.count)" : "")
                    + " (hidden_size \(hiddenSize), intermediate_size \(intermediateSize), num_hidden_layers \(layers), vocab_size \(vocabSize))"
            }
            total = t
        }
        return nil
    }

    // MARK: What qlora implements

    /// The model types qlora's decoder (`LlamaModel`) runs.
    public static let trainableModelTypes = ["llama", "mistral", "qwen2", "qwen3", "phi3"]

    /// The model types whose layers these fields describe, for memory and fit: the same five.
    /// Another family differs in what the fields do not say (Gemma ties its embeddings by
    /// default, its MLP and norms differ), so counting it as a Llama would be wrong.
    public static let describedModelTypes = trainableModelTypes

    /// What keeps these fields from describing the model at all, one problem per feature by its
    /// config name; empty when `qlora memory` and `qlora fit` can count it.
    public var undescribed: [String] {
        var problems: [String] = []
        if !Self.describedModelTypes.contains(modelType) {
            problems.append("model_type \(modelType) is not described (\(Self.describedModelTypes.joined(separator: ", ")) are); counting it as a Llama would be wrong")
        }
        problems += unmodelledFeatures.map { "\($0) is not described: its parameters and activations are counted nowhere yet" }
        return problems
    }

    /// What qlora's decoder (`LlamaModel`) cannot run in this architecture, one problem per
    /// feature, by its config name; empty when it can be trained. The memory estimate counts
    /// every architecture these fields describe; a new family extends this list.
    public var unsupportedForTraining: [String] {
        var problems: [String] = []
        if !Self.trainableModelTypes.contains(modelType) {
            problems.append("model_type \(modelType) is not supported for training (\(Self.trainableModelTypes.joined(separator: ", ")) are)")
        }
        problems += unmodelledFeatures.map { "\($0) is not supported" }
        if case .unsupported(let type) = ropeScaling { problems.append("rope type \(type) is not supported (default and llama3 are)") }
        if partialRotaryFactor != 1 { problems.append("partial_rotary_factor \(partialRotaryFactor) is not supported (rope on whole heads only)") }
        return problems
    }

    /// Why training at `seqLen` tokens would differ from the model's own attention, or nil:
    /// sliding-window attention only matters beyond its window.
    public func slidingWindowProblem(seqLen: Int) -> String? {
        guard let w = slidingWindow, seqLen > w else { return nil }
        return "sliding-window attention (sliding_window \(w)) is not supported beyond \(w) tokens; use --seq-len \(w) or less"
    }

    // MARK: Presets

    /// Built-in presets with their exact published configs.
    public static let presets: [ModelArchitecture] = [
        ModelArchitecture(name: "llama-2-7b", hiddenSize: 4096, intermediateSize: 11008, layers: 32, attentionHeads: 32, vocabSize: 32000),
        ModelArchitecture(name: "llama-2-13b", hiddenSize: 5120, intermediateSize: 13824, layers: 40, attentionHeads: 40, vocabSize: 32000),
        ModelArchitecture(name: "llama-2-70b", hiddenSize: 8192, intermediateSize: 28672, layers: 80, attentionHeads: 64, keyValueHeads: 8, vocabSize: 32000),
        ModelArchitecture(name: "llama-65b", hiddenSize: 8192, intermediateSize: 22016, layers: 80, attentionHeads: 64, vocabSize: 32000),
        ModelArchitecture(name: "llama-3.1-8b", hiddenSize: 4096, intermediateSize: 14336, layers: 32, attentionHeads: 32, keyValueHeads: 8, vocabSize: 128256),
        ModelArchitecture(name: "llama-3.1-70b", hiddenSize: 8192, intermediateSize: 28672, layers: 80, attentionHeads: 64, keyValueHeads: 8, vocabSize: 128256),
        ModelArchitecture(name: "mistral-7b", modelType: "mistral", hiddenSize: 4096, intermediateSize: 14336, layers: 32, attentionHeads: 32, keyValueHeads: 8, vocabSize: 32000),
        ModelArchitecture(name: "qwen2.5-7b", modelType: "qwen2", hiddenSize: 3584, intermediateSize: 18944, layers: 28, attentionHeads: 28, keyValueHeads: 4, vocabSize: 152064, attentionQKVBias: true),
        ModelArchitecture(name: "qwen2.5-14b", modelType: "qwen2", hiddenSize: 5120, intermediateSize: 13824, layers: 48, attentionHeads: 40, keyValueHeads: 8, vocabSize: 152064, attentionQKVBias: true),
        ModelArchitecture(name: "qwen2.5-32b", modelType: "qwen2", hiddenSize: 5120, intermediateSize: 27648, layers: 64, attentionHeads: 40, keyValueHeads: 8, vocabSize: 152064, attentionQKVBias: true),
        qwen3(ModelArchitecture(name: "qwen3-8b", modelType: "qwen3", hiddenSize: 4096, intermediateSize: 12288, layers: 36, attentionHeads: 32, keyValueHeads: 8, headDim: 128, vocabSize: 151936)),
        qwen3(ModelArchitecture(name: "qwen3-32b", modelType: "qwen3", hiddenSize: 5120, intermediateSize: 25600, layers: 64, attentionHeads: 64, keyValueHeads: 8, headDim: 128, vocabSize: 151936)),
        phi3(ModelArchitecture(name: "phi-4", modelType: "phi3", hiddenSize: 5120, intermediateSize: 17920, layers: 40, attentionHeads: 40, keyValueHeads: 10, vocabSize: 100352)),
        ModelArchitecture(name: "llama-3.2-1b", hiddenSize: 2048, intermediateSize: 8192, layers: 16, attentionHeads: 32, keyValueHeads: 8, vocabSize: 128256, tiedEmbeddings: true),
        ModelArchitecture(name: "llama-3.2-3b", hiddenSize: 3072, intermediateSize: 8192, layers: 28, attentionHeads: 24, keyValueHeads: 8, vocabSize: 128256, tiedEmbeddings: true),
    ]

    private static func qwen3(_ a: ModelArchitecture) -> ModelArchitecture { var a = a; a.qkNorm = true; return a }
    private static func phi3(_ a: ModelArchitecture) -> ModelArchitecture { var a = a; a.fusedProjections = true; return a }

    public static func preset(_ name: String) -> ModelArchitecture? { presets.first { $0.name == name.lowercased() } }
}

/// A bad architecture or target list: one line.
public struct ArchitectureError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
