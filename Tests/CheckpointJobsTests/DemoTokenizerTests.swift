import CheckpointFormats
import CheckpointJobs
import Foundation
import GGUF
import QLoRA
import SafeTensors
import TestSupport
import XCTest

/// The tokenizer `make demo` exports (issue 25): Vectors/demo/tokenizer.model, SentencePiece BPE
/// with byte fallback (Vectors/generate_demo_tokenizer.py). Vectors/demo/vocab.json holds what
/// llama.cpp's convert_hf_to_gguf.py --vocab-only writes for it beside the demo's config.json.
final class DemoTokenizerTests: XCTestCase {
    let demo = repositoryRoot.appendingPathComponent("Vectors/demo")

    /// Llama 2's layout: <unk>, <s>, </s>, then the 256 byte pieces <0x00>..<0xFF> llama.cpp falls
    /// back to for text no other piece covers (without them its tokenizer throws std::out_of_range).
    func testSpecialAndBytePiecesComeFirst() throws {
        let model = try SentencePieceModel(file: demo.appendingPathComponent("tokenizer.model").path)
        XCTAssertEqual(model.pieces.count, 512)
        XCTAssertEqual(model.pieces.prefix(3).map(\.piece), ["<unk>", "<s>", "</s>"])
        XCTAssertEqual(model.pieces.prefix(3).map(\.type), [.unknown, .control, .control])
        for b in 0..<256 {
            let p = model.pieces[3 + b]
            XCTAssertEqual(p.piece, "<0x" + String(format: "%02X", b) + ">")
            XCTAssertEqual(p.type, .byte, p.piece)
            XCTAssertEqual(p.score.bitPattern, 0, p.piece)
        }
        XCTAssertFalse(model.pieces.dropFirst(259).contains { $0.type != .normal })
        // As the converter writes them: BYTE is GGUF token type 6, and the score is kept.
        let v = model.ggufVocabulary(vocabSize: 512)
        XCTAssertEqual(v.types[3...258], ArraySlice(repeating: 6, count: 256))
        XCTAssertEqual(v.tokens[3 + 0x41], "<0x41>")
    }

    /// The whole --vocab-only file, header and tokenizer, at the demo's vocab_size (512) and padded
    /// to 8192: the same bytes as the converter's, from the same directory (named `model`, as in
    /// the demo) read the way `qlora export` reads it.
    func testVocabularyOnlyFileIsTheConvertersToTheByte() throws {
        let golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: demo.appendingPathComponent("vocab.json"))) as? [String: Any])
        for size in ["512", "8192"] {
            let want = try XCTUnwrap(golden[size] as? [String: Any], size)
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("demo-tok-\(UUID().uuidString)/model")
            defer { try? FileManager.default.removeItem(at: dir.deletingLastPathComponent()) }
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            try JSONSerialization.data(withJSONObject: try XCTUnwrap(want["config"])).write(to: dir.appendingPathComponent("config.json"))
            try FileManager.default.copyItem(at: demo.appendingPathComponent("tokenizer.model"), to: dir.appendingPathComponent("tokenizer.model"))
            let configPath = dir.appendingPathComponent("config.json").path
            let config = try JSONValue.parse(document: [UInt8](try Data(contentsOf: URL(fileURLWithPath: configPath))))
            let arch = try ModelArchitecture(configFile: configPath)
            XCTAssertEqual(String(arch.vocabSize), size)
            let tokenizer = try GGUFExport.Tokenizer(directory: dir.path, .llama, vocabSize: arch.vocabSize)
            let general = GGUFNames.generalKeys(directory: dir.path, config: config, parameters: 0) { _ in "" }
            let metadata = GGUFExport.metadata(config: config, arch, .llama, name: "", parameters: 0, outType: .f16,
                                               vocabulary: tokenizer.sentencePiece, special: tokenizer.special, general: general)
            if let keys = want["metadata"] as? [String] {
                XCTAssertEqual(metadata.map(\.key), keys.map { String($0.split(separator: " ")[0]) }, "\(size): keys and order")
            }
            XCTAssertEqual(tokenizer.sentencePiece.types.filter { $0 == 6 }.count, want["byte_tokens"] as? Int, "\(size): BYTE tokens")
            let bytes = try GGUFHeader(metadata: metadata, tensors: []).encoded()
            XCTAssertEqual(bytes.count, want["bytes"] as? Int, "\(size): size")
            XCTAssertEqual(SHA256.hex(bytes), want["sha256"] as? String, "\(size): the file's bytes")
        }
    }
}
