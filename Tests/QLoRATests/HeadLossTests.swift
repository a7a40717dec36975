import XCTest
@testable import QLoRA

/// The fused, chunked head and loss (`HeadLoss`): chunked equals all rows at once bit for bit at
/// every kernel level, and both agree with the plain reference ops (`LlamaOps.linearForward`,
/// `crossEntropy`, `linearBackwardInput`; LlamaOpsTests holds those to torch, and the training
/// tests hold the whole step to transformers' golden steps).
final class HeadLossTests: XCTestCase {
    /// The head's products, bf16 GEMM (fp32 sums in k order) against sgemm (OpenBLAS's order and
    /// FMA), in bf16 ulps of the tensor's largest magnitude: the sums differ by fp32 ulps, so now
    /// and then a rounded logit or hidden gradient lands on the adjacent bf16 value. The bound of
    /// one ulp still catches a wrong row, column, layout or missed rounding (far larger).
    static let gemmOrderULPs = 1.0
    /// The loss rows' AVX-512 level against the scalar one, relative: its exp is a polynomial
    /// within about an ulp of expf and its sums run in 16 lanes, so the log-sum-exp moves by a
    /// few fp32 ulps (2^-23 ≈ 1.2e-7 each) of the row's largest logit.
    static let vectorLossRelative = 1e-6

    var rng = SplitMix64(seed: 0x4EAD)

    func bf16Values(_ n: Int, sd: Float = 1) -> [Float] { (0..<n).map { _ in HalfPrecision.roundedToBFloat16(rng.normal() * sd) } }

    /// Levels this CPU runs, best first (AVX512-BF16: the bf16 GEMM; below: sgemm; AVX-512 and up:
    /// the vectorized loss rows).
    var levels: [KernelLevel] { [KernelLevel.avx512bf16, .avx512, .avx2, .scalar].filter { $0.rawValue <= KernelLevel.cpu.rawValue } }

    /// A case: tokens, hidden, vocab; labels with ignored positions.
    struct Case { let t: Int, h: Int, v: Int, batch: Int }
    // One token; odd sizes; a hidden size past the forward's k block (512) and a vocabulary past
    // the input gradient's k block (130 rows: 2016 entries).
    let cases = [Case(t: 4, h: 8, v: 17, batch: 2), Case(t: 37, h: 41, v: 531, batch: 1), Case(t: 130, h: 600, v: 5000, batch: 2)]

    func inputs(_ c: Case) -> (normed: [Float], w: [Float], labels: [Int]) {
        let normed = bf16Values(c.t * c.h), w = bf16Values(c.v * c.h, sd: 0.05)
        let labels = (0..<c.t).map { i in i % 5 == 3 ? -100 : Int(rng.next() % UInt64(c.v)) }
        return (normed, w, labels)
    }

    /// One case's inputs and head at one kernel level.
    struct Prepared {
        let normed: [Float], w: [Float], labels: [Int], head: HeadLoss, targets: [Int64], count: Int, tokens: Int
        func run(chunkRows: Int) -> (lossSum: Double, dn: [Float], logits: [Float], dlogits: [Float]) {
            head.run(normed: normed, targets: targets, count: count, tokens: tokens, chunkRows: chunkRows, keepLogits: true, keepGradient: true)
        }
    }

    /// `body` for every case at every level the CPU runs (the level restored after).
    func forEachLevelAndCase(_ body: (KernelLevel, Case, Prepared) -> Void) {
        defer { KernelLevel.setMaximum(.avx512bf16) }
        for level in levels {
            KernelLevel.setMaximum(level)
            for c in cases {
                let (normed, w, labels) = inputs(c)
                let (targets, count) = HeadLoss.targets(labels: labels, batch: c.batch, seq: c.t / c.batch)
                body(level, c, Prepared(normed: normed, w: w, labels: labels, head: HeadLoss(weight: w, vocab: c.v, hidden: c.h),
                                        targets: targets, count: count, tokens: c.t))
            }
        }
    }

    func testChunkedEqualsAllRowsAtOnceBitForBit() {
        forEachLevelAndCase { level, c, p in
            let all = p.run(chunkRows: c.t)
            XCTAssertTrue(all.lossSum.isFinite && all.lossSum > 0, "\(level) \(c): loss")
            for rows in [1, 7, 64] {
                let part = p.run(chunkRows: rows)
                let name = "\(level) t\(c.t) h\(c.h) v\(c.v) in blocks of \(rows)"
                XCTAssertEqual(part.lossSum.bitPattern, all.lossSum.bitPattern, "\(name): loss")
                for (got, want, what) in [(part.dn, all.dn, "dn"), (part.logits, all.logits, "logits"), (part.dlogits, all.dlogits, "dlogits")] {
                    let differ = zip(got, want).filter { $0.bitPattern != $1.bitPattern }.count
                    XCTAssertEqual(got.count, want.count, "\(name): \(what) count")
                    XCTAssertEqual(differ, 0, "\(name): \(differ) of \(want.count) \(what) differ")
                }
            }
        }
    }

    func testAgainstThePlainReferenceOps() {
        forEachLevelAndCase { level, c, p in
            let (normed, w, labels, count) = (p.normed, p.w, p.labels, p.count)
            let seq = c.t / c.batch
            let got = p.run(chunkRows: 16)
            let name = "\(level) t\(c.t) h\(c.h) v\(c.v)"
            // The logits: the same bf16 rounding of the same exact products, summed in another order.
            let logitsRef = LlamaOps.linearForward(normed, w, tokens: c.t, inFeatures: c.h, outFeatures: c.v)
            checkULPs(got.logits, logitsRef, "\(name) logits")
            // The loss on the logits this path computed: the scalar level is the reference's
            // arithmetic to the bit; AVX-512 within its exp and lane sums.
            let ref = LlamaOps.crossEntropy(logits: got.logits, labels: labels, batch: c.batch, seq: seq, vocab: c.v)
            XCTAssertEqual(ref.count, count, "\(name): counted positions")
            let loss = Float(got.lossSum / Double(count))
            if level == .scalar || level == .avx2 {
                XCTAssertEqual(loss.bitPattern, ref.loss.bitPattern, "\(name): loss \(loss) against \(ref.loss)")
                XCTAssertEqual(zip(got.dlogits, ref.dlogits).filter { $0.bitPattern != $1.bitPattern }.count, 0, "\(name): dlogits")
            } else {
                XCTAssertLessThan(abs(Double(loss - ref.loss)) / Double(ref.loss), Self.vectorLossRelative, "\(name): loss \(loss) against \(ref.loss)")
                checkULPs(got.dlogits, ref.dlogits, "\(name) dlogits")
            }
            // The hidden gradient from this path's dlogits.
            let dnRef = LlamaOps.linearBackwardInput(got.dlogits, w, tokens: c.t, inFeatures: c.h, outFeatures: c.v)
            checkULPs(got.dn, dnRef, "\(name) dn")
        }
    }

    /// Max |got − want| within `gemmOrderULPs` bf16 ulps of max |want|.
    func checkULPs(_ got: [Float], _ want: [Float], _ name: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(got.count, want.count, "\(name): count", file: file, line: line)
        let unit = LlamaOpsTests.bf16Ulp(want.reduce(Float(0)) { max($0, abs($1)) })
        var worst = 0.0, differ = 0
        for i in want.indices where got[i].bitPattern != want[i].bitPattern {
            differ += 1
            worst = max(worst, Double(abs(got[i] - want[i])) / unit)
        }
        print("\(name): \(differ) of \(want.count) differ, worst \(String(format: "%.3f", worst)) bf16 ulps of max |x|")
        XCTAssertLessThanOrEqual(worst, Self.gemmOrderULPs, "\(name)", file: file, line: line)
    }
}
