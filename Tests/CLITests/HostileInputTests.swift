import Foundation
import XCTest
import QLoRA
import SafeTensors
import TestSupport

/// Hostile and malformed inputs (issue 13), through the `qlora` executable. Every refusal is one
/// line on stderr naming the file (and tensor or field) and the problem, exit status 1, no
/// output, the inputs unchanged (checksummed before and after), and nothing left beside the
/// output.
class HostileInputTestCase: TemporaryDirectoryTestCase {
    var fixtures: URL { repositoryRoot.appendingPathComponent("Vectors") }

    func qlora(_ args: [String]) throws -> (status: Int32, stdout: String, stderr: String) { try runQLoRA(args) }

    func contents(_ path: String) -> [String: Data] { fileContents(path) }

    /// Runs `args`, expecting the refusal contract: exit 1, one stderr line mentioning each of
    /// `mentions`, no raw control character on it, `output` (if any) not created, no other new
    /// entry beside it, and `inputs` byte-identical afterwards.
    func expectRefusal(_ args: [String], mentions: [String], inputs: [String], output: String? = nil,
                       file: StaticString = #filePath, line: UInt = #line) throws {
        let before = inputs.map(contents)
        let parent = output.map { URL(fileURLWithPath: $0).deletingLastPathComponent() } ?? tmp!
        let listed = try FileManager.default.contentsOfDirectory(atPath: parent.path).sorted()
        let r = try qlora(args)
        XCTAssertEqual(r.status, 1, "expected exit 1: \(args) -> \(r.stderr)", file: file, line: line)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "stderr should be one line: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("qlora: error: "), r.stderr, file: file, line: line)
        XCTAssertFalse(r.stderr.dropLast().unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7F }, "raw control character: \(r.stderr.debugDescription)", file: file, line: line)
        for m in mentions { XCTAssertTrue(r.stderr.contains(m), "stderr should mention '\(m)': \(r.stderr)", file: file, line: line) }
        XCTAssertEqual(r.stdout, "", file: file, line: line)
        if let output { XCTAssertFalse(FileManager.default.fileExists(atPath: output), "\(output) should not exist", file: file, line: line) }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: parent.path).sorted(), listed, "nothing may be left beside the output", file: file, line: line)
        for (i, path) in inputs.enumerated() { XCTAssertEqual(contents(path), before[i], "\(path) changed", file: file, line: line) }
    }

    typealias Tensor = (name: String, dtype: DType, shape: [Int], bytes: [UInt8])

    /// The tensors of a safetensors file, in file order.
    func tensors(of path: String) throws -> [Tensor] {
        let f = try SafeTensorsFile(path: path)
        return f.tensors.map { t in (t.name, t.dtype, t.shape, f.withBytes(of: t.name) { Array($0) }) }
    }

    func write(_ tensors: [Tensor], to path: String) throws {
        try SafeTensorsWriter.write(url: URL(fileURLWithPath: path), tensors: tensors, metadata: ["format": "pt"])
    }

    /// `Vectors/checkpoint/bnb-nf4-dq.safetensors` with `edit` applied to its tensors, at `name` in tmp.
    func editedBnB(_ name: String, source: String = "bnb-nf4-dq", _ edit: (inout [Tensor]) -> Void) throws -> String {
        var t = try tensors(of: fixtures.appendingPathComponent("checkpoint/\(source).safetensors").path)
        edit(&t)
        let path = tmp.appendingPathComponent(name).path
        try write(t, to: path)
        return path
    }

    static let q = "model.layers.0.self_attn.q_proj.weight"

    /// Replaces the quant-state JSON of q_proj.
    func withQuantState(_ t: inout [Tensor], _ json: String, type: String = "nf4") {
        let key = Self.q + ".quant_state.bitsandbytes__" + type
        let bytes = Array(json.utf8)
        if let i = t.firstIndex(where: { $0.name == key }) { t[i] = (key, .u8, [bytes.count], bytes) } else { t.append((key, .u8, [bytes.count], bytes)) }
    }

    func floatBytes(_ v: [Float]) -> [UInt8] { v.withUnsafeBytes { Array($0) } }

    /// A tiny Llama base (`Vectors/llama/tiny`, read only) and a copy-task JSONL of `count` lines.
    func copyTask(_ name: String, count: Int, labelled: (Int) -> Bool = { _ in true }) throws -> String {
        var lines: [String] = []
        for i in 0..<count {
            let a = (0..<5).map { 10 + ($0 * 3 + i) % 16 }
            let ids = [1] + a + [2] + a
            let labels = labelled(i) ? Array(repeating: -100, count: 7) + a : Array(repeating: -100, count: ids.count)
            lines.append("{\"input_ids\": \(ids), \"labels\": \(labels)}")
        }
        let path = tmp.appendingPathComponent(name).path
        try Data((lines.joined(separator: "\n") + "\n").utf8).write(to: URL(fileURLWithPath: path))
        return path
    }

    var tinyLlama: String { fixtures.appendingPathComponent("llama/tiny").path }

    /// A sample base with a rank-4 adapter on all seven projections of its 2 layers.
    func sampleWithAdapter() throws -> (base: String, adapter: String) {
        let base = tmp.appendingPathComponent("base").path
        let r = try qlora(["sample", base, "--layers", "2", "--hidden", "64", "--intermediate", "128", "--vocab", "64", "--heads", "4", "--adapter-rank", "4"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return (base, base + "-adapter")
    }

    func setAdapterConfig(_ adapter: String, _ change: (inout [String: Any]) -> Void) throws {
        let url = URL(fileURLWithPath: adapter + "/adapter_config.json")
        var c = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        change(&c)
        try JSONSerialization.data(withJSONObject: c).write(to: url)
    }
}

/// Inputs that crashed (overflow, duplicate keys, division by zero, allocation failure, index out
/// of range) and are now one clear line.
final class HostileInputCrashTests: HostileInputTestCase {
    func testQuantStateShapeNearInt64MaxIsRefused() throws {
        let bad = try editedBnB("huge-shape.safetensors") {
            withQuantState(&$0, #"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [9223372036854775807], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.29}"#)
        }
        let out = tmp.appendingPathComponent("out").path
        for args in [["inspect", bad], ["dequantize", bad, out]] {
            try expectRefusal(args, mentions: ["huge-shape.safetensors", Self.q, "9223372036854775807", "expected 4611686018427387904"], inputs: [bad], output: out)
        }
        let overflow = try editedBnB("overflow-shape.safetensors") {
            withQuantState(&$0, #"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4611686018427387904, 4], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.29}"#)
        }
        try expectRefusal(["dequantize", overflow, out], mentions: ["overflow-shape.safetensors", "shape", "64-bit"], inputs: [overflow], output: out)
    }

    func testNestedBlocksizeNearInt64MaxIsRefused() throws {
        let bad = try editedBnB("huge-nested.safetensors") {
            withQuantState(&$0, #"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [16, 16], "nested_blocksize": 9223372036854775807, "nested_dtype": "float32", "nested_offset": 0.29}"#)
        }
        let out = tmp.appendingPathComponent("out").path
        for args in [["inspect", bad], ["dequantize", bad, out]] {
            try expectRefusal(args, mentions: ["huge-nested.safetensors", "nested_blocksize 9223372036854775807"], inputs: [bad], output: out)
        }
    }

    func testQuantStateForBothTypesIsRefused() throws {
        let bad = try editedBnB("both.safetensors") {
            withQuantState(&$0, #"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [16, 16], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.29}"#, type: "fp4")
        }
        let out = tmp.appendingPathComponent("out").path
        for args in [["inspect", bad], ["dequantize", bad, out]] {
            try expectRefusal(args, mentions: ["both.safetensors", Self.q, "two quant states", "__nf4", "__fp4"], inputs: [bad], output: out)
        }
        // merge and train's loader read the base through the same check.
        let (_, adapter) = try sampleWithAdapter()
        try expectRefusal(["merge", bad, adapter, out], mentions: ["both.safetensors", "two quant states"], inputs: [bad, adapter], output: out)
    }

    func testMemoryConfigWithHugeOrZeroSizesIsRefused() throws {
        let base: [String: Any] = ["model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000]
        let cases: [(String, Any, [String])] = [
            ("num_hidden_layers", 1_000_000_000_000, ["num_hidden_layers 1000000000000", "2^48"]),
            ("hidden_size", 3_000_000_000, ["hidden_size 3000000000", "2^48"]),
            ("vocab_size", 1 << 62, ["vocab_size is 4611686018427387904", "2^40"]),
            ("num_key_value_heads", 0, ["num_key_value_heads is 0", "positive"]),
            ("hidden_size", "4096", ["hidden_size is \"4096\" (a string), not an integer"]),
        ]
        for (i, (key, value, mentions)) in cases.enumerated() {
            var c = base
            c[key] = value
            let path = tmp.appendingPathComponent("config-\(i).json").path
            try JSONSerialization.data(withJSONObject: c).write(to: URL(fileURLWithPath: path))
            try expectRefusal(["memory", "--config", path], mentions: ["config-\(i).json"] + mentions, inputs: [path])
        }
        let max = String(Int.max)
        try expectRefusal(["memory", "--seq-len", max], mentions: ["activations", "64-bit"], inputs: [])
        try expectRefusal(["memory", "--batch", max], mentions: ["seq-len × batch", "64-bit"], inputs: [])
        try expectRefusal(["memory", "--rank", max], mentions: ["rank \(max)", "2^40"], inputs: [])
        try expectRefusal(["memory", "--rank", "-4"], mentions: ["must be positive"], inputs: [])
    }

    func testTrainThatCannotFitIsRefusedBeforeAllocating() throws {
        let data = try copyTask("data.jsonl", count: 8)
        let out = tmp.appendingPathComponent("adapter").path
        try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--seq-len", "100000000", "--out", out],
                          mentions: ["llama/tiny", "seq-len 100000000", "the run would need at least", "available (MemAvailable)"], inputs: [tinyLlama, data], output: out)
        try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--rank", "100000000", "--out", out],
                          mentions: ["rank 100000000", "adapters with gradients and AdamW state"], inputs: [tinyLlama, data], output: out)
        try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--seq-len", String(Int.max), "--batch", "4", "--out", out],
                          mentions: ["more bytes than a 64-bit count holds"], inputs: [tinyLlama, data], output: out)
    }

    func testResumeBeyondTheDataOrStepsIsRefused() throws {
        let data = try copyTask("data.jsonl", count: 4)
        let out = tmp.appendingPathComponent("run").path
        let r = try qlora(["train", "--model", tinyLlama, "--data", data, "--steps", "2", "--batch", "2", "--save-every", "1", "--seq-len", "16", "--out", out])
        XCTAssertEqual(r.status, 0, r.stderr)
        let checkpoint = out + "/checkpoint-1"
        let short = try copyTask("short.jsonl", count: 2)
        let out2 = tmp.appendingPathComponent("run2").path
        try expectRefusal(["train", "--model", tinyLlama, "--data", short, "--resume", checkpoint, "--steps", "2", "--batch", "2", "--seq-len", "16", "--out", out2],
                          mentions: ["checkpoint-1/trainer_state.json", "data position 2", "short.jsonl", "2 examples"], inputs: [tinyLlama, short, checkpoint], output: out2)
        // A state past --steps.
        let state = URL(fileURLWithPath: checkpoint + "/trainer_state.json")
        var s = try JSONSerialization.jsonObject(with: Data(contentsOf: state)) as! [String: Any]
        s["step"] = 7
        try JSONSerialization.data(withJSONObject: s).write(to: state)
        try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--resume", checkpoint, "--steps", "2", "--batch", "2", "--seq-len", "16", "--out", out2],
                          mentions: ["trainer_state.json", "step 7 is beyond --steps 2"], inputs: [tinyLlama, data, checkpoint], output: out2)
    }
}

/// Inputs that gave wrong output with exit 0 and are now refused.
final class HostileInputSilentOutputTests: HostileInputTestCase {
    func testNonFiniteBlockScalesAreRefusedByDequantizeAndReportedByInspect() throws {
        let nested = try editedBnB("nan-nested.safetensors") { t in
            let i = t.firstIndex { $0.name == Self.q + ".nested_absmax" }!
            t[i].bytes = floatBytes([.nan])
        }
        let plain = try editedBnB("inf-absmax.safetensors", source: "bnb-nf4-nodq") { t in
            let i = t.firstIndex { $0.name == Self.q + ".absmax" }!
            var v = t[i].bytes.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            v[1] = .infinity
            t[i].bytes = floatBytes(v)
        }
        let out = tmp.appendingPathComponent("out").path
        try expectRefusal(["dequantize", nested, out], mentions: ["nan-nested.safetensors", Self.q + ".nested_absmax", "nan", "not finite"], inputs: [nested], output: out)
        try expectRefusal(["dequantize", plain, out], mentions: ["inf-absmax.safetensors", Self.q + ".absmax", "block 1: inf"], inputs: [plain], output: out)
        for path in [nested, plain] {
            let r = try qlora(["inspect", path])
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertTrue(r.stdout.contains("NON-FINITE block scales"), r.stdout)
            XCTAssertTrue(r.stdout.contains("warning: " + Self.q), r.stdout)
            let j = try qlora(["inspect", path, "--json"])
            XCTAssertTrue(j.stdout.contains("\"non_finite_scales\""), j.stdout)
        }
    }

    func testNonFiniteOrNonPositiveLearningRateAndAlphaAreRefused() throws {
        let data = try copyTask("data.jsonl", count: 4)
        let out = tmp.appendingPathComponent("adapter").path
        for lr in ["inf", "nan", "0", "-1", "-inf"] {
            try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--lr", lr, "--out", out], mentions: ["--lr must be a positive finite number"], inputs: [data], output: out)
        }
        for alpha in ["nan", "inf", "-inf", "0"] {
            try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--alpha", alpha, "--out", out], mentions: ["--alpha must be a finite non-zero number"], inputs: [data], output: out)
        }
    }

    func testDataWithoutTrainableLabelsIsRefused() throws {
        let out = tmp.appendingPathComponent("adapter").path
        let none = try copyTask("unlabelled.jsonl", count: 4, labelled: { _ in false })
        try expectRefusal(["train", "--model", tinyLlama, "--data", none, "--steps", "2", "--seq-len", "16", "--out", out],
                          mentions: ["unlabelled.jsonl", "no example has a label to train on"], inputs: [none], output: out)
        // Labels only in examples 3 and 4: the first step sees example 1 alone.
        let late = try copyTask("late.jsonl", count: 4, labelled: { $0 >= 2 })
        try expectRefusal(["train", "--model", tinyLlama, "--data", late, "--steps", "1", "--seq-len", "16", "--out", out],
                          mentions: ["late.jsonl", "step 1 of this run sees examples 1…1"], inputs: [late], output: out)
        // Labels cut off by --seq-len (they start at position 7).
        let labelled = try copyTask("cut.jsonl", count: 4)
        try expectRefusal(["train", "--model", tinyLlama, "--data", labelled, "--steps", "1", "--seq-len", "4", "--out", out],
                          mentions: ["cut.jsonl", "--seq-len 4"], inputs: [labelled], output: out)
    }

    func testZeroElementTensorsAreCopiedNotQuantized() throws {
        let input = tmp.appendingPathComponent("empty.safetensors").path
        try write([("empty.weight", .f32, [0, 64], []), ("w.weight", .f32, [4, 64], floatBytes((0..<256).map { Float($0) / 256 }))], to: input)
        let out = tmp.appendingPathComponent("q").path
        let before = contents(input)
        let r = try qlora(["quantize", input, out])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(contents(input), before)
        let i = try qlora(["inspect", out, "--json"])
        XCTAssertEqual(i.status, 0, i.stderr)
        let written = try SafeTensorsFile(path: out)
        XCTAssertEqual(written.tensors.first { $0.name == "empty.weight" }.map { [$0.dtype.rawValue] + $0.shape.map(String.init) }, ["F32", "0", "64"])
        XCTAssertFalse(written.tensors.contains { $0.name.hasPrefix("empty.weight.") })
        XCTAssertTrue(written.tensors.contains { $0.name == "w.weight.quant_state.bitsandbytes__nf4" })
    }
}

/// Inputs whose error did not say what was wrong.
final class HostileInputUnclearErrorTests: HostileInputTestCase {
    func testPickleAdapterIsNamed() throws {
        let (base, adapter) = try sampleWithAdapter()
        try FileManager.default.moveItem(atPath: adapter + "/adapter_model.safetensors", toPath: adapter + "/adapter_model.bin")
        let out = tmp.appendingPathComponent("merged").path
        try expectRefusal(["merge", base, adapter, out], mentions: ["adapter_model.bin", "PyTorch pickle", "not read"], inputs: [base, adapter], output: out)
    }

    func testMistypedAdapterConfigFieldsSayWhatTheyHold() throws {
        let (base, adapter) = try sampleWithAdapter()
        let out = tmp.appendingPathComponent("merged").path
        let cases: [(String, Any, String)] = [
            ("lora_alpha", "8", "lora_alpha is \"8\" (a string), not a number"),
            ("r", "8", "r is \"8\" (a string), not an integer"),
            ("r", true, "r is true (a boolean), not an integer"),
            ("use_rslora", "yes", "use_rslora is \"yes\" (a string), not true or false"),
            ("lora_dropout", [0.1], "lora_dropout is a list, not a number"),
            ("target_modules", 7, "target_modules is 7, not a string or a list of strings"),
        ]
        let original = try Data(contentsOf: URL(fileURLWithPath: adapter + "/adapter_config.json"))
        for (key, value, message) in cases {
            try original.write(to: URL(fileURLWithPath: adapter + "/adapter_config.json"))
            try setAdapterConfig(adapter) { $0[key] = value }
            try expectRefusal(["merge", base, adapter, out], mentions: ["adapter_config.json", message], inputs: [base, adapter], output: out)
        }
    }

    func testNegativeNumbersReachValidation() throws {
        let data = try copyTask("data.jsonl", count: 4)
        let out = tmp.appendingPathComponent("adapter").path
        try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--lr", "-1", "--out", out], mentions: ["--lr must be a positive finite number, got -1.0"], inputs: [data], output: out)
        try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--rank", "-8", "--out", out], mentions: ["--rank must be a positive integer, got -8"], inputs: [data], output: out)
        try expectRefusal(["train", "--model", tinyLlama, "--data", data, "--seq-len", "-1", "--out", out], mentions: ["--seq-len must be at least 2, got -1"], inputs: [data], output: out)
    }

    func testControlCharactersInNamesAreEscaped() throws {
        let evil = "evil\u{1B}[2J\u{9B}31m\nname.weight"
        let escaped = "evil\\u{1b}[2J\\u{9b}31m\\nname.weight"
        let input = tmp.appendingPathComponent("evil.safetensors").path
        try write([(evil, .f32, [2, 2], floatBytes([1, 2, 3, 4]))], to: input)
        for args in [["inspect", input], ["compare", input, input]] {
            let r = try qlora(args)
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertTrue(r.stdout.contains(escaped), r.stdout.debugDescription)
            XCTAssertFalse(r.stdout.unicodeScalars.contains { $0 == "\u{1B}" || $0 == "\u{9B}" }, r.stdout.debugDescription)
        }
        // An error quoting the name: a quant state that is not JSON.
        let bad = tmp.appendingPathComponent("evil-q.safetensors").path
        try write([(evil, .u8, [2, 1], [0, 0]), (evil + ".quant_state.bitsandbytes__nf4", .u8, [3], Array("nah".utf8))], to: bad)
        let out = tmp.appendingPathComponent("out").path
        try expectRefusal(["dequantize", bad, out], mentions: ["evil-q.safetensors", escaped], inputs: [bad], output: out)
    }

    /// PEFT loads only the modules its config selects and drops the others' weights without a
    /// word: merge refuses an adapter whose file holds modules its config does not target, and
    /// honours "all-linear", regex strings and layers_to_transform.
    func testAdapterModulesOutsideTheConfigsTargetsAreRefused() throws {
        let (base, adapter) = try sampleWithAdapter()
        let out = tmp.appendingPathComponent("merged").path
        let original = try Data(contentsOf: URL(fileURLWithPath: adapter + "/adapter_config.json"))
        try setAdapterConfig(adapter) { $0["layers_to_transform"] = [0] }
        try expectRefusal(["merge", base, adapter, out], mentions: ["adapter_model.safetensors", "model.layers.1.", "not one that adapter_config.json targets",
                                                                  "layers_to_transform [0]", "PEFT would ignore"], inputs: [base, adapter], output: out)
        try setAdapterConfig(adapter) { $0["layers_to_transform"] = NSNull(); $0["target_modules"] = #".*\.self_attn\..*"# }
        try expectRefusal(["merge", base, adapter, out], mentions: ["mlp", "target_modules \".*\\.self_attn\\..*\""], inputs: [base, adapter], output: out)
        try setAdapterConfig(adapter) { $0["target_modules"] = "q_proj"; $0["layers_to_transform"] = [0] }
        try expectRefusal(["merge", base, adapter, out], mentions: ["layers_to_transform and layers_pattern cannot be used when target_modules is a string"], inputs: [base, adapter], output: out)
        for targets: Any in ["all-linear", #"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"#] {
            try original.write(to: URL(fileURLWithPath: adapter + "/adapter_config.json"))
            try setAdapterConfig(adapter) { $0["target_modules"] = targets }
            let merged = tmp.appendingPathComponent("merged-\(UUID().uuidString)").path
            let r = try qlora(["merge", base, adapter, merged])
            XCTAssertEqual(r.status, 0, r.stderr)
        }
    }
}
