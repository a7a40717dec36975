import Foundation
import CheckpointFormats
import Memory
import QLoRA
import TestSupport
import XCTest

/// What transformers 5 + bitsandbytes hold after a 4-bit load of Qwen3-MoE, Mixtral and gpt-oss
/// (experts, router, embeddings and norms bf16; attention and dense MLPs NF4), against
/// Vectors/memory/moe.json kind by kind, to the byte: the tiny models as loaded on CPU and the
/// real sizes as built on the meta device.
final class MixtureOfExpertsTests: XCTestCase {
    func testHeldBytesAfterAFourBitLoad() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/memory/moe.json"))
        let families = try XCTUnwrap((try JSONSerialization.jsonObject(with: data) as? [String: Any])?["families"] as? [String: [String: Any]])
        XCTAssertEqual(Set(families.keys), ["qwen3_moe", "mixtral", "gpt_oss"])
        for (name, f) in families {
            // The tiny model, loaded.
            let tiny = try Self.architecture(try XCTUnwrap(f["saved_config_json"] as? [String: Any]), name)
            let kinds = try XCTUnwrap((f["load_4bit"] as? [String: Any])?["by_kind"] as? [String: [String: Any]])
            var want = kinds.mapValues { ($0["bytes"] as! Int) + ($0["quant_state_bytes"] as! Int) }
            want["rotary_buffer"] = nil
            XCTAssertEqual(MemoryEstimate.heldAfterFourBitLoad(tiny), want, "\(name) tiny")
            // The real size.
            let real = try XCTUnwrap(f["real_size"] as? [String: Any])
            let model = try Self.architecture(try XCTUnwrap(real["config"] as? [String: Any]), name)
            let after = try XCTUnwrap(real["after_4bit"] as? [String: Any])
            let held = MemoryEstimate.heldAfterFourBitLoad(model)
            XCTAssertEqual(held, try XCTUnwrap(after["bytes_by_kind"] as? [String: Int]), "\(name) real")
            XCTAssertEqual(held.values.reduce(0, +), after["held_bytes"] as? Int, "\(name) real total")
            // The bf16 load holds every parameter in bf16.
            XCTAssertEqual(2 * model.totalParameters, (real["dense_bf16"] as? [String: Any])?["bytes"] as? Int, "\(name) bf16")
        }
    }

    /// config.json as moe.json recorded it, through qlora's reader.
    static func architecture(_ config: [String: Any], _ name: String) throws -> ModelArchitecture {
        try ModelArchitecture(configData: try JSONSerialization.data(withJSONObject: config), path: name)
    }

    /// The library refuses, as the commands do, to count a model these fields do not describe.
    func testMemoryEstimateRefusesUndescribedModels() {
        let gemma = ModelArchitecture(name: "g", modelType: "gemma2", hiddenSize: 64, intermediateSize: 128, layers: 2, attentionHeads: 4, vocabSize: 256)
        XCTAssertThrowsError(try MemoryEstimate(model: gemma, options: MemoryOptions())) { XCTAssertTrue("\($0)".contains("gemma2 is not described"), "\($0)") }
    }
}
