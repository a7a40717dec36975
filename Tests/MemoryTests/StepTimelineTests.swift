import Foundation
import CheckpointFormats
import Memory
import QLoRA
import TestSupport
import XCTest

/// The step-memory model against live tensor bytes of the real transformers + PEFT +
/// bitsandbytes step (Vectors/memory/peaks.json, made by Vectors/generate_peaks.py on CPU).
final class StepTimelineTests: XCTestCase {
    /// The peak of each measured configuration: within 3% (the issue's bound; the head's and the
    /// layers' terms are exact, the recompute's gradients in flight are fitted).
    static let peakTolerance = 0.03
    /// What autograd keeps at the end of the forward: within 1% (every term is exact; what is
    /// left is the batch's ids and a few small tensors the model does not count).
    static let keptTolerance = 0.01

    /// The architectures generate_peaks.py builds (its ARCHS), two layers each.
    static let architectures: [String: ModelArchitecture] = [
        "llama-h1024": ModelArchitecture(name: "llama-h1024", hiddenSize: 1024, intermediateSize: 2816, layers: 2, attentionHeads: 16, vocabSize: 32000),
        "llama-h4096": ModelArchitecture(name: "llama-h4096", hiddenSize: 4096, intermediateSize: 11008, layers: 2, attentionHeads: 32, vocabSize: 32000),
        "qwen2-h896": ModelArchitecture(name: "qwen2-h896", modelType: "qwen2", hiddenSize: 896, intermediateSize: 4864, layers: 2, attentionHeads: 14,
                                        keyValueHeads: 2, vocabSize: 48000, tiedEmbeddings: true, attentionQKVBias: true),
        "qwen2-h3584": ModelArchitecture(name: "qwen2-h3584", modelType: "qwen2", hiddenSize: 3584, intermediateSize: 18944, layers: 2, attentionHeads: 28,
                                         keyValueHeads: 4, vocabSize: 152064, attentionQKVBias: true),
    ]

    /// The mixtures of experts generate_peaks.py builds, from config.json as transformers writes them.
    static let expertArchitectures: [String: String] = [
        "qwen3moe-h1024": #"{"model_type": "qwen3_moe", "hidden_size": 1024, "intermediate_size": 3072, "moe_intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "num_local_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": true, "vocab_size": 151936, "tie_word_embeddings": false}"#,
        "qwen3moe-h1024-dense0": #"{"model_type": "qwen3_moe", "hidden_size": 1024, "intermediate_size": 3072, "moe_intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "num_local_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [0], "norm_topk_prob": true, "vocab_size": 151936, "tie_word_embeddings": false}"#,
        "mixtral-h1024": #"{"model_type": "mixtral", "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": false}"#,
        "llama4-h1024": #"{"model_type": "llama4_text", "hidden_size": 1024, "intermediate_size": 1664, "intermediate_size_mlp": 3328, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "vocab_size": 202048, "use_qk_norm": true, "no_rope_layers": [1, 0], "tie_word_embeddings": false}"#,
        "gptoss-h1024": #"{"model_type": "gpt_oss", "hidden_size": 1024, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 24, "num_key_value_heads": 4, "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "vocab_size": 201088, "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"], "attention_bias": true, "tie_word_embeddings": false}"#,
    ]

    static func architecture(_ name: String) throws -> ModelArchitecture? {
        if let a = architectures[name] { return a }
        return try expertArchitectures[name].map { try ModelArchitecture(configData: Data($0.utf8), path: name) }
    }

    func testPeaksAndKeptBytesOfTheRealStack() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/memory/peaks.json"))
        let configs = try XCTUnwrap((try JSONSerialization.jsonObject(with: data) as? [String: Any])?["configs"] as? [[String: Any]])
        var checked = 0
        for c in configs {
            let name = c["name"] as! String
            // Not modelled: prepare_model_for_kbit_training without its checkpointing (the
            // "-prepared" row; the recipe as the docs call it is the "-peft-kbit" rows); full
            // fine-tuning's forward is approximated (its peak, the optimizer's, is held).
            if name.hasSuffix("-prepared") { continue }
            let arch = try XCTUnwrap(try Self.architecture(c["arch"] as! String), name)
            let method: TrainingMethod = name.contains("-full-") ? .full : name.contains("-lora-") ? .lora : .qlora
            var targets: [String]
            switch c["targets"] as! String {
            case "attn": targets = ModelArchitecture.attentionProjections
            case "attn+experts": targets = ModelArchitecture.attentionProjections + ["experts"]
            case "all-linear": targets = arch.peftAllLinear.targets
            default: targets = ModelArchitecture.projectionNames
            }
            var o = MemoryOptions(method: method, rank: max(c["r"] as? Int ?? 1, 1), targets: targets, seqLen: c["seq"] as! Int, batch: c["batch"] as! Int,
                                  gradientCheckpointing: c["ckpt"] as! Bool, dora: c["dora"] as? Bool ?? false)
            o.modulesToSave = (c["save"] as? String).map { [$0] } ?? []
            if c["targets"] as! String == "all-linear" { o.expertGateUpRankFactor = arch.peftAllLinear.expertGateUpRankFactor }
            if c["experts"] as? String == "nf4-parametrize" { o.experts = .nf4 }
            if arch.experts != nil {
                XCTAssertEqual(try MemoryEstimate(model: arch, options: o).params.trainable, c["trainable_params"] as? Int, "\(name) trainable parameters")
            }
            let recipe = try XCTUnwrap(Stack.Recipe(rawValue: c["recipe"] as? String ?? "peft"), name)
            let attention = try XCTUnwrap(Stack.Attention(rawValue: c["attn"] as? String ?? "sdpa"), name)
            let transformers = try XCTUnwrap(Stack.Transformers(rawValue: c["transformers"] as? String ?? "5"), name)
            let model = try StepTimeline(model: arch, options: o, firstStep: true,
                                         stack: Stack(recipe: recipe, attention: attention, transformers: transformers))
            let baseline = model.points[0].bytes
            let measuredPeak = Double(c["peak_above_baseline"] as! Int), ourPeak = Double(model.peakBytes - baseline)
            print(String(format: "%@: peak %.3f of measured (%@ vs %@), error %.2f of the tolerance", name, ourPeak / measuredPeak,
                         model.peak.phase, c["peak_phase"] as! String, abs(ourPeak / measuredPeak - 1) / Self.peakTolerance))
            XCTAssertEqual(ourPeak, measuredPeak, accuracy: Self.peakTolerance * measuredPeak, "\(name) peak above the weights")
            // And in the same phase.
            let phase = c["peak_phase"] as! String
            let expected = phase == "backward_head" ? "head backward" : phase == "final_norm+lm_head+loss" ? "head forward"
                : phase == "optimizer_step" ? "optimizer step"
                : phase.hasPrefix("forward_") ? "forward layer " + phase.dropFirst("forward_".count) : "backward layer " + phase.dropFirst("backward_".count)
            XCTAssertTrue(model.peak.phase.hasPrefix(expected), "\(name): peak in \(model.peak.phase), measured in \(phase)")
            XCTAssertEqual(Double(model.points[0].bytes), Double(c["baseline_bytes"] as! Int), accuracy: Self.peakTolerance * Double(c["baseline_bytes"] as! Int), "\(name) weights")
            if method != .full {
                let tokens = c["tokens"] as! Int
                XCTAssertEqual(Double(model.keptBytesPerToken * tokens), Double(c["kept_after_forward"] as! Int),
                               accuracy: Self.keptTolerance * Double(c["kept_after_forward"] as! Int), "\(name) kept after forward")
                XCTAssertEqual(Double(model.headKeptBytesPerToken), c["head_kept_per_token"] as! Double,
                               accuracy: Self.keptTolerance * (c["head_kept_per_token"] as! Double), "\(name) head")
            }
            checked += 1
        }
        XCTAssertGreaterThanOrEqual(checked, 40)
    }
}

/// bitsandbytes' 8-bit AdamW holds 2 × (1 B + 4 B per 256) per moment pair element, and a paged
/// one counts nothing on the device for `qlora fit`.
final class OptimizerTests: XCTestCase {
    func testEightBitAndPagedStates() throws {
        let a = ModelArchitecture.preset("llama-2-7b")!
        let fp32 = try MemoryEstimate(model: a, options: MemoryOptions())
        let eight = try MemoryEstimate(model: a, options: MemoryOptions(optimizer: .adamw8bit))
        let trainable = fp32.params.trainable
        XCTAssertEqual(fp32.component("optimizer_states")?.estimatedBytes, 8 * trainable)
        // Every LoRA tensor of llama-2-7b at r=16 has at least 4,096 elements and a multiple of 256.
        XCTAssertEqual(eight.component("optimizer_states")?.estimatedBytes, 2 * trainable + 2 * 4 * trainable / 256)
        let o = MemoryOptions(gradientCheckpointing: true, optimizer: .pagedAdamw8bit)
        let paged = try Fit.perDeviceBytes(a, o, gpus: 1, parallelism: .ddp)
        var unpaged = o
        unpaged.optimizer = .adamw8bit
        XCTAssertLessThan(paged, try Fit.perDeviceBytes(a, unpaged, gpus: 1, parallelism: .ddp))
    }
}

/// Unsloth's recipe (from its source, not measured: see StepTimeline+Unsloth.swift): what its
/// autograd functions save, term by term, and what its offloading and fused loss leave out.
final class UnslothRecipeTests: XCTestCase {
    func testWhatUnslothKeepsOnTheDevice() throws {
        let a = ModelArchitecture.preset("llama-3.1-8b")!
        let o = MemoryOptions(method: .qlora, rank: 16, seqLen: 2048, gradientCheckpointing: true, optimizer: .adamw8bit)
        let u = try StepTimeline(model: a, options: o, recipe: .unsloth)
        // Recomputed layer, llama-3.1-8b (h 4096, q 4096, kv 1024, i 14336, 32 heads): two norms'
        // inputs and 1/rms, LoRA_QKV's input, q/k/v/output and log-sum-exp, LoRA_MLP's input, e, g.
        XCTAssertEqual(StepTimeline.unslothLayerBytesPerToken(a), (2 * 4096 + 4) * 2 + 2 * 4096 + (2 * 4096 + 2 * 1024 + 2 * 1024 + 2 * 4096 + 4 * 32) + 2 * 4096 + 2 * 2 * 14336)
        // The head: bf16 logits and an fp32 log-sum-exp, the final norm's input, 1/rms and output, labels.
        XCTAssertEqual(u.headKeptBytesPerToken, 2 * 128256 + 4 + 2 * 4096 + 4 + 2 * 4096 + 8)
        // No checkpoint stays on the device: what the forward leaves does not grow with the layers.
        var deeper = a
        deeper.layers *= 2
        let d = try StepTimeline(model: deeper, options: o, recipe: .unsloth)
        func endOfForward(_ t: StepTimeline) -> Int { t.points.first { $0.phase.hasPrefix("head forward") }!.components["activations"]! }
        XCTAssertEqual(endOfForward(u), endOfForward(d))
        XCTAssertEqual(d.hostBytes, 2 * u.hostBytes)
        XCTAssertEqual(u.hostBytes, 32 * 2048 * 2 * 4096)
        // transformers keeps the fp32 log-softmax and its gradient (12V per token at the head's
        // backward): Unsloth's in-place bf16 gradient is what brings the peak down.
        let hf = try StepTimeline(model: a, options: o)
        XCTAssertGreaterThan(hf.peakBytes - u.peakBytes, 2048 * 8 * 128256)
        XCTAssertThrowsError(try StepTimeline(model: a, options: MemoryOptions(method: .full), recipe: .unsloth))
    }

    /// Unsloth on Qwen3-MoE and Mixtral (from its source): the experts held as `--experts nf4`
    /// holds them (one NF4 Params4bit per projection's stack, as a CPU run of its loader held them
    /// to the byte), no checkpoint on the device, the fused loss's chunk at its 4 GiB cap; gpt-oss
    /// and Llama 4, whose paths are not modelled, and the router refused.
    func testUnslothOnAMixtureOfExperts() throws {
        let a = ModelArchitecture.preset("qwen3-30b-a3b")!
        var o = MemoryOptions(method: .qlora, rank: 16, targets: ModelArchitecture.attentionProjections + ["experts"], seqLen: 2048, gradientCheckpointing: true)
        o.experts = .nf4
        o.quantizedExpertLoRA = true
        let u = try StepTimeline(model: a, options: o, recipe: .unsloth)
        var peft = o
        peft.targets = ModelArchitecture.attentionProjections
        let nf4 = try StepTimeline(model: a, options: peft)
        // The same 4-bit weights; and the expert adapters trained (E·r·(h + 2i) + E·r·(i + h) per layer on top).
        XCTAssertEqual(u.points[0].components["weights"], nf4.points[0].components["weights"])
        XCTAssertEqual(try MemoryEstimate(model: a, options: o).params.trainable - (try MemoryEstimate(model: a, options: peft)).params.trainable,
                       48 * 128 * 16 * ((2048 + 2 * 768) + (768 + 2048)))
        var deeper = a
        deeper.layers *= 2
        let d = try StepTimeline(model: deeper, options: o, recipe: .unsloth)
        func endOfForward(_ t: StepTimeline) -> Int { t.points.first { $0.phase.hasPrefix("head forward") }!.components["activations"]! }
        XCTAssertEqual(endOfForward(u), endOfForward(d))
        XCTAssertEqual(u.hostBytes, 48 * 2048 * 2 * 2048)
        // One chunk while the fp32 logits fit 4 GiB; past it, a multiple of 4 chunks within it.
        XCTAssertEqual(StepTimeline.unslothFusedLossChunkBytes(tokens: 2048, vocab: 151936), 14 * 2048 * 151936)
        XCTAssertEqual(StepTimeline.unslothFusedLossChunkBytes(tokens: 16384, vocab: 151936), 14 * 4096 * 151936)   // 9.3 GiB: 4 chunks
        XCTAssertLessThanOrEqual(StepTimeline.unslothFusedLossChunkBytes(tokens: 1 << 20, vocab: 151936), 14 * (4 << 30) / 4 + 14 * 151936)
        for name in ["gpt-oss-20b", "llama-4-scout"] {
            XCTAssertThrowsError(try StepTimeline(model: ModelArchitecture.preset(name)!, options: peft, recipe: .unsloth), name)
        }
        var router = o
        router.targets.append("router")
        XCTAssertThrowsError(try StepTimeline(model: a, options: router, recipe: .unsloth))
        o.experts = .bf16
        XCTAssertThrowsError(try StepTimeline(model: a, options: o, recipe: .unsloth))
    }
}

/// DoRA's terms beyond plain LoRA (PEFT 0.21.2's DoraLinearLayer; the -dora rows of peaks.json
/// hold the step, these the parts).
final class DoRAMemoryTests: XCTestCase {
    func testMagnitudesAndKeptResults() throws {
        let a = ModelArchitecture.preset("llama-2-7b")!
        let o = MemoryOptions(method: .qlora, rank: 16, seqLen: 1024, gradientCheckpointing: false, dora: true)
        var plain = o
        plain.dora = false
        // One fp32 magnitude per output feature of each adapted projection: 32 × (4·4096 + 2·11008 + 4096).
        let outs = 4 * 4096 + 2 * 11008 + 4096
        XCTAssertEqual(try MemoryEstimate(model: a, options: o).params.trainable - MemoryEstimate(model: a, options: plain).params.trainable, 32 * outs)
        // Per token each module keeps its bf16 base result and fp32 adapter result: 6·out.
        XCTAssertEqual(MemoryEstimate.activationBytesPerToken(a, o) - MemoryEstimate.activationBytesPerToken(a, plain), 6 * outs)
        // The forward's weight norm of down_proj (in 11008, out 4096): x_eye and A·x_eye, then 16·in·out.
        XCTAssertEqual(StepTimeline.doraForwardTransientBytes(a, o, grad: true), 4 * 11008 * 11008 + 4 * 11008 * 16 + 16 * 11008 * 4096)
        XCTAssertThrowsError(try StepTimeline(model: a, options: o, stack: Stack(recipe: .peftKbit)))
        XCTAssertThrowsError(try StepTimeline(model: a, options: MemoryOptions(method: .full, dora: true)))
    }
}
