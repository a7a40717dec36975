import XCTest
import CheckpointFormats
import QLoRA
import SafeTensors
import TestSupport

final class PEFTAdapterTests: TemporaryDirectoryTestCase {
    var peftDir: String { repositoryRoot.appendingPathComponent("Vectors/peft_adapter").path }

    /// The adapter PEFT's save_pretrained wrote (Vectors/peft_adapter) loads with the same A and B
    /// as the LoRA vectors, and a layer built from it reproduces PEFT's output.
    func testReadsPEFTsOwnAdapter() throws {
        let a = try PEFTAdapter.load(directory: peftDir)
        XCTAssertEqual(a.rank, 8)
        XCTAssertEqual(a.loraAlpha, 16)
        XCTAssertEqual(a.targetModules, ["proj"])
        let m = try XCTUnwrap(a.modules["proj"])
        let v = try VectorFile("lora")
        XCTAssertNil(byteMismatch(rawBytes(m.loraA), v.bytes("r8.lora_A"), name: "lora_A", elementSize: 4))
        XCTAssertNil(byteMismatch(rawBytes(m.loraB), v.bytes("r8.lora_B"), name: "lora_B", elementSize: 4))
        try a.validate(againstBase: ["proj": (48, 128)], baseName: "base")
        let w = v.floats("base.weight")
        let q = try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [48, 128]) }
        let layer = try LoRALinear(base: Linear4BitWeight(q), config: a.config(for: "proj"), loraA: m.loraA, loraB: m.loraB)
        let (y, _) = try layer.forward(v.floats("x"), tokens: 5)
        let want = v.floats("r8.y")
        for i in want.indices { XCTAssertEqual(y[i], want[i], accuracy: 3e-5 * (abs(want[i]) + 0.5), "y[\(i)]") }
    }

    func testSaveLoadRoundTripAndPatterns() throws {
        var a = PEFTAdapter(rank: 4, loraAlpha: 8, targetModules: ["q_proj", "v_proj"])
        a.rankPattern = ["v_proj": 2]
        a.alphaPattern = ["v_proj": 3]
        a.useRSLoRA = true
        let qA: [Float] = (0..<24).map { Float($0) }, qB: [Float] = (0..<20).map { -Float($0) }
        let vA: [Float] = (0..<12).map { Float($0) / 7 }, vB: [Float] = (0..<6).map { Float($0) / 3 }
        let q = "model.layers.0.self_attn.q_proj", v = "model.layers.0.self_attn.v_proj"
        a.modules[q] = PEFTAdapter.Module(path: q, rank: 4, inFeatures: 6, outFeatures: 5, loraA: qA, loraB: qB)
        a.modules[v] = PEFTAdapter.Module(path: v, rank: 2, inFeatures: 6, outFeatures: 3, loraA: vA, loraB: vB)
        let dir = tmp.appendingPathComponent("adapter").path
        try a.save(directory: dir)
        let b = try PEFTAdapter.load(directory: dir)
        XCTAssertEqual(b.modules, a.modules)
        XCTAssertEqual(b.config(for: v), LoRAConfig(rank: 2, alpha: 3, useRSLoRA: true))
        let qScaling: Double = b.config(for: q).scaling
        XCTAssertEqual(qScaling, 4.0)  // rsLoRA: alpha / sqrt(r) = 8 / 2
        let f = try SafeTensorsFile(path: dir + "/adapter_model.safetensors")
        let names: Set<String> = Set(f.tensors.map(\.name))
        let expected: Set<String> = Set([q, v].flatMap { ["base_model.model.\($0).lora_A.weight", "base_model.model.\($0).lora_B.weight"] })
        XCTAssertEqual(names, expected)
        XCTAssertThrowsError(try a.save(directory: dir)) { XCTAssertTrue("\($0)".contains("not empty"), "\($0)") }
    }

    func testBadAdaptersNameTheFileAndProblem() throws {
        // Missing adapter_config.json.
        XCTAssertThrowsError(try PEFTAdapter.load(directory: tmp.path)) { XCTAssertTrue("\($0)".contains("adapter_config.json: missing"), "\($0)") }
        // A rank that disagrees with the config.
        let dir = tmp.appendingPathComponent("bad")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Data(#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["proj"]}"#.utf8).write(to: dir.appendingPathComponent("adapter_config.json"))
        try FileManager.default.copyItem(atPath: peftDir + "/adapter_model.safetensors", toPath: dir.appendingPathComponent("adapter_model.safetensors").path)
        XCTAssertThrowsError(try PEFTAdapter.load(directory: dir.path)) { XCTAssertTrue("\($0)".contains("disagrees with the config's r = 4"), "\($0)") }
        // Keys that do not match the base.
        let a = try PEFTAdapter.load(directory: peftDir)
        XCTAssertThrowsError(try a.validate(againstBase: ["other": (48, 128)], baseName: "model.safetensors")) {
            XCTAssertTrue("\($0)".contains("model.safetensors: tensor 'proj.weight'"), "\($0)")
        }
        XCTAssertThrowsError(try a.validate(againstBase: ["proj": (48, 64)], baseName: "model.safetensors")) {
            XCTAssertTrue("\($0)".contains("does not match"), "\($0)")
        }
        // A tensor that is not a LoRA weight.
        let odd = tmp.appendingPathComponent("odd")
        try FileManager.default.createDirectory(at: odd, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: peftDir + "/adapter_config.json", toPath: odd.appendingPathComponent("adapter_config.json").path)
        try SafeTensorsWriter.write(url: odd.appendingPathComponent("adapter_model.safetensors"), tensors: [(name: "proj.weight", dtype: .f32, shape: [1], bytes: [0, 0, 0, 0])])
        XCTAssertThrowsError(try PEFTAdapter.load(directory: odd.path)) { XCTAssertTrue("\($0)".contains("not a PEFT adapter tensor"), "\($0)") }
    }
}
