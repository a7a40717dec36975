import XCTest
import CheckpointFormats
import QLoRA
import TestSupport
import Training

/// A QLoRA training step of each family besides Llama against transformers + bitsandbytes +
/// PEFT (Vectors/families/, made by generate_families.py): logits, loss, every LoRA gradient and
/// 3 AdamW steps, held to LlamaTests' tolerances, which say why they are that size.
final class FamilyTests: XCTestCase {
    func golden(_ family: String) throws -> VectorFile { try VectorFile("golden", directory: "Vectors/families/\(family)") }

    /// transformers' bnb-4bit file of the family, with PEFT's initial adapters.
    func model(_ family: String, _ v: VectorFile) throws -> LlamaModel {
        let directory = repositoryRoot.appendingPathComponent("Vectors/families/\(family)/tiny-nf4").path
        return try LlamaCheckpoint.load(directory: directory, adapter: v.initialAdapter(try LlamaCheckpoint.config(directory: directory)))
    }

    func check(_ family: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let v = try golden(family)
        let m = try model(family, v)
        let ids = v.ints("input_ids"), labels = v.ints("labels")
        var config = AdamWConfig(lr: 1e-3)
        config.weightDecay = 0.01
        var states = m.adapters.map { (AdamWState(count: $0.layer.loraA.count), AdamWState(count: $0.layer.loraB.count)) }
        var losses: [Float] = []
        var worstGrad = 0.0
        for step in 0..<3 {
            m.zeroGrad()
            let (loss, logits, acts) = try m.forward(ids: ids, labels: labels, batch: 2, seq: 16)
            losses.append(loss)
            try m.backward(acts)
            if step == 0 {
                // What `qlora train` checks before allocating: its per-layer count is what this
                // family's real forward keeps, to the byte (Qwen3's q/k norms included).
                let arch = m.config, tokens = 2 * 16
                let plan = try XCTUnwrap(TrainingMemory.estimate(arch, rank: 8, batch: 2, seqLen: 16, checkpointing: false))
                let head = TrainingMemory.headRows(arch, tokens: tokens, chunked: true) * 6 * arch.vocabSize
                XCTAssertEqual(plan.activationBytes - tokens * (4 * arch.hiddenSize + 4) - head, acts.layerBytes,
                               "\(family): TrainingMemory's layers against the forward's exact count", file: file, line: line)
                let lc = relMax(logits, v.floats("logits"))
                XCTAssertLessThan(lc, LlamaTests.logitTolerance, "\(family) logits", file: file, line: line)
                for (path, layer) in m.adapters {
                    for (name, got) in [("lora_A", layer.gradA), ("lora_B", layer.gradB)] {
                        let e = relMax(got, v.floats("grad.\(path).\(name).weight"))
                        worstGrad = max(worstGrad, e)
                        XCTAssertLessThan(e, LlamaTests.gradientTolerance, "\(family) grad \(path) \(name)", file: file, line: line)
                    }
                }
                print(String(format: "%@: logits %.2f, worst LoRA gradient %.2f of the tolerance", family, lc / LlamaTests.logitTolerance, worstGrad / LlamaTests.gradientTolerance))
            }
            for (i, (_, layer)) in m.adapters.enumerated() {
                AdamW.step(param: &layer.loraA, grad: layer.gradA, state: &states[i].0, config: config)
                AdamW.step(param: &layer.loraB, grad: layer.gradB, state: &states[i].1, config: config)
            }
        }
        LlamaTests.assertStepsMatch(m, v, losses: losses, lr: config.lr, label: family, file: file, line: line)
    }

    /// lm_head is the embedding; Llama-3 rope scaling with frequencies in its smoothed and its scaled band.
    func testLlamaTiedEmbeddings() throws { try check("llama-tied") }
    func testMistral() throws { try check("mistral") }
    /// q/k/v biases, added before the base's one bf16 rounding.
    func testQwen2() throws { try check("qwen2") }
    /// Per-head q/k RMSNorm before rope, head_dim 32 against hidden / heads = 16.
    func testQwen3() throws { try check("qwen3") }
    /// Fused qkv_proj and gate_up_proj, adapters on the fused modules.
    func testPhi3() throws { try check("phi3") }
}

/// The config reader names what the decoder cannot run, and training refuses it by that name.
final class UnsupportedFeatureTests: TemporaryDirectoryTestCase {
    func config(_ edit: (inout [String: Any]) -> Void, from family: String = "qwen3") throws -> String {
        let src = repositoryRoot.appendingPathComponent("Vectors/families/\(family)/tiny-nf4/config.json")
        var c = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: src)) as? [String: Any])
        edit(&c)
        let dir = tmp.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try JSONSerialization.data(withJSONObject: c).write(to: dir.appendingPathComponent("config.json"))
        return dir.path
    }

    func testFamiliesAreReadFromTheirConfigs() throws {
        let qwen3 = try ModelArchitecture(configFile: repositoryRoot.appendingPathComponent("Vectors/families/qwen3/tiny-nf4/config.json").path)
        XCTAssertTrue(qwen3.qkNorm)
        XCTAssertEqual(qwen3.headDim, 32)
        XCTAssertEqual(qwen3.projection("q_proj").outFeatures, 128)
        let phi3 = try ModelArchitecture(configFile: repositoryRoot.appendingPathComponent("Vectors/families/phi3/tiny-nf4/config.json").path)
        XCTAssertEqual(phi3.moduleNames, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        XCTAssertEqual(phi3.adaptedModules(["q_proj", "v_proj"]), ["qkv_proj"])
        let qwen2 = try ModelArchitecture(configFile: repositoryRoot.appendingPathComponent("Vectors/families/qwen2/tiny-nf4/config.json").path)
        XCTAssertEqual(qwen2.projections.filter(\.hasBias).map(\.name), ["q_proj", "k_proj", "v_proj"])
        for a in [qwen3, phi3, qwen2] { XCTAssertEqual(a.unsupportedForTraining, [], a.modelType) }
    }

    func testUnsupportedFeaturesAreRefusedByName() throws {
        let cases: [(String, (inout [String: Any]) -> Void)] = [
            ("model_type gemma2 is not supported", { $0["model_type"] = "gemma2" }),
            ("mixture of experts (num_local_experts 8)", { $0["num_local_experts"] = 8 }),
            ("a vision tower (vision_config)", { $0["vision_config"] = [String: Any]() }),
            ("rope type yarn is not supported", { $0["rope_parameters"] = ["rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0] }),
            ("partial_rotary_factor 0.75", { $0["rope_parameters"] = ["rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75] }),
        ]
        for (problem, edit) in cases {
            let dir = try config(edit)
            XCTAssertThrowsError(try LlamaCheckpoint.config(directory: dir), problem) {
                XCTAssertTrue("\($0)".contains(problem) && "\($0)".contains("config.json"), "\($0)")
            }
        }
        // A sliding window matters only beyond it.
        let windowed = try ModelArchitecture(configFile: try config({ $0["model_type"] = "mistral"; $0["sliding_window"] = 8 }) + "/config.json")
        XCTAssertNil(windowed.slidingWindowProblem(seqLen: 8))
        XCTAssertTrue(windowed.slidingWindowProblem(seqLen: 9)?.contains("sliding_window 8") == true)
    }
}
