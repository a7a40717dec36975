import XCTest
import CheckpointFormats
import QLoRA
import TestSupport

final class OptimizerCheckpointTests: TemporaryDirectoryTestCase {
    /// Five steps, save, load, five more == ten uninterrupted steps, to the bit.
    func testResumeIsBitIdentical() throws {
        let dir: URL = tmp
        var rng = SplitMix64(seed: 4)
        let p0 = (0..<300).map { _ in rng.normal() }
        let grads = (0..<10).map { _ in (0..<300).map { _ in rng.normal() } }
        var config = AdamWConfig()
        config.lr = 2e-4

        var straight = p0, s = AdamWState(count: 300)
        for g in grads { AdamW.step(param: &straight, grad: g, state: &s, config: config) }

        var resumed = p0, r = AdamWState(count: 300)
        for g in grads[0..<5] { AdamW.step(param: &resumed, grad: g, state: &r, config: config) }
        let path = dir.appendingPathComponent("optimizer.safetensors").path
        try OptimizerCheckpoint(config: config, states: ["lora_A": r]).save(to: path)
        let loaded = try OptimizerCheckpoint.load(path: path)
        XCTAssertEqual(loaded.config, config)
        var r2 = try XCTUnwrap(loaded.states["lora_A"])
        XCTAssertEqual(r2, r)
        for g in grads[5...] { AdamW.step(param: &resumed, grad: g, state: &r2, config: loaded.config) }
        XCTAssertEqual(resumed.map(\.bitPattern), straight.map(\.bitPattern))
        XCTAssertEqual(r2, s)

        XCTAssertThrowsError(try OptimizerCheckpoint.load(path: repositoryRoot.appendingPathComponent("Vectors/checkpoint/model.safetensors").path)) {
            XCTAssertTrue("\($0)".contains("not a qlora optimizer checkpoint"), "\($0)")
        }
    }
}
