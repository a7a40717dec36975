import CheckpointFormats
import CheckpointJobs
import Foundation
import GGUF
import QLoRA
import SafeTensors
import TestSupport
import XCTest

/// `exportGGUF` from a 4-bit base and with adapters is the export of the dense checkpoint that
/// `qlora dequantize` and `qlora merge` write (each of which is held to bitsandbytes and PEFT
/// elsewhere); and bad input is refused with nothing written.
final class GGUFExportJobTests: XCTestCase {
    var tmp: URL!

    override func setUpWithError() throws {
        tmp = FileManager.default.temporaryDirectory.appendingPathComponent("gguf-export-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: tmp) }

    static let tokenizer = repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/tokenizer.model")

    /// A sample Llama (256 wide, so Q4_K_M's K types apply) with the tiny tokenizer, and its adapter.
    func sample(_ name: String) throws -> (model: String, adapter: String) {
        let spec = SampleCheckpointSpec(architecture: ModelArchitecture(name: "sample", hiddenSize: 256, intermediateSize: 512, layers: 2,
                                                                         attentionHeads: 8, keyValueHeads: 2, vocabSize: 300), seed: 7)
        let model = tmp.appendingPathComponent(name)
        try writeSampleCheckpoint(output: model.path, spec: spec)
        try FileManager.default.copyItem(at: Self.tokenizer, to: model.appendingPathComponent("tokenizer.model"))
        let adapter = tmp.appendingPathComponent(name + "-adapter")
        try writeSampleAdapter(directory: adapter.path, spec: spec, rank: 4)
        return (model.path, adapter.path)
    }

    /// The export of `base` into a fresh `dir/model/` (the name gives general.name), as bytes.
    func exported(_ base: String, adapters: [String] = [], _ type: GGUFExportType, tag: String) throws -> [UInt8] {
        let out = tmp.appendingPathComponent("\(tag)-\(type.rawValue).gguf")
        try exportGGUF(base: base, adapters: adapters.map { MergeAdapter($0) }, output: out.path, type: type)
        let data = try Data(contentsOf: out)
        // The reader round-trips it: the header it parses encodes to the same bytes.
        let file = try GGUFFile(bytes: data, file: out.path)
        XCTAssertEqual(file.header.encoded(), [UInt8](data.prefix(file.dataOffset)), "\(tag) \(type): header round trip")
        return [UInt8](data)
    }

    /// `dir/model`, a directory named "model" so every export has the same general.name.
    func named(_ dir: String) -> String {
        let parent = tmp.appendingPathComponent(dir)
        try? FileManager.default.createDirectory(at: parent, withIntermediateDirectories: true)
        return parent.appendingPathComponent("model").path
    }

    func testFourBitBaseAndAdaptersExportAsTheirDenseCheckpoint() throws {
        let s = try sample("dense")
        try FileManager.default.copyItem(atPath: s.model, toPath: named("a"))
        // A 4-bit base: the export of its dequantization.
        try quantizeCheckpoint(input: named("a"), output: named("nf4"), options: QuantizeOptions())
        try dequantizeCheckpoint(input: named("nf4"), output: named("deq"))
        XCTAssertEqual(try exported(named("nf4"), .q4_k_m, tag: "nf4"), try exported(named("deq"), .q4_k_m, tag: "deq"), "4-bit base")
        // Adapters on a dense base: the export of qlora merge's output.
        try mergeCheckpoint(base: named("a"), adapters: [MergeAdapter(s.adapter)], output: named("merged"), options: MergeOptions())
        XCTAssertEqual(try exported(named("a"), adapters: [s.adapter], .bf16, tag: "a+adapter"), try exported(named("merged"), .bf16, tag: "merged"), "adapter")
        // Adapters on a 4-bit base: merged to bf16, then dequantized, then exported.
        try mergeCheckpoint(base: named("nf4"), adapters: [MergeAdapter(s.adapter)], output: named("nf4merged"), options: MergeOptions())
        try dequantizeCheckpoint(input: named("nf4merged"), output: named("nf4merged-deq"))
        XCTAssertEqual(try exported(named("nf4"), adapters: [s.adapter], .iq4_nl, tag: "nf4+adapter"), try exported(named("nf4merged-deq"), .iq4_nl, tag: "nf4merged"),
                       "adapter on a 4-bit base")
    }

    /// The serving report's merged and NF4 columns are what `qlora merge --report` says of the
    /// merged_16bit and the re-quantized merge (merge's report is held to PEFT's merge elsewhere);
    /// the llama.cpp columns use the type llama-quantize picks.
    func testServingReportAgreesWithTheMergeReport() throws {
        let s = try sample("model")
        let nf4 = tmp.appendingPathComponent("nf4").path
        try quantizeCheckpoint(input: s.model, output: nf4, options: QuantizeOptions())
        let exported = try exportGGUF(base: nf4, adapters: [MergeAdapter(s.adapter)], output: tmp.appendingPathComponent("r.gguf").path, type: .q4_k_m, report: true)
        let dense = try mergeCheckpoint(base: nf4, adapters: [MergeAdapter(s.adapter)], output: tmp.appendingPathComponent("m16").path, options: MergeOptions(report: true))
        let requantized = try mergeCheckpoint(base: nf4, adapters: [MergeAdapter(s.adapter)], output: tmp.appendingPathComponent("m4").path,
                                              options: MergeOptions(requantize: true, report: true))
        XCTAssertEqual(exported.serving.count, 14)
        let byName = Dictionary(uniqueKeysWithValues: exported.serving.map { ($0.name, $0) })
        for (merge, column) in [(dense, "merged"), (requantized, "nf4")] {
            for r in merge.report + [merge.total] {
                let e = try XCTUnwrap(r.name == "total" ? exported.servingTotal : byName[r.name], r.name)
                XCTAssertEqual(e.errorToDelta[column]!, r.errorToDelta, accuracy: 1e-9 * max(1, r.errorToDelta), "\(r.name) \(column)")
                XCTAssertEqual(e.deltaCosine[column]!, r.deltaCosine, accuracy: 1e-9, "\(r.name) \(column)")
            }
        }
        // qlora merge --report gives the same serving rows as the export of the same merge.
        XCTAssertEqual(dense.serving.count, exported.serving.count)
        for r in dense.serving + [dense.servingTotal] {
            let e = try XCTUnwrap(r.name == "total" ? exported.servingTotal : byName[r.name], r.name)
            XCTAssertEqual(r.ggmlTypes, e.ggmlTypes, r.name)
            for f in ServingFormat.allCases.map(\.rawValue) {
                XCTAssertEqual(r.errorToDelta[f]!, e.errorToDelta[f]!, accuracy: 1e-12, "\(r.name) \(f)")
                XCTAssertEqual(r.deltaCosine[f]!, e.deltaCosine[f]!, accuracy: 1e-12, "\(r.name) \(f)")
            }
        }
        XCTAssertEqual(requantized.serving.count, 14, "the re-quantizing merge reports the serving formats too")
        let v = try XCTUnwrap(byName["model.layers.1.self_attn.v_proj.weight"])
        XCTAssertEqual(v.ggmlTypes["q4_k_m"], "Q6_K", "the last layer's attn_v gets more bits")
        XCTAssertEqual(byName["model.layers.0.self_attn.v_proj.weight"]?.ggmlTypes["q4_k_m"], "Q4_K")
        // More bits keep more of the delta.
        XCTAssertLessThan(exported.servingTotal.errorToDelta["q8_0"]!, exported.servingTotal.errorToDelta["q4_k_m"]!)
        XCTAssertGreaterThan(exported.servingTotal.deltaCosine["q8_0"]!, exported.servingTotal.deltaCosine["q4_k_m"]!)
    }

    func testBadInputIsRefusedWithNothingWritten() throws {
        let s = try sample("model")
        let out = tmp.appendingPathComponent("out.gguf").path
        func refused(_ base: String, adapters: [String] = [], _ expected: String, file: StaticString = #filePath, line: UInt = #line) {
            XCTAssertThrowsError(try exportGGUF(base: base, adapters: adapters.map { MergeAdapter($0) }, output: out, type: .q4_0), file: file, line: line) {
                XCTAssertTrue("\($0)".contains(expected), "\($0)", file: file, line: line)
            }
            XCTAssertFalse(FileManager.default.fileExists(atPath: out), "nothing written", file: file, line: line)
        }
        refused(s.model + "/model.safetensors", "export needs a checkpoint directory")
        // A copy of the sample checkpoint with one thing changed.
        func variant(_ name: String, _ change: (String) throws -> Void) throws -> String {
            let dir = tmp.appendingPathComponent(name).path
            try FileManager.default.copyItem(atPath: s.model, toPath: dir)
            try change(dir)
            return dir
        }
        func replace(_ file: String, _ a: String, _ b: String) throws {
            try String(contentsOfFile: file, encoding: .utf8).replacingOccurrences(of: a, with: b).write(toFile: file, atomically: true, encoding: .utf8)
        }
        let noTokenizer = try variant("no-tokenizer") { try FileManager.default.removeItem(atPath: $0 + "/tokenizer.model") }
        refused(noTokenizer, "has no tokenizer.model")
        try Data("{}".utf8).write(to: URL(fileURLWithPath: noTokenizer + "/tokenizer.json"))
        refused(noTokenizer, "tokenizer.json: is not a BPE tokenizer")
        refused(try variant("gemma") { try replace($0 + "/config.json", "LlamaForCausalLM", "GemmaForCausalLM") }, "this checkpoint is GemmaForCausalLM")
        refused(try variant("bad-tokenizer") { try Data([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]).write(to: URL(fileURLWithPath: $0 + "/tokenizer.model")) }, "tokenizer.model")
        refused(s.model, adapters: [tmp.appendingPathComponent("missing-adapter").path], "missing-adapter")
        refused(try variant("huge-vocab") { try replace($0 + "/config.json", "\"vocab_size\": 300", "\"vocab_size\": 100000000") },
                "vocab_size 100000000 is not model.embed_tokens.weight's 300 rows")
        refused(try variant("bad-tokenizer-config") { try Data("{\"bos_token\": ".utf8).write(to: URL(fileURLWithPath: $0 + "/tokenizer_config.json")) },
                "tokenizer_config.json: is not valid JSON")
        // What the export writes differently from the converter is named in a warning.
        XCTAssertEqual(try exportGGUF(base: s.model, output: tmp.appendingPathComponent("w1.gguf").path, type: .q4_0).warnings, [])
        let carded = try variant("Llama-2-7b-chat") { _ in }
        // A card's keys are carried; one with a value the reader does not take (a number) is named.
        try Data("---\nlicense: llama2\ntags:\n- chat\nversion: 2.0\n---\n# Llama 2\n".utf8).write(to: URL(fileURLWithPath: carded + "/README.md"))
        let warned = try exportGGUF(base: carded, output: tmp.appendingPathComponent("w2.gguf").path, type: .q4_0).warnings
        XCTAssertEqual(warned.count, 1)
        XCTAssertTrue(warned.first?.contains("README.md: the model card's version not read") == true, "\(warned)")
        let file = try GGUFFile(bytes: Data(contentsOf: tmp.appendingPathComponent("w2.gguf")), file: "w2.gguf")
        XCTAssertEqual(file.value("general.license"), .string("llama2"))
        XCTAssertEqual(file.value("general.tags"), .strings(["chat"]))
        // An existing OUTPUT is kept unless overwrite is asked for.
        try Data("keep".utf8).write(to: URL(fileURLWithPath: out))
        XCTAssertThrowsError(try exportGGUF(base: s.model, output: out, type: .q4_0))
        XCTAssertEqual(try String(contentsOfFile: out, encoding: .utf8), "keep")
        try exportGGUF(base: s.model, output: out, type: .q4_0, overwrite: true)
        XCTAssertEqual([UInt8](try Data(contentsOf: URL(fileURLWithPath: out)).prefix(4)), GGUF.magic)
    }
}
