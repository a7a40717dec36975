import XCTest
import CheckpointFormats
import CheckpointJobs
import QLoRA
import SafeTensors
import TestSupport

/// Every adapter kind PEFT writes besides plain LoRA, merged by `mergeCheckpoint` and held to
/// PEFT 0.21.2's `merge_and_unload` (Vectors/peft_kinds, made by generate_peft_kinds.py on the
/// tiny Llama of Vectors/llama): bit for bit, tensor by tensor.
final class AdapterKindsTests: TemporaryDirectoryTestCase {
    let kinds = repositoryRoot.appendingPathComponent("Vectors/peft_kinds")
    let tiny = repositoryRoot.appendingPathComponent("Vectors/llama/tiny").path
    let tinyNF4 = repositoryRoot.appendingPathComponent("Vectors/llama/tiny-nf4").path

    /// The report's error of a DoRA merge, whose ΔW is W' − W in fp32: fl(W + fl(W' − W)) differs
    /// from W' by at most an ulp of fp32, against a ΔW of bf16 ulps.
    static let readBackTolerance = 1e-6

    func adapterDir(_ kind: String) -> String { kinds.appendingPathComponent(kind).appendingPathComponent("adapter").path }

    /// Every tensor of the golden file `name` in `kind` equals the output's, byte for byte.
    func assertOutputHoldsGolden(_ output: String, _ kind: String, _ name: String = "merged", file: StaticString = #filePath, line: UInt = #line) throws {
        let golden = try SafeTensorsFile(path: kinds.appendingPathComponent(kind).appendingPathComponent(name + ".safetensors").path)
        let out = try CheckpointReader(path: output)
        for t in golden.tensors {
            guard let info = out.info(named: t.name) else { XCTFail("\(kind): \(t.name) missing from the output", file: file, line: line); continue }
            XCTAssertEqual(info.shape, t.shape, "\(kind) \(t.name) shape", file: file, line: line)
            XCTAssertEqual(info.dtype, t.dtype, "\(kind) \(t.name) dtype", file: file, line: line)
            let mine = out.withBytes(of: t.name) { Array($0) }
            XCTAssertNil(byteMismatch(mine, golden.withBytes(of: t.name) { Array($0) }, name: "\(kind) \(t.name)"), file: file, line: line)
        }
    }

    func testDoRAOnABF16BaseMatchesPEFT() throws {
        let adapter = try PEFTAdapter.load(directory: adapterDir("dora-bf16"))
        XCTAssertTrue(adapter.useDora)
        XCTAssertEqual(adapter.modules.count, 14)
        XCTAssertEqual(adapter.modules["model.layers.0.self_attn.k_proj"]?.magnitude?.count, 32)
        XCTAssertFalse(adapter.isPlainLoRA)
        let out = tmp.appendingPathComponent("dora-bf16").path
        var o = MergeOptions()
        o.report = true
        let s = try mergeCheckpoint(base: tiny, adapter: adapterDir("dora-bf16"), output: out, options: o)
        XCTAssertEqual(s.merged, 14)
        try assertOutputHoldsGolden(out, "dora-bf16")
        // The report's ΔW for DoRA is what the merge changed: the written weight minus the base.
        XCTAssertEqual(s.report.count, 14)
        // W + ΔW rounds back to the written weight but for the fp32 subtraction's last bits.
        XCTAssertEqual(s.total.errorToDelta, 0, accuracy: Self.readBackTolerance, "ΔW is read back from the written weight")
    }

    /// An fp32 base (the tiny Llama's bf16 values widened, as `from_pretrained(dtype=float32)`
    /// holds them): the merged weight stays fp32.
    func testDoRAOnAnFP32BaseMatchesPEFT() throws {
        let reader = try CheckpointReader(path: tiny)
        var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
        for e in reader.entries {
            let values = reader.withBytes(of: e.name) { loadFloats($0, as: ElementType(e.info.dtype)!) }
            tensors.append((e.name, .f32, e.info.shape, encode(values, as: .float32)))
        }
        let base = tmp.appendingPathComponent("f32")
        try FileManager.default.createDirectory(at: base, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: tiny + "/config.json", toPath: base.appendingPathComponent("config.json").path)
        try SafeTensorsWriter.write(url: base.appendingPathComponent("model.safetensors"), tensors: tensors)
        let out = tmp.appendingPathComponent("dora-f32").path
        try mergeCheckpoint(base: base.path, adapter: adapterDir("dora-f32"), output: out, options: MergeOptions())
        try assertOutputHoldsGolden(out, "dora-f32")
    }

    /// DoRA on the NF4 base: PEFT's bnb merge rescales the dequantized bf16 weight, rounds it to
    /// bf16 and re-quantizes it (`--requantize`: every quant-state tensor), or (16-bit) that bf16 weight.
    func testDoRAOnAFourBitBaseMatchesPEFT() throws {
        var o = MergeOptions()
        o.requantize = true
        let q = tmp.appendingPathComponent("dora-nf4").path
        try mergeCheckpoint(base: tinyNF4, adapter: adapterDir("dora-nf4"), output: q, options: o)
        try assertOutputHoldsGolden(q, "dora-nf4")
        let dense = tmp.appendingPathComponent("dora-nf4-16bit").path
        try mergeCheckpoint(base: tinyNF4, adapter: adapterDir("dora-nf4"), output: dense, options: MergeOptions())
        try assertOutputHoldsGolden(dense, "dora-nf4", "merged_16bit")
    }

    /// modules_to_save: the adapter's trained lm_head replaces the base's outright, LoRA merges
    /// into q and v; the summary says which tensor was replaced.
    func testModulesToSaveReplacesTheModule() throws {
        let a = try PEFTAdapter.load(directory: adapterDir("modules-to-save"))
        XCTAssertEqual(a.modulesToSave, ["lm_head"])
        XCTAssertEqual(Array(a.savedTensors.keys), ["lm_head.weight"])
        let out = tmp.appendingPathComponent("mts").path
        let s = try mergeCheckpoint(base: tiny, adapter: adapterDir("modules-to-save"), output: out, options: MergeOptions())
        XCTAssertEqual(s.merged, 4)
        XCTAssertEqual(s.replaced.map(\.name), ["lm_head.weight"])
        XCTAssertTrue(s.replaced[0].how.hasPrefix("replaced by"), s.replaced[0].how)
        try assertOutputHoldsGolden(out, "modules-to-save")
        // PEFT 0.6's pickle (adapter_model.bin) of the same adapter is refused by name, as every pickle.
        XCTAssertThrowsError(try PEFTAdapter.load(directory: adapterDir("modules-to-save-old"))) { XCTAssertTrue("\($0)".contains("pickle"), "\($0)") }
    }

    /// trainable_token_indices: the adapter's rows (fp32, cast to bf16) are written into the
    /// embedding; every other row and tensor as PEFT merges them.
    func testTrainableTokenRowsAreWrittenIn() throws {
        let a = try PEFTAdapter.load(directory: adapterDir("trainable-tokens"))
        XCTAssertEqual(a.trainableTokenIndices, ["embed_tokens": [3, 17, 200, 255]])
        XCTAssertEqual(a.tokenRows["model.embed_tokens.weight"]?.indices, [3, 17, 200, 255])
        let out = tmp.appendingPathComponent("tokens").path
        let s = try mergeCheckpoint(base: tiny, adapter: adapterDir("trainable-tokens"), output: out, options: MergeOptions())
        XCTAssertEqual(s.replaced.map(\.name), ["model.embed_tokens.weight"])
        try assertOutputHoldsGolden(out, "trainable-tokens")
    }

    /// A vocabulary resized to 260 and its new rows trained (PEFT's documented way: trainable
    /// tokens on embed_tokens and lm_head, saved with save_embedding_layers): both tensors grow,
    /// config.json's vocab_size follows, and tokenizer files saved beside the adapter replace the base's.
    func testResizedVocabularyGrowsTheEmbeddingsAndConfig() throws {
        let adapter = tmp.appendingPathComponent("resized-adapter")
        try FileManager.default.copyItem(atPath: adapterDir("resized-vocab"), toPath: adapter.path)
        try Data(#"{"added_tokens_decoder": {}}"#.utf8).write(to: adapter.appendingPathComponent("tokenizer_config.json"))
        let out = tmp.appendingPathComponent("resized").path
        let s = try mergeCheckpoint(base: tiny, adapter: adapter.path, output: out, options: MergeOptions())
        XCTAssertEqual(Set(s.replaced.map(\.name)), ["model.embed_tokens.weight", "lm_head.weight"])
        XCTAssertEqual(s.tokenizerFiles, ["tokenizer_config.json"])
        try assertOutputHoldsGolden(out, "resized-vocab")
        let config = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/config.json"))) as? [String: Any])
        XCTAssertEqual(config["vocab_size"] as? Int, 260)
        XCTAssertEqual(try String(contentsOfFile: out + "/tokenizer_config.json", encoding: .utf8), #"{"added_tokens_decoder": {}}"#)
        // Without lm_head's rows the vocabulary would be resized for one layer only: refused, nothing written.
        let half = tmp.appendingPathComponent("half-adapter")
        try FileManager.default.createDirectory(at: half, withIntermediateDirectories: true)
        var config2 = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: adapter.appendingPathComponent("adapter_config.json"))) as? [String: Any])
        config2["trainable_token_indices"] = ["embed_tokens": [256, 257, 258, 259]]
        try JSONSerialization.data(withJSONObject: config2).write(to: half.appendingPathComponent("adapter_config.json"))
        let file = try SafeTensorsFile(path: adapter.appendingPathComponent("adapter_model.safetensors").path)
        try SafeTensorsWriter.write(url: half.appendingPathComponent("adapter_model.safetensors"),
                                    tensors: file.tensors.filter { !$0.name.contains("lm_head") }.map { t in (t.name, t.dtype, t.shape, file.withBytes(of: t.name) { Array($0) }) })
        let refused = tmp.appendingPathComponent("refused").path
        XCTAssertThrowsError(try mergeCheckpoint(base: tiny, adapter: half.path, output: refused, options: MergeOptions())) {
            XCTAssertTrue("\($0)".contains("lm_head.weight") && "\($0)".contains("resize"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: refused))
    }

    /// A LoRA GGUF carries lora_a / lora_b only: convert_lora_to_gguf.py stops at a magnitude
    /// vector, a whole module or token rows ("Not a lora_A or lora_B tensor"), and so does
    /// `exportLoRAGGUF`, with one line saying what the adapter holds; nothing is written.
    func testLoRAGGUFRefusesWhatTheConverterRefuses() throws {
        for (kind, what) in [("dora-bf16", "DoRA"), ("modules-to-save", "whole modules (lm_head.weight)"), ("trainable-tokens", "trainable tokens")] {
            let out = tmp.appendingPathComponent(kind + ".gguf").path
            XCTAssertThrowsError(try exportLoRAGGUF(adapter: adapterDir(kind), base: tiny, output: out, type: .f32)) {
                XCTAssertTrue("\($0)".contains(what) && "\($0)".contains("convert_lora_to_gguf.py"), "\($0)")
            }
            XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        }
    }

    /// `qlora export BASE --adapter DIR` merges through the same engine: for DoRA, a trained
    /// lm_head and trainable tokens, its GGUF is the export of `qlora merge`'s output. A resized
    /// vocabulary is refused in one step (merge first: the GGUF's vocabulary is one directory's).
    func testExportMergesEveryKindAsTheMergeDoes() throws {
        let base = tmp.appendingPathComponent("tiny-tok")
        try FileManager.default.copyItem(atPath: tiny, toPath: base.path)
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/tokenizer.model"),
                                         to: base.appendingPathComponent("tokenizer.model"))
        for kind in ["dora-bf16", "modules-to-save", "trainable-tokens"] {
            let merged = tmp.appendingPathComponent("\(kind)-merged/model")
            try FileManager.default.createDirectory(at: merged.deletingLastPathComponent(), withIntermediateDirectories: true)
            try mergeCheckpoint(base: base.path, adapter: adapterDir(kind), output: merged.path, options: MergeOptions())
            let (a, b) = (tmp.appendingPathComponent("\(kind)-a.gguf").path, tmp.appendingPathComponent("\(kind)-b.gguf").path)
            let direct = tmp.appendingPathComponent("\(kind)-direct/model")
            try FileManager.default.createDirectory(at: direct.deletingLastPathComponent(), withIntermediateDirectories: true)
            try FileManager.default.copyItem(at: base, to: direct)   // the same directory name, so general.name agrees
            let s = try exportGGUF(base: direct.path, adapters: [MergeAdapter(adapterDir(kind))], output: a, type: .bf16)
            try exportGGUF(base: merged.path, output: b, type: .bf16)
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: a)), try Data(contentsOf: URL(fileURLWithPath: b)), kind)
            XCTAssertEqual(s.merged, kind == "modules-to-save" ? 4 : 14, kind)
        }
        let out = tmp.appendingPathComponent("resized.gguf").path
        XCTAssertThrowsError(try exportGGUF(base: base.path, adapters: [MergeAdapter(adapterDir("resized-vocab"))], output: out, type: .bf16)) {
            XCTAssertTrue("\($0)".contains("merge it first"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
    }

    /// torch's row norm, as `LoRAMerge.rowNorm` sums it: against the plain fp64 norm, within fp32
    /// rounding, and its order (8 partial sums, then the tail) visible on a row where it matters.
    func testRowNormOrder() {
        let row: [Float] = (0..<37).map { Float(($0 * 7919) % 101) / 13 - 3.7 }
        let exact = row.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
        let mine = row.withUnsafeBufferPointer { LoRAMerge.rowNorm($0) }
        XCTAssertEqual(Double(mine), exact, accuracy: exact * 1e-6)
        var lanes = [Float](repeating: 0, count: 8)
        for i in 0..<32 { lanes[i % 8] += row[i] * row[i] }
        var total: Float = 0
        for l in lanes { total += l }
        for i in 32..<37 { total += row[i] * row[i] }
        XCTAssertEqual(mine, total.squareRoot())
    }
}
