import XCTest
@testable import QLoRA
import TestSupport

/// Each Llama op against torch running transformers' own module on the same bf16 inputs, forward
/// and backward from a given upstream gradient (Vectors/llama/ops.safetensors, made by
/// Vectors/generate_llama_ops.py). Tensors are [batch·seq, heads·headDim], token-major.
///
/// Tolerances are in bf16 ulps of each expected element (0: the same bits); every check prints its
/// worst error as a fraction of the tolerance and how many elements differ at all. On these
/// vectors every output and gradient is bit-equal to torch's (measured 0 bf16 ulps throughout); the
/// constants below allow only what a legitimate difference can cause, as said at each one.
final class LlamaOpsTests: XCTestCase {
    /// Elementwise ops that perform torch's operations one for one, with the same roundings and no
    /// reduction or libm call in between (rope's rotation and its backward, the bf16 cast): the
    /// same bits by construction.
    static let exact = 0.0

    /// One bf16 rounding of an fp32 reduction whose order differs from torch's (rmsnorm's mean of
    /// squares and dot product, lm_head's OpenBLAS sgemm against torch's bf16 GEMM, the
    /// cross-entropy's exp-sum): the fp32 values differ by a few fp32 ulps (torch's vectorized
    /// mean of squares differs from a sequential sum in about half of all rows), which after the
    /// rounding is the same bf16 value or the adjacent one. Measured 0.
    static let reductionULPs = 1.0

    /// One bf16 rounding of a libm result: glibc's expf/cosf/sinf against torch's vectorized
    /// (Sleef) ones, each within an fp32 ulp or so, so at most the adjacent bf16 value (SiLU and
    /// its backward, the cos/sin tables). Measured 0 over 2,016 SwiGLU and 1,024 table values.
    static let libmULPs = 1.0

    /// Attention: every score, probability and product is rounded where torch's eager path
    /// rounds it (qlora recomputes each row's probabilities the same way in backward), and each
    /// output is one rounding of an fp32 sum of at most 16 terms in qlora's order: one ulp. A
    /// flip of an upstream rounding (a score or a probability) would show as more than that, and
    /// is a disagreement to look into, not to absorb. Measured 0.
    static let attentionULPs = 1.0

    /// The loss is fp32: torch sums the 8 counted terms in fp32 (7 roundings of at most half an
    /// ulp of the sum, i.e. 3.5 ulps of the mean) on per-term log-softmax values that differ from
    /// qlora's by about one ulp each (about 1 ulp of the mean after averaging); qlora sums in
    /// Float64 and rounds once. Hence 5 fp32 ulps. Measured 0 (1 on another draw of the inputs).
    static let lossFP32ULPs: Float = 5

    func vectors() throws -> VectorFile { try VectorFile("ops", directory: "Vectors/llama") }

    /// A tensor's elements as fp32 (bf16 tensors converted exactly).
    func values(_ v: VectorFile, _ name: String) -> [Float] {
        v.withElements(name) { e in (0..<e.count).map { e[$0] } }
    }

    func parameters(_ v: VectorFile, _ op: String) -> [String: Any] {
        guard let p = v.cases[op] else { fatalError("ops: no case '\(op)'; \(regenerateHint)") }
        return p
    }

    /// One bf16 ulp at x's magnitude (TestSupport's `bf16Ulp`).
    static func bf16Ulp(_ x: Float) -> Double { TestSupport.bf16Ulp(x) }

    /// Holds `got` to torch's `want` within `ulps` bf16 ulps (TestSupport's `assertBF16`).
    func check(_ got: [Float], _ want: [Float], _ name: String, ulps: Double, file: StaticString = #filePath, line: UInt = #line) {
        assertBF16(got, want, name, ulps: ulps, file: file, line: line)
    }

    // MARK: RMSNorm

    func testRMSNormMatchesLlamaRMSNorm() throws {
        let v = try vectors(), p = parameters(v, "rmsnorm")
        let tokens = p["tokens"] as! Int, eps = Float(p["eps"] as! Double)
        let x = values(v, "rmsnorm.x"), w = values(v, "rmsnorm.weight")
        let (y, rstd) = LlamaOps.rmsnormForward(x, w, tokens: tokens, eps: eps)
        check(y, values(v, "rmsnorm.y"), "rmsnorm y", ulps: Self.reductionULPs)
        let dx = LlamaOps.rmsnormBackward(values(v, "rmsnorm.dy"), x, w, rstd: rstd, tokens: tokens)
        check(dx, values(v, "rmsnorm.dx"), "rmsnorm dx", ulps: Self.reductionULPs)
    }

    // MARK: RoPE

    static let llama3 = ModelArchitecture.Llama3RopeScaling(factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192)

    /// fp32 inverse frequencies, exact: the same fp32 operations as transformers'
    /// `_compute_llama3_parameters` (Llama 3.1's scaling at head_dim 16 and 128) and the default
    /// at 128. This caught Swift's Float.pi (rounded toward zero) standing for torch's fp32 2π:
    /// 3 of the 6 medium frequencies at head_dim 128 were 1–2 ulps off.
    func testRopeInverseFrequenciesMatchTransformers() throws {
        let v = try vectors()
        for (name, d, theta, s) in [("llama3.d16", 16, 500000.0, Self.llama3), ("llama3.d128", 128, 500000.0, Self.llama3),
                                    ("default.d128", 128, 10000.0, nil)] {
            let got = LlamaOps.ropeInverseFrequencies(headDim: d, theta: theta, llama3: s)
            let want = v.floats("rope.inv_freq." + name)
            var worst = 0.0, differ = 0
            for i in want.indices where got[i] != want[i] {
                differ += 1
                worst = max(worst, Double(abs(got[i] - want[i])) / Double(want[i].ulp))
            }
            print("inv_freq \(name): \(differ) of \(want.count) differ, max \(worst) fp32 ulps (exact)")
            XCTAssertEqual(got.map(\.bitPattern), want.map(\.bitPattern), "inv_freq \(name)")
        }
    }

    func testRopeTablesMatchLlamaRotaryEmbedding() throws {
        let v = try vectors(), p = parameters(v, "rope")
        let positions = p["table_positions"] as! Int
        let (cos, sin) = LlamaOps.ropeTables(seq: positions, inverseFrequencies: v.floats("rope.inv_freq.llama3.d16"))
        check(cos, values(v, "rope.cos"), "rope cos", ulps: Self.libmULPs)
        check(sin, values(v, "rope.sin"), "rope sin", ulps: Self.libmULPs)
    }

    func testRopeMatchesApplyRotaryPosEmb() throws {
        let v = try vectors(), p = parameters(v, "rope")
        let seq = p["seq"] as! Int, heads = p["heads"] as! Int, kvHeads = p["kv_heads"] as! Int, d = p["head_dim"] as! Int
        let cos = Array(values(v, "rope.cos")[..<(seq * d)]), sin = Array(values(v, "rope.sin")[..<(seq * d)])
        // Attention's inputs are rope's outputs, and its dq, dk rope's upstream gradients.
        for (name, n) in [("q", heads), ("k", kvHeads)] {
            let y = LlamaOps.ropeForward(values(v, "rope.\(name)"), heads: n, headDim: d, seq: seq, cos: cos, sin: sin)
            check(y, values(v, "attention.\(name)"), "rope \(name)_out", ulps: Self.exact)
            let dx = LlamaOps.ropeBackward(values(v, "attention.d\(name)"), heads: n, headDim: d, seq: seq, cos: cos, sin: sin)
            check(dx, values(v, "rope.d\(name)"), "rope d\(name)", ulps: Self.exact)
        }
    }

    // MARK: Attention

    func testAttentionMatchesEagerAttentionForward() throws {
        let v = try vectors(), p = parameters(v, "attention")
        let (b, s, h, kv, d) = (p["batch"] as! Int, p["seq"] as! Int, p["heads"] as! Int, p["kv_heads"] as! Int, p["head_dim"] as! Int)
        let q = values(v, "attention.q"), k = values(v, "attention.k"), vv = values(v, "attention.v")
        let out = LlamaOps.attentionForward(q: q, k: k, v: vv, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d)
        check(out, values(v, "attention.out"), "attention out", ulps: Self.attentionULPs)
        let (dq, dk, dv) = LlamaOps.attentionBackward(dout: values(v, "attention.dout"), q: q, k: k, v: vv, batch: b, seq: s,
                                                      heads: h, kvHeads: kv, headDim: d)
        check(dq, values(v, "attention.dq"), "attention dq", ulps: Self.attentionULPs)
        check(dk, values(v, "attention.dk"), "attention dk", ulps: Self.attentionULPs)
        check(dv, values(v, "attention.dv"), "attention dv", ulps: Self.attentionULPs)
    }

    // MARK: SwiGLU

    func testSwiGLUMatchesSiLUTimesUp() throws {
        let v = try vectors()
        let gate = values(v, "swiglu.gate"), up = values(v, "swiglu.up")
        check(LlamaOps.swigluForward(gate: gate, up: up), values(v, "swiglu.y"), "swiglu y", ulps: Self.libmULPs)
        let (dg, du) = LlamaOps.swigluBackward(values(v, "swiglu.dy"), gate: gate.map { HalfPrecision.bfloat16Bits($0) },
                                               up: up.map { HalfPrecision.bfloat16Bits($0) })
        check(dg, values(v, "swiglu.dgate"), "swiglu dgate", ulps: Self.libmULPs)
        check(du, values(v, "swiglu.dup"), "swiglu dup", ulps: Self.libmULPs)
    }

    // MARK: lm_head and loss

    func testLinearMatchesTorchBF16Linear() throws {
        let v = try vectors(), p = parameters(v, "linear")
        let (t, k, n) = (p["tokens"] as! Int, p["in"] as! Int, p["out"] as! Int)
        let w = values(v, "linear.w")
        check(LlamaOps.linearForward(values(v, "linear.x"), w, tokens: t, inFeatures: k, outFeatures: n), values(v, "linear.y"), "linear y", ulps: Self.reductionULPs)
        check(LlamaOps.linearBackwardInput(values(v, "linear.dy"), w, tokens: t, inFeatures: k, outFeatures: n), values(v, "linear.dx"), "linear dx", ulps: Self.reductionULPs)
    }

    func testCrossEntropyMatchesForCausalLMLoss() throws {
        let v = try vectors(), p = parameters(v, "loss")
        let (b, s, vocab) = (p["batch"] as! Int, p["seq"] as! Int, p["vocab"] as! Int)
        let labels = v.bytes("loss.labels").withUnsafeBytes { raw in (0..<(raw.count / 8)).map { Int(raw.loadUnaligned(fromByteOffset: 8 * $0, as: Int64.self)) } }
        let (loss, dlogits, count) = LlamaOps.crossEntropy(logits: values(v, "loss.logits"), labels: labels, batch: b, seq: s, vocab: vocab)
        XCTAssertEqual(count, p["counted"] as! Int)
        let want = v.floats("loss.loss")[0]
        let lossULPs = abs(loss - want) / want.ulp
        print("loss: \(loss) vs torch \(want): max error \(String(format: "%.2f", lossULPs / Self.lossFP32ULPs)) of the tolerance (\(Self.lossFP32ULPs) fp32 ulps)")
        XCTAssertLessThanOrEqual(lossULPs, Self.lossFP32ULPs, "loss \(loss) vs torch \(want)")
        check(dlogits, values(v, "loss.dlogits"), "loss dlogits", ulps: Self.reductionULPs)
    }

    // MARK: bf16 rounding

    /// fp32 -> bf16, exact (round to nearest even, overflow to infinity, subnormals kept). NaN
    /// differs in bits only: torch's vectorized CPU cast writes 0xFFFF for every NaN (any sign or
    /// payload), HalfPrecision writes c10::BFloat16's scalar 0x7FC0; both are NaN.
    func testBFloat16RoundingMatchesTorch() throws {
        let v = try vectors()
        let x = v.floats("bf16.x")
        let want = v.withElements("bf16.y") { e -> [UInt16] in guard case .bfloat16(let b) = e else { fatalError() }; return Array(b) }
        for i in x.indices {
            let got = HalfPrecision.bfloat16Bits(x[i])
            if x[i].isNaN {
                XCTAssertTrue(HalfPrecision.float(bfloat16Bits: got).isNaN && HalfPrecision.float(bfloat16Bits: want[i]).isNaN)
                XCTAssertEqual(want[i], 0xFFFF, "torch's NaN bits changed; update the comment")
            } else {
                XCTAssertEqual(got, want[i], "bf16(\(x[i]) = 0x\(String(x[i].bitPattern, radix: 16)))")
            }
        }
        print("bf16: \(x.count) values, \(x.filter(\.isNaN).count) NaNs (NaN bits differ: torch 0xFFFF, qlora 0x7FC0)")
    }
}
