import Foundation
@testable import QLoRA
import TestSupport
import XCTest

/// A sparse mixture-of-experts block against transformers 5.23's own Qwen3MoeSparseMoeBlock and
/// MixtralSparseMoeBlock on the same bf16 weights and input (Vectors/moe/block.safetensors, made by
/// Vectors/generate_moe_block.py; weights, input and upstream gradient from each name's
/// `small_weights`): the router's softmax, top-k (ties included) and routing weights to the bit
/// from torch's logits, then the output, the logits' gradient and the input gradient.
final class SparseMoETests: XCTestCase {
    /// Routing from torch's own logits involves no GEMM: softmax (Sleef expf, 16-lane sum),
    /// libstdc++'s top-k, the renormalisation — the same bits.
    static let exact = 0.0
    /// Values fed by a GEMM (router, gate_up, down and their backward): one bf16 rounding of an
    /// fp32 sum whose order is OpenBLAS' here and oneDNN's in torch (LlamaOpsTests.reductionULPs);
    /// a flip upstream of a later rounding can carry one more ulp (the activation's product, the
    /// bf16 sums of a token's rows).
    static let gemmULPs = 2.0

    func testTheBlockIsTransformers() throws {
        let v = try VectorFile("block", directory: "Vectors/moe")
        XCTAssertFalse(v.cases.isEmpty, "block.safetensors has no cases; \(regenerateHint)")
        for (name, c) in v.cases.sorted(by: { $0.key < $1.key }) {
            let (e, k, h, i, t) = (c["E"] as! Int, c["K"] as! Int, c["H"] as! Int, c["I"] as! Int, c["T"] as! Int)
            let family: SparseMoE.Family = (c["family"] as! String) == "mixtral" ? .mixtral : .qwen3(normalizesTopK: c["norm_topk_prob"] as? Bool ?? false)
            func weights(_ tensor: String, _ count: Int) -> [Float] { smallWeights("\(name).\(tensor)", count).map { HalfPrecision.float(bfloat16Bits: $0) } }
            let b = SparseMoE.Weights(family: family, experts: e, perToken: k, hidden: h, intermediate: i,
                                      router: weights("router", e * h), gateUp: weights("gate_up", e * 2 * i * h), down: weights("down", e * h * i))
            let x = weights("x", t * h), g = weights("g", t * h)
            func values(_ tensor: String) -> [Float] { v.withElements("\(name).\(tensor)") { el in (0..<el.count).map { el[$0] } } }
            let torchLogits = values("logits")
            // Routing from torch's logits: exact.
            let (out, _, cache) = SparseMoE.forward(b, x, tokens: t, routerLogits: torchLogits)
            assertBF16(cache.probabilities, v.floats("\(name).probs"), "\(name) softmax", ulps: Self.exact)
            let topk = v.bytes("\(name).topk").withUnsafeBytes { raw in (0..<(raw.count / 4)).map { Int(raw.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self)) } }
            XCTAssertEqual(cache.indices, topk, "\(name): top-k experts and slot order")
            assertBF16(cache.weights, v.floats("\(name).weights").map { family.isQwen3 ? LlamaOps.bf16($0) : $0 }, "\(name) routing weights", ulps: Self.exact)
            assertBF16(out, values("out"), "\(name) output", ulps: Self.gemmULPs)
            let (dx, dLogits) = SparseMoE.backward(b, g, cache)
            assertBF16(dLogits, values("d_logits"), "\(name) router logits' gradient", ulps: Self.gemmULPs)
            assertBF16(dx, values("dx"), "\(name) input gradient", ulps: Self.gemmULPs)
            // And the router computed here: torch's logits within a GEMM's rounding.
            assertBF16(SparseMoE.forward(b, x, tokens: t).logits, torchLogits, "\(name) router logits", ulps: LlamaOpsTests.reductionULPs)
        }
    }

    /// torch.topk's tie order is libstdc++'s, not the lowest index first.
    func testTopKTiesFollowLibstdcxx() {
        XCTAssertEqual(SparseMoE.topK([1, 2, 2, 2, 0], 2).count, 2)
        XCTAssertEqual(SparseMoE.topK([0.5, 0.25, 0.75], 3), [2, 0, 1])
        XCTAssertEqual(SparseMoE.reduce16(Array(repeating: 1, count: 37)), 37)
        XCTAssertEqual(SparseMoE.sleefExpf(0), 1)
        XCTAssertEqual(SparseMoE.sleefExpf(-200), 0)
    }
}

extension SparseMoE.Family {
    var isQwen3: Bool { if case .qwen3 = self { return true }; return false }
}
