import Foundation
import QLoRA

/// A mixture-of-experts causal LM as transformers 5 builds it (Qwen3-MoE, Mixtral, gpt-oss), and
/// the bytes a 4-bit load holds: transformers' bitsandbytes integration replaces only
/// `nn.Linear` (transformers/integrations/bitsandbytes.py), so the attention projections and
/// dense MLPs are NF4 while each layer's fused 3-D experts (`experts.gate_up_proj`,
/// `experts.down_proj`), the router, embeddings, lm_head and norms stay bf16 (bitsandbytes #1849).
/// Held to Vectors/memory/moe.json (generate_moe.py: tiny models loaded on CPU, real sizes built
/// on the meta device), kind by kind, to the byte. The step's memory is not modelled yet: `qlora
/// memory` and `qlora fit` refuse mixture-of-experts configs.
public struct MixtureOfExperts: Sendable, Equatable {
    public enum Family: String, Sendable, CaseIterable { case qwen3MoE = "qwen3_moe", mixtral, gptOSS = "gpt_oss" }

    public var family: Family
    public var hiddenSize, layers, attentionHeads, keyValueHeads, headDim, vocabSize: Int
    public var tiedEmbeddings: Bool
    /// Experts per MoE layer, and how many each token is routed to.
    public var experts, expertsPerToken: Int
    /// One expert's MLP width (Qwen3-MoE's moe_intermediate_size; Mixtral's and gpt-oss'
    /// intermediate_size), and a dense layer's (Qwen3-MoE's intermediate_size).
    public var expertIntermediateSize, denseIntermediateSize: Int
    /// Layers with a dense MLP instead of experts (Qwen3-MoE's mlp_only_layers and
    /// decoder_sparse_step).
    public var denseLayers: Set<Int>

    /// Reads config.json's fields (as transformers' config classes name them). Errors name the field.
    public init(config c: [String: Any]) throws {
        func bad(_ p: String) -> MemoryError { .badOption(p) }
        guard let type = c["model_type"] as? String, let f = Family(rawValue: type) else {
            throw bad("model_type \((c["model_type"] as? String) ?? "(none)") is not a mixture of experts described here (\(Family.allCases.map(\.rawValue).joined(separator: ", ")) are)")
        }
        func int(_ k: String) throws -> Int {
            guard let v = c[k] as? Int, v > 0 else { throw bad("\(k) is missing or not a positive integer") }
            return v
        }
        family = f
        hiddenSize = try int("hidden_size"); layers = try int("num_hidden_layers"); attentionHeads = try int("num_attention_heads")
        keyValueHeads = (c["num_key_value_heads"] as? Int) ?? attentionHeads
        headDim = (c["head_dim"] as? Int) ?? hiddenSize / attentionHeads
        vocabSize = try int("vocab_size")
        tiedEmbeddings = (c["tie_word_embeddings"] as? Bool) ?? false
        // Qwen3-MoE's published config says num_experts, transformers 5 saves num_local_experts.
        guard let e = (c["num_local_experts"] as? Int) ?? (c["num_experts"] as? Int), e > 0 else { throw bad("num_local_experts (or num_experts) is missing") }
        experts = e
        expertsPerToken = try int("num_experts_per_tok")
        denseIntermediateSize = try int("intermediate_size")
        expertIntermediateSize = f == .qwen3MoE ? try int("moe_intermediate_size") : denseIntermediateSize
        var dense = Set<Int>()
        if f == .qwen3MoE {
            // transformers' Qwen3MoeDecoderLayer: sparse unless in mlp_only_layers, and only every
            // decoder_sparse_step-th layer.
            let step = (c["decoder_sparse_step"] as? Int) ?? 1, only = Set((c["mlp_only_layers"] as? [Int]) ?? [])
            for l in 0..<layers where only.contains(l) || step <= 0 || (l + 1) % step != 0 { dense.insert(l) }
        }
        denseLayers = dense
    }

    /// Bytes of one NF4 weight of `n` values with double quantization as bitsandbytes holds it in
    /// memory: packed n/2, 8-bit absmax per 64, fp32 nested absmax per 256 blocks, the NF4 code
    /// (16 fp32), the offset (fp32) and the nested 8-bit code (256 fp32).
    public static func nf4Bytes(_ n: Int) -> Int {
        let blocks = (n + 63) / 64
        return (n + 1) / 2 + blocks + 4 * ((blocks + 255) / 256) + 64 + 4 + 1024
    }

    /// What a 4-bit load holds, by kind (moe.json's names), parameters and quantization state
    /// (the rotary buffer excluded).
    public var heldAfterFourBitLoad: [String: Int] {
        let h = hiddenSize, q = attentionHeads * headDim, kv = keyValueHeads * headDim, e = experts, ie = expertIntermediateSize
        var held: [String: Int] = [:]
        held["embedding"] = 2 * vocabSize * h
        if !tiedEmbeddings { held["lm_head"] = 2 * vocabSize * h }
        let qkNorm = family == .qwen3MoE ? 2 * headDim : 0
        held["norm"] = 2 * (layers * (2 * h + qkNorm) + h)
        let attention = Self.nf4Bytes(q * h) + 2 * Self.nf4Bytes(kv * h) + Self.nf4Bytes(h * q)
        let denseMLP = 3 * Self.nf4Bytes(denseIntermediateSize * h)
        let sparse = layers - denseLayers.count
        held["quantized_projection"] = layers * attention + denseLayers.count * denseMLP
        held["router"] = sparse * 2 * e * h + (family == .gptOSS ? sparse * 2 * e : 0)
        held["expert_weight"] = sparse * 2 * e * 3 * ie * h
        if family == .gptOSS {
            // gpt-oss: attention biases (bf16, inside Linear4bit), sinks per head, expert biases.
            held["linear_bias"] = layers * 2 * (q + 2 * kv + h)
            held["sinks"] = layers * 2 * attentionHeads
            held["expert_bias"] = sparse * 2 * e * (2 * ie + h)
        }
        return held
    }

    /// The experts' share of what a 4-bit load holds.
    public var expertBytes: Int { heldAfterFourBitLoad["expert_weight", default: 0] + heldAfterFourBitLoad["expert_bias", default: 0] }
}
