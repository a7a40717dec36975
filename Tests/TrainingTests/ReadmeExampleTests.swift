import XCTest
import CheckpointFormats
import CheckpointJobs
import Training
import QLoRA
import TestSupport

/// The "one training step" example of Sources/QLoRA/QLoRA.docc/LoRA.md, as written there (so it compiles and runs).
final class ReadmeExampleTests: TemporaryDirectoryTestCase {
    func testOneTrainingStep() throws {
        let dir: URL = tmp
        var rng = SplitMix64(seed: 2)
        let w = (0..<(64 * 128)).map { _ in rng.normal() * 0.05 }
        let q = try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [64, 128]) }
        let x = (0..<(512 * 128)).map { _ in rng.normal() }, dy = (0..<(512 * 64)).map { _ in rng.normal() }

        let base = try Linear4BitWeight(q)                        // q: Quantized4Bit [out, in]
        let layer = try LoRALinear(base: base, config: LoRAConfig(rank: 16, alpha: 32), seed: 0)  // A ~ U(±1/√in), B = 0
        var stateA = AdamWState(count: layer.loraA.count), stateB = AdamWState(count: layer.loraB.count)
        let adamw = AdamWConfig(lr: 2e-4)                        // torch defaults otherwise

        layer.zeroGrad()
        let (y, saved) = try layer.forward(x, tokens: 512)        // x: [512, in] -> y: [512, out]
        let dx = try layer.backward(dy, saved: saved)             // dy: [512, out] -> dx; gradA, gradB accumulate
        var grads = [layer.gradA, layer.gradB]
        try GradientClipping.clipGradNorm(&grads, maxNorm: 1.0)   // throws on NaN/Inf: skip the step
        AdamW.step(param: &layer.loraA, grad: grads[0], state: &stateA, config: adamw)
        AdamW.step(param: &layer.loraB, grad: grads[1], state: &stateB, config: adamw)

        let opt = dir.appendingPathComponent("optimizer.safetensors").path
        try OptimizerCheckpoint(config: adamw, states: ["proj.lora_A": stateA, "proj.lora_B": stateB]).save(to: opt)
        var adapter = PEFTAdapter(rank: 16, loraAlpha: 32, targetModules: ["proj"])
        adapter.modules["proj"] = .init(path: "proj", rank: 16, inFeatures: base.inFeatures, outFeatures: base.outFeatures,
                                        loraA: layer.loraA, loraB: layer.loraB)
        try adapter.save(directory: dir.appendingPathComponent("my-adapter").path)

        XCTAssertEqual(y.count, 512 * 64)
        XCTAssertEqual(dx.count, 512 * 128)
        XCTAssertTrue(layer.loraB.contains { $0 != 0 }, "B moved off zero after one step")
        XCTAssertEqual(try PEFTAdapter.load(directory: dir.appendingPathComponent("my-adapter").path).modules["proj"]?.loraB, layer.loraB)
        XCTAssertEqual(try OptimizerCheckpoint.load(path: opt).states["proj.lora_B"], stateB)
    }
}
