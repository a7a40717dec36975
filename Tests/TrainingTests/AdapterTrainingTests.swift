import XCTest
import CheckpointFormats
import QLoRA
import SafeTensors
import TestSupport
import Training

/// Training a DoRA adapter on the 4-bit base (`qlora train --dora`) against PEFT 0.21.2 +
/// transformers + bitsandbytes (Vectors/llama/golden-dora.safetensors and
/// Vectors/families/qwen2/golden-dora.safetensors, made by generate_adapter_training.py in train
/// mode): logits, loss, the gradients of A, B and the magnitude, and 3 AdamW steps, held to
/// LlamaTests' tolerances (which say why they are that size), and the adapter qlora saves
/// against the one PEFT saved after those steps.
final class AdapterTrainingTests: TemporaryDirectoryTestCase {
    /// (the base directory, the plain golden holding the initial A and B, the DoRA golden, PEFT's saved adapter)
    static let cases = [
        ("llama", "Vectors/llama/tiny-nf4", "Vectors/llama", "Vectors/llama/adapter-dora"),
        ("qwen2", "Vectors/families/qwen2/tiny-nf4", "Vectors/families/qwen2", "Vectors/families/qwen2/adapter-dora"),
    ]

    func testDoRAStepsMatchPEFT() throws {
        for (family, base, dir, saved) in Self.cases {
            let plain = try VectorFile("golden", directory: dir), v = try VectorFile("golden-dora", directory: dir)
            let directory = repositoryRoot.appendingPathComponent(base).path
            let arch = try LlamaCheckpoint.config(directory: directory)
            var adapter = plain.initialAdapter(arch)
            adapter.useDora = true
            for path in adapter.modules.keys { adapter.modules[path]!.magnitude = v.floats("init.\(path).lora_magnitude_vector.weight") }
            let m = try LlamaCheckpoint.load(directory: directory, adapter: adapter)
            let ids = v.ints("input_ids"), labels = v.ints("labels")
            let lc = relMax(try m.forward(ids: ids, labels: labels, batch: 2, seq: 16).logits, v.floats("logits"))
            XCTAssertLessThan(lc, LlamaTests.logitTolerance, "\(family) logits")
            // Three steps of the trainer `qlora train` runs: AdamW on A, B and the magnitudes.
            let examples = (0..<2).map { b in TrainingExample(inputIds: Array(ids[(b * 16)..<((b + 1) * 16)]), labels: Array(labels[(b * 16)..<((b + 1) * 16)])) }
            let config = AdamWConfig(lr: 1e-3, weightDecay: 0.01)
            let trainer = LlamaTrainer(model: m, optimizer: config)
            var losses: [Float] = []
            for step in 0..<3 {
                losses.append(try trainer.step([examples], seq: 16).loss)
                if step == 0 {
                    var worst = 0.0
                    for (path, layer) in m.adapters {
                        for (name, got) in [("lora_A.weight", layer.gradA), ("lora_B.weight", layer.gradB), ("lora_magnitude_vector.weight", layer.gradMagnitude)] {
                            let e = relMax(got, v.floats("grad.\(path).\(name)"))
                            worst = max(worst, e)
                            XCTAssertLessThan(e, LlamaTests.gradientTolerance, "\(family) grad \(path) \(name)")
                        }
                    }
                    print(String(format: "%@ DoRA: logits %.2f, worst gradient %.2f of the tolerance", family, lc / LlamaTests.logitTolerance, worst / LlamaTests.gradientTolerance))
                }
            }
            for (g, w) in zip(losses, v.floats("step_losses")) {
                XCTAssertEqual(g, w, accuracy: LlamaTests.lossTolerance * abs(w), "\(family) loss")
            }
            // After 3 steps: the adapter qlora saves against PEFT's, within LlamaTests' AdamW tolerance
            // for elements with a large gradient.
            let ours = tmpDirectory().appendingPathComponent("\(family)-dora")
            try LlamaCheckpoint.adapter(of: m).save(directory: ours.path)
            let mine = try PEFTAdapter.load(directory: ours.path), peft = try PEFTAdapter.load(directory: repositoryRoot.appendingPathComponent(saved).path)
            XCTAssertTrue(mine.useDora && peft.useDora)
            XCTAssertEqual(Set(mine.modules.keys), Set(peft.modules.keys))
            var total = 0, far = 0
            for (path, p) in peft.modules {
                let q = mine.modules[path]!
                for (name, got, want) in [("lora_A", q.loraA, p.loraA), ("lora_B", q.loraB, p.loraB), ("lora_magnitude_vector", q.magnitude!, p.magnitude!)] {
                    let grad = v.floats("grad.\(path).\(name).weight"), gmax = grad.map { abs($0) }.max()!
                    for i in want.indices {
                        let d = Double(abs(got[i] - want[i])) / config.lr
                        total += 1
                        if abs(grad[i]) >= LlamaTests.largeGradient * gmax {
                            XCTAssertLessThan(d, LlamaTests.adamTolerance, "\(family) step 3 \(path) \(name)[\(i)]")
                        } else if d > LlamaTests.adamTolerance { far += 1 }
                    }
                }
            }
            XCTAssertLessThan(Double(far), LlamaTests.smallGradientOutliers * Double(total), "\(family): \(far) of \(total) small-gradient elements beyond tolerance")
        }
    }

    /// modules_to_save (lm_head on Llama and Qwen2, embed_tokens on Llama): the module trained
    /// whole as a bf16 copy beside the LoRA adapters, against PEFT's goldens: the losses of 3
    /// AdamW steps, the module's bf16 gradient, and the module and adapters qlora saves after
    /// them against PEFT's saved adapter.
    func testModulesToSaveStepsMatchPEFT() throws {
        for (family, base, dir, module, golden) in [
            ("llama", "Vectors/llama/tiny-nf4", "Vectors/llama", LlamaModel.WholeModule.lmHead, "modules-to-save"),
            ("qwen2", "Vectors/families/qwen2/tiny-nf4", "Vectors/families/qwen2", .lmHead, "modules-to-save"),
            ("llama", "Vectors/llama/tiny-nf4", "Vectors/llama", .embedTokens, "modules-to-save-embed"),
        ] {
            let plain = try VectorFile("golden", directory: dir), v = try VectorFile("golden-" + golden, directory: dir)
            let directory = repositoryRoot.appendingPathComponent(base).path
            let arch = try LlamaCheckpoint.config(directory: directory)
            let m = try LlamaCheckpoint.load(directory: directory, adapter: plain.initialAdapter(arch), modulesToSave: [module])
            XCTAssertEqual(m.trainedModules, [module])
            let ids = v.ints("input_ids"), labels = v.ints("labels")
            let examples = (0..<2).map { b in TrainingExample(inputIds: Array(ids[(b * 16)..<((b + 1) * 16)]), labels: Array(labels[(b * 16)..<((b + 1) * 16)])) }
            let trainer = LlamaTrainer(model: m, optimizer: AdamWConfig(lr: 1e-3, weightDecay: 0.01))
            var losses: [Float] = []
            for step in 0..<3 {
                losses.append(try trainer.step([examples], seq: 16).loss)
                if step == 0 {
                    let got = module == .lmHead ? m.gradLMHead : m.gradEmbedTokens
                    let want = v.withElements("grad.\(module.tensorName.dropLast(".weight".count)).modules_to_save.weight") { e in (0..<e.count).map { e[$0] } }
                    let e = relMax(got, want)
                    XCTAssertLessThan(e, LlamaTests.gradientTolerance, "\(family) \(module.rawValue) gradient")
                    print(String(format: "%@ %@: gradient %.2f of the tolerance", family, module.rawValue, e / LlamaTests.gradientTolerance))
                }
            }
            for (g, w) in zip(losses, v.floats("step_losses")) {
                XCTAssertEqual(g, w, accuracy: LlamaTests.lossTolerance * abs(w), "\(family) \(module.rawValue) loss")
            }
            // The module qlora saves after 3 steps against PEFT's: bf16 values within a bf16 step
            // of lr-sized AdamW moves (elements move by about lr per step, each rounded to bf16).
            let ours = tmpDirectory().appendingPathComponent("\(family)-\(golden)")
            try LlamaCheckpoint.adapter(of: m).save(directory: ours.path)
            let mine = try PEFTAdapter.load(directory: ours.path)
            let peft = try PEFTAdapter.load(directory: repositoryRoot.appendingPathComponent("\(dir)/adapter-\(golden)").path)
            XCTAssertEqual(mine.modulesToSave, [module.rawValue])
            XCTAssertEqual(peft.modulesToSave, [module.rawValue])
            let (a, b) = (try XCTUnwrap(mine.savedTensors[module.tensorName]), try XCTUnwrap(peft.savedTensors[module.tensorName]))
            XCTAssertEqual(a.shape, b.shape)
            let x = a.bytes.withUnsafeBytes { loadFloats($0, as: .bfloat16) }, y = b.bytes.withUnsafeBytes { loadFloats($0, as: .bfloat16) }
            var far = 0
            for i in y.indices where abs(x[i] - y[i]) > Float(LlamaTests.adamTolerance * 1e-3) + abs(y[i]) * Self.bf16Step { far += 1 }
            XCTAssertLessThan(Double(far), LlamaTests.smallGradientOutliers * Double(y.count), "\(family) \(module.rawValue): \(far) of \(y.count) elements apart")
        }
    }

    /// One bf16 rounding step relative to the value (2⁻⁸): two bf16 AdamW runs whose inputs
    /// differ in the last bits may round an element's update apart by one step.
    static let bf16Step: Float = 1.0 / 256

    /// New DoRA adapters start from PEFT's magnitude: the row norms of the dequantized bf16
    /// weight (B is zero), rounded to bf16.
    func testNewDoRAAdaptersStartAtTheWeightNorm() throws {
        let directory = repositoryRoot.appendingPathComponent("Vectors/llama/tiny-nf4").path
        let m = try LlamaCheckpoint.load(directory: directory, rank: 8, alpha: 16, dora: true)
        let v = try VectorFile("golden-dora", directory: "Vectors/llama")
        for (path, layer) in m.adapters {
            XCTAssertEqual(layer.magnitude, v.floats("init.\(path).lora_magnitude_vector.weight"), path)
        }
    }

    /// A fresh directory inside the test's `tmp` (removed with it after the test).
    func tmpDirectory() -> URL {
        let u = tmp.appendingPathComponent(UUID().uuidString)
        try? FileManager.default.createDirectory(at: u, withIntermediateDirectories: true)
        return u
    }
}
