import Foundation
import XCTest
@testable import Claims
import Memory
import QLoRA
import TestSupport

/// The committed slice of real trained weights (Q4), by its place in the repository.
let slicePath = repositoryRoot.appendingPathComponent("Data/all-MiniLM-L6-v2/slice.safetensors").path

/// `qlora claims` covers every claim of ../shared/claims.md, with its words and sources.
final class ClaimsTests: XCTestCase {
    func testEveryClaimOfSharedClaimsIsChecked() throws {
        let checks = try Claims.check(precision: try PrecisionFigures.measure(realWeights: try PrecisionFigures.loadRealWeights(path: slicePath)))
        XCTAssertEqual(checks.map(\.id), Claims.ids)
        let shared = repositoryRoot.deletingLastPathComponent().appendingPathComponent("shared/claims.md")
        guard let text = try? String(contentsOf: shared, encoding: .utf8) else {
            throw XCTSkip("../shared/claims.md not found beside the repository")
        }
        var rows: [String: (claim: String, source: String)] = [:]
        for line in text.split(separator: "\n") where line.hasPrefix("| ") {
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            guard cells.count == 3, cells[0].first.map({ "QM".contains($0) }) == true, Int(cells[0].dropFirst()) != nil else { continue }
            rows[cells[0]] = (cells[1], cells[2])
        }
        XCTAssertEqual(Set(rows.keys), Set(Claims.ids), "claims.md ids")
        for c in checks {
            XCTAssertEqual(c.claim, rows[c.id]?.claim, c.id)
            XCTAssertEqual(c.source, rows[c.id]?.source, c.id)
            XCTAssertFalse(c.figure.isEmpty || c.detail.isEmpty, c.id)
        }
    }

    /// The measured precision figures behind Q2, Q4 and Q6.
    func testPrecisionFigures() throws {
        let real = try XCTUnwrap(try PrecisionFigures.loadRealWeights(path: slicePath), slicePath)
        XCTAssertEqual(real.values.count, 147_456)
        let p = try PrecisionFigures.measure(realWeights: real)
        XCTAssertEqual(p.bitsNoDoubleQuant, 4.5, accuracy: 0.001)  // 4 + 32/64, plus code tables
        XCTAssertEqual(p.bitsNoDoubleQuant - p.bitsDoubleQuant, 0.373, accuracy: 0.002)
        XCTAssertLessThan(p.nf4Normal, p.int4Normal)
        XCTAssertLessThan(p.int4Normal, p.fp4Normal)
        XCTAssertLessThan(try XCTUnwrap(p.nf4Real), try XCTUnwrap(p.int4Real))
        XCTAssertGreaterThan(p.requantErrorToDelta, 0.5)
    }

    /// Int4 absmax: 15 levels per block, exact at ±absmax and 0.
    func testInt4AbsmaxRoundTrip() {
        let x: [Float] = [1, -1, 0, 0.5, 0.07, -0.3]
        let y = int4AbsmaxRoundTrip(x, blocksize: 3)
        XCTAssertEqual(Array(y[0..<3]), [1, -1, 0])
        XCTAssertEqual(y[3], 0.5)  // the block's absmax
        XCTAssertEqual(y[4], (0.07 / 0.5 * 7).rounded() / 7 * 0.5, accuracy: 1e-7)
    }

    /// The library looks for no file: no path, no real weights.
    func testNoPathNoRealWeights() throws {
        XCTAssertNil(try PrecisionFigures.loadRealWeights(path: nil))
    }

    /// M23–M30 state the setting that decides them, and rows that cannot be checked say why.
    func testFitClaimsNameTheirSetting() throws {
        let checks = try Claims.check(precision: PrecisionFigures())
        for c in checks where ["M26", "M27", "M28", "M29"].contains(c.id) {
            XCTAssertTrue(c.figure.contains("batch 1: the largest sequence length that fits"), c.id)
            XCTAssertTrue(c.detail.contains("2048 tokens × batch 1"), c.id)
        }
        for c in checks where c.verdict == .notCheckable {
            XCTAssertTrue(c.detail.hasPrefix("not checkable"), c.id)
        }
        // The step's peak model makes the mid-step spike (M23) and the 8B peak (M12) checkable;
        // system RAM (M30) depends on the loader.
        XCTAssertEqual(checks.filter { ["M23", "M30"].contains($0.id) }.map(\.verdict), [.holds, .notCheckable])
        XCTAssertNotEqual(checks.first { $0.id == "M12" }?.verdict, .notCheckable)
        XCTAssertNotEqual(checks.first { $0.id == "M13" }?.verdict, .notCheckable, "M13 is judged with the unsloth recipe")
    }

    /// The shapes that are not presets, against their published parameter counts; the
    /// bisection's answer fits and one token more does not.
    func testLocalShapesAndLargestSeqLen() throws {
        XCTAssertEqual(Claims.llama30b.totalParameters, 32_528_943_616)
        XCTAssertEqual(Claims.codeLlama34b.totalParameters, 33_743_970_304)
        let a = try XCTUnwrap(ModelArchitecture.preset("llama-2-7b"))
        let budget = 12_000_000_000
        let o = Claims.fitOptions(.qlora)
        let n = try XCTUnwrap(try Fit.largestSeqLen(a, o, memory: budget))
        func peak(_ seq: Int) throws -> Int { var q = o; q.seqLen = seq; return try Fit.perDeviceBytes(a, q, gpus: 1, parallelism: .ddp) }
        XCTAssertLessThanOrEqual(try peak(n), budget)
        XCTAssertGreaterThan(try peak(n + 1), budget)
        XCTAssertNil(try Fit.largestSeqLen(a, Claims.fitOptions(.full), memory: budget))
    }

    /// One question, one answer: the claims' fits are `qlora fit`'s (the same search and
    /// criterion), on one GPU and on several, and the claims name the stack they assume.
    func testClaimsAndFitGiveTheSameLength() throws {
        let questions: [(ModelArchitecture, TrainingMethod, Double, Int)] = [
            (try XCTUnwrap(ModelArchitecture.preset("llama-2-7b")), .qlora, 24, 1), (try XCTUnwrap(ModelArchitecture.preset("llama-2-7b")), .qlora, 8, 1),
            (Claims.codeLlama34b, .qlora, 24, 2), (try XCTUnwrap(ModelArchitecture.preset("llama-3.1-70b")), .lora, 80, 2),
        ]
        for (a, method, gb, gpus) in questions {
            let claim = try Claims.fit("", a, method, in: "", gb, gpus: gpus)
            let o = MemoryOptions(method: method, rank: 16, seqLen: 2048)  // qlora fit's defaults
            let answers = try Fit.answer(a, o, memory: Int(gb * 1e9), gpus: gpus, parallelism: gpus > 1 ? .fsdp : .ddp)
            let withCheckpointing = try XCTUnwrap(answers.first { $0.gradientCheckpointing })
            XCTAssertEqual(claim.tokens, withCheckpointing.largestSeqLen, "\(a.name) \(method) in \(gpus)×\(gb) GB")
            XCTAssertNotNil(claim.tokens)
        }
        let checks = try Claims.check(precision: PrecisionFigures())
        for c in checks where ["M26", "M27", "M28", "M29"].contains(c.id) {
            XCTAssertTrue(c.figure.contains(Stack.default.description), c.id)
        }
    }

    /// M22's Q4_K_M byte count is llama-quantize's: the tensor bytes of its Q4_K_M file for the
    /// `small` model of Vectors/gguf/quantize.json (made by llama.cpp's own llama-quantize).
    func testQ4KMBytesAreLlamaQuantizes() throws {
        let data = try Data(contentsOf: repositoryRoot.appendingPathComponent("Vectors/gguf/quantize.json"))
        let golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let tensors = try XCTUnwrap(((golden["small"] as? [String: Any])?["q4_k_m"] as? [String: Any])?["tensors"] as? [[Any]])
        let blocks: [String: (Int, Int)] = ["F32": (1, 4), "Q4_K": (256, 144), "Q6_K": (256, 210)]
        let bytes = try tensors.reduce(0) { total, t in
            let (qk, size) = try XCTUnwrap(blocks[t[1] as! String], "\(t[1])")
            return total + (t[2] as! [Int]).reduce(1, *) / qk * size
        }
        let small = ModelArchitecture(name: "small", hiddenSize: 256, intermediateSize: 512, layers: 4, attentionHeads: 8, keyValueHeads: 2, vocabSize: 256)
        XCTAssertEqual(ggufQ4KMBytes(small), bytes)
    }
}
