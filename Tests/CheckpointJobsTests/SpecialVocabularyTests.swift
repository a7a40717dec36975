import CheckpointFormats
import CheckpointJobs
import Foundation
import GGUF
import QLoRA
import SafeTensors
import TestSupport
import XCTest

/// A checkpoint's tokenizer side files as llama.cpp's converter writes them (gguf-py's
/// SpecialVocab, added tokens, add_prefix_space): Vectors/gguf/llama-tiny/special/VARIANT.gguf is
/// `convert_hf_to_gguf.py --vocab-only` of Vectors/llama/tiny with tokenizer.model and VARIANT/'s
/// files (Vectors/generate_gguf_special.py).
final class SpecialVocabularyTests: XCTestCase {
    let special = repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/special")

    func testSideFilesGiveTheConvertersTokenizerKeys() throws {
        let model = repositoryRoot.appendingPathComponent("Vectors/llama/tiny")
        let configBytes = [UInt8](try Data(contentsOf: model.appendingPathComponent("config.json")))
        let config = try JSONValue.parse(document: configBytes)
        let arch = try ModelArchitecture(configFile: model.appendingPathComponent("config.json").path)
        let sp = try SentencePieceModel(file: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/tokenizer.model").path)
        for variant in ["chat", "added", "jsontemplate"] {
            let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("special-\(UUID().uuidString)")
            defer { try? FileManager.default.removeItem(at: tmp) }
            try FileManager.default.copyItem(at: special.appendingPathComponent(variant), to: tmp)
            try FileManager.default.copyItem(at: model.appendingPathComponent("config.json"), to: tmp.appendingPathComponent("config.json"))
            let vocab = try SpecialVocabulary(directory: tmp.path, vocabSize: arch.vocabSize)
            let ours = GGUFExport.llamaMetadata(config: config, arch, name: "Tiny", parameters: 0, outType: .f16,
                                                vocabulary: sp.ggufVocabulary(vocabSize: arch.vocabSize), special: vocab)
            let got = try assertTokenizerKeys(ours, golden: special.appendingPathComponent(variant + ".gguf"), variant)
            if variant == "added" {
                // The end-of-turn token the template's trailing </s> displaced, and the added tokens' types.
                XCTAssertEqual(got.first { $0.key == "tokenizer.ggml.eot_token_id" }?.value, .uint32(171))
                XCTAssertEqual(vocab.apply(to: sp.ggufVocabulary(vocabSize: arch.vocabSize)).types[170...173], [3, 3, 4, 4])
            }
        }
    }

    /// Byte-level BPE tokenizers (tokenizer.json): Vectors/gguf/bpe/VARIANT.gguf is the
    /// converter's `--vocab-only` output for VARIANT/ (Vectors/generate_gguf_bpe.py).
    func testBPETokenizersGiveTheConvertersTokenizerKeys() throws {
        let bpe = repositoryRoot.appendingPathComponent("Vectors/gguf/bpe")
        for (variant, family, pre) in [("qwen2", GGUFArchitecture.qwen2, "qwen2"), ("llama3", .llama, "llama-bpe")] {
            let dir = bpe.appendingPathComponent(variant)
            let configPath = dir.appendingPathComponent("config.json").path
            let config = try JSONValue.parse(document: [UInt8](try Data(contentsOf: URL(fileURLWithPath: configPath))))
            let arch = try ModelArchitecture(configFile: configPath)
            let tokenizer = try GGUFExport.Tokenizer(directory: dir.path, family, vocabSize: arch.vocabSize)
            XCTAssertEqual(tokenizer.bpe?.pre, pre, variant)
            let ours = GGUFExport.metadata(config: config, arch, family, name: "Tiny", parameters: 0, outType: .f16,
                                           vocabulary: tokenizer.sentencePiece, special: tokenizer.special, bpe: tokenizer.bpe)
            try assertTokenizerKeys(ours, golden: bpe.appendingPathComponent(variant + ".gguf"), variant)
        }
    }

    /// Our metadata from general.quantization_version on (the tokenizer's keys) equals the golden
    /// --vocab-only file's: keys, order and values. Returns ours.
    @discardableResult
    func assertTokenizerKeys(_ ours: [(key: String, value: GGUFValue)], golden url: URL, _ variant: String) throws -> [(key: String, value: GGUFValue)] {
        let golden = try GGUFFile(bytes: try Data(contentsOf: url), file: url.path).metadata
        func tail(_ m: [(key: String, value: GGUFValue)]) -> [(key: String, value: GGUFValue)] {
            Array(m.drop { $0.key != "general.quantization_version" })
        }
        let (want, got) = (tail(golden), tail(ours))
        XCTAssertGreaterThan(want.count, 8, "\(variant): the golden's tokenizer keys")
        XCTAssertEqual(got.map(\.key), want.map(\.key), "\(variant): keys and order")
        for (g, w) in zip(got, want) where g.key == w.key {
            XCTAssertEqual(g.value, w.value, "\(variant): \(g.key)")
        }
        return got
    }

    /// Two additional chat templates whose names sanitize alike are one key, the later template
    /// (gguf-py overwrites; a repeated key would make a file llama.cpp refuses).
    func testChatTemplateNamesThatSanitizeAlikeAreOneKey() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("templates-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("additional_chat_templates"), withIntermediateDirectories: true)
        try Data("{\"tokenizer_class\": \"LlamaTokenizer\"}".utf8).write(to: dir.appendingPathComponent("tokenizer_config.json"))
        try Data("default".utf8).write(to: dir.appendingPathComponent("chat_template.jinja"))
        try Data("first".utf8).write(to: dir.appendingPathComponent("additional_chat_templates/tool-use.jinja"))
        try Data("second".utf8).write(to: dir.appendingPathComponent("additional_chat_templates/tool_use.jinja"))
        let v = try SpecialVocabulary(directory: dir.path, vocabSize: 256)
        XCTAssertEqual(v.entries, [.namedChatTemplate(name: "tool_use", template: "second"), .chatTemplateNames(["tool_use"]), .chatTemplate("default")])
    }

    /// A pre-tokenizer qlora does not name is refused with one line naming tokenizer.json.
    func testUnknownPreTokenizerIsRefused() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bpe-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.copyItem(at: repositoryRoot.appendingPathComponent("Vectors/gguf/bpe/qwen2"), to: dir)
        let file = dir.appendingPathComponent("tokenizer.json")
        let text = try String(contentsOf: file, encoding: .utf8).replacingOccurrences(of: #"\\p{N}|"#, with: #"\\p{N}{1,2}|"#)
        try text.write(to: file, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try BPEVocabulary(directory: dir.path)) { e in
            XCTAssertTrue("\(e)".contains("tokenizer.json: its pre-tokenizer is not one qlora names yet"), "\(e)")
        }
    }
}
