import CheckpointFormats
import CheckpointJobs
import Foundation
import GGUF
import QLoRA
import SafeTensors
import TestSupport
import XCTest

/// `qlora export` against llama.cpp's convert_hf_to_gguf.py + llama-quantize, to the byte
/// (Vectors/gguf/quantize.json, made by Vectors/generate_gguf_quantize.py).
final class GGUFQuantizeTests: XCTestCase {
    var golden: [String: Any] = [:]

    override func setUpWithError() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/gguf/quantize.json"))
        golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    /// The `small` config of generate_gguf_quantize.py.
    static let smallConfig = """
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 256,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,
         "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
        """

    /// generate_gguf_quantize.py's `small_weights` (TestSupport's `smallWeights`).
    static func smallWeights(_ name: String, _ count: Int) -> [UInt16] { TestSupport.smallWeights(name, count) }

    /// The `small` checkpoint directory with the tiny SentencePiece tokenizer.
    static func smallCheckpoint(_ dir: URL) throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let (h, f, kv, layers, vocab) = (256, 512, 64, 4, 256)
        var shapes: [(String, [Int])] = [("model.embed_tokens.weight", [vocab, h]), ("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]
        for l in 0..<layers {
            let p = "model.layers.\(l)."
            shapes += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                       (p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]),
                       (p + "self_attn.o_proj.weight", [h, h]), (p + "mlp.gate_proj.weight", [f, h]), (p + "mlp.up_proj.weight", [f, h]),
                       (p + "mlp.down_proj.weight", [h, f])]
        }
        let w = try SafeTensorsWriter(url: dir.appendingPathComponent("model.safetensors"), tensors: shapes.map { ($0.0, DType.bf16, $0.1) }, metadata: ["format": "pt"])
        for (name, shape) in shapes {
            let bits = smallWeights(name, shape.reduce(1, *))
            try bits.withUnsafeBytes { try w.write(name, bytes: $0) }
        }
        try w.finish()
        try Data(smallConfig.utf8).write(to: dir.appendingPathComponent("config.json"))
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/tokenizer.model"), to: dir.appendingPathComponent("tokenizer.model"))
    }

    static func tinyCheckpoint(_ dir: URL) throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for f in ["config.json", "model.safetensors"] {
            try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/llama/tiny/" + f), to: dir.appendingPathComponent(f))
        }
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/tokenizer.model"), to: dir.appendingPathComponent("tokenizer.model"))
    }

    /// Exports `model` as `type` and compares the file with the golden: every tensor's name, type,
    /// dimensions and bytes, the metadata keys in order, and the whole file.
    func check(_ model: String, _ dir: URL, _ type: GGUFExportType, goldenKey: String, dequantized: Bool = true) throws {
        let want = try XCTUnwrap((golden[model] as? [String: Any])?[goldenKey] as? [String: Any], "\(model) \(goldenKey)")
        let out = dir.deletingLastPathComponent().appendingPathComponent("\(model)-\(type.rawValue).gguf")
        let summary = try exportGGUF(base: dir.path, output: out.path, type: type)
        let data = try Data(contentsOf: out)
        XCTAssertEqual(summary.bytesWritten, data.count, "\(model) \(type): bytes reported")
        try assertGGUF(data, path: out.path, equals: want, "\(model) \(type)", dequantized: dequantized)
    }

    /// The other families, exported from their NF4 checkpoints (Vectors/gguf/families.json: the
    /// converter and llama-quantize on transformers' dequantization of the same files).
    func testFamiliesExportAsTheConverterWritesThem() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/gguf/families.json"))
        golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("gguf-families-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: tmp) }
        for family in ["mistral", "qwen2", "qwen3", "phi3"] {
            let dir = tmp.appendingPathComponent(family).appendingPathComponent("tiny")
            try FileManager.default.createDirectory(at: dir.deletingLastPathComponent(), withIntermediateDirectories: true)
            try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/families/\(family)/tiny-nf4"), to: dir)
            try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/tokenizer.model"), to: dir.appendingPathComponent("tokenizer.model"))
            try check(family, dir, .bf16, goldenKey: "auto", dequantized: false)
            try check(family, dir, .q4_k_m, goldenKey: "q4_k_m", dequantized: false)
        }
        // A LongRoPE Phi-3 (generate_gguf_families.py's phi3_longrope), its weights from the names.
        let dir = tmp.appendingPathComponent("phi3-longrope").appendingPathComponent("tiny")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        var config = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/families/phi3/tiny-nf4/config.json"))) as? [String: Any])
        config["quantization_config"] = nil
        config["max_position_embeddings"] = 1024
        config["original_max_position_embeddings"] = 256
        config["rope_parameters"] = ["rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                     "long_factor": [1.0, 1.25, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0], "short_factor": [1.0, 1.0, 1.0, 1.0625, 1.125, 1.25, 1.5, 2.0]]
        try JSONSerialization.data(withJSONObject: config).write(to: dir.appendingPathComponent("config.json"))
        var shapes: [(String, [Int])] = [("model.embed_tokens.weight", [256, 64]), ("model.norm.weight", [64]), ("lm_head.weight", [256, 64])]
        for l in 0..<2 {
            let p = "model.layers.\(l)."
            shapes += [(p + "input_layernorm.weight", [64]), (p + "post_attention_layernorm.weight", [64]), (p + "self_attn.qkv_proj.weight", [128, 64]),
                       (p + "self_attn.o_proj.weight", [64, 64]), (p + "mlp.gate_up_proj.weight", [256, 64]), (p + "mlp.down_proj.weight", [64, 128])]
        }
        let w = try SafeTensorsWriter(url: dir.appendingPathComponent("model.safetensors"), tensors: shapes.map { ($0.0, DType.bf16, $0.1) }, metadata: ["format": "pt"])
        for (name, shape) in shapes { try Self.smallWeights(name, shape.reduce(1, *)).withUnsafeBytes { try w.write(name, bytes: $0) } }
        try w.finish()
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/tokenizer.model"), to: dir.appendingPathComponent("tokenizer.model"))
        try check("phi3-longrope", dir, .bf16, goldenKey: "auto", dequantized: false)
        try check("phi3-longrope", dir, .q4_k_m, goldenKey: "q4_k_m", dequantized: false)
    }

    /// generate_gguf_moe.py's checkpoint of `family`: its config.json, each tensor's bf16 bits from
    /// its name, and the tokenizer the converter reads for it.
    static func expertCheckpoint(_ family: String, _ dir: URL) throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let configURL = repositoryRoot.appendingPathComponent("Vectors/gguf/moe/\(family)/config.json")
        try FileManager.default.copyItem(at: configURL, to: dir.appendingPathComponent("config.json"))
        let c = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: configURL)) as? [String: Any])
        let (h, heads, kv, headDim, layers, i) = (256, 4, 2, 64, 2, 256)
        let v = try XCTUnwrap(c["vocab_size"] as? Int), e = try XCTUnwrap(c["num_experts"] as? Int ?? c["num_local_experts"] as? Int)
        let (q, k) = (heads * headDim, kv * headDim)
        var shapes: [(String, [Int])] = [("model.embed_tokens.weight", [v, h]), ("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
        for l in 0..<layers {
            let p = "model.layers.\(l)."
            shapes += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [q, h]),
                       (p + "self_attn.k_proj.weight", [k, h]), (p + "self_attn.v_proj.weight", [k, h]), (p + "self_attn.o_proj.weight", [h, q])]
            switch family {
            case "qwen3_moe":
                shapes += [(p + "self_attn.q_norm.weight", [headDim]), (p + "self_attn.k_norm.weight", [headDim]), (p + "mlp.gate.weight", [e, h])]
                for x in 0..<e {
                    shapes += [(p + "mlp.experts.\(x).gate_proj.weight", [i, h]), (p + "mlp.experts.\(x).up_proj.weight", [i, h]), (p + "mlp.experts.\(x).down_proj.weight", [h, i])]
                }
            case "mixtral":
                shapes.append((p + "block_sparse_moe.gate.weight", [e, h]))
                for x in 0..<e {
                    let m = p + "block_sparse_moe.experts.\(x)."
                    shapes += [(m + "w1.weight", [i, h]), (m + "w3.weight", [i, h]), (m + "w2.weight", [h, i])]
                }
            default:
                shapes += [(p + "self_attn.q_proj.bias", [q]), (p + "self_attn.k_proj.bias", [k]), (p + "self_attn.v_proj.bias", [k]), (p + "self_attn.o_proj.bias", [h]),
                           (p + "self_attn.sinks", [heads]), (p + "mlp.router.weight", [e, h]), (p + "mlp.router.bias", [e]),
                           (p + "mlp.experts.gate_up_proj", [e, h, 2 * i]), (p + "mlp.experts.gate_up_proj_bias", [e, 2 * i]),
                           (p + "mlp.experts.down_proj", [e, i, h]), (p + "mlp.experts.down_proj_bias", [e, h])]
            }
        }
        let w = try SafeTensorsWriter(url: dir.appendingPathComponent("model.safetensors"), tensors: shapes.map { ($0.0, DType.bf16, $0.1) }, metadata: ["format": "pt"])
        for (name, shape) in shapes { try smallWeights(name, shape.reduce(1, *)).withUnsafeBytes { try w.write(name, bytes: $0) } }
        try w.finish()
        let tokenizer = family == "mixtral" ? ["llama-tiny/tokenizer.model"] : ["bpe/qwen2/tokenizer.json", "bpe/qwen2/tokenizer_config.json"]
        for f in tokenizer {
            let from = repositoryRoot.appendingPathComponent("Vectors/gguf/" + f)
            try FileManager.default.copyItem(at: from, to: dir.appendingPathComponent(from.lastPathComponent))
        }
    }

    /// Qwen3-MoE, Mixtral (8 experts: llama-quantize's attention rules for them) and gpt-oss as
    /// the converter and llama-quantize write them (Vectors/gguf/moe.json): each tensor's type in
    /// order, the size and the whole file's bytes.
    func testMixturesOfExpertsExportAsTheConverterWritesThem() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/gguf/moe.json"))
        let golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("gguf-moe-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: tmp) }
        for family in ["qwen3_moe", "mixtral", "gpt_oss"] {
            let dir = tmp.appendingPathComponent(family).appendingPathComponent("tiny")
            try Self.expertCheckpoint(family, dir)
            for (type, key) in [(GGUFExportType.bf16, "auto"), (.q4_k_m, "q4_k_m")] {
                let want = try XCTUnwrap((golden[family] as? [String: Any])?[key] as? [String: Any], "\(family) \(key)")
                let out = tmp.appendingPathComponent("\(family)-\(key).gguf")
                let summary = try exportGGUF(base: dir.path, output: out.path, type: type)
                let file = try Data(contentsOf: out)
                let gguf = try GGUFFile(bytes: file, file: out.path)
                XCTAssertEqual(gguf.header.tensors.map { "\($0.name) \($0.type.description)" }, want["tensors"] as? [String], "\(family) \(key): tensors and types")
                XCTAssertEqual(summary.bytesWritten, file.count)
                XCTAssertEqual(file.count, want["bytes"] as? Int, "\(family) \(key): size")
                XCTAssertEqual(SHA256.hex([UInt8](file)), want["sha256"] as? String, "\(family) \(key): the file's bytes")
            }
        }
    }

    func testExportIsConvertThenLlamaQuantizeToTheByte() throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("gguf-quantize-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let tiny = tmp.appendingPathComponent("tiny"), small = tmp.appendingPathComponent("small")
        try Self.tinyCheckpoint(tiny)
        try Self.smallCheckpoint(small)
        for (model, dir) in [("tiny", tiny), ("small", small)] {
            try check(model, dir, .bf16, goldenKey: "auto")  // --outtype auto is bf16 for a bf16 checkpoint
            for type in [GGUFExportType.q8_0, .q4_0, .q4_k_m, .iq4_nl] {
                try check(model, dir, type, goldenKey: type.rawValue)
            }
        }
    }
}

/// `exportLoRAGGUF` against convert_lora_to_gguf.py (Vectors/gguf/lora.json, made by
/// Vectors/generate_gguf_lora.py), to the byte.
final class LoRAGGUFTests: XCTestCase {
    /// generate_gguf_lora.py's adapter: rank 4 on the seven projections of Vectors/llama/tiny, bf16
    /// values from `GGUFQuantizeTests.smallWeights`.
    static func writeAdapter(_ dir: URL) throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/gguf/lora/adapter_config.json"), to: dir.appendingPathComponent("adapter_config.json"))
        let dims: [(String, Int, Int)] = [("q_proj", 64, 64), ("k_proj", 64, 32), ("v_proj", 64, 32), ("o_proj", 64, 64), ("gate_proj", 64, 128), ("up_proj", 64, 128), ("down_proj", 128, 64)]
        var shapes: [(String, [Int])] = []
        for layer in 0..<2 {
            for (module, n_in, n_out) in dims {
                let group = ["gate_proj", "up_proj", "down_proj"].contains(module) ? "mlp" : "self_attn"
                let p = "base_model.model.model.layers.\(layer).\(group).\(module)"
                shapes += [(p + ".lora_A.weight", [4, n_in]), (p + ".lora_B.weight", [n_out, 4])]
            }
        }
        let w = try SafeTensorsWriter(url: dir.appendingPathComponent("adapter_model.safetensors"), tensors: shapes.map { ($0.0, DType.bf16, $0.1) }, metadata: ["format": "pt"])
        for (name, shape) in shapes {
            try GGUFQuantizeTests.smallWeights(name, shape.reduce(1, *)).withUnsafeBytes { try w.write(name, bytes: $0) }
        }
        try w.finish()
    }

    func testLoRAGGUFIsTheConvertersToTheByte() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/gguf/lora.json"))
        let golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("lora-gguf-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let adapter = tmp.appendingPathComponent("adapter")
        try Self.writeAdapter(adapter)
        for outType in GGUFOutType.allCases {
            let want = try XCTUnwrap(golden[outType.rawValue] as? [String: Any])
            let out = tmp.appendingPathComponent("lora-\(outType.rawValue).gguf")
            let s = try exportLoRAGGUF(adapter: adapter.path, base: repositoryRoot.appendingPathComponent("Vectors/llama/tiny").path, output: out.path, type: outType)
            XCTAssertEqual(s.modules, 14)
            try assertGGUF(try Data(contentsOf: out), path: out.path, equals: want, "\(outType)", dequantized: false)
        }
    }
}

/// The export's threaded encoding writes the bytes one thread writes (rows are quantized on their own).
final class GGUFExportEncodingTests: XCTestCase {
    /// The GGUF module's block table (what a reader sizes tensors by) and the quantizers' (what
    /// the writer fills) are two tables in two modules: they must agree for every type.
    func testEveryTypesBlockIsItsQuantizersBlock() {
        for t in GGMLType.allCases {
            XCTAssertEqual(GGMLQuants.byteCount(t.block.elements, as: LlamaQuantize.encoding(t)), t.block.bytes, "\(t)")
            XCTAssertEqual(GGMLQuants.byteCount(t.block.elements - 1, as: LlamaQuantize.encoding(t)), 0, "\(t): \(t.block.elements) values a block")
        }
    }

    /// A finite value past f16's range becomes inf in the converter's f16 file, which llama-quantize
    /// refuses: so does the export (it would otherwise write zeros for it).
    func testAnF16ReadBackPastTheRangeIsRefused() {
        var x = [Float](repeating: 0.5, count: 64)
        x[37] = 70_000
        XCTAssertNoThrow(try GGUFExportEncoding.encode(x, ne: [64], convertedAs: .f16, final: .f16))
        XCTAssertThrowsError(try GGUFExportEncoding.encode(x, ne: [64], convertedAs: .f16, final: .q8_0)) {
            XCTAssertEqual(($0 as? GGUFExportEncoding.NonFinite)?.index, 37)
        }
        XCTAssertNoThrow(try GGUFExportEncoding.encode(x, ne: [64], convertedAs: .bf16, final: .q8_0), "bf16 holds it")
    }

    func testThreadsDoNotChangeTheBytes() throws {
        let (rows, cols) = (101, 512)  // 16 rows a part at least: up to 6 parts
        let bits = GGUFQuantizeTests.smallWeights("threads", rows * cols)
        let x = bits.map { HalfPrecision.float(bfloat16Bits: $0) }
        for type in [GGMLType.q4_K, .q6_K, .iq4_nl, .q8_0, .q5_0] {
            let one = try GGUFExportEncoding.encode(x, ne: [cols, rows], convertedAs: .bf16, final: type, threads: 1)
            for threads in [2, 3, 8] {
                XCTAssertEqual(try GGUFExportEncoding.encode(x, ne: [cols, rows], convertedAs: .bf16, final: type, threads: threads), one, "\(type), \(threads) threads")
            }
        }
    }
}

/// A GGUF file against a golden's description (generate_gguf_quantize.py's `describe`): the reader
/// round-trips the header; every tensor's name, order, type, dimensions and bytes (and with
/// `dequantized`, its values as the gguf package dequantizes them); the metadata keys in order;
/// the size and the whole file's sha256.
func assertGGUF(_ data: Data, path: String, equals want: [String: Any], _ label: String, dequantized: Bool,
                file: StaticString = #filePath, line: UInt = #line) throws {
    let gguf = try GGUFFile(bytes: data, file: path)
    XCTAssertEqual(gguf.header.encoded(), [UInt8](data.prefix(gguf.dataOffset)), "\(label): the reader round-trips the header", file: file, line: line)
    let wantTensors = try XCTUnwrap(want["tensors"] as? [[Any]], file: file, line: line)
    XCTAssertEqual(gguf.header.tensors.map(\.name), wantTensors.map { $0[0] as! String }, "\(label): tensor order", file: file, line: line)
    for (t, w) in zip(gguf.header.tensors, wantTensors) {
        XCTAssertEqual(t.type.description, w[1] as? String, "\(label) \(t.name): type", file: file, line: line)
        XCTAssertEqual(t.ne, w[2] as? [Int], "\(label) \(t.name): dimensions", file: file, line: line)
        let bytes = gguf.data(of: t)
        XCTAssertEqual(SHA256.hex(Array(bytes)), w[3] as? String, "\(label) \(t.name): bytes", file: file, line: line)
        if dequantized {
            // Its values as the gguf package dequantizes them (fp32, little-endian).
            let values = bytes.withUnsafeBytes { GGMLQuants.decode($0, as: LlamaQuantize.encoding(t.type), count: t.ne.reduce(1, *)) }
            XCTAssertEqual(SHA256.hex(values.withUnsafeBytes { Array($0) }), w[4] as? String, "\(label) \(t.name): dequantized values", file: file, line: line)
        }
    }
    XCTAssertEqual(gguf.metadata.map(\.key), (want["metadata"] as? [[String]])?.map { $0[0] }, "\(label): metadata keys and order", file: file, line: line)
    XCTAssertEqual(data.count, want["bytes"] as? Int, "\(label): size", file: file, line: line)
    XCTAssertEqual(SHA256.hex([UInt8](data)), want["sha256"] as? String, "\(label): the file's bytes", file: file, line: line)
}
