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

    /// An adapter on a mixture of experts' fused parameters (PEFT's target_parameters) is refused
    /// with one line naming adapter_config.json, not read as if it had none (Vectors/check_interop.py:
    /// an attention adapter on the same models merges as PEFT does).
    func testTargetParametersAdaptersAreRefused() throws {
        let dir = tmp.appendingPathComponent("experts-adapter")
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/peft_adapter"), to: dir)
        let config = dir.appendingPathComponent("adapter_config.json")
        var json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: config)) as? [String: Any])
        XCTAssertNoThrow(try PEFTAdapter.load(directory: dir.path))
        json["target_parameters"] = ["experts.gate_up_proj", "experts.down_proj"]
        try JSONSerialization.data(withJSONObject: json).write(to: config)
        XCTAssertThrowsError(try PEFTAdapter.load(directory: dir.path)) {
            XCTAssertTrue("\($0)".contains("adapter_config.json") && "\($0)".contains("target_parameters (experts.gate_up_proj, experts.down_proj)"), "\($0)")
        }
    }
}
