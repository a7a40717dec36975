import XCTest
@testable import QLoRA

/// The fast Llama kernels (LlamaKernels.swift) against the scalar references in LlamaOps.swift,
/// which define the answer (LlamaOpsTests holds both to torch). Seeded bf16 inputs at awkward
/// sizes (1, 7, 33, …) beside ones large enough to be split between threads and, for attention,
/// to span several query blocks with a partial last one.
final class LlamaKernelsTests: XCTestCase {
    /// Elementwise and per-row ops do the reference's operations in its order: the same bits.
    static let exact = 0.0

    /// Attention, fast vs reference, in bf16 ulps of the tensor's largest magnitude. Both round
    /// at the same points, but the fp32 sums inside the GEMMs (q·k, P·V, dO·Vᵀ, dS·K, dSᵀ·Q, Pᵀ·dO)
    /// run in OpenBLAS's order (and with FMA), not the reference's sequential one: the sums differ
    /// by a few fp32 ulps, so now and then a rounded score, product or gradient lands on the
    /// adjacent bf16 value, and a flipped score or probability moves its row's outputs by a
    /// fraction of a bf16 ulp of the largest. Measured: worst 0.125 (dq; out 0, dk 0, dv 0.062),
    /// with at most 8 of 66,560 elements differing on sgemm with scalar softmax rows; with the
    /// vectorized rows (AVX-512: a polynomial exp, 16-lane sums) and the bf16 GEMM (AVX512-BF16,
    /// the 1/√d scale applied after the sums) worst 0.125 (dq), at most 40 of 66,560 (dq) and 11
    /// of 16,640 (dk) differing. The bound of one ulp still catches any real
    /// slip (a mask, a head mapping, a missed rounding is off by far more). An element-wise ulp
    /// bound would not do: an output that cancels to near zero has an arbitrarily small ulp.
    static let attentionScaleULPs = 1.0

    /// The fraction of elements that may differ at all: a flip is the exception. Measured 0.07%
    /// at most (11 of 16,640, the bf16 GEMM's dk); bounded at 1%.
    static let attentionDifferingFraction = 0.01

    var rng = SplitMix64(seed: 0x11A4A)

    /// n bf16 values, normal with standard deviation `sd`.
    func bf16Values(_ n: Int, sd: Float = 1) -> [Float] {
        (0..<n).map { _ in HalfPrecision.roundedToBFloat16(rng.normal() * sd) }
    }

    func checkIdentical(_ got: [Float], _ want: [Float], _ name: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(got.count, want.count, "\(name): count", file: file, line: line)
        let differ = zip(got, want).filter { $0.bitPattern != $1.bitPattern }.count
        print("\(name): \(differ) of \(want.count) elements differ from the reference (exact)")
        XCTAssertEqual(differ, 0, "\(name): \(differ) elements differ from the reference", file: file, line: line)
    }

    /// Max |got - want| in bf16 ulps of max |want|, and the fraction of elements that differ.
    func checkScaled(_ got: [Float], _ want: [Float], _ name: String, file: StaticString = #filePath, line: UInt = #line) -> Double {
        XCTAssertEqual(got.count, want.count, "\(name): count", file: file, line: line)
        let scale = want.reduce(Float(0)) { max($0, abs($1)) }
        let unit = LlamaOpsTests.bf16Ulp(scale)
        var worst = 0.0, differ = 0
        for i in want.indices where got[i].bitPattern != want[i].bitPattern {
            differ += 1
            worst = max(worst, Double(abs(got[i] - want[i])) / unit)
        }
        let fraction = Double(differ) / Double(max(want.count, 1))
        print("\(name): max error \(String(format: "%.3f", worst)) bf16 ulps of max |x| = \(scale) (allowed \(Self.attentionScaleULPs)); "
              + "\(differ) of \(want.count) differ (\(String(format: "%.1f", 100 * fraction))%)")
        XCTAssertLessThanOrEqual(worst, Self.attentionScaleULPs, "\(name): error", file: file, line: line)
        XCTAssertLessThanOrEqual(fraction, Self.attentionDifferingFraction, "\(name): differing fraction", file: file, line: line)
        XCTAssertFalse(got.contains { !$0.isFinite }, "\(name): non-finite", file: file, line: line)
        return worst
    }

    /// The branchless `roundedToBFloat16` the kernels vectorize against the bit conversion.
    func testBranchlessBF16RoundingMatchesBitConversion() {
        var specials: [UInt32] = [0, 0x8000_0000, 0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0xFFFF_FFFF, 0x7F80_0001, 0x7F7F_FFFF,
                                  0x0000_0001, 0x0000_8000, 0x0001_8000, 0x3F80_8000, 0x3F81_8000, 0x3F80_7FFF, 0x7F7F_8000]
        for _ in 0..<1_000_000 { specials.append(UInt32(truncatingIfNeeded: rng.next())) }
        for b in specials {
            let x = Float(bitPattern: b)
            XCTAssertEqual(HalfPrecision.roundedToBFloat16(x).bitPattern, HalfPrecision.float(bfloat16Bits: HalfPrecision.bfloat16Bits(x)).bitPattern, "bits \(String(b, radix: 16))")
        }
    }

    func testResidualAddsMatchReference() {
        for n in [1, 7, 1023, 100_003] {
            let a = bf16Values(n), b = bf16Values(n, sd: 0.01), c = bf16Values(n, sd: 100)
            checkIdentical(LlamaOps.addRounded(a, b), a.indices.map { LlamaOps.bf16(a[$0] + b[$0]) }, "add n=\(n)")
            checkIdentical(LlamaOps.addRounded(a, b, c), a.indices.map { LlamaOps.bf16(LlamaOps.bf16(a[$0] + b[$0]) + c[$0]) }, "add3 n=\(n)")
        }
    }

    func testRMSNormMatchesReference() {
        for (tokens, h) in [(1, 1), (7, 33), (33, 7), (300, 256), (5, 4096)] {
            let x = bf16Values(tokens * h, sd: 3), w = bf16Values(h), dy = bf16Values(tokens * h, sd: 0.1)
            let (y, rstd) = LlamaOps.rmsnormForward(x, w, tokens: tokens, eps: 1e-5)
            let (yRef, rstdRef) = LlamaOps.rmsnormForwardReference(x, w, tokens: tokens, eps: 1e-5)
            checkIdentical(y, yRef, "rmsnorm y \(tokens)x\(h)")
            checkIdentical(rstd, rstdRef, "rmsnorm rstd \(tokens)x\(h)")
            checkIdentical(LlamaOps.rmsnormBackward(dy, x, w, rstd: rstd, tokens: tokens),
                           LlamaOps.rmsnormBackwardReference(dy, x, w, rstd: rstdRef, tokens: tokens), "rmsnorm dx \(tokens)x\(h)")
        }
    }

    func testRoPEMatchesReference() {
        let inv = LlamaOps.ropeInverseFrequencies(headDim: 64, theta: 10000, llama3: nil)
        for (tokens, heads, d, seq) in [(1, 1, 2, 1), (7, 3, 8, 7), (66, 5, 64, 33), (600, 4, 64, 300)] {
            let (cos, sin) = LlamaOps.ropeTables(seq: seq, inverseFrequencies: Array(inv.prefix(d / 2)))
            let x = bf16Values(tokens * heads * d, sd: 2), dy = bf16Values(tokens * heads * d, sd: 0.1)
            checkIdentical(LlamaOps.ropeForward(x, heads: heads, headDim: d, seq: seq, cos: cos, sin: sin),
                           LlamaOps.ropeForwardReference(x, heads: heads, headDim: d, seq: seq, cos: cos, sin: sin), "rope y \(tokens)x\(heads)x\(d)")
            checkIdentical(LlamaOps.ropeBackward(dy, heads: heads, headDim: d, seq: seq, cos: cos, sin: sin),
                           LlamaOps.ropeBackwardReference(dy, heads: heads, headDim: d, seq: seq, cos: cos, sin: sin), "rope dx \(tokens)x\(heads)x\(d)")
        }
    }

    func testSwiGLUMatchesReference() {
        for n in [1, 7, 1023, 100_003] {
            let g = bf16Values(n, sd: 4), u = bf16Values(n), dy = bf16Values(n, sd: 0.1)
            checkIdentical(LlamaOps.swigluForward(gate: g, up: u), LlamaOps.swigluForwardReference(gate: g, up: u), "swiglu y n=\(n)")
            let gb = g.map { HalfPrecision.bfloat16Bits($0) }, ub = u.map { HalfPrecision.bfloat16Bits($0) }
            let fast = LlamaOps.swigluBackward(dy, gate: gb, up: ub), ref = LlamaOps.swigluBackwardReference(dy, gate: gb, up: ub)
            checkIdentical(fast.dgate, ref.dgate, "swiglu dgate n=\(n)")
            checkIdentical(fast.dup, ref.dup, "swiglu dup n=\(n)")
        }
    }

    func testAttentionMatchesReference() {
        // (batch, seq, heads, kvHeads, headDim): one token; GQA with a partial block; MHA across
        // several blocks (64 query rows each) and a partial last one; GQA 4:1 at head_dim 128.
        // At every level the CPU has: AVX512-BF16 runs the products on the bf16 GEMM, below it
        // sgemm; AVX-512 and up vectorize the softmax rows (a polynomial exp), below it the
        // reference's scalar arithmetic.
        defer { KernelLevel.setMaximum(.avx512bf16) }
        for level in [KernelLevel.avx512bf16, .avx512, .avx2] where level.rawValue <= KernelLevel.cpu.rawValue {
            KernelLevel.setMaximum(level)
            attentionAgainstReference(label: "\(level)")
        }
    }

    func attentionAgainstReference(label: String) {
        var worst = 0.0
        for (b, s, h, kv, d) in [(1, 1, 1, 1, 8), (2, 33, 4, 2, 16), (1, 150, 3, 3, 32), (1, 130, 4, 1, 128), (1, 67, 2, 2, 24)] {
            let q = bf16Values(b * s * h * d), k = bf16Values(b * s * kv * d), v = bf16Values(b * s * kv * d)
            let dout = bf16Values(b * s * h * d, sd: 0.01)
            let name = "attention \(label) b\(b) s\(s) h\(h) kv\(kv) d\(d)"
            let out = LlamaOps.attentionForward(q: q, k: k, v: v, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d)
            let outRef = LlamaOps.attentionForwardReference(q: q, k: k, v: v, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d)
            worst = max(worst, checkScaled(out, outRef, "\(name) out"))
            let g = LlamaOps.attentionBackward(dout: dout, q: q, k: k, v: v, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d)
            let r = LlamaOps.attentionBackwardReference(dout: dout, q: q, k: k, v: v, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d)
            worst = max(worst, checkScaled(g.dq, r.dq, "\(name) dq"))
            worst = max(worst, checkScaled(g.dk, r.dk, "\(name) dk"))
            worst = max(worst, checkScaled(g.dv, r.dv, "\(name) dv"))
        }
        print("attention fast vs reference (\(label)): worst \(worst) bf16 ulps of max |x|")
    }

    /// The same inputs give the same bits on every run, whatever the threads' scheduling.
    func testAttentionIsDeterministic() {
        let (b, s, h, kv, d) = (2, 100, 4, 2, 32)
        let q = bf16Values(b * s * h * d), k = bf16Values(b * s * kv * d), v = bf16Values(b * s * kv * d), dout = bf16Values(b * s * h * d)
        let first = LlamaOps.attentionBackward(dout: dout, q: q, k: k, v: v, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d)
        let out1 = LlamaOps.attentionForward(q: q, k: k, v: v, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d)
        for _ in 0..<3 {
            let again = LlamaOps.attentionBackward(dout: dout, q: q, k: k, v: v, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d)
            checkIdentical(again.dq, first.dq, "dq rerun")
            checkIdentical(again.dk, first.dk, "dk rerun")
            checkIdentical(again.dv, first.dv, "dv rerun")
            checkIdentical(LlamaOps.attentionForward(q: q, k: k, v: v, batch: b, seq: s, heads: h, kvHeads: kv, headDim: d), out1, "out rerun")
        }
    }
}
