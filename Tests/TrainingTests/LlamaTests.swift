import XCTest
import CheckpointFormats
import CheckpointJobs
import Training
import QLoRA
import SafeTensors
import TestSupport

/// A QLoRA step through the tiny Llama against transformers + bitsandbytes + PEFT
/// (Vectors/llama, made by Vectors/generate_llama.py).
final class LlamaTests: XCTestCase {
    func golden() throws -> VectorFile { try VectorFile("golden", directory: "Vectors/llama") }

    /// The model of Vectors/llama/tiny-nf4 (transformers' own bnb-4bit file) with PEFT's initial adapters.
    func model(_ v: VectorFile, directory: String = "Vectors/llama/tiny-nf4") throws -> LlamaModel {
        var adapter = PEFTAdapter(rank: 8, loraAlpha: 16, targetModules: ModelArchitecture.projectionNames)
        for l in 0..<2 {
            for p in 0..<7 {
                let path = ModelArchitecture.modulePath(layer: l, projection: p)
                let a = v.info("init.\(path).lora_A.weight"), b = v.info("init.\(path).lora_B.weight")
                adapter.modules[path] = .init(path: path, rank: 8, inFeatures: a.shape[1], outFeatures: b.shape[0],
                                              loraA: v.floats("init.\(path).lora_A.weight"), loraB: v.floats("init.\(path).lora_B.weight"))
            }
        }
        return try LlamaCheckpoint.load(directory: repositoryRoot.appendingPathComponent(directory).path, adapter: adapter)
    }

    /// max |a - b| / max |b|, and how many elements differ by more than `ulps` bf16 ulps of their value.
    func compare(_ got: [Float], _ want: [Float]) -> (relMax: Double, scale: Double) {
        var d = 0.0, s = 0.0
        for i in want.indices { d = max(d, Double(abs(got[i] - want[i]))); s = max(s, Double(abs(want[i]))) }
        return (d / s, s)
    }

    // Tolerances against transformers + PEFT. Every op matches torch to the bit on its own
    // (LlamaOpsTests); through the whole model the fp32 sums inside the 4-bit matmuls run in
    // another order than bitsandbytes', so now and then a bf16 rounding goes the other way, and
    // those one-ulp flips (2^-8 relative) compound through two layers and the head.
    /// max |Δlogit| / max |logit|: about five bf16 ulps.
    static let logitTolerance = 0.02
    /// Relative error of the fp32 loss, computed from logits within `logitTolerance`.
    static let lossTolerance: Float = 2e-3
    /// max |Δgrad| / max |grad| of each LoRA gradient: backward passes the flips through two more
    /// matmuls per layer, so a few times the logits' tolerance.
    static let gradientTolerance = 0.05
    /// After 3 AdamW steps, in units of lr: Adam divides each gradient by its own running RMS, so
    /// an element moves by about ±lr per step whatever its gradient's size; 0.3 lr is what
    /// gradient differences within `gradientTolerance` allow for elements whose gradient is at
    /// least `largeGradient` of their tensor's largest.
    static let adamTolerance = 0.3
    static let largeGradient: Float = 0.1
    /// Of the elements with smaller gradients, the share that may move further: their sign can
    /// follow bf16 noise.
    static let smallGradientOutliers = 0.01

    func testForwardBackwardAndThreeAdamWStepsMatchTransformersPEFT() throws {
        let v = try golden()
        let m = try model(v)
        let ids = v.ints("input_ids"), labels = v.ints("labels")
        let (loss, logits, acts) = try m.forward(ids: ids, labels: labels, batch: 2, seq: 16)
        let wantLoss = v.floats("loss")[0]
        // bf16 activations through two layers: values agree to a few bf16 ulps (2^-8 relative).
        let lc = compare(logits, v.floats("logits"))
        print("logits: max error \(lc.relMax) of max |logit| \(lc.scale); loss \(loss) vs \(wantLoss)")
        XCTAssertLessThan(lc.relMax, Self.logitTolerance)
        XCTAssertEqual(loss, wantLoss, accuracy: Self.lossTolerance * abs(wantLoss))

        try m.backward(acts)
        for (path, layer) in m.adapters {
            for (name, got) in [("lora_A", layer.gradA), ("lora_B", layer.gradB)] {
                let c = compare(got, v.floats("grad.\(path).\(name).weight"))
                XCTAssertLessThan(c.relMax, Self.gradientTolerance, "grad \(path) \(name)")
            }
        }

        // Two more steps on the same batch, AdamW as torch (lr 1e-3, weight decay 0.01).
        var config = AdamWConfig()
        config.lr = 1e-3
        var states = m.adapters.map { (AdamWState(count: $0.layer.loraA.count), AdamWState(count: $0.layer.loraB.count)) }
        var losses = [loss]
        for step in 0..<3 {
            if step > 0 {
                m.zeroGrad()
                let (l, _, a) = try m.forward(ids: ids, labels: labels, batch: 2, seq: 16)
                losses.append(l)
                try m.backward(a)
            }
            for (i, (_, layer)) in m.adapters.enumerated() {
                AdamW.step(param: &layer.loraA, grad: layer.gradA, state: &states[i].0, config: config)
                AdamW.step(param: &layer.loraB, grad: layer.gradB, state: &states[i].1, config: config)
            }
        }
        Self.assertStepsMatch(m, v, losses: losses, lr: config.lr, label: "llama")
    }

    /// The losses of three AdamW steps and the adapters after them against the golden run
    /// (`step_losses`, `step3.*`): elements with a large gradient each within `adamTolerance`
    /// lr, the rest allowed `smallGradientOutliers` beyond it. FamilyTests uses it too.
    static func assertStepsMatch(_ m: LlamaModel, _ v: VectorFile, losses: [Float], lr: Double, label: String,
                                 file: StaticString = #filePath, line: UInt = #line) {
        for (g, w) in zip(losses, v.floats("step_losses")) {
            XCTAssertEqual(g, w, accuracy: lossTolerance * abs(w), "\(label) loss", file: file, line: line)
        }
        var total = 0, far = 0
        for (path, layer) in m.adapters {
            for (name, got) in [("lora_A", layer.loraA), ("lora_B", layer.loraB)] {
                let want = v.floats("step3.\(path).\(name).weight"), grad = v.floats("grad.\(path).\(name).weight")
                let gmax = grad.map { abs($0) }.max()!
                for i in want.indices {
                    let d = Double(abs(got[i] - want[i])) / lr  // in units of lr
                    total += 1
                    if abs(grad[i]) >= largeGradient * gmax {
                        XCTAssertLessThan(d, adamTolerance, "\(label) step 3 \(path) \(name)[\(i)]", file: file, line: line)
                    } else if d > adamTolerance { far += 1 }
                }
            }
        }
        XCTAssertLessThan(Double(far), smallGradientOutliers * Double(total),
                          "\(label): \(far) of \(total) small-gradient elements beyond \(adamTolerance) lr", file: file, line: line)
    }
}

extension LlamaTests {
    /// Checkpointing recomputes each layer in backward, and the chunked loss (`HeadLoss`, the
    /// trainer's default) runs the head a few tokens at a time: the same loss and gradients to the
    /// bit as the unchunked step the tests above hold to transformers. The dense bf16 checkpoint,
    /// quantized on load, is the same model as transformers' bnb-4bit file.
    func testCheckpointingChunkedLossAndDenseLoadGiveTheSameStep() throws {
        let v = try golden()
        let ids = v.ints("input_ids"), labels = v.ints("labels")
        var grads: [[Float]] = [], losses: [Float] = []
        let runs: [(String, Bool, Int?)] = [("Vectors/llama/tiny-nf4", false, nil), ("Vectors/llama/tiny-nf4", true, nil), ("Vectors/llama/tiny", false, nil),
                                            ("Vectors/llama/tiny-nf4", false, 5), ("Vectors/llama/tiny-nf4", true, 1)]
        for (dir, gc, chunk) in runs {
            let m = try model(v, directory: dir)
            let (loss, logits, a) = try m.forward(ids: ids, labels: labels, batch: 2, seq: 16, checkpointing: gc, headChunkRows: chunk)
            XCTAssertEqual(logits.isEmpty, chunk != nil, "logits are returned only by the unchunked path")
            try m.backward(a)
            grads.append(m.adapters.flatMap { $0.layer.gradA + $0.layer.gradB })
            losses.append(loss)
            if gc { XCTAssertLessThan(a.byteCount * 3, try m.forward(ids: ids, labels: labels, batch: 2, seq: 16).activations.byteCount) }
        }
        for (i, what) in [(1, "checkpointing"), (2, "dense checkpoint quantized on load"), (3, "chunked loss"), (4, "chunked loss with checkpointing")] {
            XCTAssertEqual(grads[0].map(\.bitPattern), grads[i].map(\.bitPattern), what)
            XCTAssertEqual(losses[0].bitPattern, losses[i].bitPattern, "\(what): loss")
        }
    }
}
