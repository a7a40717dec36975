import Foundation

/// A decoder-only transformer (Llama, Mistral, Qwen2, Qwen3 and Phi-3 families, and the
/// mixtures of experts Qwen3-MoE, Mixtral and gpt-oss for memory and fit) as its config.json
/// describes it:
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
    /// The mixture of experts in place of the MLP (`experts.sparseLayers`), or nil for a dense model.
    public var experts: Experts? = nil
    /// Llama 4: layers that skip rope (NoPE; transformers' `no_rope_layers` has 0 there) and scale
    /// their queries by position instead (`attn_temperature_tuning`); the others normalise q and
    /// k by their L2 norm (`use_qk_norm`, no weights).
    public var noRopeLayers: [Int] = []
    public var l2QKNorm = false
    /// The MLP's module: `mlp`, or Llama 4's `feed_forward`.
    public var mlpModule: String { experts?.family == .llama4 ? "feed_forward" : "mlp" }

    /// Each attention head has a learned sink logit (gpt-oss' `self_attn.sinks`, [heads]) that
    /// joins the softmax, and transformers runs it with eager attention (no SDPA path).
    public var attentionSinks = false

    /// A mixture of experts as transformers 5 builds it (Qwen3-MoE, Mixtral, gpt-oss): each
    /// sparse layer's experts are two fused 3-D parameters, `mlp.experts.gate_up_proj` [experts,
    /// 2·intermediate, hidden] and `mlp.experts.down_proj` [experts, hidden, intermediate]
    /// (gpt-oss stores both transposed, with biases), beside a router [experts, hidden]; the
    /// experts run through transformers' grouped_mm path (integrations/moe.py
    /// `grouped_mm_experts_forward`, the default `experts_implementation`): the tokens gathered in
    /// expert order, one row per token and chosen expert.
    public struct Experts: Sendable, Equatable, Codable {
        public enum Family: String, Sendable, Codable, CaseIterable { case qwen3MoE = "qwen3_moe", mixtral, gptOSS = "gpt_oss", llama4 = "llama4_text" }
        public var family: Family
        /// Experts per sparse layer (`num_local_experts`; Qwen3-MoE's published `num_experts`).
        public var count: Int
        /// Experts each token is routed to (`num_experts_per_tok`).
        public var perToken: Int
        /// One expert's MLP width (Qwen3-MoE's `moe_intermediate_size`, the others' `intermediate_size`).
        public var intermediateSize: Int
        /// Layers with a dense MLP instead (Qwen3-MoE's `mlp_only_layers`, `decoder_sparse_step`).
        public var denseLayers: [Int] = []
        /// The top-k routing weights are renormalised to sum to one (Qwen3-MoE's `norm_topk_prob`;
        /// Mixtral always): the router keeps their sum and the divided copy.
        public var normalizesTopK = true
        /// Llama 4's shared expert beside the routed ones: an MLP of this width (nn.Linear
        /// modules, so a 4-bit load quantizes it).
        public var sharedIntermediateSize: Int? = nil

        public init(family: Family, count: Int, perToken: Int, intermediateSize: Int, denseLayers: [Int] = [], sharedIntermediateSize: Int? = nil) {
            (self.family, self.count, self.perToken, self.intermediateSize, self.denseLayers) = (family, count, perToken, intermediateSize, denseLayers)
            self.sharedIntermediateSize = sharedIntermediateSize
        }

        /// gpt-oss: a bias on the router and on each expert's projections.
        public var biases: Bool { family == .gptOSS }
        /// The module holding the router: `mlp.gate` (Qwen3-MoE, Mixtral) or `mlp.router` (gpt-oss,
        /// Llama 4's `feed_forward.router`).
        public var routerModule: String { family == .gptOSS || family == .llama4 ? "router" : "gate" }
        /// The expert weights stored [experts, in, out] (gpt-oss, Llama 4) rather than [experts, out, in].
        public var transposed: Bool { family == .gptOSS || family == .llama4 }
        /// Rows the experts compute per token: the k chosen ones through transformers' grouped_mm;
        /// Llama 4's `Llama4TextExperts` runs every expert on every token (`torch.bmm` over
        /// the repeated, score-weighted hidden states).
        public var rowsPerToken: Int { family == .llama4 ? count : perToken }
    }

    /// One layer of each kind (dense first, then sparse) with how many layers are of its kind:
    /// what every per-layer count multiplies.
    public var layerKinds: [(layer: Int, count: Int)] {
        guard experts != nil else { return [(0, layers)] }
        let dense = Set(denseLayerIndices)
        // Among the first dense.count + 1 layers one is sparse, unless every layer is dense.
        let firstSparse = (0...dense.count).first { $0 < layers && !dense.contains($0) }
        return [(dense.min(), denseMLPLayers), (firstSparse, sparseLayers)].compactMap { l, n in l.flatMap { n > 0 ? ($0, n) : nil } }
    }

    /// Whether layer `l` has experts rather than a dense MLP.
    public func isSparse(layer l: Int) -> Bool { experts.map { !$0.denseLayers.contains(l) } ?? false }
    /// How many layers have experts.
    public var sparseLayers: Int { experts.map { _ in layers - denseLayerIndices.count } ?? 0 }
    /// A mixture of experts' layers with a dense MLP (`mlp_only_layers`, `decoder_sparse_step`,
    /// Llama 4's interleaving), those the model has.
    public var denseLayerIndices: [Int] { experts?.denseLayers.filter { $0 < layers } ?? [] }
    /// How many layers have a dense MLP.
    public var denseMLPLayers: Int { layers - sparseLayers }

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
    /// LoRA targets that are parameters, not modules (PEFT's `target_parameters`): a mixture of
    /// experts' fused expert weights (`experts.gate_up_proj`, `experts.down_proj`) and its router
    /// weight.
    public static let parameterTargets = ["experts", "router"]
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

    /// The linear modules with their shapes and biases, in `moduleNames` order (a sparse layer
    /// has only the attention's: its experts are not `nn.Linear`).
    public var projections: [Projection] { moduleNames.map { projection($0) } }

    /// Layer `l`'s linear modules.
    public func projections(layer l: Int) -> [Projection] {
        guard isSparse(layer: l) else { return projections }
        return moduleNames.map { projection($0, layer: l) }.filter { $0.block == "self_attn" || experts?.sharedIntermediateSize != nil }
    }

    /// Projection `name` (one of `projectionNames`, or a fused module); with a layer, as that
    /// layer has it (Llama 4's sparse layers: the MLP names are its shared expert's).
    public func projection(_ name: String, layer: Int? = nil) -> Projection {
        let shared = layer.map { isSparse(layer: $0) } == true ? experts?.sharedIntermediateSize : nil
        let h = hiddenSize, i = shared ?? intermediateSize
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
        let block = attention ? "self_attn" : shared != nil ? mlpModule + ".shared_expert" : mlpModule
        return Projection(name: name, block: block, outFeatures: out, inFeatures: inF, hasBias: bias)
    }

    /// [out, in] of projection `p` (in layer `layer`, where layers differ).
    public func projectionShape(_ p: String, layer: Int? = nil) -> (out: Int, in: Int) {
        let s = projection(p, layer: layer)
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

    /// PEFT 0.21.2's `target_modules="all-linear"` on this model: every linear module but the
    /// head on a dense model; on Qwen3-MoE and Mixtral the attention projections plus, through
    /// target_parameters, the experts (gate_up_proj at twice the rank) and the router (PEFT
    /// misses Qwen3-MoE's dense-layer MLPs); on gpt-oss the attention only (moe.json
    /// `peft_all_linear`).
    public var peftAllLinear: (targets: [String], expertGateUpRankFactor: Int) {
        switch experts?.family {
        case nil: return (moduleNames, 1)
        case .gptOSS?: return (Self.attentionProjections, 1)
        case _?: return (Self.attentionProjections + Self.parameterTargets, 2)
        }
    }

    /// The modules a target list adapts in layer `l` (a sparse layer has no dense MLP).
    public func adaptedModules(_ targets: [String], layer l: Int) -> [String] {
        let present = Set(projections(layer: l).map(\.name))
        return adaptedModules(targets).filter(present.contains)
    }

    /// Modules fed the same tensor: q/k/v (or qkv) the normed input, o the attention output,
    /// gate/up (or gate_up) the normed residual, down the SwiGLU product.
    public var sharedInputGroups: [[String]] {
        fusedProjections ? [["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]]
                         : [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    }

    /// The projections a target list names: `all`, `attention`, `mlp`, or a comma-separated list
    /// of those and names such as `q,v`, `q_proj,v_proj` or `attention,experts` (`experts` and
    /// `router`: a mixture of experts' parameters); returned in `projectionNames` order.
    public static func targetProjections(_ text: String) throws -> [String] {
        switch text.lowercased() {
        case "all": return projectionNames
        case "attention": return attentionProjections
        case "mlp": return mlpProjections
        default:
            let names = try text.split(separator: ",").flatMap { part -> [String] in
                let t = part.trimmingCharacters(in: .whitespaces).lowercased()
                if parameterTargets.contains(t) { return [t] }
                if ["all", "attention", "mlp"].contains(t) { return try targetProjections(t) }
                let name = t.hasSuffix("_proj") ? t : t + "_proj"
                guard projectionNames.contains(name) || fusedModules.contains(where: { $0.name == name }) else {
                    throw ArchitectureError("unknown target '\(part)'; use all, attention, mlp or names from \(projectionNames.joined(separator: ", ")) (qkv_proj, gate_up_proj when fused; experts, router in a mixture of experts), comma-separated")
                }
                return [name]
            }
            guard !names.isEmpty else { throw ArchitectureError("--targets is empty") }
            return (projectionNames + fusedModules.map(\.name) + parameterTargets).filter(names.contains)
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
        /// A sparse layer's fused expert weights, [experts, out, in] (bf16 after a 4-bit load:
        /// transformers' bitsandbytes integration replaces only `nn.Linear`).
        case expert
        /// gpt-oss' expert biases.
        case expertBias = "expert_bias"
        /// The router's weight (and gpt-oss' bias), an `nn.Parameter` of a router module.
        case router
        /// gpt-oss' attention sinks, one per head.
        case sinks
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
                let s = projection(p, layer: l)
                let path = s.modulePath(layer: l)
                let w = TensorGroup(name: path + ".weight", shape: [s.outFeatures, s.inFeatures], count: 1, kind: .projection, projection: p)
                return s.hasBias ? [w, TensorGroup(name: path + ".bias", shape: [s.outFeatures], count: 1, kind: .bias, projection: p)] : [w]
            }
        }
        let attention = moduleNames.filter { projection($0).block == "self_attn" }, mlp = moduleNames.filter { projection($0).block != "self_attn" }
        let qk = qkNorm ? [norm("self_attn.q_norm", headDim), norm("self_attn.k_norm", headDim)] : []
        let sinks = attentionSinks ? [TensorGroup(name: "model.layers.\(l).self_attn.sinks", shape: [attentionHeads], count: 1, kind: .sinks)] : []
        let head = [norm("input_layernorm", hiddenSize)] + block(attention) + qk + sinks + [norm("post_attention_layernorm", hiddenSize)]
        guard let x = experts, isSparse(layer: l) else { return head + block(mlp) }
        // The names and shapes transformers 5 gives the parameters in memory (a checkpoint may
        // hold Qwen3-MoE's and Mixtral's experts one by one; transformers fuses them on load).
        let p = "model.layers.\(l).\(mlpModule).", (e, i, h) = (x.count, x.intermediateSize, hiddenSize)
        var t = [TensorGroup(name: p + x.routerModule + ".weight", shape: [e, h], count: 1, kind: .router)]
        if x.biases { t.append(TensorGroup(name: p + "router.bias", shape: [e], count: 1, kind: .router)) }
        t.append(TensorGroup(name: p + "experts.gate_up_proj", shape: x.transposed ? [e, h, 2 * i] : [e, 2 * i, h], count: 1, kind: .expert))
        if x.biases { t.append(TensorGroup(name: p + "experts.gate_up_proj_bias", shape: [e, 2 * i], count: 1, kind: .expertBias)) }
        t.append(TensorGroup(name: p + "experts.down_proj", shape: x.transposed ? [e, i, h] : [e, h, i], count: 1, kind: .expert))
        if x.biases { t.append(TensorGroup(name: p + "experts.down_proj_bias", shape: [e, h], count: 1, kind: .expertBias)) }
        // Llama 4's shared expert: linear modules.
        return head + t + (x.sharedIntermediateSize != nil ? block(mlp) : [])
    }

    /// Every parameter, layer tensors as patterns with `*` for the layer, as transformers' model
    /// class creates them (`Vectors/memory/presets.json` pins the presets to transformers' own counts).
    public var tensorGroups: [TensorGroup] {
        var g = [TensorGroup(name: "model.embed_tokens.weight", shape: [vocabSize, hiddenSize], count: 1, kind: .embedding)]
        // Layers of one kind (dense, sparse) have the same tensors: the first of each kind
        // stands for all of them; what both kinds have is counted once per layer.
        for (l, n) in layerKinds {
            for t in layerTensors(l) {
                let name = t.name.replacingOccurrences(of: "model.layers.\(l).", with: "model.layers.*.")
                if let k = g.firstIndex(where: { $0.name == name && $0.shape == t.shape }) {
                    g[k].count += n
                } else {
                    g.append(TensorGroup(name: name, shape: t.shape, count: n, kind: t.kind, projection: t.projection))
                }
            }
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
        if let x = experts {
            for (name, v) in [("num_local_experts", x.count), ("num_experts_per_tok", x.perToken), ("the experts' intermediate_size", x.intermediateSize)] {
                guard v > 0, v <= Self.maxDimension else { return "\(name) is \(v); it must be a positive integer up to 2^40" }
            }
            guard layers <= 1 << 16 else { return "num_hidden_layers \(layers) is above qlora's limit of 65536 for a mixture of experts" }
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
    public static let trainableModelTypes = ["llama", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "mixtral"]

    /// The model types whose layers these fields describe, for memory and fit: the trainable ones
    /// and the other mixtures of experts (gpt-oss, Llama 4).
    /// Another family differs in what the fields do not say (Gemma ties its embeddings by
    /// default, its MLP and norms differ), so counting it as a Llama would be wrong.
    public static let describedModelTypes = trainableModelTypes + Experts.Family.allCases.map(\.rawValue).filter { !trainableModelTypes.contains($0) }

    /// Why a model_type is not described, or nil when it is.
    public static func undescribedTypeProblem(_ type: String) -> String? {
        describedModelTypes.contains(type) ? nil
            : "model_type \(type) is not described (\(describedModelTypes.joined(separator: ", ")) are); counting it as a Llama would be wrong"
    }

    /// What keeps these fields from describing the model at all, one problem per feature by its
    /// config name; empty when `qlora memory` and `qlora fit` can count it.
    public var undescribed: [String] {
        var problems = Self.undescribedTypeProblem(modelType).map { [$0] } ?? []
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
        if !denseLayerIndices.isEmpty {
            problems.append("dense layers in a mixture of experts (mlp_only_layers / decoder_sparse_step) are not supported for training yet")
        }
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
        // Mixtures of experts (memory and fit; qlora's decoder does not run them).
        moe(ModelArchitecture(name: "qwen3-30b-a3b", modelType: "qwen3_moe", hiddenSize: 2048, intermediateSize: 6144, layers: 48, attentionHeads: 32,
                              keyValueHeads: 4, headDim: 128, vocabSize: 151936), Experts(family: .qwen3MoE, count: 128, perToken: 8, intermediateSize: 768)),
        moe(ModelArchitecture(name: "mixtral-8x7b", modelType: "mixtral", hiddenSize: 4096, intermediateSize: 14336, layers: 32, attentionHeads: 32,
                              keyValueHeads: 8, vocabSize: 32000), Experts(family: .mixtral, count: 8, perToken: 2, intermediateSize: 14336)),
        moe(ModelArchitecture(name: "gpt-oss-20b", modelType: "gpt_oss", hiddenSize: 2880, intermediateSize: 2880, layers: 24, attentionHeads: 64,
                              keyValueHeads: 8, headDim: 64, vocabSize: 201088), Experts(family: .gptOSS, count: 32, perToken: 4, intermediateSize: 2880)),
        llama4(ModelArchitecture(name: "llama-4-scout", modelType: "llama4_text", hiddenSize: 5120, intermediateSize: 16384, layers: 48, attentionHeads: 40,
                                 keyValueHeads: 8, headDim: 128, vocabSize: 202048),
               Experts(family: .llama4, count: 16, perToken: 1, intermediateSize: 8192, sharedIntermediateSize: 8192)),
        moe(ModelArchitecture(name: "gpt-oss-120b", modelType: "gpt_oss", hiddenSize: 2880, intermediateSize: 2880, layers: 36, attentionHeads: 64,
                              keyValueHeads: 8, headDim: 64, vocabSize: 201088), Experts(family: .gptOSS, count: 128, perToken: 4, intermediateSize: 2880)),
    ]

    /// Llama 4 Scout's text model (meta-llama/Llama-4-Scout-17B-16E: text_config; the vision
    /// tower is not counted), as Llama4TextConfig sets it up.
    public static func llama4(_ a: ModelArchitecture, _ x: Experts, noRopeInterval: Int = 4) -> ModelArchitecture {
        var a = moe(a, x)
        a.noRopeLayers = (0..<a.layers).filter { ($0 + 1) % noRopeInterval == 0 }
        return a
    }

    /// A mixture of experts as its family's config class sets it up (the reader's
    /// `ModelArchitecture(configFile:)` does the same from config.json).
    public static func moe(_ a: ModelArchitecture, _ x: Experts) -> ModelArchitecture {
        var a = a
        a.experts = x
        a.qkNorm = x.family == .qwen3MoE
        a.l2QKNorm = x.family == .llama4
        a.attentionSinks = x.family == .gptOSS
        a.attentionBias = x.family == .gptOSS
        return a
    }

    private static func qwen3(_ a: ModelArchitecture) -> ModelArchitecture { var a = a; a.qkNorm = true; return a }
    private static func phi3(_ a: ModelArchitecture) -> ModelArchitecture { var a = a; a.fusedProjections = true; return a }

    public static func preset(_ name: String) -> ModelArchitecture? { presets.first { $0.name == name.lowercased() } }
}

/// A bad architecture or target list: one line.
public struct ArchitectureError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
