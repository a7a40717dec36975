import Foundation
import QLoRA
import SafeTensors

/// Loads a Hugging Face Llama checkpoint directory (config.json + safetensors, dense or
/// bitsandbytes-4bit) as a QLoRA `LlamaModel`: dense projections are quantized to NF4 with
/// double quantization (bitsandbytes' defaults), everything else is held as bf16 values.
public enum LlamaCheckpoint {
    /// Reads config.json. Errors name the file and the field.
    public static func config(directory: String) throws -> LlamaConfig {
        let path = directory + "/config.json"
        guard let data = FileManager.default.contents(atPath: path) else { throw CheckpointError.invalidPath(path: path, problem: "missing (a Llama checkpoint directory has a config.json)") }
        guard let c = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { throw CheckpointError.invalidPath(path: path, problem: "is not a JSON object") }
        func int(_ k: String) throws -> Int {
            guard let v = c[k] as? Int, v > 0 else { throw CheckpointError.invalidPath(path: path, problem: "\(k) is missing or not a positive integer") }
            return v
        }
        if let t = c["model_type"] as? String, !["llama", "mistral"].contains(t) {
            throw CheckpointError.invalidPath(path: path, problem: "model_type \(t) is not a Llama architecture")
        }
        let heads = try int("num_attention_heads")
        var cfg = LlamaConfig(hiddenSize: try int("hidden_size"), intermediateSize: try int("intermediate_size"), layers: try int("num_hidden_layers"),
                              heads: heads, kvHeads: (c["num_key_value_heads"] as? Int) ?? heads, vocabSize: try int("vocab_size"))
        guard cfg.hiddenSize % cfg.heads == 0, cfg.heads % cfg.kvHeads == 0 else {
            throw CheckpointError.invalidPath(path: path, problem: "hidden_size must be a multiple of num_attention_heads, and that of num_key_value_heads")
        }
        cfg.rmsNormEps = (c["rms_norm_eps"] as? NSNumber)?.doubleValue ?? 1e-6
        cfg.tiedEmbeddings = (c["tie_word_embeddings"] as? Bool) ?? false
        if (c["attention_bias"] as? Bool) == true || (c["mlp_bias"] as? Bool) == true {
            throw CheckpointError.invalidPath(path: path, problem: "attention_bias / mlp_bias are not supported")
        }
        // transformers 5 writes rope_parameters; earlier versions rope_theta + rope_scaling.
        let rope = (c["rope_parameters"] as? [String: Any]) ?? (c["rope_scaling"] as? [String: Any]) ?? [:]
        cfg.ropeTheta = (rope["rope_theta"] as? NSNumber)?.doubleValue ?? (c["rope_theta"] as? NSNumber)?.doubleValue ?? 10000
        let type = (rope["rope_type"] as? String) ?? (rope["type"] as? String) ?? "default"
        switch type {
        case "default": break
        case "llama3":
            guard let f = (rope["factor"] as? NSNumber)?.doubleValue, let lo = (rope["low_freq_factor"] as? NSNumber)?.doubleValue,
                  let hi = (rope["high_freq_factor"] as? NSNumber)?.doubleValue, let orig = rope["original_max_position_embeddings"] as? Int else {
                throw CheckpointError.invalidPath(path: path, problem: "llama3 rope scaling needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings")
            }
            cfg.llama3RopeScaling = .init(factor: f, lowFreqFactor: lo, highFreqFactor: hi, originalMaxPositions: orig)
        default: throw CheckpointError.invalidPath(path: path, problem: "rope type \(type) is not supported (default and llama3 are)")
        }
        return cfg
    }

    /// Loads the model. `adapter`: a PEFT adapter for its A and B (rank and alpha per module from
    /// it); otherwise new adapters of `rank`/`alpha` on all seven projections, initialized as PEFT
    /// does (A Kaiming-uniform from `seed`, B zero).
    public static func load(directory: String, adapter: PEFTAdapter? = nil, rank: Int = 16, alpha: Double = 32, dropout: Double = 0,
                            seed: UInt64 = 0) throws -> LlamaModel {
        let cfg = try config(directory: directory)
        let reader = try CheckpointReader(path: directory)
        let groups = Dictionary(uniqueKeysWithValues: BnB4BitFormat.groups(in: reader.tensorNames).map { ($0.name, $0) })
        func file(_ name: String) -> String { reader.entry(named: name).map { reader.directory + "/" + $0.shard } ?? directory }
        func dense(_ name: String, _ shape: [Int]) throws -> [Float] {
            guard let info = reader.info(named: name) else { throw CheckpointError.invalidTensor(file: directory, tensor: name, problem: "missing") }
            guard info.shape == shape, let type = elementType(info.dtype) else {
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
        var layers: [LlamaLayer] = []
        for l in 0..<cfg.layers {
            var projections: [LoRALinear] = []
            for p in 0..<7 {
                let path = LlamaModel.modulePath(layer: l, projection: p)
                let name = path + ".weight"
                let (out, inF) = [(h, h), (cfg.kvDim, h), (cfg.kvDim, h), (h, h), (cfg.intermediateSize, h), (cfg.intermediateSize, h), (h, cfg.intermediateSize)][p]
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
                if let adapter {
                    guard let m = adapter.modules[path] else {
                        throw CheckpointError.invalidPath(path: directory, problem: "the adapter has no \(path); qlora train adapts all seven projections of every layer")
                    }
                    let c = adapter.config(for: path)
                    projections.append(try LoRALinear(base: base, config: LoRAConfig(rank: c.rank, alpha: c.alpha, useRSLoRA: c.useRSLoRA, dropout: dropout),
                                                      loraA: m.loraA, loraB: m.loraB))
                } else {
                    projections.append(try LoRALinear(base: base, config: LoRAConfig(rank: rank, alpha: alpha, dropout: dropout),
                                                      seed: seed &+ UInt64(l * 7 + p)))
                }
            }
            layers.append(LlamaLayer(inputNorm: try dense("model.layers.\(l).input_layernorm.weight", [h]),
                                     postAttentionNorm: try dense("model.layers.\(l).post_attention_layernorm.weight", [h]),
                                     projections: projections))
        }
        let embed = try dense("model.embed_tokens.weight", [cfg.vocabSize, h])
        let head = cfg.tiedEmbeddings ? nil : try dense("lm_head.weight", [cfg.vocabSize, h])
        return LlamaModel(config: cfg, embedTokens: embed, layers: layers, finalNorm: try dense("model.norm.weight", [h]), lmHead: head)
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
        let first = model.layers[0].q.config
        var a = PEFTAdapter(rank: first.rank, loraAlpha: first.alpha, targetModules: LlamaModel.projectionNames)
        a.useRSLoRA = first.useRSLoRA
        a.loraDropout = first.dropout
        a.baseModelNameOrPath = baseModel
        for (path, l) in model.adapters {
            a.modules[path] = .init(path: path, rank: l.config.rank, inFeatures: l.inFeatures, outFeatures: l.outFeatures, loraA: l.loraA, loraB: l.loraB)
        }
        return a
    }
}
