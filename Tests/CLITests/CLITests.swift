import Foundation
import XCTest
import QLoRA
import SafeTensors
import TestSupport

/// The `qlora` executable as a user runs it: exit codes, one-line errors on stderr naming
/// the file, and no output file on failure.
final class CLITests: TemporaryDirectoryTestCase {

    func run(_ args: [String], environment: [String: String]? = nil) throws -> (status: Int32, stdout: String, stderr: String) {
        try runQLoRA(args, environment: environment)
    }

    var dense: String { repositoryRoot.appendingPathComponent("Vectors/checkpoint/model.safetensors").path }

    func testQuantizeInspectDequantizeAsDocumented() throws {
        let q = tmp.appendingPathComponent("q.safetensors").path
        var r = try run(["quantize", dense, q, "--quant-type", "fp4", "--blocksize", "128", "--no-double-quant", "--exclude", "up_proj"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("quantized 2 tensors"), r.stdout)
        r = try run(["inspect", q, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        let tensors = json["tensors"] as! [[String: Any]]
        let down = tensors.first { $0["name"] as? String == "model.layers.0.mlp.down_proj.weight" }!
        let quant = down["quantization"] as! [String: Any]
        XCTAssertEqual(quant["quant_type"] as? String, "fp4")
        XCTAssertEqual(quant["blocksize"] as? Int, 128)
        XCTAssertEqual(quant["double_quant"] as? Bool, false)
        let up = tensors.first { $0["name"] as? String == "model.layers.0.mlp.up_proj.weight" }!
        XCTAssertEqual(up["dtype"] as? String, "BF16")
        let d = tmp.appendingPathComponent("d.safetensors").path
        r = try run(["dequantize", q, d, "--dtype", "f32"])
        XCTAssertEqual(r.status, 0, r.stderr)
        r = try run(["inspect", d])
        XCTAssertTrue(r.stdout.contains("model.layers.0.mlp.down_proj.weight") && r.stdout.contains("F32"), r.stdout)
        r = try run(["quantize", dense, tmp.appendingPathComponent("i.safetensors").path, "--include", "q_proj|embed"])
        XCTAssertTrue(r.stdout.contains("quantized 2 tensors"), r.stdout)
    }

    func expectFailure(_ args: [String], mentions: [String], noOutput output: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try run(args)
        XCTAssertNotEqual(r.status, 0, "expected failure: \(args)", file: file, line: line)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "stderr should be one line: \(r.stderr)", file: file, line: line)
        for m in mentions { XCTAssertTrue(r.stderr.contains(m), "stderr should mention '\(m)': \(r.stderr)", file: file, line: line) }
        XCTAssertFalse(FileManager.default.fileExists(atPath: output), "\(output) should not exist", file: file, line: line)
    }

    /// `qlora quantize --quant-storage X` writes, tensor for tensor, what transformers' save_pretrained
    /// wrote for the same bf16 model with `bnb_4bit_quant_storage=X` (Vectors/bnb_variants), and
    /// records X in config.json.
    func testQuantizeQuantStorageEqualsTransformers() throws {
        let variants = repositoryRoot.appendingPathComponent("Vectors/bnb_variants")
        for storage in ["uint8", "bfloat16", "float16", "float32"] {
            let out = tmp.appendingPathComponent(storage).path
            let r = try run(["quantize", variants.appendingPathComponent("dense").path, out, "--quant-storage", storage])
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertTrue(r.stdout.contains("quantized 7 tensors"), r.stdout)
            let ours = try SafeTensorsFile(path: out + "/model.safetensors")
            let theirs = try SafeTensorsFile(path: variants.appendingPathComponent("nf4-\(storage)/model.safetensors").path)
            XCTAssertEqual(Set(ours.tensors.map(\.name)), Set(theirs.tensors.map(\.name)), storage)
            for t in theirs.tensors {
                guard let mine = ours.info(named: t.name) else { continue }
                XCTAssertEqual(mine.dtype, t.dtype, "\(storage) \(t.name) dtype")
                XCTAssertEqual(mine.shape, t.shape, "\(storage) \(t.name) shape")
                XCTAssertNil(byteMismatch(ours.withBytes(of: t.name) { Array($0) }, theirs.withBytes(of: t.name) { Array($0) }, name: "\(storage) \(t.name)"))
            }
            let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/config.json"))) as! [String: Any]
            XCTAssertEqual((config["quantization_config"] as? [String: Any])?["bnb_4bit_quant_storage"] as? String, storage)
        }
        let out = tmp.appendingPathComponent("bad.safetensors").path
        try expectFailure(["quantize", dense, out, "--quant-storage", "int8"], mentions: ["int8", "uint8, bfloat16, float16, float32"], noOutput: out)
        // 3×3 NF4 is 5 bytes: not a whole number of bf16 elements (bitsandbytes' view fails too).
        let odd = tmp.appendingPathComponent("odd.safetensors")
        try SafeTensorsWriter.write(url: odd, tensors: [("w", .f32, [3, 3], rawBytes([Float](repeating: 0.5, count: 9)))])
        try expectFailure(["quantize", odd.path, out, "--quant-storage", "bfloat16"], mentions: ["odd.safetensors", "'w'", "BF16"], noOutput: out)
    }

    func testBadInputsGiveOneLineNamingTheFile() throws {
        let out = tmp.appendingPathComponent("out.safetensors").path
        // Truncated file.
        let trunc = tmp.appendingPathComponent("truncated.safetensors")
        let bytes = try Data(contentsOf: URL(fileURLWithPath: dense))
        try bytes.prefix(bytes.count / 2).write(to: trunc)
        try expectFailure(["quantize", trunc.path, out], mentions: ["truncated.safetensors"], noOutput: out)
        // Header length beyond the file.
        let hdr = tmp.appendingPathComponent("header.safetensors")
        var h = Data(bytes); h.replaceSubrange(0..<8, with: [0xFF, 0xFF, 0, 0, 0, 0, 0, 0])
        try h.write(to: hdr)
        try expectFailure(["inspect", hdr.path], mentions: ["header.safetensors"], noOutput: out)
        // Malformed JSON.
        let bad = tmp.appendingPathComponent("json.safetensors")
        var j = Data(bytes); j[9] = UInt8(ascii: "#")
        try j.write(to: bad)
        try expectFailure(["dequantize", bad.path, out], mentions: ["json.safetensors"], noOutput: out)
        // Missing file, missing shard directory.
        try expectFailure(["quantize", tmp.appendingPathComponent("nope.safetensors").path, out], mentions: ["nope.safetensors"], noOutput: out)
        // Invalid blocksize, OUTPUT == INPUT.
        try expectFailure(["quantize", dense, out, "--blocksize", "48"], mentions: ["blocksize"], noOutput: out)
        let copy = tmp.appendingPathComponent("copy.safetensors").path
        try FileManager.default.copyItem(atPath: dense, toPath: copy)
        try expectFailure(["quantize", copy, copy], mentions: ["same as INPUT"], noOutput: out)
        // A missing shard.
        let dir = tmp.appendingPathComponent("sharded")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Data(#"{"metadata": {"total_size": 4}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}"#.utf8)
            .write(to: dir.appendingPathComponent("model.safetensors.index.json"))
        let outDir = tmp.appendingPathComponent("outdir").path
        try expectFailure(["quantize", dir.path, outDir], mentions: ["model-00001-of-00001.safetensors"], noOutput: outDir)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: tmp.path).filter { $0.hasPrefix(".") }
        XCTAssertEqual(leftovers, [], "temporary files left behind")
    }

    /// `qlora merge` as documented: a sample checkpoint and adapter, a second adapter at weight
    /// 0 (changes nothing: bf16(W + 0) = W), --max-shard-size, --report --json, and bad options.
    func testMergeAsDocumented() throws {
        let base = tmp.appendingPathComponent("base").path, adapter = base + "-adapter"
        var r = try run(["sample", base, "--layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "256", "--adapter-rank", "4"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let once = tmp.appendingPathComponent("once").path, twice = tmp.appendingPathComponent("twice").path
        r = try run(["merge", base, adapter, once])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("merged 7 tensors"), r.stdout)
        r = try run(["merge", base, adapter, twice, "--adapter", adapter + "=0", "--max-shard-size", "100KB", "--report", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        XCTAssertEqual((json["report"] as! [Any]).count, 7)
        XCTAssertNotNil((json["total"] as! [String: Any])["error_to_delta"])
        let a = try SafeTensorsFile(path: once + "/model.safetensors")
        let shards = try FileManager.default.contentsOfDirectory(atPath: twice).filter { $0.hasSuffix(".safetensors") }.sorted()
        XCTAssertGreaterThan(shards.count, 1)
        XCTAssertTrue(FileManager.default.fileExists(atPath: twice + "/model.safetensors.index.json"))
        var seen = 0
        for shard in shards {
            let f = try SafeTensorsFile(path: twice + "/" + shard)
            for t in f.tensors {
                XCTAssertEqual(f.withBytes(of: t.name) { Array($0) }, a.withBytes(of: t.name) { Array($0) }, t.name)
                seen += 1
            }
        }
        XCTAssertEqual(seen, a.tensors.count)
        let out = tmp.appendingPathComponent("bad").path
        try expectFailure(["merge", base, adapter, out, "--max-shard-size", "lots"], mentions: ["lots"], noOutput: out)
        try expectFailure(["merge", base, adapter + "=x", out], mentions: ["=x"], noOutput: out)
        try expectFailure(["merge", base, tmp.path, out], mentions: ["adapter_config.json"], noOutput: out)
    }

    /// `qlora memory --json` has issue 6's fields; `qlora claims --json` covers every id;
    /// `qlora report` writes its two files; bad options fail with one line.
    func testMemoryClaimsReportAsDocumented() throws {
        var r = try run(["memory", "--model", "llama-3.1-8b", "--targets", "q,v", "--rank", "8", "--grad-checkpointing", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let m = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        XCTAssertEqual(m["model"] as? String, "llama-3.1-8b")
        XCTAssertEqual(m["method"] as? String, "qlora")
        let params = m["params"] as! [String: Any]
        XCTAssertEqual(params["total"] as? Int, 8_030_261_248)
        XCTAssertEqual(params["trainable"] as? Int, 32 * 8 * ((4096 + 4096) + (4096 + 1024)))
        let components = m["components"] as! [[String: Any]]
        XCTAssertEqual(components.first?["name"] as? String, "base_weights")
        XCTAssertTrue(components.allSatisfy { $0["estimated_bytes"] is Int && $0.keys.contains("measured_bytes") })
        XCTAssertTrue(m["total_measured_bytes"] is NSNull)
        XCTAssertTrue(m["total_estimated_bytes"] is Int)
        let act = m["activations"] as! [String: Int]
        XCTAssertEqual(Set(act.keys), ["per_layer_bytes", "head_bytes", "total_with_checkpointing_bytes", "total_without_checkpointing_bytes"])
        XCTAssertEqual(act["total_with_checkpointing_bytes"], components.first { $0["name"] as? String == "activations" }?["estimated_bytes"] as? Int)

        r = try run(["claims", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let claims = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [[String: Any]]
        XCTAssertEqual(claims.map { $0["id"] as! String }, (1...6).map { "Q\($0)" } + (1...30).map { "M\($0)" })

        let out = tmp.appendingPathComponent("report").path
        r = try run(["report", "--out", out, "--no-measure"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let md = try String(contentsOfFile: out + "/report.md", encoding: .utf8)
        XCTAssertTrue(md.contains("![memory per method](memory.svg)") && md.contains("| M22 |"), md)
        XCTAssertTrue(try String(contentsOfFile: out + "/memory.svg", encoding: .utf8).hasPrefix("<svg"))

        let none = tmp.appendingPathComponent("none").path
        try expectFailure(["memory", "--model", "gpt-5"], mentions: ["gpt-5"], noOutput: none)
        try expectFailure(["memory", "--targets", "wq"], mentions: ["wq"], noOutput: none)
        try expectFailure(["memory", "--config", none], mentions: [none], noOutput: none)
    }

    /// `qlora train` as documented: a sample model and copy task, a short run that writes the
    /// adapter; Ctrl-C saves a checkpoint and exits 130, and --resume continues from it.
    func testTrainAndCtrlC() throws {
        let model = tmp.appendingPathComponent("tiny").path
        var r = try run(["sample", model, "--layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "64", "--heads", "4",
                         "--kv-heads", "2", "--embedding-std", "1", "--weight-std", "0.1", "--copy-task", "64"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let out = tmp.appendingPathComponent("adapter").path
        r = try run(["train", "--model", model, "--data", model + "-copy.jsonl", "--steps", "3", "--batch", "2", "--seq-len", "12", "--out", out])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("trained 3 steps"), r.stdout)
        XCTAssertTrue(r.stderr.contains("step 3/3"), r.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/adapter_model.safetensors"))
        // --dora: a DoRA adapter PEFT's format holds (use_dora, a magnitude per module), resumable
        // and mergeable.
        let doraOut = tmp.appendingPathComponent("dora").path
        r = try run(["train", "--model", model, "--data", model + "-copy.jsonl", "--steps", "2", "--batch", "2", "--seq-len", "12", "--dora",
                     "--save-every", "1", "--out", doraOut])
        XCTAssertEqual(r.status, 0, r.stderr)
        let config = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: doraOut + "/adapter_config.json"))) as? [String: Any])
        XCTAssertEqual(config["use_dora"] as? Bool, true)
        let tensors = try SafeTensorsFile(path: doraOut + "/adapter_model.safetensors").tensors.map(\.name)
        XCTAssertEqual(tensors.filter { $0.hasSuffix(".lora_magnitude_vector") }.count, tensors.filter { $0.hasSuffix(".lora_A.weight") }.count)
        r = try run(["train", "--model", model, "--data", model + "-copy.jsonl", "--steps", "3", "--batch", "2", "--seq-len", "12",
                     "--resume", doraOut + "/checkpoint-1", "--out", doraOut])
        XCTAssertEqual(r.status, 0, r.stderr)
        r = try run(["merge", model, doraOut, tmp.appendingPathComponent("dora-merged").path])
        XCTAssertEqual(r.status, 0, r.stderr)
        try expectFailure(["train", "--model", model, "--data", model + "-copy.jsonl", "--dora", "--adapter", out, "--out", tmp.appendingPathComponent("x").path],
                          mentions: ["--dora"], noOutput: tmp.appendingPathComponent("x").path)
        // --modules-to-save: lm_head saved whole in PEFT's name and dtype, and listed in the config.
        let saveOut = tmp.appendingPathComponent("mts").path
        r = try run(["train", "--model", model, "--data", model + "-copy.jsonl", "--steps", "2", "--batch", "2", "--seq-len", "12",
                     "--modules-to-save", "lm_head", "--out", saveOut])
        XCTAssertEqual(r.status, 0, r.stderr)
        let saveConfig = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: saveOut + "/adapter_config.json"))) as? [String: Any])
        XCTAssertEqual(saveConfig["modules_to_save"] as? [String], ["lm_head"])
        let head = try XCTUnwrap(try SafeTensorsFile(path: saveOut + "/adapter_model.safetensors").tensors.first { $0.name == "base_model.model.lm_head.weight" })
        XCTAssertEqual(head.dtype, .bf16)
        try expectFailure(["train", "--model", model, "--data", model + "-copy.jsonl", "--modules-to-save", "score", "--out", tmp.appendingPathComponent("x").path],
                          mentions: ["score"], noOutput: tmp.appendingPathComponent("x").path)

        let p = Process()
        p.executableURL = qloraBinary
        let out2 = tmp.appendingPathComponent("interrupted").path
        p.arguments = ["train", "--model", model, "--data", model + "-copy.jsonl", "--steps", "1000000", "--batch", "2", "--seq-len", "12",
                       "--save-every", "0", "--out", out2]
        let err = Pipe()
        p.standardError = err
        p.standardOutput = Pipe()
        try p.run()
        // Let it load and take some steps (the tiny model loads in milliseconds), then Ctrl-C.
        Thread.sleep(forTimeInterval: 2)
        p.interrupt()
        p.waitUntilExit()
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertEqual(p.terminationStatus, 130, stderr)
        XCTAssertTrue(stderr.contains("interrupted: saved"), stderr)
        let checkpoint = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: out2).first { $0.hasPrefix("checkpoint-") })
        for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: out2 + "/" + checkpoint + "/" + f), f)
        }
        let done = Int(checkpoint.dropFirst("checkpoint-".count))!
        r = try run(["train", "--model", model, "--data", model + "-copy.jsonl", "--steps", "\(done + 2)", "--batch", "2", "--seq-len", "12",
                     "--out", out2, "--resume", out2 + "/" + checkpoint])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("trained \(done + 2) steps"), r.stdout)
        try expectFailure(["train", "--model", model, "--data", model, "--out", tmp.appendingPathComponent("x").path], mentions: [model], noOutput: tmp.appendingPathComponent("x").path)
    }

    /// Moves `directory`'s files into a Hugging Face cache layout (`<root>/blobs/<blob>`, and
    /// `<root>/snapshots/main/<name> -> ../../blobs/<blob>`) and returns the snapshot directory.
    func cacheSnapshot(of directory: String, root: String) throws -> String {
        let fm = FileManager.default
        let snap = root + "/snapshots/main"
        try fm.createDirectory(atPath: root + "/blobs", withIntermediateDirectories: true)
        try fm.createDirectory(atPath: snap, withIntermediateDirectories: true)
        for (i, name) in try fm.contentsOfDirectory(atPath: directory).sorted().enumerated() {
            let blob = String(format: "%064x", 0xcafe + i)
            try fm.moveItem(atPath: directory + "/" + name, toPath: root + "/blobs/" + blob)
            try fm.createSymbolicLink(atPath: snap + "/" + name, withDestinationPath: "../../blobs/" + blob)
        }
        return snap
    }

    /// Every command reads a Hugging Face cache snapshot (relative links into blobs/, and a link
    /// to the snapshot directory itself) and writes regular files.
    /// --compute-dtype is recorded as transformers records it, and a re-quantized merge keeps it.
    func testComputeDtypeIsRecordedAndKept() throws {
        let base = tmp.appendingPathComponent("m").path, q = tmp.appendingPathComponent("q").path, merged = tmp.appendingPathComponent("mq").path
        var r = try run(["sample", base, "--layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "256", "--adapter-rank", "4"])
        XCTAssertEqual(r.status, 0, r.stderr)
        r = try run(["quantize", base, q, "--compute-dtype", "f16"])
        XCTAssertEqual(r.status, 0, r.stderr)
        func computeDtype(_ dir: String) throws -> String? {
            let c = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/config.json"))) as? [String: Any]
            return (c?["quantization_config"] as? [String: Any])?["bnb_4bit_compute_dtype"] as? String
        }
        XCTAssertEqual(try computeDtype(q), "float16")
        r = try run(["merge", q, base + "-adapter", merged, "--requantize"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try computeDtype(merged), "float16")
        try expectFailure(["quantize", base, tmp.appendingPathComponent("x").path, "--compute-dtype", "f8"], mentions: ["f8"], noOutput: tmp.appendingPathComponent("x").path)
    }

    /// A config.json these fields do not describe (another family, a mixture of experts) gets
    /// one line naming the file and what is missing from `qlora memory` and `qlora fit`, never a
    /// Llama's answer.
    func testUndescribedModelsAreRefusedNotCountedAsLlama() throws {
        let shape: [String: Any] = ["hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 16,
                                    "num_key_value_heads": 8, "vocab_size": 151936]
        for (name, extra, problem) in [("gemma", ["model_type": "gemma3_text"], "model_type gemma3_text is not described"),
                                       ("moe", ["model_type": "qwen3", "num_experts": 128], "mixture of experts (num_experts 128) is not described"),
                                       ("qwen2moe", ["model_type": "qwen2_moe", "num_experts": 60], "model_type qwen2_moe is not described"),
                                       // A described family without a field it needs.
                                       ("qwen3moe-partial", ["model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8],
                                        "moe_intermediate_size is missing")] as [(String, [String: Any], String)] {
            let config = tmp.appendingPathComponent(name + ".json")
            try JSONSerialization.data(withJSONObject: shape.merging(extra) { $1 }).write(to: config)
            try expectFailure(["memory", "--config", config.path], mentions: [config.path, problem], noOutput: tmp.appendingPathComponent("none").path)
            try expectFailure(["fit", "--config", config.path, "--memory", "24GB"], mentions: [config.path, problem], noOutput: tmp.appendingPathComponent("none").path)
        }
        // The checkpoint jobs whose answer depends on the family refuse it too, naming config.json.
        let gemma = tmp.appendingPathComponent("gemma-checkpoint")
        try FileManager.default.createDirectory(at: gemma, withIntermediateDirectories: true)
        try JSONSerialization.data(withJSONObject: shape.merging(["model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]]) { $1 })
            .write(to: gemma.appendingPathComponent("config.json"))
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/checkpoint/model.safetensors"), to: gemma.appendingPathComponent("model.safetensors"))
        let data = tmp.appendingPathComponent("data.jsonl")
        try Data("{\"input_ids\": [1, 2, 3, 4, 5, 6, 7, 8]}\n".utf8).write(to: data)
        let out = tmp.appendingPathComponent("out").path
        let config = gemma.appendingPathComponent("config.json").path
        for (args, problem) in [(["quantize", gemma.path, out], "model_type gemma3_text is not described"),
                                (["merge", gemma.path, repositoryRoot.appendingPathComponent("Vectors/peft_adapter").path, out], "model_type gemma3_text is not described"),
                                (["export", gemma.path, out, "--type", "f16"], "this checkpoint is Gemma3ForCausalLM"),
                                (["train", "--model", gemma.path, "--data", data.path, "--out", out], "model_type gemma3_text is not supported for training")] {
            try expectFailure(args, mentions: [config, problem], noOutput: out)
        }
    }

    /// A mixture of experts transformers 5 builds is counted as it holds it: Qwen3-30B-A3B's
    /// config.json as published (num_experts), its experts bf16 after a "4-bit" load
    /// (Vectors/memory/moe.json), or NF4 through bitsandbytes' parametrize route.
    func testMixtureOfExpertsMemoryAndFit() throws {
        let config = tmp.appendingPathComponent("qwen3-30b-a3b.json")
        try Data(#"{"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true, "vocab_size": 151936}"#.utf8).write(to: config)
        var r = try run(["memory", "--config", config.path])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("experts") && r.stdout.contains("57.98 GB") && r.stdout.contains("bitsandbytes #1849"), r.stdout)
        r = try run(["memory", "--config", config.path, "--experts", "nf4"])
        XCTAssertEqual(r.status, 0, r.stderr)
        // NF4 experts, but without checkpointing every layer's dequantized bf16 copy stays for the backward.
        XCTAssertTrue(r.stdout.contains("14.96 GB") && r.stdout.contains("expert_weight_copies    57.98 GB"), r.stdout)
        r = try run(["fit", "--model", "qwen3-30b-a3b", "--memory", "80GB", "--targets", "all-linear"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("experts,router (experts' gate_up_proj at r=32)"), r.stdout)
        // Unsloth quantizes the experts as it loads them: nf4 is its default route, bf16 refused; gpt-oss' path is not modelled.
        r = try run(["fit", "--model", "qwen3-30b-a3b", "--memory", "80GB", "--recipe", "unsloth", "--targets", "attention,experts"])
        XCTAssertTrue(r.status == 0 && r.stdout.contains("Unsloth's step from its source"), r.stdout + r.stderr)
        // Unsloth's get_moe_target_parameters: the MLP's names (the default targets, all) adapt the
        // experts, as attention,experts does; attention alone leaves them out; half of them is refused.
        let byDefault = try run(["fit", "--model", "qwen3-30b-a3b", "--memory", "80GB", "--recipe", "unsloth"])
        let attentionOnly = try run(["fit", "--model", "qwen3-30b-a3b", "--memory", "80GB", "--recipe", "unsloth", "--targets", "attention"])
        func figures(_ text: String) -> String { text.split(separator: "\n").filter { $0.hasPrefix("with") }.joined(separator: "\n") }
        XCTAssertEqual(figures(byDefault.stdout), figures(r.stdout), "--targets all under Unsloth adapts the experts")
        XCTAssertNotEqual(figures(attentionOnly.stdout), figures(r.stdout), "--targets attention under Unsloth leaves the experts frozen")
        try expectFailure(["fit", "--model", "qwen3-30b-a3b", "--memory", "80GB", "--recipe", "unsloth", "--targets", "q,down"], mentions: ["only the experts' down_proj"],
                          noOutput: tmp.appendingPathComponent("none").path)
        try expectFailure(["fit", "--model", "qwen3-30b-a3b", "--memory", "80GB", "--recipe", "unsloth", "--experts", "bf16"], mentions: ["--experts nf4"], noOutput: tmp.appendingPathComponent("none").path)
        try expectFailure(["fit", "--model", "gpt-oss-20b", "--memory", "80GB", "--recipe", "unsloth"], mentions: ["GptOssExpertsBnb4bit"], noOutput: tmp.appendingPathComponent("none").path)
        try expectFailure(["fit", "--model", "llama-2-7b", "--memory", "80GB", "--targets", "attention,experts"], mentions: ["has no experts"], noOutput: tmp.appendingPathComponent("none").path)
        // Llama 4 on every route that runs (the llama4 rows of peaks.json); TRL 1.16 fails on it.
        for route in [["--experts", "nf4"], ["--recipe", "peft-kbit", "--targets", "attention,experts"]] {
            r = try run(["fit", "--model", "llama-4-scout", "--memory", "80GB"] + route)
            XCTAssertEqual(r.status, 0, r.stderr)
        }
        try expectFailure(["fit", "--model", "llama-4-scout", "--memory", "80GB", "--recipe", "trl"], mentions: ["TRL 1.16", "Llama4ForCausalLM"], noOutput: tmp.appendingPathComponent("none").path)
    }

    /// `qlora memory --timeline` draws the step and names its peak; `--json` carries it; `qlora fit` answers.
    func testTimelineAndFitAsDocumented() throws {
        let svg = tmp.appendingPathComponent("step.svg").path
        var r = try run(["memory", "--model", "llama-2-7b", "--seq-len", "512", "--grad-checkpointing", "--timeline", svg])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("peak: ") && r.stdout.contains("head backward"), r.stdout)
        let drawn = try String(contentsOfFile: svg, encoding: .utf8)
        XCTAssertTrue(drawn.hasPrefix("<svg") && drawn.contains("peak "), drawn.prefix(200).description)
        r = try run(["memory", "--model", "qwen3-8b", "--timeline", tmp.appendingPathComponent("q.svg").path, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        let timeline = try XCTUnwrap(json["timeline"] as? [String: Any])
        XCTAssertGreaterThan(timeline["peak_bytes"] as? Int ?? 0, json["total_estimated_bytes"] as? Int ?? .max)
        try expectFailure(["memory", "--timeline", svg], mentions: [svg, "already exists"], noOutput: tmp.appendingPathComponent("none").path)
        r = try run(["fit", "--memory", "24GB", "--model", "llama-3.1-8b"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("with checkpointing") && r.stdout.contains("largest seq-len"), r.stdout)
        r = try run(["fit", "--matrix"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("phi-4") && r.stdout.contains("128 GB"), r.stdout)
        try expectFailure(["fit", "--model", "llama-2-7b"], mentions: ["--memory"], noOutput: tmp.appendingPathComponent("none").path)
        // The stack options: each named in the answer; a stack that does not exist is one line.
        r = try run(["fit", "--memory", "12GB", "--model", "llama-3.1-8b", "--rank", "32", "--recipe", "peft-kbit", "--transformers", "4.48.3",
                     "--attention", "flash_attention_2", "--runtime", "cuda"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("transformers 4.46–4.48") && r.stdout.contains("FlashAttention-2") && r.stdout.contains("caching allocator"), r.stdout)
        r = try run(["fit", "--memory", "12GB", "--model", "llama-3.1-8b", "--recipe", "trl", "--runtime", "cuda"])
        XCTAssertTrue(r.status == 0 && r.stdout.contains("TRL 1.16"), r.stdout + r.stderr)
        try expectFailure(["fit", "--memory", "12GB", "--transformers", "4.50"], mentions: ["4.50", "not modelled"], noOutput: tmp.appendingPathComponent("none").path)
        try expectFailure(["fit", "--memory", "12GB", "--attention", "flash_attention_2"], mentions: ["--runtime cuda"], noOutput: tmp.appendingPathComponent("none").path)
        try expectFailure(["fit", "--memory", "12GB", "--recipe", "trl", "--transformers", "4.46"], mentions: ["TRL 1.16"], noOutput: tmp.appendingPathComponent("none").path)
    }

    func testCacheSnapshotsAsInputs() throws {
        let model = tmp.appendingPathComponent("tiny").path
        var r = try run(["sample", model, "--layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "64", "--heads", "4",
                         "--kv-heads", "2", "--copy-task", "8", "--adapter-rank", "4"])
        XCTAssertEqual(r.status, 0, r.stderr)
        try Data("{\"version\": \"1.0\"}".utf8).write(to: URL(fileURLWithPath: model + "/tokenizer.json"))
        let snap = try cacheSnapshot(of: model, root: tmp.appendingPathComponent("models--tiny").path)
        let adapter = try cacheSnapshot(of: model + "-adapter", root: tmp.appendingPathComponent("models--tiny-adapter").path)
        let link = tmp.appendingPathComponent("tiny-link").path
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "models--tiny/snapshots/main")

        func assertRegularFiles(_ dir: String) throws {
            for name in try FileManager.default.contentsOfDirectory(atPath: dir) {
                let type = try FileManager.default.attributesOfItem(atPath: dir + "/" + name)[.type] as? FileAttributeType
                XCTAssertEqual(type, .typeRegular, dir + "/" + name)
            }
        }
        let q = tmp.appendingPathComponent("q").path, d = tmp.appendingPathComponent("d").path, m = tmp.appendingPathComponent("m").path
        for (args, out) in [(["quantize", link, q], q), (["dequantize", q, d], d), (["merge", snap, adapter, m], m)] {
            r = try run(args)
            XCTAssertEqual(r.status, 0, "\(args): \(r.stderr)")
            try assertRegularFiles(out)
            XCTAssertEqual(try String(contentsOfFile: out + "/tokenizer.json", encoding: .utf8), "{\"version\": \"1.0\"}")
        }
        let trained = tmp.appendingPathComponent("trained").path
        r = try run(["train", "--model", link, "--data", model + "-copy.jsonl", "--steps", "1", "--seq-len", "8", "--out", trained])
        XCTAssertEqual(r.status, 0, r.stderr)
        r = try run(["train", "--model", snap, "--data", model + "-copy.jsonl", "--steps", "1", "--seq-len", "8", "--adapter", adapter,
                     "--out", trained + "2"])
        XCTAssertEqual(r.status, 0, r.stderr)
        // A dangling link: one line naming it, no output.
        try FileManager.default.createSymbolicLink(atPath: snap + "/special_tokens_map.json", withDestinationPath: "../../blobs/gone")
        try expectFailure(["quantize", snap, tmp.appendingPathComponent("q2").path], mentions: [snap + "/special_tokens_map.json"],
                          noOutput: tmp.appendingPathComponent("q2").path)
    }

    /// `qlora bench --quick --json` reports the documented fields, and picks OpenBLAS's
    /// AVX-512 kernels itself only when the user has not chosen a core.
    func testBenchQuickJSON() throws {
        var env = ProcessInfo.processInfo.environment
        env.removeValue(forKey: "OPENBLAS_CORETYPE")
        let r = try run(["bench", "--quick", "--json", "--threads", "1"], environment: env)
        XCTAssertEqual(r.status, 0, r.stderr)
        let j = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        XCTAssertEqual(j["openblas_core"] as? String, BLAS.preferredCoreType ?? (j["openblas_core"] as? String))
        XCTAssertEqual(j["threads"] as? Int, 1)
        let dequant = j["dequant"] as! [[String: Any]]
        XCTAssertGreaterThan(dequant.first?["params_per_s"] as? Double ?? 0, 0)
        XCTAssertGreaterThan(dequant.first?["ratio_to_memcpy"] as? Double ?? 0, 0)
        let gemm = j["gemm"] as! [[String: Any]]
        for key in ["m", "n", "k", "seconds", "sgemm_seconds", "ratio"] { XCTAssertNotNil(gemm.first?[key], key) }
        let gemv = j["gemv"] as! [[String: Any]]
        for key in ["n", "k", "seconds", "sgemv_seconds", "speedup"] { XCTAssertNotNil(gemv.first?[key], key) }
        let lora = j["lora_step"] as! [[String: Any]]
        for key in ["tokens", "rank", "seconds", "base_seconds", "ratio"] { XCTAssertNotNil(lora.first?[key], key) }
        // One llama-2-7b layer at 128 tokens: 4·t·202,375,168 projection FLOPs, 6·t·16·78,080 of
        // LoRA, 7 · 2·128 · (128·129/2) · 32 heads of attention.
        let step = try XCTUnwrap((j["train_step"] as? [[String: Any]])?.first)
        XCTAssertEqual(step["tokens"] as? Int, 128)
        let projections: Int = 4 * 128 * 202_375_168, adapters: Int = 6 * 128 * 16 * 78_080, attention: Int = 7 * 2 * 128 * (128 * 129 / 2) * 32
        XCTAssertEqual(step["flops"] as? Double, Double(projections + adapters + attention))
        XCTAssertGreaterThan(step["tokens_per_s"] as? Double ?? 0, 0)
        XCTAssertGreaterThan(step["bf16_bound_tokens_per_s"] as? Double ?? step["sgemm_bound_tokens_per_s"] as? Double ?? 0, 0)

        env["OPENBLAS_CORETYPE"] = "Haswell"  // the user's choice is kept
        let h = try run(["bench", "--quick", "--json", "--threads", "1", "--tokens", "1", "--step-tokens", "none"], environment: env)
        let hj = try JSONSerialization.jsonObject(with: Data(h.stdout.utf8)) as! [String: Any]
        XCTAssertEqual(hj["openblas_core"] as? String, "Haswell")
    }
}
