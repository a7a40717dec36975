import CheckpointFormats
import CheckpointJobs
import Foundation
import GGUF
import QLoRA
import SafeTensors
import TestSupport
import XCTest

/// Each tensor qlora's GGUF export writes for Vectors/llama/tiny against what llama.cpp's
/// convert_hf_to_gguf.py wrote (Vectors/gguf/llama-tiny/export.json, by generate_gguf_llama.py):
/// the same names in the same order, types, dimensions and bytes (sha256), for every --outtype.
final class GGUFExportTests: XCTestCase {
    func testSHA256() {
        XCTAssertEqual(SHA256.hex(Array("abc".utf8)), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertEqual(SHA256.hex([UInt8]()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        XCTAssertEqual(SHA256.hex([UInt8](repeating: 0x61, count: 1000)), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3")
    }

    func testTensorsAreTheConvertersToTheBit() throws {
        let model = repositoryRoot.appendingPathComponent("Vectors/llama/tiny")
        let arch = try ModelArchitecture(configFile: model.appendingPathComponent("config.json").path)
        let reader = try CheckpointReader(path: model.appendingPathComponent("model.safetensors").path)
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/export.json"))
        let golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        for outType in GGUFOutType.allCases {
            let want = try XCTUnwrap((golden[outType.rawValue] as? [String: Any])?["tensors"] as? [[Any]], outType.rawValue)
            let got = try GGUFExport.llamaTensors(reader, arch, outType: outType)
            XCTAssertEqual(got.map(\.name), want.map { $0[0] as! String }, "\(outType): names and order")
            for (t, w) in zip(got, want) {
                XCTAssertEqual(t.type.description, w[1] as? String, "\(outType) \(t.name): type")
                XCTAssertEqual(t.ne, w[2] as? [Int], "\(outType) \(t.name): dimensions")
                XCTAssertEqual(SHA256.hex(t.bytes), w[3] as? String, "\(outType) \(t.name): bytes")
            }
        }
    }

    /// The whole file, metadata and tokenizer included: the same bytes as convert_hf_to_gguf.py's
    /// for every --outtype (the directory is named `tiny`, as the converter saw it: the name
    /// becomes general.name).
    func testWholeFileIsTheConvertersToTheByte() throws {
        let model = repositoryRoot.appendingPathComponent("Vectors/llama/tiny")
        let arch = try ModelArchitecture(configFile: model.appendingPathComponent("config.json").path)
        let config = try JSONValue.parse(document: [UInt8](try Data(contentsOf: model.appendingPathComponent("config.json"))))
        let reader = try CheckpointReader(path: model.appendingPathComponent("model.safetensors").path)
        let sp = try SentencePieceModel(file: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/tokenizer.model").path)
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/export.json"))
        let golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        // gguf-py's Metadata.load on such directory names gives these names.
        for (dir, name) in [("tiny", "Tiny"), ("my_model", "My_Model"), ("llama2", "Llama2"), ("Qwen", "Qwen"), ("v2model", "V2Model")] {
            XCTAssertEqual(GGUFNames.idToTitle(dir), name, dir)
        }
        for outType in GGUFOutType.allCases {
            let want = try XCTUnwrap(golden[outType.rawValue] as? [String: Any])
            let tensors = try GGUFExport.llamaTensors(reader, arch, outType: outType)
            let parameters = tensors.reduce(0) { $0 + $1.ne.reduce(1, *) }
            let metadata = GGUFExport.llamaMetadata(config: config, arch, name: "Tiny", parameters: parameters, outType: outType,
                                                    vocabulary: sp.ggufVocabulary(vocabSize: arch.vocabSize))
            XCTAssertEqual(metadata.map(\.key), (want["metadata"] as? [[String]])?.map { $0[0] }, "\(outType): keys and order")
            let bytes = try GGUFExport.fileBytes(metadata: metadata, tensors: tensors)
            XCTAssertEqual(bytes.count, want["bytes"] as? Int, "\(outType): size")
            XCTAssertEqual(SHA256.hex(bytes), want["sha256"] as? String, "\(outType): the file's bytes")
        }
    }

    func testSizeLabelsAsGGUFPyWritesThem() {
        XCTAssertEqual(GGUFExport.sizeLabel(parameters: 106_824), "107K")
        XCTAssertEqual(GGUFExport.sizeLabel(parameters: 1_235_814_400), "1.2B")
        XCTAssertEqual(GGUFExport.sizeLabel(parameters: 8_030_261_248), "8.0B")
        XCTAssertEqual(GGUFExport.sizeLabel(parameters: 70_553_706_496), "71B")
        XCTAssertEqual(GGUFExport.sizeLabel(parameters: 494_032_768), "494M")
    }

    /// LlamaModel.permute on a small case worked by hand: 2 heads of 4 rows, one column.
    func testPermuteInterleavesEachHeadsHalves() {
        let w: [Float] = [0, 1, 2, 3, 10, 11, 12, 13]
        XCTAssertEqual(GGUFExport.permuteRows(w, rows: 8, cols: 1, heads: 2), [0, 2, 1, 3, 10, 12, 11, 13])
    }
}
