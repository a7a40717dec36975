import CheckpointFormats
import QLoRA

extension GGUFExport {
    /// The expert tensors of a mixture of experts as convert_hf_to_gguf.py writes them, fed the
    /// checkpoint's tensors in the converter's reading order:
    /// - Qwen3-MoE (conversion/qwen.py `Qwen2MoeModel.modify_tensors`) and Mixtral
    ///   (conversion/llama.py `LlamaModel.modify_tensors`) store one tensor per expert; the
    ///   converter holds a layer's until it has all 3 × experts, then writes each projection's
    ///   stacked in expert order: Qwen3-MoE down, gate, up (`mlp.experts.X.{down,gate,up}_proj`),
    ///   Mixtral w1 (gate), w2 (down), w3 (up) (`block_sparse_moe.experts.X.wN`);
    /// - gpt-oss (conversion/gpt_oss.py `GptOssModel.modify_tensors`, bf16 experts) stores each
    ///   layer's experts fused, [experts, in, out], gate and up interleaved: down_proj transposed,
    ///   gate_up split into its even (gate) and odd (up) columns, each transposed; its biases
    ///   split alike; the attention sinks named `attn_sinks.weight`.
    /// The tensors it returns are typed by `plan` (the `.f32` here is a placeholder).
    struct ExpertStacks {
        let a: ModelArchitecture, arch: GGUFArchitecture
        /// A layer's per-expert tensors read so far.
        var held: [Int: [String: DenseTensor]] = [:]

        init(_ a: ModelArchitecture, _ arch: GGUFArchitecture) { (self.a, self.arch) = (a, arch) }

        /// The projections of a per-expert layout in the order the converter writes them, with
        /// their GGUF names.
        var projections: [(hf: String, gguf: String)] {
            arch == .qwen3MoE ? [("down_proj", "ffn_down_exps"), ("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps")]
                : [("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")]
        }

        /// The module holding one expert's projections.
        var expertModule: String { arch == .qwen3MoE ? "mlp.experts" : "block_sparse_moe.experts" }

        /// The tensors `t` completes (empty while a layer's experts are being gathered), or nil
        /// for a tensor that is not an expert's.
        mutating func add(_ t: DenseTensor) throws -> [PlannedTensor]? {
            guard let count = a.experts?.count else { return nil }
            let parts = t.name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            guard parts.count >= 5, parts[0] == "model", parts[1] == "layers", let layer = Int(parts[2]), String(layer) == parts[2] else { return nil }
            let rest = parts[3...].joined(separator: ".")
            if arch == .gptOSS { return try fused(t, layer: layer, rest, count: count) }
            guard arch == .qwen3MoE || arch == .llama, rest.hasPrefix(expertModule + "."), parts.count == 8, parts[7] == "weight" else { return nil }
            guard let x = Int(parts[5]), String(x) == parts[5], (0..<count).contains(x), projections.contains(where: { $0.hf == parts[6] }) else {
                throw CheckpointError.invalidTensor(file: t.file, tensor: t.name, problem: "is not one of the \(count) experts' projections config.json describes")
            }
            guard t.shape.count == 2 else { throw CheckpointError.invalidTensor(file: t.file, tensor: t.name, problem: "an expert's projection must be 2-D, not \(t.shape)") }
            held[layer, default: [:]][t.name] = t
            guard held[layer]!.count == 3 * count else { return [] }
            let experts = held.removeValue(forKey: layer)!
            return try projections.map { p in
                let names = (0..<count).map { "model.layers.\(layer).\(expertModule).\($0).\(p.hf).weight" }
                let first = experts[names[0]]!
                if let odd = names.first(where: { experts[$0]!.shape != first.shape }) {
                    throw CheckpointError.invalidTensor(file: experts[odd]!.file, tensor: odd, problem: "shape \(experts[odd]!.shape) differs from expert 0's \(first.shape)")
                }
                return PlannedTensor(source: names[0], name: "blk.\(layer).\(p.gguf).weight", ne: [first.shape[1], first.shape[0], count], type: .f32,
                                     experts: .stacked(names))
            }
        }

        /// gpt-oss' fused expert parameters and sinks, or nil for another tensor.
        func fused(_ t: DenseTensor, layer: Int, _ rest: String, count: Int) throws -> [PlannedTensor]? {
            func bad(_ problem: String) -> CheckpointError { .invalidTensor(file: t.file, tensor: t.name, problem: problem) }
            let p = "blk.\(layer)."
            switch rest {
            case "self_attn.sinks":
                return [PlannedTensor(source: t.name, name: p + "attn_sinks.weight", ne: Array(t.shape.reversed()), type: .f32)]
            case "mlp.experts.gate_up_proj", "mlp.experts.down_proj":
                guard t.shape.count == 3, t.shape[0] == count else { throw bad("must be [\(count) experts, in, out], not \(t.shape)") }
                let (input, out) = (t.shape[1], t.shape[2])
                if rest.hasSuffix("down_proj") {
                    return [PlannedTensor(source: t.name, name: p + "ffn_down_exps.weight", ne: [input, out, count], type: .f32, experts: .transposed(half: nil))]
                }
                guard out % 2 == 0 else { throw bad("gate_up_proj's \(out) columns do not interleave gate and up") }
                return [("ffn_gate_exps", 0), ("ffn_up_exps", 1)].map {
                    PlannedTensor(source: t.name, name: p + $0.0 + ".weight", ne: [input, out / 2, count], type: .f32, experts: .transposed(half: $0.1))
                }
            case "mlp.experts.gate_up_proj_bias":
                guard t.shape.count == 2, t.shape[0] == count, t.shape[1] % 2 == 0 else { throw bad("must be [\(count) experts, 2 × intermediate], not \(t.shape)") }
                return [("ffn_gate_exps", 0), ("ffn_up_exps", 1)].map {
                    PlannedTensor(source: t.name, name: p + $0.0 + ".bias", ne: [t.shape[1] / 2, count], type: .f32, experts: .interleavedBias(half: $0.1))
                }
            case "mlp.experts.down_proj_bias":
                return [PlannedTensor(source: t.name, name: p + "ffn_down_exps.bias", ne: Array(t.shape.reversed()), type: .f32)]
            default:
                if rest.hasSuffix("_blocks") || rest.hasSuffix("_scales") {
                    throw bad("gpt-oss' MXFP4 experts: run `qlora dequantize` first (it writes the bf16 experts transformers holds, which export takes)")
                }
                return nil
            }
        }

        /// Every layer's experts complete, or the first that is not.
        func finish() throws {
            guard let (layer, experts) = held.min(by: { $0.key < $1.key }), let any = experts.values.first else { return }
            throw CheckpointError.invalidTensor(file: any.file, tensor: any.name,
                                                problem: "layer \(layer) has \(experts.count) of its \(3 * (a.experts?.count ?? 0)) expert projections; llama.cpp's converter stacks them only when all are there")
        }
    }
}
