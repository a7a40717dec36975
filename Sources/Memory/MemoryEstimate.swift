import Foundation
import QLoRA

/// How a model is fine-tuned, for memory accounting.
public enum TrainingMethod: String, Sendable, CaseIterable, Codable {
    /// Mixed precision as ZeRO counts it: bf16 weights and gradients, an fp32 master copy, fp32
    /// AdamW moments (16 bytes per parameter).
    case full
    /// bf16 weights and gradients, bitsandbytes' 8-bit AdamW (block-wise, 256 per block; tensors
    /// under 4,096 elements keep fp32 moments), no master copy.
    case full8BitAdam = "full-8bit-adam"
    /// A frozen bf16 base with fp32 LoRA adapters (PEFT's default), AdamW on the adapters.
    case lora
    /// A frozen NF4 base (bitsandbytes, bf16 compute) with fp32 LoRA adapters, AdamW on the adapters.
    case qlora
}

/// The optimizer of a LoRA run (the full-fine-tuning methods name theirs).
public enum Optimizer: String, Sendable, CaseIterable, Codable {
    /// torch.optim.AdamW: two fp32 moments per trainable parameter.
    case adamw
    /// bitsandbytes' AdamW8bit: two 8-bit moments with an fp32 absmax per 256 (tensors under
    /// 4,096 elements keep fp32 moments).
    case adamw8bit = "adamw-8bit"
    /// bitsandbytes' PagedAdamW8bit (the QLoRA paper's): the same bytes in paged (unified) memory,
    /// which the driver moves to CPU memory when the GPU runs short; `Fit` counts none of it on
    /// the device, the most paging can save.
    case pagedAdamw8bit = "paged-adamw-8bit"

    /// Bytes of the two moments for a tensor of `n` elements.
    func stateBytes(_ n: Int) -> Int {
        switch self {
        case .adamw: return 8 * n
        case .adamw8bit, .pagedAdamw8bit: return n < 4096 ? 8 * n : 2 * (n + 4 * CheckedSize.ceilingDivision(n, 256))
        }
    }
}

/// How a mixture of experts' fused expert parameters are held during training.
public enum ExpertRoute: String, Sendable, CaseIterable, Codable {
    /// As transformers 5 + bitsandbytes load them: bf16, whatever the quantization config says
    /// (only `nn.Linear` is replaced by Linear4bit; bitsandbytes #1849).
    case bf16
    /// bitsandbytes' parametrize route (`bitsandbytes.nn.parametrize.replace_parameter_4bit` on
    /// each fused parameter after loading): NF4 + double quant, one quant state per 3-D tensor;
    /// reading the parameter dequantizes it whole to bf16, so every forward holds a bf16 copy of
    /// the layer's experts, kept for backward (measured: peaks.json's `-experts-nf4` rows). PEFT's
    /// target_parameters does not find a parametrized expert (moe.json), so LoRA here is on the
    /// linear modules only.
    case nf4
}

/// What is trained and at what size.
public struct MemoryOptions: Sendable, Codable {
    public var method: TrainingMethod = .qlora
    public var rank = 16
    public var alpha = 32.0
    /// Projections with adapters (HF names).
    public var targets = ModelArchitecture.projectionNames
    public var seqLen = 2048
    public var batch = 1
    public var gradientCheckpointing = false
    public var doubleQuant = true
    public var blocksize = 64
    /// LoRA dropout > 0 keeps a mask per adapter input.
    public var loraDropout = 0.0
    /// The LoRA methods' optimizer.
    public var optimizer: Optimizer = .adamw
    /// DoRA (PEFT's `use_dora`): a trainable fp32 magnitude per output feature of each adapted
    /// projection, and the forward's weight norm (measured: peaks.json's `-dora` rows).
    public var dora = false
    /// Modules trained whole (PEFT's `modules_to_save`): "lm_head", "embed_tokens". PEFT trains a
    /// bf16 copy of each with a bf16 gradient and bf16 AdamW moments (measured: peaks.json's
    /// `-save-*` rows).
    public var modulesToSave: [String] = []
    /// How a mixture of experts' experts are held.
    public var experts: ExpertRoute = .bf16
    /// LoRA on quantized experts runs beside them (Unsloth's ParamWrapper forward, which applies
    /// the adapters as their own grouped matmuls), where PEFT's target_parameters finds no
    /// parametrized expert.
    public var quantizedExpertLoRA = false
    /// The rank of experts.gate_up_proj's adapter over `rank`: PEFT's "all-linear" on a mixture
    /// of experts gives it twice the rank (its rank_pattern; moe.json `peft_all_linear`).
    public var expertGateUpRankFactor = 1

    public init(method: TrainingMethod = .qlora, rank: Int = 16, alpha: Double = 32, targets: [String] = ModelArchitecture.projectionNames,
                seqLen: Int = 2048, batch: Int = 1, gradientCheckpointing: Bool = false, doubleQuant: Bool = true, blocksize: Int = 64,
                loraDropout: Double = 0, optimizer: Optimizer = .adamw, dora: Bool = false) {
        (self.method, self.rank, self.alpha, self.targets, self.seqLen, self.batch) = (method, rank, alpha, targets, seqLen, batch)
        (self.gradientCheckpointing, self.doubleQuant, self.blocksize, self.loraDropout) = (gradientCheckpointing, doubleQuant, blocksize, loraDropout)
        (self.optimizer, self.dora) = (optimizer, dora)
    }

    public var tokens: Int { seqLen * batch }
    public var isLoRA: Bool { method == .lora || method == .qlora }
}

/// One line of the memory table.
public struct MemoryComponent: Sendable, Codable {
    public var name: String
    public var estimatedBytes: Int
    /// Measured in this process (`MemoryMeasurement`), or nil.
    public var measuredBytes: Int?
    /// How the measured figure was obtained, or why there is none.
    public var measuredBy: String?
    /// Resident-set growth while the component was built (RSS, a second opinion on the allocator).
    public var measuredRSSBytes: Int?
    /// The formula or rule behind the estimate.
    public var basis: String

    public init(name: String, estimatedBytes: Int, basis: String) {
        self.name = name
        self.estimatedBytes = estimatedBytes
        self.basis = basis
    }
}

/// The memory a fine-tuning run needs, per component, from exact parameter counts.
public struct MemoryEstimate: Sendable, Codable {
    public struct Parameters: Sendable, Codable {
        public var total: Int
        public var quantized: Int
        public var trainable: Int
    }

    public var model: String
    public var architecture: ModelArchitecture
    public var method: TrainingMethod
    public var options: MemoryOptions
    public var params: Parameters
    public var components: [MemoryComponent]
    /// Per decoder layer and per token, the activation bytes the formula counts (see `activationBytesPerToken`).
    public var activationBytesPerLayerPerToken: Int
    public static let notModelledText = "the CUDA context and kernel workspaces, allocator caching and fragmentation, framework buffers, the data pipeline, and activation memory outside the formula (see activations' basis)."

    public var totalEstimatedBytes: Int { components.filter { !$0.name.hasPrefix("(") }.reduce(0) { $0 + $1.estimatedBytes } }
    public var totalMeasuredBytes: Int? {
        let counted = components.filter { !$0.name.hasPrefix("(") }
        guard counted.allSatisfy({ $0.measuredBytes != nil }) else { return nil }
        return counted.reduce(0) { $0 + $1.measuredBytes! }
    }

    public func component(_ name: String) -> MemoryComponent? { components.first { $0.name == name } }

    /// Activation bytes per decoder layer and in total, with and without gradient checkpointing,
    /// at the options' tokens.
    public var activationSummary: [String: Int] {
        let a = architecture, o = options
        let head = Self.headActivationBytesPerToken(a, o)
        return [
            "per_layer_bytes": o.tokens * activationBytesPerLayerPerToken,
            "head_bytes": o.tokens * head,
            "total_without_checkpointing_bytes": o.tokens * (Self.allLayersActivationBytesPerToken(a, o) + head),
            "total_with_checkpointing_bytes": o.tokens * (a.layers * 2 * a.hiddenSize + activationBytesPerLayerPerToken + head),
        ]
    }

    /// Every size is computed with checked arithmetic: an architecture or option whose bytes do
    /// not fit in `Int` is refused with the quantity that overflowed, never trapped on.
    public init(model a: ModelArchitecture, options o: MemoryOptions) throws {
        guard o.rank > 0, o.seqLen > 0, o.batch > 0 else { throw MemoryError.badOption("rank, seq-len and batch must be positive") }
        if let problem = a.sizeProblem { throw MemoryError.badOption("\(a.name): \(problem)") }
        guard o.rank <= ModelArchitecture.maxDimension else {
            throw MemoryError.badOption("rank \(o.rank) is above qlora's limit of 2^40 (\(ModelArchitecture.maxDimension))")
        }
        guard o.blocksize > 0 else { throw MemoryError.badOption("blocksize must be positive") }
        func checked(_ v: Int?, _ what: String) throws -> Int {
            guard let v else { throw MemoryError.badOption("\(what) would not fit in a 64-bit byte count (seq-len \(o.seqLen), batch \(o.batch), rank \(o.rank))") }
            return v
        }
        // The architecture's sizes are bounded (at most 2^48 parameters, dimensions at most 2^40)
        // and so is the rank, so per-parameter and per-token byte counts fit; what scales with
        // the options is multiplied with checks, and the largest sum of components is checked
        // once here, so the arithmetic below cannot overflow.
        let tokens = try checked(CheckedSize.product(o.seqLen, o.batch), "seq-len × batch")
        let loraBytes = try checked(CheckedSize.product(Self.loraElements(a, o), 16), "the LoRA adapters' bytes (their parameters × 16 B)")
        let perToken = try checked(CheckedSize.sum(CheckedSize.product(a.layers, Self.largestLayerActivationBytesPerToken(a, o) + 2 * a.hiddenSize) ?? .max,
                                                   Self.headActivationBytesPerToken(a, o), Self.qloraLayerStepPeakBytesPerToken(a, o)),
                                   "activation bytes per token")
        let activationBytes = try checked(CheckedSize.product(tokens, perToken), "the activations (\(tokens) tokens × \(perToken) B per token)")
        _ = try checked(CheckedSize.sum(CheckedSize.product(a.totalParameters, 16) ?? .max, loraBytes, activationBytes), "the total")
        let known = ModelArchitecture.projectionNames + ModelArchitecture.fusedModules.map(\.name) + ModelArchitecture.parameterTargets
        // Never a Llama's count for a model these fields do not describe.
        if let problem = a.undescribed.first { throw MemoryError.badOption("\(a.name): \(problem)") }
        if a.experts == nil, let t = o.targets.first(where: ModelArchitecture.parameterTargets.contains) {
            throw MemoryError.badOption("target '\(t)': \(a.name) has no experts (it is not a mixture of experts)")
        }
        if o.experts == .nf4, !o.quantizedExpertLoRA, a.experts != nil, let t = o.targets.first(where: ModelArchitecture.parameterTargets.contains) {
            throw MemoryError.badOption("target '\(t)' with --experts nf4: PEFT's target_parameters finds no parametrized expert (bitsandbytes' parametrize route); adapt the linear modules only")
        }
        for m in o.modulesToSave where m != "lm_head" && m != "embed_tokens" {
            throw MemoryError.badOption("modules_to_save '\(m)': lm_head and embed_tokens are the modules trained whole here")
        }
        for t in o.targets where !known.contains(t) {
            throw MemoryError.badOption("unknown target '\(t)'; targets are \(known.joined(separator: ", "))")
        }
        model = a.name
        architecture = a
        method = o.method
        options = o
        let groups = a.tensorGroups
        let projections = groups.filter { $0.kind == .projection }
        let expertGroups = groups.filter { $0.kind == .expert }
        let others = groups.filter { $0.kind != .projection && $0.kind != .expert }
        let projectionElements = projections.reduce(0) { $0 + $1.elements }
        let expertElements = expertGroups.reduce(0) { $0 + $1.elements }
        let otherElements = others.reduce(0) { $0 + $1.elements }
        let loraElements = o.isLoRA ? Self.loraElements(a, o) : 0
        let wholeElements = o.isLoRA ? o.modulesToSave.count * a.vocabSize * a.hiddenSize : 0
        let quantizesExperts = o.method == .qlora && o.experts == .nf4
        params = Parameters(total: a.totalParameters, quantized: o.method == .qlora ? projectionElements + (quantizesExperts ? expertElements : 0) : 0,
                            trainable: o.isLoRA ? loraElements + wholeElements : a.totalParameters)
        activationBytesPerLayerPerToken = Self.largestLayerActivationBytesPerToken(a, o)

        var c: [MemoryComponent] = []
        switch o.method {
        case .qlora:
            let fourBit = projections.reduce(0) { $0 + Self.fourBitBytes(elements: $1.shape.reduce(1, *), blocksize: o.blocksize, doubleQuant: o.doubleQuant).data * $1.count }
            let constants = projections.reduce(0) { $0 + Self.fourBitBytes(elements: $1.shape.reduce(1, *), blocksize: o.blocksize, doubleQuant: o.doubleQuant).constants * $1.count }
            c.append(MemoryComponent(name: "base_weights", estimatedBytes: fourBit, basis: "NF4: ceil(n/2) bytes per projection weight"))
            c.append(MemoryComponent(name: "quant_constants", estimatedBytes: constants,
                                     basis: o.doubleQuant ? "per weight: absmax u8 per \(o.blocksize) + nested absmax f32 per 256 blocks + quant_map 64 B + nested_quant_map 1 KiB"
                                                          : "per weight: absmax f32 per \(o.blocksize) + quant_map 64 B"))
            c.append(MemoryComponent(name: "unquantized_weights", estimatedBytes: 2 * otherElements, basis: "embeddings, norms, lm_head, biases\(a.experts == nil ? "" : ", routers") in bf16"))
            if !expertGroups.isEmpty {
                c.append(quantizesExperts
                    ? MemoryComponent(name: "experts", estimatedBytes: expertGroups.reduce(0) { $0 + $1.count * Self.parametrizedNF4Bytes($1.shape.reduce(1, *)) },
                                      basis: "NF4 + double quant per fused expert tensor (bitsandbytes' replace_parameter_4bit): n/2 + absmax and nested absmax + codes + offset")
                    : MemoryComponent(name: "experts", estimatedBytes: 2 * expertElements,
                                      basis: "bf16: transformers 5's bitsandbytes integration quantizes only nn.Linear, and the experts are fused 3-D parameters (bitsandbytes #1849)"))
            }
        case .lora:
            c.append(MemoryComponent(name: "base_weights", estimatedBytes: 2 * (projectionElements + expertElements), basis: "projection\(a.experts == nil ? "" : " and expert") weights in bf16 (frozen)"))
            c.append(MemoryComponent(name: "unquantized_weights", estimatedBytes: 2 * otherElements, basis: "embeddings, norms, lm_head, biases in bf16"))
        case .full, .full8BitAdam:
            c.append(MemoryComponent(name: "base_weights", estimatedBytes: 2 * a.totalParameters, basis: "every parameter in bf16"))
            c.append(MemoryComponent(name: "gradients", estimatedBytes: 2 * a.totalParameters, basis: "bf16, one per parameter"))
        }
        if o.isLoRA {
            c.append(MemoryComponent(name: "lora_params", estimatedBytes: 4 * loraElements, basis: (o.dora ? "r·(in+out) + out (DoRA's magnitude) per adapted projection, fp32" : "r·(in+out) per adapted projection, fp32")
                                     + (o.targets.contains("experts") ? "; r·experts·(in+out) per fused expert parameter (PEFT's target_parameters)" : "")))
            c.append(MemoryComponent(name: "lora_grads", estimatedBytes: 4 * loraElements, basis: "fp32, one per adapter parameter"))
            if o.optimizer == .adamw {
                c.append(MemoryComponent(name: "optimizer_states", estimatedBytes: 8 * loraElements, basis: "AdamW exp_avg + exp_avg_sq, fp32"))
            } else {
                let states = Self.adapterTensorElements(a, o).reduce(0) { $0 + $1.count * o.optimizer.stateBytes($1.elements) }
                c.append(MemoryComponent(name: "optimizer_states", estimatedBytes: states,
                                         basis: "\(o.optimizer.rawValue): 2 states × (1 B + f32 absmax per 256); tensors < 4096 elements fp32" + (o.optimizer == .pagedAdamw8bit ? "; paged: may live in CPU memory" : "")))
            }
            if wholeElements > 0 {
                c.append(MemoryComponent(name: "modules_to_save", estimatedBytes: 8 * wholeElements,
                                         basis: "\(o.modulesToSave.joined(separator: ", ")) trained whole: PEFT's bf16 copy, its bf16 gradient and AdamW's two bf16 moments"))
            }
        } else if o.method == .full {
            c.append(MemoryComponent(name: "optimizer_states", estimatedBytes: 8 * a.totalParameters, basis: "AdamW exp_avg + exp_avg_sq, fp32"))
            c.append(MemoryComponent(name: "master_weights", estimatedBytes: 4 * a.totalParameters, basis: "fp32 copy of every parameter (mixed precision)"))
        } else {
            let states = groups.reduce(0) { t, g in t + g.count * Optimizer.adamw8bit.stateBytes(g.shape.reduce(1, *)) }
            c.append(MemoryComponent(name: "optimizer_states", estimatedBytes: states,
                                     basis: "8-bit AdamW: 2 states × (1 B + f32 absmax per 256); tensors < 4096 elements fp32"))
        }
        let perLayer = activationBytesPerLayerPerToken
        let head = Self.headActivationBytesPerToken(a, o)
        let layerInput = 2 * a.hiddenSize
        let activations = o.gradientCheckpointing
            ? o.tokens * (a.layers * layerInput + perLayer + head)
            : o.tokens * (Self.allLayersActivationBytesPerToken(a, o) + head)
        if let x = a.experts, (o.isLoRA && o.targets.contains("experts")) || (o.method == .qlora && o.experts == .nf4) {
            // grouped_mm keeps the weights it multiplied: a bf16 copy of each sparse layer's experts
            // (PEFT's merged W + B·A, or bitsandbytes' dequantized parametrization) for as long as
            // the layer's activations (measured: peaks.json's attn+experts and -experts-nf4 rows).
            let copy = 2 * 3 * x.count * x.intermediateSize * a.hiddenSize
            c.append(MemoryComponent(name: "expert_weight_copies", estimatedBytes: (o.gradientCheckpointing ? 1 : a.sparseLayers) * copy,
                                     basis: (o.experts == .nf4 ? "bitsandbytes dequantizes" : "PEFT's target_parameters merges W + B·A for") + " each sparse layer's experts into bf16 (\(gigabytes(copy)) a layer), kept for its backward: "
                                        + (o.gradientCheckpointing ? "one layer at a time with checkpointing" : "every sparse layer without checkpointing")))
        }
        c.append(MemoryComponent(name: "activations", estimatedBytes: activations,
                                 basis: o.gradientCheckpointing
                                    ? "tokens × (layers × 2h (checkpointed layer inputs) + one layer recomputed (\(perLayer) B/token) + head (\(head) B/token))"
                                    : "tokens × (layers × \(perLayer) B/token + head \(head) B/token)"))
        if o.isLoRA && a.experts == nil {
            c.append(MemoryComponent(name: "(qlora layer step peak, one layer)", estimatedBytes: o.tokens * Self.qloraLayerStepPeakBytesPerToken(a, o),
                                     basis: "kept activations + the backward's live fp32 gradients at its high-water mark (16h + 16i per token) + the matmul scratch (4·max(h, i))"))
            c.append(MemoryComponent(name: "(activations with checkpointing: qlora's decoder layer, one layer)", estimatedBytes: o.tokens * 2 * a.hiddenSize,
                                     basis: "tokens × 2h: the layer's bf16 input; backward recomputes the rest"))
            c.append(MemoryComponent(name: "(activations: qlora's decoder layer, one layer)", estimatedBytes: o.tokens * Self.qloraLayerActivationBytesPerToken(a, o),
                                     basis: "what qlora's own Llama layer keeps (LlamaModel): tokens × (bf16 x, q, k, v, h, gate, up; fp32 adapter inputs, one per distinct input, and A·x; 2 × 4 B of 1/rms)"))
        }
        components = c
    }

    /// The bytes of one 4-bit weight of `elements` values, as `qlora quantize` stores it: packed
    /// data, and constants (absmax, nested absmax, code tables; the quant-state JSON excluded).
    public static func fourBitBytes(elements n: Int, blocksize: Int, doubleQuant: Bool) -> (data: Int, constants: Int) {
        let blocks = CheckedSize.ceilingDivision(n, blocksize)
        let constants = doubleQuant ? blocks + 4 * CheckedSize.ceilingDivision(blocks, 256) + 64 + 1024 : 4 * blocks + 64
        return (CheckedSize.ceilingDivision(n, 2), constants)
    }

    /// Every LoRA tensor the options train (A, B, DoRA's magnitude; PEFT's target_parameters
    /// adapters on the experts, [rank·experts, in] and [out, rank·experts] per fused parameter,
    /// and on the router), elements each, with how many of it the model has.
    public static func adapterTensorElements(_ a: ModelArchitecture, _ o: MemoryOptions) -> [(elements: Int, count: Int)] {
        a.layerKinds.flatMap { l, n in layerAdapterElements(a, o, layer: l).map { ($0, n) } }
    }

    /// One layer's LoRA tensors, elements each, in the order PEFT creates them.
    public static func layerAdapterElements(_ a: ModelArchitecture, _ o: MemoryOptions, layer l: Int) -> [Int] {
        guard o.isLoRA else { return [] }
        var t = a.adaptedModules(o.targets, layer: l).flatMap { p -> [Int] in
            let s = a.projectionShape(p, layer: l)
            return [o.rank * s.in, s.out * o.rank] + (o.dora ? [s.out] : [])
        }
        guard let x = a.experts, a.isSparse(layer: l) else { return t }
        let (h, e, i) = (a.hiddenSize, x.count, x.intermediateSize)
        if o.targets.contains("experts") {
            let r = o.rank * o.expertGateUpRankFactor
            t += [r * e * h, 2 * i * r * e, o.rank * e * i, h * o.rank * e]
        }
        if o.targets.contains("router") { t += [o.rank * h, e * o.rank] }
        return t
    }

    /// Every trainable LoRA parameter.
    public static func loraElements(_ a: ModelArchitecture, _ o: MemoryOptions) -> Int {
        adapterTensorElements(a, o).reduce(0) { $0 + $1.elements * $1.count }
    }

    /// Bytes bitsandbytes holds for one tensor of `n` values quantized to NF4 with double
    /// quantization, as a parametrization or a Params4bit holds it in memory: packed n/2, 8-bit
    /// absmax per 64, fp32 nested absmax per 256 blocks, the NF4 code (16 fp32), the offset
    /// (fp32) and the nested code (256 fp32) (moe.json `quant_state_layout`).
    public static func parametrizedNF4Bytes(_ n: Int) -> Int {
        let blocks = CheckedSize.ceilingDivision(n, 64)
        return CheckedSize.ceilingDivision(n, 2) + blocks + 4 * CheckedSize.ceilingDivision(blocks, 256) + 64 + 4 + 1024
    }

    /// What a transformers 5 + bitsandbytes 4-bit load holds, by kind (moe.json's names): NF4
    /// projections with their quant state, everything else bf16 (experts included).
    public static func heldAfterFourBitLoad(_ a: ModelArchitecture) -> [String: Int] {
        var held: [String: Int] = [:]
        for g in a.tensorGroups {
            let n = g.shape.reduce(1, *)
            let kind: String
            switch g.kind {
            case .projection: kind = "quantized_projection"
            case .bias: kind = "linear_bias"
            case .expert: kind = "expert_weight"
            default: kind = g.kind.rawValue
            }
            held[kind, default: 0] += g.count * (g.kind == .projection ? parametrizedNF4Bytes(n) : 2 * n)
        }
        return held
    }

    /// The fp32 inputs and A·x results LoRA keeps per token in one layer (PEFT casts the
    /// input to the adapter's fp32 for each adapter; `LoRALinear.Saved` holds the same).
    public static func loraActivationBytesPerToken(_ a: ModelArchitecture, _ o: MemoryOptions, layer l: Int = 0) -> Int {
        loraActivationTermsPerToken(a, o, layer: l).reduce(0, +)
    }

    /// The same, tensor by tensor: per adapted module its fp32 input, A·x and (with dropout) the
    /// dropped input.
    static func loraActivationTermsPerToken(_ a: ModelArchitecture, _ o: MemoryOptions, layer l: Int = 0) -> [Int] {
        a.adaptedModules(o.targets, layer: l).flatMap { p -> [Int] in
            let s = a.projectionShape(p, layer: l)
            // DoRA also keeps the base layer's bf16 result and the adapter's fp32 result, which
            // `(m/‖W‖ − 1)·base + m/‖W‖·lora·s` multiplies (peft/tuners/lora/dora.py forward).
            return [4 * s.in, 4 * o.rank] + (o.loraDropout > 0 ? [4 * s.in] : []) + (o.dora ? [2 * s.out, 4 * s.out] : [])
        }
    }

    /// What qlora's own decoder layer (`LlamaModel`) keeps per token for backward: bf16 x, q and
    /// k after RoPE, v, the attention residual h, gate and up (2 B each); with q/k norms also q
    /// and k before them and their 1/rms per head; the adapters' fp32 inputs, one per distinct
    /// input tensor, and A·x; 1/rms of both norms (fp32). Attention probabilities are recomputed
    /// in backward; silu(gate) too.
    public static func qloraLayerActivationBytesPerToken(_ a: ModelArchitecture, _ o: MemoryOptions) -> Int {
        // Adapters fed the same tensor keep one fp32 copy of it (without dropout): q/k/v share
        // the normed input, gate/up theirs.
        let modules = a.adaptedModules(o.targets)
        let t = Set(modules)
        let groups: [[String]] = o.loraDropout > 0 ? modules.map { [$0] } : a.sharedInputGroups
        let inputs = groups.filter { !t.isDisjoint(with: $0) }.reduce(0) { n, g in n + 4 * a.projectionShape(g.first { t.contains($0) }!).in * (o.loraDropout > 0 ? 2 : 1) }
        let qkNorm = a.qkNorm ? 2 * (a.queryDim + a.keyValueDim) + 4 * (a.attentionHeads + a.keyValueHeads) : 0
        return 2 * a.hiddenSize + 4 + 2 * (a.queryDim + 2 * a.keyValueDim) + qkNorm + 2 * a.hiddenSize + 4 + 4 * a.intermediateSize + inputs + 4 * o.rank * modules.count
    }

    /// The peak memory of one decoder layer's training step in qlora, per token, above its
    /// weights and adapters: what the forward keeps (`qloraLayerActivationBytesPerToken`) plus
    /// the live set at the step's high-water mark, the gate/up backward: the incoming gradient,
    /// the LoRA input gradients and dx (4 × 4h), dm, dgate, dup and the adapter's scaled copy of
    /// dup (4 × 4i), and the matmul scratch's fp32 copy of the widest activation (4·max(h, i)).
    public static func qloraLayerStepPeakBytesPerToken(_ a: ModelArchitecture, _ o: MemoryOptions) -> Int {
        qloraLayerActivationBytesPerToken(a, o) + 16 * a.hiddenSize + 16 * a.intermediateSize + 4 * max(a.hiddenSize, a.intermediateSize)
    }

    /// Activation bytes one decoder layer keeps per token for backward (bf16 compute, SDPA /
    /// flash attention, HF Llama layer). h hidden, q query dim (h unless head_dim says otherwise),
    /// kv key/value dim, i intermediate, a heads:
    /// - each RMSNorm: its fp32 input and 1/rms: 4h + 4 (two per layer); with per-head q/k norms
    ///   (Qwen3) also 4(q + kv) + 4(a + kv heads);
    /// - attention: q, k, v after RoPE 2(q + 2kv), the output 2q and the fp32 log-sum-exp 4a;
    /// - SwiGLU: gate, silu(gate), up: 6i;
    /// - trained projections (full fine-tune): their bf16 inputs not already kept, normed x 2h
    ///   (q/k/v share it), normed x 2h (gate/up) and silu(gate)·up 2i;
    /// - LoRA: `loraActivationBytesPerToken`.
    public static func activationBytesPerToken(_ a: ModelArchitecture, _ o: MemoryOptions, layer l: Int = 0) -> Int {
        activationTermsPerToken(a, o, layer: l).reduce(0, +)
    }

    /// What every layer keeps per token, summed (layers of a mixture of experts differ).
    public static func allLayersActivationBytesPerToken(_ a: ModelArchitecture, _ o: MemoryOptions) -> Int {
        a.layerKinds.reduce(0) { $0 + $1.count * activationBytesPerToken(a, o, layer: $1.layer) }
    }

    /// The most any layer keeps per token.
    public static func largestLayerActivationBytesPerToken(_ a: ModelArchitecture, _ o: MemoryOptions) -> Int {
        a.layerKinds.map { activationBytesPerToken(a, o, layer: $0.layer) }.max() ?? 0
    }

    /// The same, tensor by tensor, in forward order; the first two are the input norm's fp32
    /// input and 1/rms (which the first layer does not keep: its input, the frozen embedding's
    /// output, needs no gradient).
    public static func activationTermsPerToken(_ a: ModelArchitecture, _ o: MemoryOptions, layer l: Int = 0) -> [Int] {
        let h = a.hiddenSize, q = a.queryDim, kv = a.keyValueDim, i = a.intermediateSize
        // Llama 4: q and k L2-normed in fp32 on rope layers; a NoPE layer's per-position query scale.
        let ropeless = a.noRopeLayers.contains(l)
        let qkNorm = a.qkNorm || a.l2QKNorm && !ropeless ? [4 * (q + kv), 4 * (a.attentionHeads + a.keyValueHeads)] : ropeless ? [4] : []
        let mlp = a.isSparse(layer: l) ? expertTermsPerToken(a, o) : [2 * i, 2 * i, 2 * i]
        return [4 * h, 4, 2 * q, 2 * kv, 2 * kv, 2 * q, 4 * a.attentionHeads] + qkNorm + [4 * h, 4] + mlp
            + (o.isLoRA ? loraActivationTermsPerToken(a, o, layer: l) : [2 * h, 2 * h, 2 * i])
    }

    /// What a sparse layer's experts keep per token for backward, as transformers 5's grouped_mm
    /// path runs them (integrations/moe.py `grouped_mm_experts_forward`; measured op by op in
    /// peaks.json's MoE rows), k experts per token, E experts of width i:
    /// - the router: Qwen3-MoE and Mixtral its fp32 softmax (4E), the top-k indices (8k) and,
    ///   renormalised, their sum and the divided copy (4 + 4k); gpt-oss the indices and the
    ///   softmax of the top k in bf16 (2k);
    /// - the gather in expert order: the sort's permutation, the token of each row and the
    ///   inverse permutation (int64, 24k), each row's routing weight (bf16 2k; Mixtral keeps
    ///   its router's fp32, 4k);
    /// - per row: gate_up's output (4i), the activation (SwiGLU's silu(gate) 2i; gpt-oss' clamped
    ///   SwiGLU its clamp, sigmoid, product and up + 1, 8i), the down projection's output (2h);
    /// - with LoRA on the experts the weights need gradients, so grouped_mm also keeps its inputs:
    ///   the gathered rows (2h) and the down projection's input (2i).
    ///
    /// `elementSize` is the experts' and the stream's: 2 (bf16), or 4 once
    /// prepare_model_for_kbit_training has cast them to fp32 (the routing weights then stay fp32).
    public static func expertTermsPerToken(_ a: ModelArchitecture, _ o: MemoryOptions, elementSize s: Int = 2) -> [Int] {
        guard let x = a.experts else { return [] }
        let (h, e, k, i) = (a.hiddenSize, x.count, x.perToken, x.intermediateSize)
        if x.family == .llama4 {
            // transformers' Llama4TextMoe: the top-k indices and values, the fp32 sigmoid of the
            // scattered scores (4E), every expert's copy of the hidden states (repeat, 2hE) and
            // its score (2E); per expert and token gate_up's output (4i) and silu(gate) (2i); the
            // shared expert's gate, silu(gate) and up (6i'). With LoRA on the experts bmm also
            // keeps its inputs: the scored copies (2hE) and the down projection's input (2iE).
            let shared = x.sharedIntermediateSize ?? 0
            let trained = o.isLoRA && o.targets.contains("experts") ? [s * h * e, s * i * e] : []
            return [10 * k, 4 * e, s * h * e, s * e, 2 * s * i * e, s * i * e, s * shared, s * shared, s * shared] + trained
        }
        let router = x.family == .gptOSS ? [8 * k, s * k] : [4 * e, 8 * k] + (x.normalizesTopK ? [4, 4 * k] : [])
        let weight = x.family == .mixtral ? 4 * k : s * k
        let activation = (x.family == .gptOSS ? 4 : 1) * s * i
        let trained = o.isLoRA && o.targets.contains("experts") ? [s * h * k, s * i * k] : []
        // An adapted router's weight needs its input: the normed hidden states (2h).
        let routerInput = o.isLoRA && o.targets.contains("router") ? [s * h] : []
        return router + [24 * k, weight, 2 * s * i * k, activation * k, s * h * k] + trained + routerInput
    }

    /// After the last layer: the final RMSNorm (4h + 4), the fp32 log-softmax of the logits
    /// (4·vocab) that cross-entropy keeps and the shifted int64 labels (8), as measured on the real
    /// stack (Vectors/memory/peaks.json); a trained lm_head also keeps its bf16 input (2h).
    public static func headActivationBytesPerToken(_ a: ModelArchitecture, _ o: MemoryOptions) -> Int {
        4 * a.hiddenSize + 4 + 4 * a.vocabSize + 8 + (o.isLoRA ? 0 : 2 * a.hiddenSize)
    }
}

/// A bad memory option: one line.
public enum MemoryError: Error, CustomStringConvertible {
    case badOption(String)

    public var description: String {
        switch self {
        case .badOption(let problem): return problem
        }
    }
}

/// Bytes as decimal gigabytes (GB = 10⁹ B), the one format every memory table, claim and report
/// prints them in: two decimals with the unit by default, "13.48 GB"; a table whose header names
/// the unit prints the bare number, with the decimals its column wants.
public func gigabytes(_ bytes: Int, decimals: Int = 2, unit: Bool = true) -> String {
    String(format: "%.\(decimals)f", Double(bytes) / 1e9) + (unit ? " GB" : "")
}
