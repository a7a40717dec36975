import CheckpointFormats
import CheckpointJobs
import Foundation
import GGUF
import QLoRA
import SafeTensors
import TestSupport
import XCTest

/// gguf-py's Metadata heuristics: Vectors/gguf/names.json (Vectors/generate_gguf_names.py).
final class GGUFNamesTests: XCTestCase {
    var golden: [String: Any] = [:]

    override func setUpWithError() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/gguf/names.json"))
        golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    func testModelIDComponentsAreGGUFPys() throws {
        let cases = try XCTUnwrap(golden["components"] as? [[String: Any]])
        XCTAssertEqual(cases.count, 100)
        for c in cases {
            let id = c["id"] as! String, total = c["total_params"] as! Int
            let got = GGUFNames.components(id, totalParameters: total)
            let want = GGUFNames.Components(fullName: c["full_name"] as? String, organization: c["org"] as? String, basename: c["basename"] as? String,
                                            finetune: c["finetune"] as? String, version: c["version"] as? String, sizeLabel: c["size_label"] as? String)
            XCTAssertEqual(got, want, "\(id) at \(total) parameters")
            if let full = want.fullName { XCTAssertEqual(GGUFNames.idToTitle(full), c["title"] as? String, id) }
        }
    }

    func testGeneralKeysAreTheConverters() throws {
        // Each directory's general.* keys: name heuristics, _name_or_path, generation_config.json and the model card.
        let files = try XCTUnwrap(golden["files"] as? [[String: Any]])
        for f in files {
            let dirName = f["directory"] as! String
            let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("names-\(UUID().uuidString)")
            defer { try? FileManager.default.removeItem(at: tmp) }
            let dir = tmp.appendingPathComponent(dirName)
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            var config = "{\"architectures\": [\"LlamaForCausalLM\"]"
            if let n = f["name_or_path"] as? String { config += ", \"_name_or_path\": \"\(n)\"" }
            config += "}"
            if let card = f["readme"] as? String { try Data(card.utf8).write(to: dir.appendingPathComponent("README.md")) }
            if let g = f["generation_config"] as? [String: Any] {
                try JSONSerialization.data(withJSONObject: g).write(to: dir.appendingPathComponent("generation_config.json"))
            }
            let keys = GGUFNames.generalKeys(directory: dir.path, config: try JSONValue.parse(document: Array(config.utf8)), parameters: 0) { _ in "unused" }
            // The golden's general.* keys between general.type and general.file_type.
            let want = try XCTUnwrap(f["general"] as? [[Any]]).filter { !["general.architecture", "general.type", "general.file_type", "general.quantization_version"].contains($0[0] as! String) }
            XCTAssertEqual(keys.map(\.key), want.map { $0[0] as! String }, dirName)
            for (k, w) in zip(keys, want) {
                switch k.value {
                case .string(let s): XCTAssertEqual(s, w[2] as? String, "\(dirName) \(k.key)")
                case .int32(let i): XCTAssertEqual(Int(i), w[2] as? Int, "\(dirName) \(k.key)")
                case .float32(let x): XCTAssertEqual(x, Float(try XCTUnwrap(w[2] as? Double)), "\(dirName) \(k.key)")  // JSONSerialization reads the last digits of a double loosely; its float is exact
                case .uint32(let u): XCTAssertEqual(Int(u), w[2] as? Int, "\(dirName) \(k.key)")
                case .array(8, let items): XCTAssertEqual(items, (w[2] as? [String])?.map { GGUFValue.string($0) }, "\(dirName) \(k.key)")
                default: XCTFail("\(dirName) \(k.key): \(k.value)")
                }
            }
        }
    }
}

/// Model cards a user's checkpoint may carry: odd or hostile front matter is read or skipped,
/// never a crash.
final class ModelCardTests: XCTestCase {
    func testOddFrontMatterIsReadOrSkipped() throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("card-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        let cards: [(String, [String: String])] = [
            ("---\nlicense: 'it''s mine'\ntags: [\"a, b\", c]\nlanguage:\n  - en\n  - fr\n---\n", ["general.license": "it's mine", "general.tags": "a, b|c", "general.languages": "en|fr"]),
            ("---\nlicense: \"unterminated\ntags:\n-\n- x\n---", [:]),  // PyYAML refuses both; skipped
            ("---\n:\n- \n  -\n\t\tlicense: mit\nlicense\n---\n", [:]),
            ("---\r\nlicense: mit # comment\r\n---\r\n", ["general.license": "mit"]),
            ("no front matter\nlicense: mit\n", [:]),
            ("---\nlicense: " + String(repeating: "x", count: 100_000) + "\n" + String(repeating: "  - deep\n", count: 10_000) + "---\n",
             ["general.license": String(repeating: "x", count: 100_000)]),
        ]
        for (text, want) in cards {
            try Data(text.utf8).write(to: tmp.appendingPathComponent("README.md"))
            let keys = GGUFNames.generalKeys(directory: tmp.path, config: .object([]), parameters: 0) { _ in "" }
            for (key, value) in want {
                let got = keys.first { $0.key == key }?.value
                switch got {
                case .string(let s)?: XCTAssertEqual(s, value, key)
                case .array(8, let items)?: XCTAssertEqual(items.map { if case .string(let s) = $0 { return s } else { return "?" } }.joined(separator: "|"), value, key)
                default: XCTFail("\(key): \(String(describing: got)) in \(text.prefix(60))")
                }
            }
            XCTAssertNil(keys.first { $0.key == "general.license" && want["general.license"] == nil }, "\(text.prefix(60))")
        }
    }
}
