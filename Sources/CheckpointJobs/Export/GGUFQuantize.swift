import GGUF
import QLoRA

/// llama-quantize's mixtures that `qlora export` writes, by the names its command line takes.
public enum LlamaQuantizeMixture: String, CaseIterable, Sendable {
    case q8_0 = "Q8_0", q4_0 = "Q4_0", q4_k_m = "Q4_K_M", iq4_nl = "IQ4_NL"

    /// llama.h's llama_ftype (general.file_type).
    public var fileType: UInt32 {
        switch self {
        case .q4_0: return 2
        case .q8_0: return 7
        case .q4_k_m: return 15
        case .iq4_nl: return 25
        }
    }

    /// The type most tensors get (llama_ftype_get_default_type).
    var defaultType: GGMLType {
        switch self {
        case .q8_0: return .q8_0
        case .q4_0: return .q4_0
        case .q4_k_m: return .q4_K
        case .iq4_nl: return .iq4_nl
        }
    }
}

/// What llama-quantize (src/llama-quant.cpp) does to a GGUF that convert_hf_to_gguf.py wrote, for
/// the mixtures above, without an importance matrix:
/// - tensors in the loader's order: by layer (`blk.N.`; other tensors first), then by name;
/// - each 2-D `*weight` tensor that is not a norm gets the mixture's type, adjusted per tensor
///   (`llama_tensor_get_type_impl`): the output (or a tied token embedding) Q6_K (Q8_0 where its
///   rows are not whole blocks, and for Q8_0); Q4_K_M's attn_v and ffn_down Q6_K in the layers
///   `useMoreBits` picks; IQ4_NL's attn_v Q5_K at GQA ≥ 4 and first eighth of ffn_down Q5_K;
///   a 70B Llama's Q4_K attn_v Q5_K; with exactly 8 experts (Mixtral-8x7B) attn_v and attn_k
///   Q8_0 and Q4_K_M's and IQ4_NL's attn_output Q5_K; 3-D expert tensors row by row like 2-D
///   ones, ffn_down_exps by its layer; then rows that are not whole blocks fall back
///   (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and F16 where a 32-value block does not fit either);
/// - every other tensor is copied; a converted tensor is read as fp32 from the converter's
///   16-bit values and quantized by ggml's reference quantizers (`GGMLQuants`);
/// - the metadata is kept in order, with general.quantization_version and general.file_type
///   moved to the end (gguf_set_val_u32 removes, then appends).
public enum LlamaQuantize {
    /// The model facts the type choice reads.
    public struct Model: Sendable {
        public var layers: Int
        public var attentionHeads: Int
        public var keyValueHeads: Int
        /// Experts per layer (the file's expert_count; 0 for a dense model).
        public var experts: Int
        public init(layers: Int, attentionHeads: Int, keyValueHeads: Int, experts: Int = 0) {
            (self.layers, self.attentionHeads, self.keyValueHeads, self.experts) = (layers, attentionHeads, keyValueHeads, experts)
        }
        public init(_ a: ModelArchitecture) {
            self.init(layers: a.layers, attentionHeads: a.attentionHeads, keyValueHeads: a.keyValueHeads, experts: a.experts?.count ?? 0)
        }
        var gqa: Int { keyValueHeads > 0 ? attentionHeads / keyValueHeads : 0 }
        /// llama.cpp's LLM_TYPE_70B for the Llama architecture: 80 layers with grouped KV heads.
        var is70B: Bool { layers == 80 && attentionHeads != keyValueHeads }
    }

    /// The layer of `blk.N.…` as sscanf("blk.%d.") reads it, else −1.
    static func layer(of name: String) -> Int {
        guard name.hasPrefix("blk.") else { return -1 }
        let digits = name.dropFirst(4).prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, name.dropFirst(4 + digits.count).first == ".", let n = Int(digits) else { return -1 }
        return n
    }

    /// Indices of `names` in the loader's order (weight_name_comparer: layer, then bytewise name).
    public static func loaderOrder(_ names: [String]) -> [Int] {
        names.indices.sorted { a, b in
            let (la, lb) = (layer(of: names[a]), layer(of: names[b]))
            if la != lb { return la < lb }
            return Array(names[a].utf8).lexicographicallyPrecedes(Array(names[b].utf8))
        }
    }

    enum Category { case output, tokenEmbedding, attentionV, attentionK, attentionOutput, ffnDown, ffnGate, ffnUp, other }

    static func category(_ name: String) -> Category {
        if name == "output.weight" { return .output }
        if name == "token_embd.weight" || name == "per_layer_token_embd.weight" { return .tokenEmbedding }
        if name.contains("attn_qkv.weight") || name.contains("attn_kv_b.weight") || name.contains("attn_v.weight") { return .attentionV }
        if name.contains("attn_k.weight") { return .attentionK }
        if name.contains("attn_output.weight") { return .attentionOutput }
        if name.contains("ffn_up") { return .ffnUp }
        if name.contains("ffn_gate") { return .ffnGate }
        if name.contains("ffn_down") { return .ffnDown }
        return .other
    }

    /// Whether llama-quantize may change this tensor's type (tensor_allows_quantization, for the
    /// tensor names qlora's families have).
    static func allowsQuantization(name: String, ne: [Int]) -> Bool {
        let dims = (ne.lastIndex { $0 != 1 } ?? 0) + 1  // ggml_n_dims
        return dims >= 2 && name.hasSuffix("weight") && !name.contains("_norm.weight") && !name.contains("ffn_gate_inp.weight")
            && name != "position_embd.weight" && name != "token_types.weight"
    }

    static func useMoreBits(_ i: Int, _ n: Int) -> Bool { i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2 }

    /// The type of each tensor (given in the loader's order, with the converter's types).
    public static func types(names: [String], ne: [[Int]], current: [GGMLType], mixture: LlamaQuantizeMixture, model: Model) -> [GGMLType] {
        let tied = !names.contains("output.weight")
        let nAttentionV = names.filter { category($0) == .attentionV }.count
        var iAttentionV = 0, iFFNDown = 0
        var result: [GGMLType] = []
        for (k, name) in names.enumerated() {
            guard allowsQuantization(name: name, ne: ne[k]) else {
                result.append(current[k])
                continue
            }
            var t = mixture.defaultType
            let nx = ne[k][0]
            let c = category(name)
            switch c {
            case .output, .tokenEmbedding:
                // The output, and a token embedding that is the output too, get the output's rule;
                // an untied token embedding keeps the mixture's type.
                if c == .output || tied {
                    if nx % t.block.elements != 0 { t = .q8_0 } else if t != .q8_0 { t = .q6_K }
                }
            case .attentionV:
                if mixture == .iq4_nl && model.gqa >= 4 {
                    t = .q5_K
                } else if mixture == .q4_k_m && useMoreBits(iAttentionV, nAttentionV) {
                    t = .q6_K
                }
                if model.is70B && t == .q4_K { t = .q5_K }
                if model.experts == 8 { t = .q8_0 }  // "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
                iAttentionV += 1
            case .attentionK:
                if model.experts == 8 { t = .q8_0 }
            case .attentionOutput:
                if model.experts == 8 && (mixture == .q4_k_m || mixture == .iq4_nl) { t = .q5_K }
            case .ffnDown:
                if mixture == .q4_k_m {
                    if useMoreBits(iFFNDown, model.layers) { t = .q6_K }
                } else if mixture == .iq4_nl && iFFNDown < model.layers / 8 {
                    t = .q5_K
                }
                iFFNDown += 1
            default:
                break
            }
            result.append(fallback(t, columns: nx))
        }
        return result
    }

    /// tensor_type_fallback: a type whose block does not divide the row length.
    static func fallback(_ t: GGMLType, columns: Int) -> GGMLType {
        guard columns % t.block.elements != 0 else { return t }
        let f: GGMLType
        switch t {
        case .q4_K: f = .q5_0
        case .q5_K: f = .q5_1
        case .q6_K: f = .q8_0
        default: f = t
        }
        return columns % f.block.elements == 0 ? f : .f16
    }

    /// The GGMLQuants encoding of a type llama-quantize writes.
    public static func encoding(_ t: GGMLType) -> GGMLQuants.Encoding {
        switch t {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        case .q4_0: return .q4_0
        case .q5_0: return .q5_0
        case .q5_1: return .q5_1
        case .q8_0: return .q8_0
        case .q4_K: return .q4_K
        case .q5_K: return .q5_K
        case .q6_K: return .q6_K
        case .iq4_nl: return .iq4_nl
        }
    }

    /// The converter's metadata as llama-quantize writes it: the quantization version and the
    /// new file type moved to the end.
    public static func metadata(_ m: [(key: String, value: GGUFValue)], mixture: LlamaQuantizeMixture) -> [(key: String, value: GGUFValue)] {
        m.filter { $0.key != "general.quantization_version" && $0.key != "general.file_type" }
            + [("general.quantization_version", .uint32(2)), ("general.file_type", .uint32(mixture.fileType))]
    }
}
