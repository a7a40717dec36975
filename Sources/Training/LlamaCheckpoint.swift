import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors

/// Loads a Hugging Face checkpoint directory (config.json + safetensors, dense or
/// bitsandbytes-4bit) of a family `LlamaModel` runs (Llama, Mistral, Qwen2, Qwen3, Phi-3; the
/// mixtures of experts Qwen3-MoE and Mixtral, their router and experts frozen bf16 `SparseMoE`
/// blocks) as a QLoRA `LlamaModel`: dense projections are quantized to NF4 with double quantization
/// (bitsandbytes' defaults), everything else (norms, biases, embeddings) is held as bf16 values.
public enum LlamaCheckpoint {
    /// Reads config.json and checks that qlora's decoder implements the architecture. Errors
    /// name the file and the field or feature.
    public static func config(directory: String) throws -> ModelArchitecture {
        let path = directory + "/config.json"
        guard FileManager.default.fileExists(atPath: path) else {
            throw CheckpointError.invalidPath(path: path, problem: "missing (a Llama checkpoint directory has a config.json)")
        }
        let architecture = try ModelArchitecture(configFile: path)
        if let problem = architecture.unsupportedForTraining.first { throw CheckpointError.invalidPath(path: path, problem: problem) }
        if architecture.experts != nil {
            // The router's training-only extras transformers adds when the config asks for them.
            let json = try ConfigJSON.read(path)
            if json["output_router_logits"] == .bool(true) {
                throw CheckpointError.invalidPath(path: path, problem: "output_router_logits true adds the routers' load-balancing loss, which qlora train does not compute")
            }
            if case .number(let n)? = json["router_jitter_noise"], let noise = Double(n), noise > 0 {
                throw CheckpointError.invalidPath(path: path, problem: "router_jitter_noise \(n) multiplies the router's input by random noise in training, which qlora train does not")
            }
        }
        return architecture
    }

    /// Loads the model. `adapter`: a PEFT adapter for its A and B (rank and alpha per module from
    /// it); otherwise new adapters of `rank`/`alpha` on all seven projections, initialized as PEFT
    /// does (A Kaiming-uniform from `seed`, B zero).
    public static func load(directory: String, adapter: PEFTAdapter? = nil, rank: Int = 16, alpha: Double = 32, dropout: Double = 0,
                            seed: UInt64 = 0, dora: Bool = false, modulesToSave: [LlamaModel.WholeModule] = []) throws -> LlamaModel {
        let cfg = try config(directory: directory)
        if let adapter, !adapter.targetParameters.isEmpty {
            // Dropping them would train another model than the adapter describes.
            throw CheckpointError.invalidPath(path: directory, problem: "the adapter has LoRA on \(adapter.targetParameters.joined(separator: ", ")) (PEFT's target_parameters), "
                                              + "which qlora train does not train yet (it trains the attention's adapters)")
        }
        let reader = try CheckpointReader(path: directory)
        let groups = Dictionary(uniqueKeysWithValues: try BnB4BitFormat.groups(of: reader).map { ($0.name, $0) })
        func file(_ name: String) -> String { reader.entry(named: name).map { reader.directory + "/" + $0.shard } ?? directory }
        func dense(_ name: String, _ shape: [Int]) throws -> [Float] {
            guard let info = reader.info(named: name) else { throw CheckpointError.invalidTensor(file: directory, tensor: name, problem: "missing") }
            guard info.shape == shape, let type = ElementType(info.dtype) else {
                throw CheckpointError.invalidTensor(file: file(name), tensor: name, problem: "expected a float tensor of shape \(shape), found \(info.dtype.rawValue) \(info.shape)")
            }
            return reader.withBytes(of: name) { raw in
                withAlignedBytes(raw, alignment: type.byteSize) { a in
                    let v = FloatElements.view(a, as: type)
                    return (0..<v.count).map { HalfPrecision.roundedToBFloat16(v[$0]) }  // a bf16 model
                }
            }
        }
        let h = cfg.hiddenSize
        // A sparse layer's router and experts, bf16 as transformers holds them, from the
        // per-expert tensors its files hold (Qwen3-MoE `mlp.experts.E.{gate,up,down}_proj`,
        // Mixtral `block_sparse_moe.experts.E.w1/w3/w2`): gate_up [E, 2I, H] each expert's gate
        // rows then its up rows, down [E, H, I].
        func experts(layer l: Int) throws -> SparseMoE.Weights {
            let x = cfg.experts!, (e, i) = (x.count, x.intermediateSize)
            let mixtral = x.family == .mixtral
            let block = "model.layers.\(l)." + (mixtral ? "block_sparse_moe" : "mlp")
            let (gate, up, down) = mixtral ? ("w1", "w3", "w2") : ("gate_proj", "up_proj", "down_proj")
            var gateUp: [Float] = [], downs: [Float] = []
            for j in 0..<e {
                let p = "\(block).experts.\(j)."
                gateUp += try dense(p + gate + ".weight", [i, h]) + dense(p + up + ".weight", [i, h])
                downs += try dense(p + down + ".weight", [h, i])
            }
            return SparseMoE.Weights(family: mixtral ? .mixtral : .qwen3(normalizesTopK: x.normalizesTopK), experts: e, perToken: x.perToken, hidden: h,
                                     intermediate: i, router: try dense(block + ".gate.weight", [e, h]), gateUp: gateUp, down: downs)
        }
        var layers: [LlamaLayer] = []
        for l in 0..<cfg.layers {
            var projections: [LoRALinear] = []
            for (p, projection) in cfg.projections(layer: l).enumerated() {
                let path = projection.modulePath(layer: l)
                let name = path + ".weight"
                let (out, inF) = (projection.outFeatures, projection.inFeatures)
                let base: Linear4BitWeight
                if let g = groups[name] {
                    let q = try BnB4BitFormat.load(g, from: reader)
                    guard q.state.shape == [out, inF] else {
                        throw CheckpointError.invalidTensor(file: file(name), tensor: name, problem: "4-bit shape \(q.state.shape), expected [\(out), \(inF)]")
                    }
                    base = try weight(q, file: file(name), tensor: name)
                } else {
                    base = try quantized(try dense(name, [out, inF]), shape: [out, inF], file: file(name), tensor: name)
                }
                let layer: LoRALinear
                if let adapter {
                    guard let m = adapter.modules[path] else {
                        let names = cfg.projections(layer: l).map(\.name)
                        throw CheckpointError.invalidPath(path: directory, problem: "the adapter has no \(path); qlora train adapts all \(names.count) linear modules of every layer (\(names.joined(separator: ", ")))")
                    }
                    let c = adapter.config(for: path)
                    layer = try LoRALinear(base: base, config: LoRAConfig(rank: c.rank, alpha: c.alpha, useRSLoRA: c.useRSLoRA, dropout: dropout),
                                           loraA: m.loraA, loraB: m.loraB)
                } else {
                    layer = try LoRALinear(base: base, config: LoRAConfig(rank: rank, alpha: alpha, dropout: dropout), seed: seed &+ UInt64(l * 7 + p))
                }
                if projection.hasBias { layer.bias = try dense(path + ".bias", [out]) }
                // DoRA: the adapter's magnitude, or PEFT's initial one (the base's row norms).
                if let m = adapter?.modules[path]?.magnitude {
                    do { try layer.enableDoRA(magnitude: m) } catch { throw CheckpointError.invalidPath(path: directory, problem: "\(path): \(error)") }
                } else if adapter == nil && dora {
                    do { try layer.enableDoRA() } catch { throw CheckpointError.invalidPath(path: directory, problem: "\(path): \(error)") }
                }
                projections.append(layer)
            }
            let norms = cfg.qkNorm ? (try dense("model.layers.\(l).self_attn.q_norm.weight", [cfg.headDim]), try dense("model.layers.\(l).self_attn.k_norm.weight", [cfg.headDim])) : nil
            layers.append(LlamaLayer(inputNorm: try dense("model.layers.\(l).input_layernorm.weight", [h]),
                                     postAttentionNorm: try dense("model.layers.\(l).post_attention_layernorm.weight", [h]),
                                     projections: projections, qNorm: norms?.0, kNorm: norms?.1,
                                     experts: cfg.isSparse(layer: l) ? try experts(layer: l) : nil))
        }
        let embed = try dense("model.embed_tokens.weight", [cfg.vocabSize, h])
        let head = cfg.tiedEmbeddings ? nil : try dense("lm_head.weight", [cfg.vocabSize, h])
        let model = LlamaModel(config: cfg, embedTokens: embed, layers: layers, finalNorm: try dense("model.norm.weight", [h]), lmHead: head)
        // Whole modules trained (modules_to_save): the adapter's copies, or the base's to start.
        var whole = Set(modulesToSave)
        for w in LlamaModel.WholeModule.allCases {
            guard let t = adapter?.savedTensors[w.tensorName] else { continue }
            guard t.shape == [cfg.vocabSize, h], let type = ElementType(t.dtype) else {
                throw CheckpointError.invalidPath(path: directory, problem: "the adapter's \(w.tensorName) is \(t.dtype.rawValue) \(t.shape); qlora trains it as [\(cfg.vocabSize), \(h)]")
            }
            let values = t.bytes.withUnsafeBytes { loadFloats($0, as: type) }.map { HalfPrecision.roundedToBFloat16($0) }
            if w == .lmHead { model.lmHead = values } else { model.embedTokens = values }
            whole.insert(w)
        }
        model.trainedModules = whole
        return model
    }

    static func weight(_ q: Quantized4Bit, file: String, tensor: String) throws -> Linear4BitWeight {
        let r = Result { () throws(QuantizationError) -> Linear4BitWeight in try Linear4BitWeight(q) }
        switch r {
        case .success(let w): return w
        case .failure(let e): throw CheckpointError.quantization(file: file, tensor: tensor, error: e)
        }
    }

    /// bf16 values quantized as bitsandbytes does by default (NF4, blocksize 64, double quant).
    static func quantized(_ w: [Float], shape: [Int], file: String, tensor: String) throws -> Linear4BitWeight {
        let bits = w.map { HalfPrecision.bfloat16Bits($0) }
        let r = Result { () throws(QuantizationError) -> Quantized4Bit in
            try bits.withUnsafeBufferPointer { (p) throws(QuantizationError) -> Quantized4Bit in try quantize4Bit(.bfloat16(p), shape: shape) }
        }
        switch r {
        case .success(let q): return try weight(q, file: file, tensor: tensor)
        case .failure(let e): throw CheckpointError.quantization(file: file, tensor: tensor, error: e)
        }
    }

    /// The model's adapters as a PEFT adapter (fp32, r and alpha of the first module).
    public static func adapter(of model: LlamaModel, baseModel: String? = nil) -> PEFTAdapter {
        let first = model.layers[0].projections[0].config
        // A mixture of experts' adapters are its attention's (the experts are not nn.Linear).
        let sparse = model.config.experts != nil
        var a = PEFTAdapter(rank: first.rank, loraAlpha: first.alpha,
                            targetModules: sparse ? model.config.projections(layer: 0).map(\.name) : model.config.moduleNames)
        a.listsTargetParameters = sparse
        a.useRSLoRA = first.useRSLoRA
        a.loraDropout = first.dropout
        a.baseModelNameOrPath = baseModel
        for (path, l) in model.adapters {
            a.modules[path] = .init(path: path, rank: l.config.rank, inFeatures: l.inFeatures, outFeatures: l.outFeatures, loraA: l.loraA, loraB: l.loraB)
            a.modules[path]!.magnitude = l.magnitude
            if l.magnitude != nil { a.useDora = true }
        }
        // Whole modules as PEFT saves them: `base_model.model.lm_head.weight`, bf16.
        for w in LlamaModel.WholeModule.allCases where model.trainedModules.contains(w) {
            a.modulesToSave.append(w.rawValue)
            let values = w == .lmHead ? model.lmHead : model.embedTokens
            a.savedTensors[w.tensorName] = .init(dtype: .bf16, shape: [model.config.vocabSize, model.config.hiddenSize], bytes: encode(values, as: .bfloat16))
        }
        return a
    }
}
