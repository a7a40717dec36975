import CheckpointFormats
import Foundation
import TestSupport
import XCTest

/// `PEFTTargets` against PEFT 0.21.2 itself: for each config of Vectors/peft_targets.json
/// (generate_peft_targets.py), the modules of a tiny Llama that `get_peft_model` adapted.
final class PEFTTargetsTests: XCTestCase {
    func testSelectsTheModulesPEFTAdapts() throws {
        let url = repositoryRoot.appendingPathComponent("Vectors/peft_targets.json")
        let doc = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any],
                                "Vectors/peft_targets.json missing; regenerate with Vectors/generate_peft_targets.py")
        let modules = try XCTUnwrap(doc["modules"] as? [[String: String]]).compactMap { $0["name"] }
        let cases = try XCTUnwrap(doc["cases"] as? [[String: Any]])
        XCTAssertEqual(cases.count, 14)
        for c in cases {
            let name = c["name"] as! String
            let targets = try PEFTTargets.read(c["config"] as! [String: Any])
            let selected = try modules.filter { try targets.selects($0) }.sorted()
            let expected = (c["adapted"] as! [String]).sorted()
            XCTAssertEqual(selected, expected, "case \(name): \(targets.summary)")
            // PEFT refuses a config that adapts nothing; so would qlora's merge (no module matches).
            if c["error"] is String { XCTAssertTrue(selected.isEmpty, name) }
            print("\(name): \(selected.count) modules, as PEFT")
        }
    }

    func testRefusesWhatLoraConfigRefuses() {
        XCTAssertThrowsError(try PEFTTargets.read(["target_modules": "q_proj", "layers_to_transform": [0]]))
        XCTAssertThrowsError(try PEFTTargets.read(["target_modules": ["q_proj"], "layers_pattern": "layers"]))
        XCTAssertThrowsError(try PEFTTargets.read(["target_modules": "(unclosed"]))
        XCTAssertThrowsError(try PEFTTargets.read(["target_modules": ["q_proj"], "layers_to_transform": ["0"]]))
        XCTAssertThrowsError(try PEFTTargets.read(["r": 8]))
    }
}
