import FileOutput
import Foundation
import QLoRA
import SafeTensors

// config.json, as transformers reads it: the one reader of a model's architecture. What qlora
// writes into config.json (`quantization_config`) is in ConfigJSON.swift.

extension ModelArchitecture {
    /// Reads a Hugging Face config.json (`model_type` llama, mistral, qwen2, qwen3 or phi3, or any
    /// config with the same fields). Errors name the file and the field. Features qlora's decoder does not
    /// implement are recorded, not refused (`unsupportedForTraining` names them).
    public init(configFile path: String) throws {
        try self.init(configData: try InputFile.read(path), path: path)
    }

    /// The same from config.json's bytes; `path` names the file in errors.
    public init(configData data: Data, path: String) throws {
        func bad(_ problem: String) -> CheckpointError { .invalidPath(path: path, problem: problem) }
        guard let c = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { throw bad("is not a JSON object") }
        func int(_ k: String) throws -> Int {
            guard let v = c[k], !(v is NSNull) else { throw bad("\(k) is missing") }
            return try positive(k, v)
        }
        /// An optional positive integer field: nil when absent or null.
        func optionalInt(_ k: String) throws -> Int? {
            guard let v = c[k], !(v is NSNull) else { return nil }
            return try positive(k, v)
        }
        func positive(_ k: String, _ v: Any) throws -> Int {
            guard let n = JSONField.integer(v) else { throw bad("\(k) is \(JSONField.describe(v)), not an integer") }
            guard n > 0 else { throw bad("\(k) is \(n); it must be a positive integer") }
            return n
        }
        func number(_ v: Any?) -> Double? { (v as? NSNumber)?.doubleValue }
        let type = (c["model_type"] as? String) ?? "llama"
        let hidden = try int("hidden_size"), intermediate = try int("intermediate_size"), layers = try int("num_hidden_layers")
        let heads = try int("num_attention_heads"), vocab = try int("vocab_size")
        self.init(name: (c["_name_or_path"] as? String) ?? (path as NSString).lastPathComponent, modelType: type,
                  hiddenSize: hidden, intermediateSize: intermediate, layers: layers, attentionHeads: heads,
                  keyValueHeads: try optionalInt("num_key_value_heads") ?? heads, headDim: try optionalInt("head_dim"), vocabSize: vocab,
                  tiedEmbeddings: (c["tie_word_embeddings"] as? Bool) ?? false, attentionQKVBias: type == "qwen2")
        attentionBias = (c["attention_bias"] as? Bool) ?? false
        mlpBias = (c["mlp_bias"] as? Bool) ?? false
        qkNorm = type == "qwen3"
        fusedProjections = type == "phi3"
        guard attentionHeads % keyValueHeads == 0, c["head_dim"] != nil || hiddenSize % attentionHeads == 0, headDim > 0 else {
            throw bad("hidden_size must be a multiple of num_attention_heads (unless head_dim is given), and that of num_key_value_heads")
        }
        if let problem = sizeProblem { throw bad(problem) }
        // Qwen2/Qwen3 configs carry a sliding_window that applies only with use_sliding_window.
        // transformers 5 also lists each layer's attention in layer_types.
        let windowed = ["qwen2", "qwen3"].contains(type)
            ? ((c["use_sliding_window"] as? Bool) ?? false) || ((c["layer_types"] as? [String]) ?? []).contains("sliding_attention") : true
        if windowed, let w = c["sliding_window"] as? Int, w > 0 { slidingWindow = w }
        if let family = Experts.Family(rawValue: type) {
            self = .moe(self, try Self.experts(family, c, layers: layers, path: path))
            if family == .llama4 {
                // The dense layers' MLP is intermediate_size_mlp wide; no_rope_layers has 0 where rope is skipped.
                intermediateSize = try optionalInt("intermediate_size_mlp") ?? 16384
                let interval = c["no_rope_layer_interval"].flatMap(JSONField.integer) ?? 4
                let flags = (c["no_rope_layers"] as? [Any])?.compactMap(JSONField.integer)
                noRopeLayers = (0..<layers).filter { l in flags.map { l < $0.count && $0[l] == 0 } ?? ((l + 1) % max(interval, 1) == 0) }
                l2QKNorm = (c["use_qk_norm"] as? Bool) ?? true
            }
        } else {
            for key in ["num_experts", "num_local_experts", "n_routed_experts"] {
                if let n = c[key] as? Int, n > 0 { unmodelledFeatures.append("mixture of experts (\(key) \(n))") }
            }
        }
        if c["vision_config"] != nil { unmodelledFeatures.append("a vision tower (vision_config)") }
        rmsNormEps = number(c["rms_norm_eps"]) ?? 1e-6
        // transformers 5 writes rope_parameters; earlier versions rope_theta + rope_scaling.
        let rope = (c["rope_parameters"] as? [String: Any]) ?? (c["rope_scaling"] as? [String: Any]) ?? [:]
        ropeTheta = number(rope["rope_theta"]) ?? number(c["rope_theta"]) ?? 10000
        partialRotaryFactor = number(rope["partial_rotary_factor"]) ?? number(c["partial_rotary_factor"]) ?? 1
        switch (rope["rope_type"] as? String) ?? (rope["type"] as? String) ?? "default" {
        case "default": ropeScaling = nil
        case "llama3":
            guard let f = number(rope["factor"]), let lo = number(rope["low_freq_factor"]), let hi = number(rope["high_freq_factor"]),
                  let orig = rope["original_max_position_embeddings"] as? Int else {
                throw bad("llama3 rope scaling needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings")
            }
            ropeScaling = .llama3(.init(factor: f, lowFreqFactor: lo, highFreqFactor: hi, originalMaxPositions: orig))
        case let other: ropeScaling = .unsupported(other)
        }
    }

    /// The most layers a mixture of experts may have here (each layer's kind is looked at).
    static let maxExpertLayers = 1 << 16

    /// A mixture of experts' fields as transformers' config classes read them (Qwen3MoeConfig,
    /// MixtralConfig, GptOssConfig); errors name the field.
    static func experts(_ family: Experts.Family, _ c: [String: Any], layers: Int, path: String) throws -> Experts {
        func bad(_ problem: String) -> CheckpointError { .invalidPath(path: path, problem: problem) }
        func positive(_ keys: [String]) throws -> Int {
            for k in keys {
                guard let v = c[k], !(v is NSNull) else { continue }
                guard let n = JSONField.integer(v), n > 0, n <= maxDimension else { throw bad("\(k) is \(JSONField.describe(v)), not a positive integer up to 2^40") }
                return n
            }
            throw bad("\(keys.joined(separator: " or ")) is missing: a \(family.rawValue) mixture of experts needs it")
        }
        guard layers <= maxExpertLayers else { throw bad("num_hidden_layers \(layers) is above qlora's limit of \(maxExpertLayers) for a mixture of experts") }
        // Qwen3-MoE's published config.json says num_experts; transformers 5 saves num_local_experts.
        let count = try positive(["num_local_experts", "num_experts"])
        let perToken = try positive(["num_experts_per_tok", "experts_per_token"])
        guard perToken <= count else { throw bad("num_experts_per_tok \(perToken) is more than the \(count) experts") }
        var x = Experts(family: family, count: count, perToken: perToken,
                        intermediateSize: try positive(family == .qwen3MoE ? ["moe_intermediate_size"] : ["intermediate_size"]))
        if family == .llama4 {
            // Llama4TextConfig: intermediate_size is an expert's (and the shared expert's) width;
            // moe_layers, or every interleave_moe_layer_step-th layer, have experts.
            x.sharedIntermediateSize = x.intermediateSize
            let step = c["interleave_moe_layer_step"].flatMap(JSONField.integer) ?? 1
            let moe = (c["moe_layers"] as? [Any]).map { Set($0.compactMap(JSONField.integer)) }
                ?? Set(stride(from: max(step - 1, 0), to: layers, by: max(step, 1)))
            x.denseLayers = (0..<layers).filter { !moe.contains($0) }
        }
        if family == .qwen3MoE {
            // transformers' Qwen3MoeDecoderLayer: experts unless the layer is in mlp_only_layers,
            // and only every decoder_sparse_step-th layer.
            let step = c["decoder_sparse_step"].flatMap(JSONField.integer) ?? 1
            let only = Set(((c["mlp_only_layers"] as? [Any]) ?? []).compactMap(JSONField.integer))
            x.denseLayers = (0..<layers).filter { only.contains($0) || step <= 0 || ($0 + 1) % step != 0 }
            // Qwen3MoeConfig's default is false; Mixtral always renormalises; gpt-oss' softmax is over the top k.
            x.normalizesTopK = (c["norm_topk_prob"] as? Bool) ?? false
        }
        return x
    }
}
