import Foundation
import XCTest
import CheckpointFormats
import CheckpointJobs
import QLoRA
import SafeTensors
import TestSupport

/// The JSON files qlora writes against what transformers 5.23 and PEFT 0.21.2 write
/// (Vectors/interop/, `Vectors/generate_interop.py`), and Hugging Face cache snapshots (relative
/// symbolic links into blobs/) as inputs.
final class InteropTests: TemporaryDirectoryTestCase {

    var interop: URL { repositoryRoot.appendingPathComponent("Vectors/interop") }
    var tinyDense: String { repositoryRoot.appendingPathComponent("Vectors/llama/tiny").path }

    func json(_ path: String) throws -> JSONValue {
        guard let data = FileManager.default.contents(atPath: path) else {
            XCTFail("\(path) is missing: run Vectors/generate_interop.py (see Vectors/README.md)")
            return .null
        }
        return try JSONValue.parse(document: [UInt8](data))
    }

    /// The token kind Python's json gives a value: an int when the number has no fraction or
    /// exponent, otherwise a float.
    static func kind(_ v: JSONValue) -> String {
        switch v {
        case .null: return "null"
        case .bool: return "bool"
        case .string: return "string"
        case .array: return "list"
        case .object: return "dict"
        case .number(let t): return t.contains(where: { ".eE".contains($0) }) ? "float" : "int"
        }
    }

    /// Every difference between two JSON values, key by key and token kind by token kind
    /// (numbers compared by kind and value, not text); `unordered` names arrays compared as sets.
    static func differences(_ ours: JSONValue, _ theirs: JSONValue, path: String = "", unordered: Set<String> = []) -> [String] {
        let (k1, k2) = (kind(ours), kind(theirs))
        guard k1 == k2 else { return ["\(path): qlora writes \(k1) \(text(ours)), the Python stack \(k2) \(text(theirs))"] }
        switch (ours, theirs) {
        case (.object(let a), .object(let b)):
            var out: [String] = []
            let ka = Set(a.map(\.key)), kb = Set(b.map(\.key))
            for k in kb.subtracting(ka).sorted() { out.append("\(path).\(k): missing in qlora's file") }
            for k in ka.subtracting(kb).sorted() { out.append("\(path).\(k): not in the Python stack's file") }
            for m in a where kb.contains(m.key) {
                out += differences(m.value, b.first { $0.key == m.key }!.value, path: path + "." + m.key, unordered: unordered)
            }
            return out
        case (.array(let a), .array(let b)):
            if unordered.contains(path) {
                let (sa, sb) = (Set(a.map(text)), Set(b.map(text)))
                return sa == sb && a.count == b.count ? [] : ["\(path): \(text(ours)) is not the set \(text(theirs))"]
            }
            guard a.count == b.count else { return ["\(path): \(a.count) elements, the Python stack \(b.count)"] }
            return zip(a, b).enumerated().flatMap { differences($1.0, $1.1, path: "\(path)[\($0)]", unordered: unordered) }
        case (.number(let x), .number(let y)):
            return Double(x) == Double(y) ? [] : ["\(path): \(x) != \(y)"]
        default:
            return ours == theirs ? [] : ["\(path): \(text(ours)) != \(text(theirs))"]
        }
    }

    static func text(_ v: JSONValue) -> String { String(decoding: v.pythonJSON(indent: 0), as: UTF8.self).replacingOccurrences(of: "\n", with: "") }

    // MARK: - The writer

    /// Python's `json.dumps(d, indent=2, sort_keys=True) + "\n"`, byte for byte, on a document
    /// with every kind, empty containers, non-ASCII keys and values, control characters and
    /// float spellings (each number's text kept).
    func testPythonLayoutByteForByte() throws {
        let input = try json(interop.appendingPathComponent("layout-input.json").path)
        let expected = try Data(contentsOf: interop.appendingPathComponent("layout.json"))
        XCTAssertEqual(String(decoding: ConfigJSON.transformersFile(input), as: UTF8.self), String(decoding: expected, as: UTF8.self))
    }

    /// `ConfigJSON.float` is Python's `repr(float)`.
    func testFloatTextIsPythonRepr() {
        let cases: [(Double, String)] = [
            (6.0, "6.0"), (0.05, "0.05"), (12.5, "12.5"), (1e-05, "1e-05"), (1.5e-07, "1.5e-07"), (0.0001, "0.0001"),
            (0.00012, "0.00012"), (1e16, "1e+16"), (1e15, "1000000000000000.0"), (123456.789, "123456.789"), (-2.5e-10, "-2.5e-10"),
            (1e22, "1e+22"), (Double.leastNonzeroMagnitude, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"), (0.1 + 0.2, "0.30000000000000004"),
            (-0.0, "-0.0"), (0, "0.0"), (500000, "500000.0"), (1e100, "1e+100"), (2e-4, "0.0002"),
        ]
        for (x, text) in cases { XCTAssertEqual(ConfigJSON.float(x), .number(text), "\(x)") }
    }

    // MARK: - config.json

    /// `qlora quantize` of transformers' dense tiny Llama writes the config.json transformers'
    /// `save_pretrained` writes after quantizing the same model with bitsandbytes: the
    /// quantization_config key by key and type by type, every other member with its number text
    /// unchanged, and in the end the same bytes.
    func testQuantizedConfigIsTransformers() throws {
        for (golden, type, dq) in [("config-nf4-dq.json", QuantType.nf4, true), ("config-fp4-nodq.json", .fp4, false)] {
            var o = QuantizeOptions()
            o.quantType = type
            o.doubleQuant = dq
            let out = tmp.appendingPathComponent(golden + ".out").path
            try quantizeCheckpoint(input: tinyDense, output: out, options: o)
            let ours = try json(out + "/config.json"), theirs = try json(interop.appendingPathComponent(golden).path)
            XCTAssertEqual(Self.differences(ours["quantization_config"]!, theirs["quantization_config"]!, path: "quantization_config"), [], golden)
            XCTAssertEqual(Self.differences(ours, theirs), [], golden)
            // Pass-through: every member but quantization_config is the input's, number text included.
            guard case .object(let members) = ours, case .object(let input) = try json(tinyDense + "/config.json") else { return XCTFail() }
            XCTAssertEqual(members.filter { $0.key != "quantization_config" }.sorted { $0.key < $1.key }, input.sorted { $0.key < $1.key }, golden)
            XCTAssertEqual(ours["rope_parameters"]?["rope_theta"], .number("500000.0"))
            XCTAssertEqual(ours["quantization_config"]?["llm_int8_threshold"], .number("6.0"))
            XCTAssertEqual(String(decoding: try Data(contentsOf: URL(fileURLWithPath: out + "/config.json")), as: UTF8.self),
                           String(decoding: try Data(contentsOf: interop.appendingPathComponent(golden)), as: UTF8.self), golden)
        }
    }

    /// bnb_4bit_quant_storage=bfloat16 (FSDP QLoRA) as transformers writes it.
    func testQuantStorageConfigIsTransformers() throws {
        let config = try Data(contentsOf: URL(fileURLWithPath: tinyDense + "/config.json"))
        let q = BnBQuantizationConfig(quantType: .nf4, doubleQuant: true, computeDtype: .bfloat16, quantStorage: .bf16)
        let ours = try XCTUnwrap(BnBQuantizationConfig.rewrite(config: config, quantization: q))
        let golden = try Data(contentsOf: interop.appendingPathComponent("config-nf4-dq-storage-bf16.json"))
        XCTAssertEqual(Self.differences(try JSONValue.parse(document: [UInt8](ours)), try JSONValue.parse(document: [UInt8](golden))), [])
        XCTAssertEqual(String(decoding: ours, as: UTF8.self), String(decoding: golden, as: UTF8.self))
    }

    /// `qlora dequantize` of transformers' bnb-4bit checkpoint removes quantization_config and
    /// leaves the config transformers wrote for the dense model, byte for byte.
    func testDequantizedConfigIsTheDenseOne() throws {
        let out = tmp.appendingPathComponent("dense").path
        try dequantizeCheckpoint(input: repositoryRoot.appendingPathComponent("Vectors/llama/tiny-nf4").path, output: out)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: out + "/config.json")),
                       try Data(contentsOf: URL(fileURLWithPath: tinyDense + "/config.json")))
    }

    /// A config.json that is not JSON is copied as it is (the weights are still written).
    func testConfigThatIsNotJSONIsCopied() throws {
        let config = Data("{\"rope_theta\": 10000.0,}".utf8)
        XCTAssertNil(BnBQuantizationConfig.rewrite(config: config, quantization: BnBQuantizationConfig(quantType: .nf4, doubleQuant: true)))
        let out = BnBQuantizationConfig.rewrite(config: Data("{\"rope_theta\": 10000.0, \"x\": [1.0e3, 2E-7]}".utf8), quantization: nil)
        XCTAssertEqual(String(decoding: try XCTUnwrap(out), as: UTF8.self), "{\n  \"rope_theta\": 10000.0,\n  \"x\": [\n    1.0e3,\n    2E-7\n  ]\n}\n")
    }

    // MARK: - adapter_config.json

    /// What `qlora train` writes (r 16, alpha 32, the seven projections) against PEFT's
    /// save_pretrained of the same LoraConfig: same keys, kinds and values (target_modules is a
    /// set in PEFT, written in hash order), and the same bytes once that order is PEFT's.
    func testAdapterConfigIsPEFT() throws {
        var a = PEFTAdapter(rank: 16, loraAlpha: 32, targetModules: ModelArchitecture.projectionNames)
        a.baseModelNameOrPath = "Vectors/llama/tiny"
        let theirs = try json(interop.appendingPathComponent("adapter_config.json").path)
        XCTAssertEqual(Self.differences(a.configJSON, theirs, unordered: [".target_modules"]), [])
        guard case .array(let order)? = theirs["target_modules"] else { return XCTFail() }
        a.targetModules = order.map { if case .string(let s) = $0 { return s } else { return "" } }
        XCTAssertEqual(String(decoding: ConfigJSON.peftFile(a.configJSON), as: UTF8.self),
                       String(decoding: try Data(contentsOf: interop.appendingPathComponent("adapter_config.json")), as: UTF8.self))
    }

    /// rsLoRA, a fractional alpha, rank and alpha patterns, dropout and no task type. The one
    /// difference: PEFT writes the base model's class into `auto_mapping` when there is no task
    /// type (for AutoPeftModel); qlora does not know the class and writes null, which
    /// `PeftModel.from_pretrained` accepts.
    func testAdapterConfigWithPatternsIsPEFT() throws {
        var a = PEFTAdapter(rank: 8, loraAlpha: 12.5, targetModules: ["q_proj", "v_proj", "down_proj"])
        a.useRSLoRA = true
        a.rankPattern = ["v_proj": 4]
        a.alphaPattern = ["down_proj": 24]
        a.loraDropout = 0.05
        a.taskType = nil
        a.baseModelNameOrPath = "Vectors/llama/tiny"
        let theirs = try json(interop.appendingPathComponent("adapter_config-patterns.json").path)
        let found = Self.differences(a.configJSON, theirs, unordered: [".target_modules"])
        XCTAssertEqual(found.count, 1, "\(found)")
        XCTAssertTrue(found.first?.hasPrefix(".auto_mapping: qlora writes null null, the Python stack dict") == true, "\(found)")
    }

    /// What qlora writes, qlora reads back (task type included).
    func testAdapterRoundTrip() throws {
        var a = PEFTAdapter(rank: 2, loraAlpha: 3.5, targetModules: ["q_proj"])
        a.modules["model.layers.0.self_attn.q_proj"] = .init(path: "model.layers.0.self_attn.q_proj", rank: 2, inFeatures: 3, outFeatures: 2,
                                                             loraA: [1, 2, 3, 4, 5, 6], loraB: [0.5, 0.25, -1, 2])
        let dir = tmp.appendingPathComponent("adapter").path
        try a.save(directory: dir)
        let b = try PEFTAdapter.load(directory: dir)
        XCTAssertEqual(b.taskType, "CAUSAL_LM")
        XCTAssertEqual(b.loraAlpha, 3.5)
        XCTAssertEqual(b.modules, a.modules)
        XCTAssertEqual(try json(dir + "/adapter_config.json")["lora_alpha"], .number("3.5"))
    }

    // MARK: - Hugging Face cache snapshots

    /// Lays `files` out as the Hugging Face cache does: each file's bytes in `blobs/<name>` and a
    /// relative link `snapshots/<rev>/<name> -> ../../blobs/<blob>`; returns the snapshot.
    static func snapshot(of files: [String: Data], in root: URL, revision: String = "0123abcd") throws -> String {
        let fm = FileManager.default
        let blobs = root.appendingPathComponent("blobs"), snap = root.appendingPathComponent("snapshots/" + revision)
        try fm.createDirectory(at: blobs, withIntermediateDirectories: true)
        try fm.createDirectory(at: snap, withIntermediateDirectories: true)
        for (i, (name, data)) in files.sorted(by: { $0.key < $1.key }).enumerated() {
            let blob = String(format: "%040x", i + 0xb10b)
            try data.write(to: blobs.appendingPathComponent(blob))
            try fm.createSymbolicLink(atPath: snap.appendingPathComponent(name).path, withDestinationPath: "../../blobs/" + blob)
        }
        return snap.path
    }

    static func files(of directory: String) throws -> [String: Data] {
        var out: [String: Data] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: directory) where !name.hasPrefix(".") {
            out[name] = try Data(contentsOf: URL(fileURLWithPath: directory + "/" + name))
        }
        return out
    }

    /// No symbolic link in `directory`: every entry a regular file.
    func assertRegularFiles(_ directory: String, file: StaticString = #filePath, line: UInt = #line) throws {
        for name in try FileManager.default.contentsOfDirectory(atPath: directory) {
            let type = try FileManager.default.attributesOfItem(atPath: directory + "/" + name)[.type] as? FileAttributeType
            XCTAssertEqual(type, .typeRegular, "\(directory)/\(name)", file: file, line: line)
        }
    }

    /// quantize, dequantize and merge read a snapshot (and a link to one, as `hf download
    /// --local-dir` or a user's shortcut makes) as they read a plain directory, and write
    /// regular files: the sidecars' contents, not links that would dangle.
    func testCacheSnapshotInputs() throws {
        var files = try Self.files(of: tinyDense)
        files["tokenizer.json"] = Data("{\"model\": {\"vocab\": {}}}".utf8)
        let snap = try Self.snapshot(of: files, in: tmp.appendingPathComponent("models--tiny"))
        let link = tmp.appendingPathComponent("tiny-link").path
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "models--tiny/snapshots/0123abcd")

        let plain = tmp.appendingPathComponent("plain-nf4").path
        try quantizeCheckpoint(input: tinyDense, output: plain, options: QuantizeOptions())
        for input in [snap, link] {
            let out = tmp.appendingPathComponent(URL(fileURLWithPath: input).lastPathComponent + "-nf4").path
            try quantizeCheckpoint(input: input, output: out, options: QuantizeOptions())
            try assertRegularFiles(out)
            let written = try Self.files(of: out)
            XCTAssertEqual(written["tokenizer.json"], files["tokenizer.json"])
            XCTAssertEqual(written["generation_config.json"], files["generation_config.json"])
            XCTAssertEqual(written["model.safetensors"], try Data(contentsOf: URL(fileURLWithPath: plain + "/model.safetensors")))
            XCTAssertEqual(written["config.json"], try Data(contentsOf: interop.appendingPathComponent("config-nf4-dq.json")))
        }

        // The quantized output as a snapshot, dequantized; an adapter snapshot merged into it.
        let qsnap = try Self.snapshot(of: try Self.files(of: plain), in: tmp.appendingPathComponent("models--tiny-nf4"))
        let dense = tmp.appendingPathComponent("dense").path
        try dequantizeCheckpoint(input: qsnap, output: dense)
        try assertRegularFiles(dense)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dense + "/config.json")), files["config.json"])

        var a = PEFTAdapter(rank: 2, loraAlpha: 4, targetModules: ["q_proj"])
        let q = "model.layers.0.self_attn.q_proj"
        let loraA: [Float] = (0..<128).map { i in Float(i % 7) / 100 }
        let loraB: [Float] = (0..<128).map { i in Float(i % 5) / 100 }
        a.modules[q] = PEFTAdapter.Module(path: q, rank: 2, inFeatures: 64, outFeatures: 64, loraA: loraA, loraB: loraB)
        let adapterDir = tmp.appendingPathComponent("adapter").path
        try a.save(directory: adapterDir)
        let asnap = try Self.snapshot(of: try Self.files(of: adapterDir), in: tmp.appendingPathComponent("models--adapter"))
        let mergedPlain = tmp.appendingPathComponent("merged-plain").path, mergedSnap = tmp.appendingPathComponent("merged-snap").path
        try mergeCheckpoint(base: plain, adapter: adapterDir, output: mergedPlain, options: MergeOptions())
        let summary = try mergeCheckpoint(base: qsnap, adapter: asnap, output: mergedSnap, options: MergeOptions())
        XCTAssertEqual(summary.merged, 1)
        try assertRegularFiles(mergedSnap)
        XCTAssertEqual(try Self.files(of: mergedSnap), try Self.files(of: mergedPlain))
    }

    /// A dangling link among a snapshot's sidecars is refused naming it, and nothing is written.
    func testDanglingSidecarLinkNamesTheFile() throws {
        let snap = try Self.snapshot(of: try Self.files(of: tinyDense), in: tmp.appendingPathComponent("models--tiny"))
        try FileManager.default.createSymbolicLink(atPath: snap + "/tokenizer.json", withDestinationPath: "../../blobs/missing")
        let out = tmp.appendingPathComponent("out").path
        XCTAssertThrowsError(try quantizeCheckpoint(input: snap, output: out, options: QuantizeOptions())) {
            XCTAssertTrue("\($0)".contains(snap + "/tokenizer.json"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
    }
}
