import CheckpointFormats
import Foundation
import GGUF
import TestSupport
import XCTest

/// tokenizer.model read as llama.cpp's converter reads it: Vectors/gguf/llama-tiny/vocab.gguf is
/// convert_hf_to_gguf.py --vocab-only of Vectors/llama/tiny with that tokenizer.model.
final class SentencePieceTests: XCTestCase {
    let dir = repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny")

    func testVocabularyIsTheConvertersToTheBit() throws {
        let model = try SentencePieceModel(file: dir.appendingPathComponent("tokenizer.model").path)
        XCTAssertEqual(model.pieces.count, 170)
        let url = dir.appendingPathComponent("vocab.gguf")
        let golden = try GGUFFile(bytes: try Data(contentsOf: url), file: url.path)
        let vocabSize = try XCTUnwrap(golden.value("llama.vocab_size")?.integer)
        let v = model.ggufVocabulary(vocabSize: vocabSize)
        XCTAssertEqual(golden.value("tokenizer.ggml.model"), .string("llama"))
        XCTAssertEqual(golden.value("tokenizer.ggml.tokens"), .strings(v.tokens))
        guard case .array(6, let scores)? = golden.value("tokenizer.ggml.scores") else { return XCTFail("scores") }
        XCTAssertEqual(scores.map { if case .float32(let f) = $0 { return f.bitPattern } else { return 0 } }, v.scores.map(\.bitPattern))
        XCTAssertEqual(golden.value("tokenizer.ggml.token_type"), .int32s(v.types))
        // The padding the converter adds past the model's pieces, and the special pieces' types.
        XCTAssertEqual(v.tokens[255], "[PAD255]")
        XCTAssertEqual(Array(v.types.prefix(3)), [2, 3, 3])
    }

    func testHostileModelsAreRefusedWithOneLine() throws {
        for (bytes, fragment) in [([UInt8]([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]), "runs past the end"), ([0x0A], "ends inside a varint"),
                                  ([0x0A, 0x02, 0x18, 0x09], "type 9"), ([0x0A, 0x00], "no text"), ([0x12, 0x00], "no pieces"),
                                  ([0x0A, 0x03, 0x0A, 0x01, 0xFF], "not UTF-8"), ([0x0B], "wire type 3")] {
            XCTAssertThrowsError(try SentencePieceModel(bytes: bytes, file: "t.model")) { e in
                let text = "\(e)"
                XCTAssertTrue(text.hasPrefix("t.model: ") && text.contains(fragment) && !text.contains("\n"), "got: \(text)")
            }
        }
    }
}
