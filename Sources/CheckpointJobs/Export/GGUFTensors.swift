import CheckpointFormats
import FileOutput
import Foundation
import GGUF
import QLoRA
import SafeTensors

/// The output types convert_hf_to_gguf.py writes itself (`--outtype`); llama-quantize's are
/// `LlamaQuantizeMixture`.
public enum GGUFOutType: String, CaseIterable, Sendable {
    case f32, f16, bf16, q8_0
}

/// One tensor of an exported GGUF: llama.cpp's name, ggml dimensions (innermost first), type, bytes.
public struct GGUFTensor: Sendable, Equatable {
    public var name: String
    public var ne: [Int]
    public var type: GGMLType
    public var bytes: [UInt8]
    public init(name: String, ne: [Int], type: GGMLType, bytes: [UInt8]) { (self.name, self.ne, self.type, self.bytes) = (name, ne, type, bytes) }
}

/// llama.cpp's architectures that qlora's families convert to, as convert_hf_to_gguf.py picks
/// them from config.json's `architectures` (its LlamaModel for Llama and Mistral, Qwen2Model,
/// Qwen3Model, Phi3MiniModel).
public enum GGUFArchitecture: String, Sendable, CaseIterable {
    case llama, qwen2, qwen3, phi3
    /// Qwen3-MoE (conversion/qwen.py `Qwen3MoeModel`).
    case qwen3MoE = "qwen3moe"
    /// gpt-oss (conversion/gpt_oss.py `GptOssModel`).
    case gptOSS = "gpt-oss"

    /// llama.cpp's architecture for a config's `architectures`; Mixtral is a Llama with experts
    /// (`LlamaModel` stacks them).
    public init?(architectures: [String]) {
        let names: [String: GGUFArchitecture] = ["LlamaForCausalLM": .llama, "MistralForCausalLM": .llama, "MixtralForCausalLM": .llama,
                                                 "Qwen2ForCausalLM": .qwen2, "Qwen3ForCausalLM": .qwen3, "Phi3ForCausalLM": .phi3,
                                                 "Qwen3MoeForCausalLM": .qwen3MoE, "GptOssForCausalLM": .gptOSS]
        guard let family = architectures.lazy.compactMap({ names[$0] }).first else { return nil }
        self = family
    }

    /// A checkpoint's config.json: its JSON, llama.cpp's architecture for it, and its shapes; one
    /// line naming the file where the architecture is not one the export writes, or a mixture
    /// of experts llama.cpp's architecture cannot hold.
    static func load(config path: String) throws -> (config: JSONValue, family: GGUFArchitecture, arch: ModelArchitecture) {
        let config = try ConfigJSON.read(path)
        var names: [String] = []
        if case .array(let a)? = config["architectures"] { names = a.compactMap { if case .string(let s) = $0 { return s }; return nil } }
        guard let family = GGUFArchitecture(architectures: names) else {
            throw CheckpointError.invalidPath(path: path, problem: "export writes LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                                              + "Qwen3MoeForCausalLM, GptOssForCausalLM and Phi3ForCausalLM; this checkpoint is \(names.first ?? "of no stated architecture")")
        }
        if case .string(let method)? = config["quantization_config"]?["quant_method"], method == "mxfp4" {
            throw CheckpointError.invalidPath(path: path, problem: "gpt-oss' MXFP4 experts: run `qlora dequantize` first (it writes the bf16 experts transformers holds, which export takes; "
                                              + "llama-quantize makes the same Q4_K_M of either)")
        }
        let arch = try ModelArchitecture(configFile: path)
        if family == .qwen3MoE, case let dense = arch.denseLayerIndices, !dense.isEmpty {
            // QWEN3MOE's tensor list (gguf-py constants.py) has no dense FFN: the converter stops at the first one.
            let which = (dense.count == 1 ? "layer " : "layers ") + dense.map(String.init).joined(separator: ", ") + (dense.count == 1 ? " has" : " have")
            throw CheckpointError.invalidPath(path: path, problem: "\(which) a dense MLP (mlp_only_layers / decoder_sparse_step), which llama.cpp's qwen3moe architecture cannot hold")
        }
        return (config, family, arch)
    }

    /// Only LlamaModel undoes Hugging Face's rotate-half layout of q and k.
    var permutesQK: Bool { self == .llama }

    /// Qwen3MoeModel and GptOssModel read only tokenizer.json (`_set_vocab_gpt2`).
    var readsOnlyBPE: Bool { self == .qwen3MoE || self == .gptOSS }

    /// The per-layer modules this architecture's tensor map names (gguf-py's tensor_mapping for it).
    var layerNames: [String: String] {
        var names = ["input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.o_proj": "attn_output"]
        let attention = ["self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"]
        let mlp = ["mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"]
        let qkNorms = ["self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"]
        switch self {
        case .phi3:
            names.merge(["self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"]) { $1 }
        case .llama:
            names.merge(attention.merging(mlp) { $1 }.merging(["block_sparse_moe.gate": "ffn_gate_inp"]) { $1 }) { $1 }
        case .qwen2:
            names.merge(attention.merging(mlp) { $1 }) { $1 }
        case .qwen3:
            names.merge(attention.merging(mlp) { $1 }.merging(qkNorms) { $1 }) { $1 }
        case .qwen3MoE:
            names.merge(attention.merging(qkNorms) { $1 }.merging(["mlp.gate": "ffn_gate_inp"]) { $1 }) { $1 }
        case .gptOSS:
            // GPT_OSS has a post-attention norm and no FFN norm; the router is an nn.Linear with a bias.
            names.merge(attention.merging(["post_attention_layernorm": "post_attention_norm", "mlp.router": "ffn_gate_inp"]) { $1 }) { $1 }
        }
        return names
    }
}

/// What llama.cpp's convert_hf_to_gguf.py does to each tensor of a Llama-architecture checkpoint
/// (conversion/base.py `prepare_tensors`, conversion/llama.py `LlamaModel`), so that qlora's
/// export holds the same bytes (Vectors/gguf/llama-tiny/export.json holds it to that):
/// - tensors in the converter's order: the generated `rope_freqs.weight` first (Llama-3 rope
///   scaling), then each shard's tensors sorted by name, as safetensors' `keys()` lists them;
/// - names from gguf-py's tensor map (`ggufName`);
/// - q_proj and k_proj rows permuted from Hugging Face's rotate-half layout back to llama.cpp's
///   interleaved one (`LlamaModel.permute`);
/// - every tensor read as fp32 (bf16 widened exactly), then: 1-D tensors and norms F32; the rest
///   the `--outtype` (F16 and BF16 rounded to nearest even, BF16 with ggml's NaN rule, Q8_0 by
///   ggml's reference quantizer, F16 where a row is not a whole number of Q8_0 blocks).
public enum GGUFExport {
    /// llama.cpp's name for a Hugging Face tensor of an `arch` model, or nil for a name it does not map.
    public static func ggufName(_ hf: String, _ arch: GGUFArchitecture) -> String? {
        switch hf {
        case "model.embed_tokens.weight": return "token_embd.weight"
        case "model.norm.weight": return "output_norm.weight"
        case "lm_head.weight": return "output.weight"
        default: break
        }
        let parts = hf.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard parts.count >= 5, parts[0] == "model", parts[1] == "layers", let layer = Int(parts[2]), layer >= 0, String(layer) == parts[2] else { return nil }
        let module = parts[3..<(parts.count - 1)].joined(separator: "."), suffix = parts[parts.count - 1]
        guard suffix == "weight" || suffix == "bias" else { return nil }
        guard let name = arch.layerNames[module] else { return nil }
        return "blk.\(layer).\(name).\(suffix)"
    }

    /// `LlamaModel.permute`: w [rows, cols] viewed as [heads, 2, rows / heads / 2, cols] with its
    /// two middle axes swapped: row (h, j, i) moves to (h, i, j).
    public static func permuteRows(_ w: [Float], rows: Int, cols: Int, heads: Int) -> [Float] {
        precondition(heads > 0 && rows % (2 * heads) == 0 && w.count == rows * cols, "permuteRows: \(rows) rows do not split into \(heads) heads of pairs")
        let half = rows / heads / 2
        var out = [Float](repeating: 0, count: w.count)
        for h in 0..<heads {
            for j in 0..<2 {
                for i in 0..<half {
                    let from = (h * 2 * half + j * half + i) * cols, to = (h * 2 * half + i * 2 + j) * cols
                    for c in 0..<cols { out[to + c] = w[from + c] }
                }
            }
        }
        return out
    }

    /// `LlamaModel.generate_extra_tensors` for Llama-3 rope scaling: one factor per frequency,
    /// 1 above the high-frequency band, `factor` below the low one, smoothed between, in fp32 as
    /// torch computes them (the smoothed band's values can differ from torch's in the last bit:
    /// torch's pow is not glibc's; the bands' exact 1 and `factor` cannot).
    public static func llama3RopeFactors(_ a: ModelArchitecture) -> [Float]? {
        guard let s = a.llama3RopeScaling else { return nil }
        let dim = a.headDim, base = Float(a.ropeTheta)
        let low = Float(s.originalMaxPositions) / Float(s.lowFreqFactor), high = Float(s.originalMaxPositions) / Float(s.highFreqFactor)
        return stride(from: 0, to: dim, by: 2).map { i -> Float in
            let freq = 1 / powf(base, Float(i) / Float(dim))
            let wavelen = Float(2 * Double.pi) / freq
            if wavelen < high { return 1 }
            if wavelen > low { return Float(s.factor) }
            let smooth = (Float(s.originalMaxPositions) / wavelen - Float(s.lowFreqFactor)) / (Float(s.highFreqFactor) - Float(s.lowFreqFactor))
            return 1 / ((1 - smooth) / Float(s.factor) + smooth)
        }
    }

    /// The type and bytes of a tensor of fp32 values `x` with ggml dimensions `ne`, as the
    /// converter stores it for `outType`.
    public static func encode(_ x: [Float], ne: [Int], name: String, outType: GGUFOutType) -> (GGMLType, [UInt8]) {
        let type = type(name: name, ne: ne, outType: outType)
        let out = x.withUnsafeBufferPointer { GGMLQuants.bytes($0, as: LlamaQuantize.encoding(type)) }
        return (type, out)
    }

    /// Phi-3's LongRoPE (Phi3MiniModel.generate_extra_tensors): the long and short rope factors as
    /// F32 tensors, and the attention factor for phi3.rope.scaling.attn_factor.
    public struct LongRoPE: Sendable, Equatable {
        public var long: [Float]
        public var short: [Float]
        public var attentionFactor: Float

        /// From config.json's rope_parameters (or rope_scaling): nil without long factors; an
        /// error where the converter stops (unknown type, factor lists of the wrong length).
        public init?(config: JSONValue, _ a: ModelArchitecture, file: String) throws {
            let rope = config["rope_parameters"] ?? config["rope_scaling"]
            func numbers(_ v: JSONValue?) -> [Double]? {
                guard case .array(let list)? = v else { return nil }
                let d = list.compactMap { (x: JSONValue) -> Double? in if case .number(let s) = x { return Double(s) }; return nil }
                return d.count == list.count ? d : nil
            }
            guard let long = numbers(rope?["long_factor"]), !long.isEmpty else { return nil }
            guard let short = numbers(rope?["short_factor"]) else { throw CheckpointError.invalidPath(path: file, problem: "rope long_factor without short_factor") }
            func int(_ v: JSONValue?) -> Int? { if case .number(let s)? = v { return Int(s) }; return nil }
            guard let original = int(rope?["original_max_position_embeddings"]) ?? int(config["original_max_position_embeddings"]), original > 1,
                  let maxPositions = int(config["max_position_embeddings"]), maxPositions > 0 else {
                throw CheckpointError.invalidPath(path: file, problem: "LongRoPE needs max_position_embeddings and original_max_position_embeddings")
            }
            let dims = a.hiddenSize / max(a.attentionHeads, 1)
            guard long.count == short.count, 2 * long.count == dims else {
                throw CheckpointError.invalidPath(path: file, problem: "rope long and short factors must each have \(dims / 2) values (they have \(long.count) and \(short.count))")
            }
            var type = ""
            if case .string(let t)? = rope?["rope_type"] ?? rope?["type"] { type = t.lowercased() }
            let scale = Double(maxPositions) / Double(original)
            switch type {
            case "su", "longrope": attentionFactor = Float(scale > 1 ? (1 + log(scale) / log(Double(original))).squareRoot() : 1)
            case "yarn": attentionFactor = Float(scale > 1 ? 0.1 * log(scale) + 1 : 1)
            default: throw CheckpointError.invalidPath(path: file, problem: "rope type '\(type)' with long factors is not one the converter knows (longrope, su, yarn)")
            }
            self.long = long.map { Float($0) }
            self.short = short.map { Float($0) }
        }
    }

    /// One output tensor, planned before any data is read: where its values come from (a
    /// checkpoint tensor, or the generated rope factors), its name, dimensions and type.
    public struct PlannedTensor: Sendable, Equatable {
        /// The checkpoint tensor it comes from (of stacked experts, the first), or nil for a
        /// tensor the converter generates (`generated`).
        public var source: String?
        /// A generated tensor's values (rope factors).
        public var generated: [Float]? = nil
        public var name: String
        public var ne: [Int]
        public var type: GGMLType
        /// How a mixture of experts' tensor is made from the checkpoint's; nil: `source` as it is.
        public var experts: ExpertSource? = nil

        /// The checkpoint tensors its values come from.
        public var members: [String] {
            if case .stacked(let names)? = experts { return names }
            return source.map { [$0] } ?? []
        }
    }

    /// How the converter makes a mixture of experts' tensor.
    public enum ExpertSource: Sendable, Equatable {
        /// Qwen2MoeModel / LlamaModel `modify_tensors`: the per-expert [out, in] tensors stacked on
        /// a new first axis in expert order, [experts, out, in].
        case stacked([String])
        /// GptOssModel `modify_tensors`: a fused [experts, in, out] parameter transposed to
        /// [experts, out, in]; of gate_up (gate and up interleaved on its last axis) the gate
        /// (`half` 0, the even columns) or the up projection (1, the odd ones).
        case transposed(half: Int?)
        /// GptOssModel: gate_up's bias [experts, 2·intermediate] split as its weight is.
        case interleavedBias(half: Int)
    }

    /// The type the converter gives a tensor: F32 for 1-D tensors and norms, else `outType`
    /// (F16 where Q8_0's 32-value blocks do not divide a row).
    static func type(name: String, ne: [Int], outType: GGUFOutType) -> GGMLType {
        // base.py prepare_tensors: 1-D tensors, norms, the router (FFN_GATE_INP) and every tensor
        // whose name does not end in ".weight", ".lora_a" or ".lora_b" (biases of any rank) stay F32.
        if ne.count <= 1 || name.hasSuffix("_norm.weight") || name.hasSuffix("ffn_gate_inp.weight")
            || ![".weight", ".lora_a", ".lora_b"].contains(where: name.hasSuffix) { return .f32 }
        switch outType {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        case .q8_0: return ne[0] % GGMLQuants.q8_0Block.elements == 0 ? .q8_0 : .f16  // gguf-py's QuantError falls back to F16
        }
    }

    /// A tensor of the dense checkpoint the converter reads: its shard (by position), logical
    /// shape and float type, and the file to name in errors.
    public struct DenseTensor: Sendable {
        public var name: String
        public var shard: Int
        public var shape: [Int]
        public var dtype: ElementType
        public var file: String
        public init(name: String, shard: Int, shape: [Int], dtype: ElementType, file: String) {
            (self.name, self.shard, self.shape, self.dtype, self.file) = (name, shard, shape, dtype, file)
        }
    }

    /// The tensors of a dense checkpoint, in the reader's order; a tensor that is not a float
    /// type is refused.
    public static func denseTensors(_ reader: CheckpointReader) throws -> [DenseTensor] {
        try reader.entries.map { e in
            guard let t = ElementType(e.info.dtype) else {
                throw CheckpointError.invalidTensor(file: reader.filePath(of: e.name), tensor: e.name, problem: "dtype \(e.info.dtype) is not a float type")
            }
            return DenseTensor(name: e.name, shard: e.shardIndex, shape: e.info.shape, dtype: t, file: reader.filePath(of: e.name))
        }
    }

    /// Every output tensor of a dense checkpoint of an `arch` model, in the converter's order,
    /// from the checkpoint's header alone (so the GGUF header can be written first and the data
    /// streamed tensor by tensor).
    public static func plan(_ dense: [DenseTensor], _ a: ModelArchitecture, _ arch: GGUFArchitecture, outType: GGUFOutType,
                            longRoPE: LongRoPE? = nil) throws -> [PlannedTensor] {
        var plan: [PlannedTensor] = []
        if arch == .llama, let factors = llama3RopeFactors(a) {
            plan.append(PlannedTensor(source: nil, generated: factors, name: "rope_freqs.weight", ne: [factors.count], type: .f32))
        }
        if let longRoPE {
            plan.append(PlannedTensor(source: nil, generated: longRoPE.long, name: "rope_factors_long.weight", ne: [longRoPE.long.count], type: .f32))
            plan.append(PlannedTensor(source: nil, generated: longRoPE.short, name: "rope_factors_short.weight", ne: [longRoPE.short.count], type: .f32))
        }
        var experts = ExpertStacks(a, arch)
        for t in converterOrder(dense) where !t.name.hasSuffix(".rotary_emb.inv_freq") {
            if let stacked = try experts.add(t) {
                plan += stacked.map { var p = $0; p.type = type(name: p.name, ne: p.ne, outType: outType); return p }
                continue
            }
            guard let name = ggufName(t.name, arch) else {
                throw CheckpointError.invalidTensor(file: t.file, tensor: t.name, problem: "llama.cpp's \(arch.rawValue) architecture has no tensor of this name")
            }
            guard (1...4).contains(t.shape.count) else {
                throw CheckpointError.invalidTensor(file: t.file, tensor: t.name, problem: "\(t.shape.count) dimensions; GGUF holds 1 to 4")
            }
            let ne = Array(t.shape.reversed())
            if arch.permutesQK, t.shape.count == 2, t.name.hasSuffix("q_proj.weight") || t.name.hasSuffix("k_proj.weight") {
                let heads = t.name.hasSuffix("q_proj.weight") ? a.attentionHeads : a.keyValueHeads
                guard heads > 0, t.shape[0] % (2 * heads) == 0 else {
                    throw CheckpointError.invalidTensor(file: t.file, tensor: t.name, problem: "\(t.shape[0]) rows do not split into \(heads) heads of rotary pairs (config.json)")
                }
            }
            plan.append(PlannedTensor(source: t.name, name: name, ne: ne, type: type(name: name, ne: ne, outType: outType)))
        }
        try experts.finish()
        return plan
    }

    /// convert_hf_to_gguf.py's `--outtype auto`: the type of the first 2-D bf16 or f16 tensor it
    /// reads (bf16 or f16), f16 when there is none.
    public static func autoOutType(_ dense: [DenseTensor]) -> GGUFOutType {
        for t in converterOrder(dense) where t.shape.count >= 2 {
            if t.dtype == .bfloat16 { return .bf16 }
            if t.dtype == .float16 { return .f16 }
        }
        return .f16
    }

    /// The tensors in the order the converter reads them: shard by shard (by position), each
    /// shard's tensors sorted by name (as safetensors' `keys()` lists them).
    static func converterOrder(_ dense: [DenseTensor]) -> [DenseTensor] {
        dense.sorted { a, b in a.shard != b.shard ? a.shard < b.shard : a.name.unicodeScalars.lexicographicallyPrecedes(b.name.unicodeScalars) }
    }

    /// The fp32 values of one planned tensor as the converter holds them before encoding: the
    /// rope factors, or the source tensor (`load`) with q_proj/k_proj rows permuted.
    public static func values(of t: PlannedTensor, _ a: ModelArchitecture, _ arch: GGUFArchitecture = .llama, load: (String) throws -> [Float]) rethrows -> [Float] {
        guard let hf = t.source else { return t.generated! }
        switch t.experts {
        case .stacked(let names)?:
            var x: [Float] = []
            x.reserveCapacity(t.ne.reduce(1, *))
            for n in names { x += try load(n) }
            return x
        case .transposed(let half)?:
            // ne [in, rows, experts] from [experts, in, out]: out = rows, or 2·rows interleaved.
            let (columns, rows, count) = (t.ne[0], t.ne[1], t.ne[2]), out = half == nil ? rows : 2 * rows
            let x = try load(hf)
            var y = [Float](repeating: 0, count: x.count / (half == nil ? 1 : 2))
            let (step, first) = half.map { (2, $0) } ?? (1, 0)
            // In tiles of 64 input rows, so that each tile's rows are read along, not across.
            for e in 0..<count {
                for c0 in stride(from: 0, to: columns, by: 64) {
                    let c1 = min(c0 + 64, columns)
                    for r in 0..<rows {
                        let from = e * columns * out + step * r + first, to = (e * rows + r) * columns
                        for c in c0..<c1 { y[to + c] = x[from + c * out] }
                    }
                }
            }
            return y
        case .interleavedBias(let half)?:
            let x = try load(hf)
            return stride(from: half, to: x.count, by: 2).map { x[$0] }
        case nil:
            break
        }
        let x = try load(hf)
        if arch.permutesQK, t.ne.count == 2, hf.hasSuffix("q_proj.weight") || hf.hasSuffix("k_proj.weight") {
            return permuteRows(x, rows: t.ne[1], cols: t.ne[0], heads: hf.hasSuffix("q_proj.weight") ? a.attentionHeads : a.keyValueHeads)
        }
        return x
    }
}

// MARK: - Metadata and the whole file

extension GGUFOutType {
    /// gguf-py's LlamaFileType of the file (general.file_type).
    public var fileType: UInt32 {
        switch self {
        case .f32: return 0
        case .f16: return 1
        case .q8_0: return 7
        case .bf16: return 32
        }
    }
}

extension GGUFExport {
    /// gguf-py's `size_label` of a dense model (`model_weight_count_rounded_notation`, two digits
    /// at least): "107K", "1.2B", "8.0B", "70B". Python's round() rounds half to even.
    public static func sizeLabel(parameters n: Int) -> String {
        let x = Double(n)
        let (scaled, suffix) = x > 1e12 ? (x * 1e-12, "T") : x > 1e9 ? (x * 1e-9, "B") : x > 1e6 ? (x * 1e-6, "M") : (x * 1e-3, "K")
        let rounded = scaled.rounded(.toNearestOrEven)
        let digits = rounded == 0 ? 0 : String(Int(rounded)).count
        return String(format: "%.\(max(2 - digits, 0))f", scaled) + suffix
    }

    /// gguf-py's size label of the planned tensors (GGUFWriter.get_total_parameter_count and
    /// utility.size_label): a dense model's parameter count, or for a mixture of experts
    /// "{experts}x{one expert's share plus the shared parameters}" ("8x7.2B"); a tensor counts as
    /// an expert's when its name has "_exps." and it has 3 dimensions (2-D expert biases are shared).
    public static func sizeLabel(of planned: [PlannedTensor]) -> String {
        var total = 0, shared = 0, expert = 0, expertSum = 0, expertTensors = 0
        for t in planned {
            let size = t.ne.reduce(1, *)
            total += size
            if t.name.contains("_exps."), t.ne.count >= 3 {
                // The numpy shape's [-3] (a bias's [-2]): ne is that shape reversed.
                let experts = t.ne[t.name.contains(".bias") ? 1 : 2]
                expert += size / max(experts, 1)
                expertSum += experts
                expertTensors += 1
            } else {
                shared += size
            }
        }
        guard expertTensors > 0 else { return sizeLabel(parameters: total) }
        return "\(expertSum / expertTensors)x" + sizeLabel(parameters: shared + expert)
    }

    static func int(_ v: JSONValue?) -> Int? { if case .number(let t)? = v { return Int(t) }; return nil }

    /// The metadata convert_hf_to_gguf.py writes for an `arch` model with a SentencePiece
    /// tokenizer (`vocabulary`) or a byte-level BPE one (`bpe`, then `vocabulary` is unused), in its order: the general keys; the hyperparameters (TextModel's, or
    /// Phi3MiniModel's own list), as transformers' config class holds them; the quantization
    /// version; the vocabulary and the special vocabulary.
    public static func metadata(config: JSONValue, _ a: ModelArchitecture, _ arch: GGUFArchitecture, name: String, parameters: Int, outType: GGUFOutType,
                                vocabulary: (tokens: [String], scores: [Float], types: [Int32]),
                                special: SpecialVocabulary? = nil,
                                bpe: (pre: String, tokens: [String], types: [Int32])? = nil,
                                general: [(key: String, value: GGUFValue)]? = nil, longRoPE: LongRoPE? = nil) -> [(key: String, value: GGUFValue)] {
        let v = special?.apply(to: vocabulary) ?? vocabulary
        let p = arch.rawValue
        func u32(_ x: Int) -> GGUFValue { .uint32(UInt32(clamping: x)) }
        var m: [(key: String, value: GGUFValue)] = [("general.architecture", .string(p))]
        // Written while the converter generates the rope factor tensors, before the rest.
        if let longRoPE { m.append(("phi3.rope.scaling.attn_factor", .float32(longRoPE.attentionFactor))) }
        m.append(("general.type", .string("model")))
        // gguf-py's Metadata keys (GGUFNames.generalKeys), or a plain name and size label.
        m += general ?? [("general.name", .string(name)), ("general.size_label", .string(sizeLabel(parameters: parameters)))]
        // The config classes' defaults when config.json has none.
        let contextLength = int(config["max_position_embeddings"]) ?? (arch == .phi3 ? 4096 : arch == .llama ? 2048 : 32768)
        if arch == .phi3 {
            m.append(("phi3.context_length", u32(contextLength)))
            let original = int(config["original_max_position_embeddings"]) ?? int(config["rope_parameters"]?["original_max_position_embeddings"])
                ?? int(config["rope_scaling"]?["original_max_position_embeddings"]) ?? 4096
            m.append(("phi3.rope.scaling.original_context_length", u32(original)))
            m.append(("phi3.embedding_length", u32(a.hiddenSize)))
            m.append(("phi3.feed_forward_length", u32(a.intermediateSize)))
            m.append(("phi3.block_count", u32(a.layers)))
            m.append(("phi3.attention.head_count", u32(a.attentionHeads)))
            m.append(("phi3.attention.head_count_kv", u32(a.keyValueHeads)))
            m.append(("phi3.attention.layer_norm_rms_epsilon", .float32(Float(a.rmsNormEps))))
            m.append(("phi3.rope.dimension_count", u32(a.hiddenSize / max(a.attentionHeads, 1))))
            m.append(("phi3.rope.freq_base", .float32(Float(a.ropeTheta))))
            m.append(("general.file_type", .uint32(outType.fileType)))
            m.append(("phi3.attention.sliding_window", u32(int(config["sliding_window"]) ?? 0)))
        } else {
            m.append(("\(p).block_count", u32(a.layers)))
            m.append(("\(p).context_length", u32(contextLength)))
            m.append(("\(p).embedding_length", u32(a.hiddenSize)))
            m.append(("\(p).feed_forward_length", u32(a.intermediateSize)))
            m.append(("\(p).attention.head_count", u32(a.attentionHeads)))
            m.append(("\(p).attention.head_count_kv", u32(a.keyValueHeads)))
            if arch == .gptOSS { m += yarnScaling(config, p) }
            m.append(("\(p).rope.freq_base", .float32(Float(a.ropeTheta))))
            m.append(("\(p).attention.layer_norm_rms_epsilon", .float32(Float(a.rmsNormEps))))
            if let x = a.experts {
                m.append(("\(p).expert_count", u32(x.count)))
                m.append(("\(p).expert_used_count", u32(x.perToken)))
            }
            // transformers' LlamaConfig, MistralConfig and Qwen3Config always have a head_dim
            // (hidden_size / num_attention_heads when config.json has none); Qwen2Config only
            // when config.json sets one.
            let hasHeadDim: Bool
            if case .number? = config["head_dim"] { hasHeadDim = true } else { hasHeadDim = arch != .qwen2 }
            if hasHeadDim {
                m.append(("\(p).attention.key_length", u32(a.headDim)))
                m.append(("\(p).attention.value_length", u32(a.headDim)))
            }
            m.append(("general.file_type", .uint32(outType.fileType)))
            switch arch {
            case .llama:
                m.append(("llama.vocab_size", u32(a.vocabSize)))
                m.append(("llama.rope.dimension_count", u32(a.headDim)))
            case .qwen3MoE:
                m.append(("qwen3moe.expert_feed_forward_length", u32(a.experts?.intermediateSize ?? 0)))
            case .gptOSS:
                m.append(("gpt-oss.attention.sliding_window", u32(int(config["sliding_window"]) ?? 0)))
                m.append(("gpt-oss.expert_feed_forward_length", u32(a.intermediateSize)))
            default:
                break
            }
        }
        m.append(("general.quantization_version", .uint32(2)))
        if let b = special?.addSpacePrefix { m.append(("tokenizer.ggml.add_space_prefix", .bool(b))) }
        if let bpe {
            // _set_vocab_gpt2: no scores.
            m.append(("tokenizer.ggml.model", .string("gpt2")))
            m.append(("tokenizer.ggml.pre", .string(bpe.pre)))
            m.append(("tokenizer.ggml.tokens", .strings(bpe.tokens)))
            m.append(("tokenizer.ggml.token_type", .int32s(bpe.types)))
        } else {
            m.append(("tokenizer.ggml.model", .string("llama")))
            m.append(("tokenizer.ggml.pre", .string("default")))
            m.append(("tokenizer.ggml.tokens", .strings(v.tokens)))
            m.append(("tokenizer.ggml.scores", .float32s(v.scores)))
            m.append(("tokenizer.ggml.token_type", .int32s(v.types)))
        }
        if let special {
            m += special.entries.map(metadata)
        } else {
            for (key, field) in [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")] {
                if let id = int(config[field]), id >= 0, id < a.vocabSize { m.append((key, .uint32(UInt32(id)))) }
            }
        }
        return withoutEmptyStrings(m)
    }

    /// TextModel.set_gguf_parameters' YaRN keys from config.json's rope_parameters (or
    /// rope_scaling), in its order; nothing for another rope type or without a factor.
    static func yarnScaling(_ config: JSONValue, _ p: String) -> [(key: String, value: GGUFValue)] {
        let rope = config["rope_parameters"] ?? config["rope_scaling"]
        func float(_ v: JSONValue?) -> GGUFValue? { if case .number(let t)? = v, let d = Double(t) { return .float32(Float(d)) }; return nil }
        guard rope?["rope_type"] == .string("yarn"), let factor = float(rope?["factor"]) else { return [] }
        var m: [(key: String, value: GGUFValue)] = [("\(p).rope.scaling.type", .string("yarn")), ("\(p).rope.scaling.factor", factor),
                                                   ("\(p).rope.scaling.original_context_length", .uint32(UInt32(clamping: int(rope?["original_max_position_embeddings"]) ?? 0)))]
        for (key, fields) in [("yarn_ext_factor", ["extrapolation_factor"]), ("yarn_attn_factor", ["attention_factor", "attn_factor"]),
                              ("yarn_beta_fast", ["beta_fast"]), ("yarn_beta_slow", ["beta_slow"])] {
            if let v = fields.lazy.compactMap({ float(rope?[$0]) }).first { m.append(("\(p).rope.scaling.\(key)", v)) }
        }
        return m
    }

    /// gguf-py's add_string writes nothing for an empty string ("if not val: return"): the key is absent.
    public static func withoutEmptyStrings(_ m: [(key: String, value: GGUFValue)]) -> [(key: String, value: GGUFValue)] {
        m.filter { if case .string(let s) = $0.value { return !s.isEmpty }; return true }
    }

    /// gguf-py's key and value of one special-vocabulary entry.
    static func metadata(_ e: SpecialVocabulary.Entry) -> (key: String, value: GGUFValue) {
        switch e {
        case .merges(let m): return ("tokenizer.ggml.merges", .strings(m))
        case .tokenID(let kind, let id):
            let names = ["unk": "unknown", "sep": "seperator", "pad": "padding"]  // gguf-py's key names, its spelling
            return ("tokenizer.ggml.\(names[kind] ?? kind)_token_id", .uint32(UInt32(clamping: id)))
        case .addToken(let kind, let b): return ("tokenizer.ggml.add_\(kind)_token", .bool(b))
        case .namedChatTemplate(let name, let t): return ("tokenizer.chat_template.\(name)", .string(t))
        case .chatTemplateNames(let names): return ("tokenizer.chat_templates", .strings(names))
        case .chatTemplate(let t): return ("tokenizer.chat_template", .string(t))
        case .normalizerLowercase(let b): return ("tokenizer.ggml.normalizer.lowercase", .bool(b))
        case .normalizerStripAccents(let b): return ("tokenizer.ggml.normalizer.strip_accents", .bool(b))
        }
    }

    /// The bytes of a GGUF holding `metadata` and `tensors` as gguf-py writes them.
    public static func fileBytes(metadata: [(key: String, value: GGUFValue)], tensors: [GGUFTensor]) throws -> [UInt8] {
        let header = try GGUFHeader(metadata: metadata, tensors: tensors.map { ($0.name, $0.ne, $0.type) })
        var out = header.encoded()
        for t in tensors {
            out += t.bytes
            out += [UInt8](repeating: 0, count: (header.alignment - t.bytes.count % header.alignment) % header.alignment)
        }
        return out
    }
}

extension GGUFExport {
    /// A checkpoint directory's tokenizer as the converter reads it for `family`: tokenizer.model
    /// (SentencePiece) when there is one, else tokenizer.json (byte-level BPE, `_set_vocab_gpt2`);
    /// Phi-3 reads tokenizer.model unless tokenizer_config.json says GPT2Tokenizer (Phi-4). With the
    /// side files' special vocabulary.
    public struct Tokenizer {
        /// The SentencePiece vocabulary (empty for BPE).
        public var sentencePiece: (tokens: [String], scores: [Float], types: [Int32]) = ([], [], [])
        public var bpe: (pre: String, tokens: [String], types: [Int32])?
        public var special: SpecialVocabulary

        public init(directory base: String, _ family: GGUFArchitecture, vocabSize: Int) throws {
            let fm = FileManager.default
            let model = base + "/tokenizer.model"
            var useBPE = family.readsOnlyBPE || !fm.fileExists(atPath: model) && fm.fileExists(atPath: base + "/tokenizer.json")
            if family.readsOnlyBPE && !fm.fileExists(atPath: base + "/tokenizer.json") {
                throw CheckpointError.invalidPath(path: base, problem: "has no tokenizer.json: llama.cpp's converter reads a \(family.rawValue) model's vocabulary from it alone")
            }
            if family == .phi3, fm.fileExists(atPath: base + "/tokenizer_config.json"),
               let tc = try? JSONValue.parse(document: [UInt8](InputFile.read(base + "/tokenizer_config.json"))), tc["tokenizer_class"] == .string("GPT2Tokenizer") {
                useBPE = true
            }
            guard useBPE || fm.fileExists(atPath: model) else {
                throw CheckpointError.invalidPath(path: base, problem: "has no tokenizer.model or tokenizer.json: llama.cpp's converter refuses a checkpoint without its tokenizer, and llama.cpp cannot run one")
            }
            if useBPE {
                let v = try BPEVocabulary(directory: base)
                let t = try v.ggufVocabulary(vocabSize: vocabSize, file: base + "/tokenizer.json")
                bpe = (v.preTokenizer, t.tokens, t.types)
            } else {
                sentencePiece = try SentencePieceModel(file: model).ggufVocabulary(vocabSize: vocabSize)
            }
            special = try SpecialVocabulary(directory: base, vocabSize: vocabSize, addedTokens: useBPE ? .bpe : family == .phi3 ? .phi3 : .sentencePiece)
            if family != .llama { special.addSpacePrefix = nil }  // only LlamaModel.set_vocab reads add_prefix_space
        }
    }
}
