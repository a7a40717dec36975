import CheckpointFormats
import CheckpointJobs
import Foundation
import QLoRA
import SafeTensors
import TestSupport
import XCTest

/// `qlora quantize` on a mixture of experts writes what transformers 5 + bitsandbytes write: the
/// linear modules 4-bit, the experts and the router as they were (Vectors/memory/moe.json: the
/// tensors `save_pretrained` writes for each family, and which of them its 4-bit load makes
/// Linear4bit). Vectors/check_interop.py holds the same files to transformers' own bytes and
/// logits.
final class MixtureOfExpertsCheckpointTests: TemporaryDirectoryTestCase {
    func testQuantizeLeavesExpertsAndRouterAsTransformersDoes() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/memory/moe.json"))
        let families = try XCTUnwrap((try JSONSerialization.jsonObject(with: data) as? [String: Any])?["families"] as? [String: [String: Any]])
        for (family, f) in families {
            let dir = tmp.appendingPathComponent(family)
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            try JSONSerialization.data(withJSONObject: try XCTUnwrap(f["saved_config_json"])).write(to: dir.appendingPathComponent("config.json"))
            // Every tensor save_pretrained writes (patterns with * for a layer or an expert), random bf16.
            let saved = try XCTUnwrap(f["saved_checkpoint_tensors"] as? [String: Any])
            var rng = SplitMix64(seed: 1)
            var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
            for (pattern, value) in saved {
                guard let v = value as? [Any], let shape = v[0] as? [Int], let count = v[1] as? Int else { continue }
                for k in 0..<count {
                    let name = pattern.components(separatedBy: "*").enumerated().map { $0.offset == 0 ? $0.element : "\(k)" + $0.element }.joined()
                    let values = (0..<shape.reduce(1, *)).map { _ in HalfPrecision.bfloat16Bits(Float(rng.normal()) * 0.05) }
                    tensors.append((name, .bf16, shape, values.flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] }))
                }
            }
            try SafeTensorsWriter.write(url: dir.appendingPathComponent("model.safetensors"), tensors: tensors)
            let out = tmp.appendingPathComponent(family + "-nf4").path
            try quantizeCheckpoint(input: dir.path, output: out, options: QuantizeOptions())
            let written = Set(try CheckpointReader(path: out).tensorNames)
            // transformers' 4-bit load: the patterns whose weight is a Linear4bit's packed uint8.
            let rows = try XCTUnwrap((f["load_4bit"] as? [String: Any])?["rows"] as? [[Any]])
            let linear4bit = Set(rows.filter { $0[1] as? String == "Linear4bit" && $0[3] as? String == "uint8" }.map { $0[0] as! String })
            XCTAssertFalse(linear4bit.isEmpty, family)
            for t in tensors {
                let pattern = t.name.replacingOccurrences(of: #"\.(layers|experts)\.\d+\."#, with: ".$1.*.", options: .regularExpression)
                let expected = linear4bit.contains(pattern.replacingOccurrences(of: ".experts.*.", with: ".experts."))
                XCTAssertEqual(written.contains(t.name + ".absmax"), expected, "\(family) \(t.name): 4-bit \(expected ? "expected" : "not expected")")
            }
        }
    }

    /// quantize and merge refuse a model_type qlora does not describe, and a checkpoint that is
    /// already quantized another way (gpt-oss' published MXFP4), with one line naming config.json.
    func testUndescribedOrAlreadyQuantizedCheckpointsAreRefused() throws {
        let dense = repositoryRoot.appendingPathComponent("Vectors/checkpoint/model.safetensors")
        for (name, config, problem) in [("gemma", #"{"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}"#,
                                         "model_type gemma3_text is not described"),
                                        ("mxfp4", #"{"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 256, "quantization_config": {"quant_method": "mxfp4"}}"#,
                                         "already quantized (quantization_config quant_method mxfp4)")] {
            let dir = tmp.appendingPathComponent(name)
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            try Data(config.utf8).write(to: dir.appendingPathComponent("config.json"))
            try FileManager.default.copyItem(at: dense, to: dir.appendingPathComponent("model.safetensors"))
            let out = tmp.appendingPathComponent(name + "-out").path
            XCTAssertThrowsError(try quantizeCheckpoint(input: dir.path, output: out, options: QuantizeOptions())) {
                XCTAssertTrue("\($0)".contains(problem) && "\($0)".contains("config.json"), "\($0)")
            }
            XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        }
    }

    /// PEFT's all-linear on Qwen3-MoE (the attention, and through target_parameters the fused
    /// experts, gate_up_proj at twice the rank, and the router) merged as `merge_and_unload` does:
    /// every tensor of the output has the SHA-256 of PEFT's (Vectors/peft_kinds/moe-all-linear,
    /// generate_moe_merge.py). check_interop.py holds Mixtral's layout the same way.
    func testAllLinearOnAMixtureOfExpertsMatchesPEFT() throws {
        let dir = repositoryRoot.appendingPathComponent("Vectors/peft_kinds/moe-all-linear")
        let adapter = try PEFTAdapter.load(directory: dir.appendingPathComponent("adapter").path)
        XCTAssertEqual(Set(adapter.parameterAdapters.keys), ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                                                             "model.layers.1.mlp.gate.weight"])
        XCTAssertEqual(adapter.parameterAdapters["model.layers.1.mlp.experts.gate_up_proj"]?.rank, 8, "rank_pattern .*\\.gate_up_proj")
        XCTAssertFalse(adapter.isPlainLoRA)
        let out = tmp.appendingPathComponent("merged").path
        try mergeCheckpoint(base: dir.appendingPathComponent("base").path, adapter: dir.appendingPathComponent("adapter").path, output: out, options: MergeOptions())
        let expected = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(contentsOf: dir.appendingPathComponent("expected.json"))) as? [String: Any])?["tensors"] as? [String: [String: Any]])
        let reader = try CheckpointReader(path: out)
        XCTAssertEqual(Set(reader.tensorNames), Set(expected.keys))
        XCTAssertGreaterThan(expected.values.filter { $0["changed"] as? Bool == true }.count, 12)
        for (name, e) in expected {
            XCTAssertEqual(reader.withBytes(of: name) { SHA256.hex($0) }, e["sha256"] as? String, name)
        }
    }

    /// An adapter on fused parameters the file keeps fused (gpt-oss) is refused with one line,
    /// and target_parameters other than the experts and router are refused by name.
    func testTargetParametersItCannotMergeAreRefused() throws {
        let dir = tmp.appendingPathComponent("other-adapter")
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/peft_adapter"), to: dir)
        let config = dir.appendingPathComponent("adapter_config.json")
        var json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: config)) as? [String: Any])
        json["target_parameters"] = ["self_attn.sinks"]
        try JSONSerialization.data(withJSONObject: json).write(to: config)
        XCTAssertThrowsError(try PEFTAdapter.load(directory: dir.path)) {
            XCTAssertTrue("\($0)".contains("adapter_config.json") && "\($0)".contains("target_parameters names self_attn.sinks"), "\($0)")
        }
    }

    /// gpt-oss' MXFP4 experts decoded as transformers' `convert_moe_packed_tensors` decodes them
    /// (Vectors/quant/mxfp4.json, generate_mxfp4.py: SHA-256 of its output for SplitMix64 bytes,
    /// every scale 0–255 included), and `dequantizeCheckpoint` writing them as the bf16
    /// parameters transformers holds after `Mxfp4Config(dequantize=True)`.
    func testMXFP4DecodesAsTransformers() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/quant/mxfp4.json"))
        let cases = try XCTUnwrap((try JSONSerialization.jsonObject(with: data) as? [String: Any])?["cases"] as? [[String: Any]])
        XCTAssertEqual(cases.count, 3)
        for c in cases {
            let (seed, e, o, g) = (c["seed"] as! Int, c["experts"] as! Int, c["out"] as! Int, c["groups"] as! Int)
            var rng = SplitMix64(seed: UInt64(seed))
            let blocks = (0..<(e * o * g * 16)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let scales = (0..<(e * o * g)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let pair = MXFP4.Pair(name: "w", experts: e, out: o, groups: g)
            XCTAssertEqual(pair.shape, c["shape"] as? [Int])
            let bits = blocks.withUnsafeBytes { b in scales.withUnsafeBytes { s in MXFP4.decode(pair, blocks: b, scales: s) } }
            XCTAssertEqual(SHA256.hex(bits.flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] }), c["sha256"] as? String, "seed \(seed)")
            XCTAssertEqual(bits.filter { $0 == 0x8000 }.count, c["negative_zeros"] as? Int, "seed \(seed)")
            if seed == 1 {
                // The job: a checkpoint holding the pair (and a plain tensor) comes out with the
                // decoded tensor under the parameter's name, and config.json without quantization_config.
                let dir = tmp.appendingPathComponent("mxfp4")
                try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
                try Data(#"{"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}"#.utf8).write(to: dir.appendingPathComponent("config.json"))
                let name = "model.layers.0.mlp.experts.gate_up_proj"
                try SafeTensorsWriter.write(url: dir.appendingPathComponent("model.safetensors"),
                                            tensors: [(name + "_blocks", .u8, [e, o, g, 16], blocks), (name + "_scales", .u8, [e, o, g], scales),
                                                      ("model.norm.weight", .bf16, [2], [0, 0x3f, 0, 0x40])])
                let out = tmp.appendingPathComponent("mxfp4-bf16").path
                try dequantizeCheckpoint(input: dir.path, output: out)
                let r = try CheckpointReader(path: out)
                XCTAssertEqual(Set(r.tensorNames), [name, "model.norm.weight"])
                XCTAssertEqual(r.info(named: name)?.shape, [e, g * 32, o])
                XCTAssertEqual(r.withBytes(of: name) { SHA256.hex($0) }, c["sha256"] as? String)
                let config = try String(contentsOfFile: out + "/config.json", encoding: .utf8)
                XCTAssertFalse(config.contains("quantization_config"), config)
            }
        }
    }
}
