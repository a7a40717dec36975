import COpenBLAS
import XCTest
import QLoRA
import TestSupport

final class LoRALinearTests: XCTestCase {
    /// PEFT 0.21.2's LoRA layer on bnb.nn.Linear4bit (Vectors/quant/lora.safetensors), r 8 and 16,
    /// rsLoRA on and off: y, dX, dA, dB.
    ///
    /// Tolerances. dA and dB are fp32 all the way: two chained dot products of at most 128 terms,
    /// so each side is within 2·γ₁₂₈ ≈ 1.5e-5 of the exact value relative to the sum of magnitudes;
    /// we allow 3e-5 · (|ref| + mean|ref|), the mean term covering cancellation. y and dX add the
    /// base layer's output, which bitsandbytes rounds to bf16: where the two fp32 accumulations
    /// straddle a bf16 rounding boundary the base term differs by one bf16 ulp (2⁻⁸ relative).
    /// That is allowed on at most 2% of elements; everywhere else the fp32 tolerance holds.
    func testMatchesPEFTOnBitsandbytes4Bit() throws {
        let v = try VectorFile("lora")
        XCTAssertEqual(v.cases.count, 5, regenerateHint)
        let w = v.floats("base.weight"), x = v.floats("x"), dy = v.floats("dy")
        for (id, p) in v.cases.sorted(by: { $0.key < $1.key }) {
            let out = p["out"] as! Int, k = p["in"] as! Int, tokens = p["tokens"] as! Int, r = p["r"] as! Int
            let q = try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [out, k]) }
            let config = LoRAConfig(rank: r, alpha: Double(p["lora_alpha"] as! Int), useRSLoRA: p["use_rslora"] as! Bool)
            XCTAssertEqual(config.scaling, p["scaling"] as! Double, "\(id) scaling")
            let bf16 = (p["lora_A_dtype"] as! String) == "torch.bfloat16"
            let layer = try LoRALinear(base: Linear4BitWeight(q), config: config, loraA: v.floats(id + ".lora_A"), loraB: v.floats(id + ".lora_B"),
                                       computeType: bf16 ? .bfloat16 : .float32)
            let rtol = bf16 ? Self.bf16Tolerance : 3e-5
            let (y, saved) = try layer.forward(x, tokens: tokens)
            let dx = try layer.backward(dy, saved: saved)
            XCTAssertEqual(saved.byteCount, (tokens * k + tokens * r) * 4, "saved for backward: dropout(x) and h")
            compare(layer.gradA, v.floats(id + ".dA"), name: "\(id) dA", bf16Flips: 0, rtol: rtol)
            compare(layer.gradB, v.floats(id + ".dB"), name: "\(id) dB", bf16Flips: 0, rtol: rtol)
            compare(y, v.floats(id + ".y"), name: "\(id) y", bf16Flips: y.count / 50, rtol: rtol)
            compare(dx, v.floats(id + ".dx"), name: "\(id) dx", bf16Flips: dx.count / 50, rtol: rtol)
        }
    }

    /// bf16 adapters: every adapter matmul result is rounded to bf16 (2⁻⁹ relative) and the fp32
    /// sums before each rounding differ in order, so a value may land one bf16 ulp away and carry
    /// that into the next product: a few bf16 ulps (2⁻⁷) against the same magnitude scale.
    static let bf16Tolerance = 0x1p-7

    func compare(_ got: [Float], _ want: [Float], name: String, bf16Flips allowed: Int, rtol: Double = 3e-5) {
        XCTAssertEqual(got.count, want.count, name)
        let meanAbs = want.reduce(0.0) { $0 + Double(abs($1)) } / Double(max(1, want.count))
        var flips = 0, worst = 0.0
        for i in want.indices {
            let err = abs(Double(got[i]) - Double(want[i]))
            let tol = rtol * (Double(abs(want[i])) + meanAbs)
            if err <= tol { worst = max(worst, err / tol); continue }
            let bf16Ulp = Double(abs(want[i])) * 0x1p-8 + tol
            if err <= bf16Ulp { flips += 1; continue }
            XCTFail("\(name)[\(i)]: \(got[i]) vs PEFT \(want[i]), error \(err) beyond one bf16 ulp")
            return
        }
        XCTAssertLessThanOrEqual(flips, allowed, "\(name): \(flips) elements differ by a bf16 ulp")
        print("\(name): max error \(String(format: "%.2f", worst)) of the tolerance, \(flips) bf16 flips")
    }

    /// Central differences in Float64 of L = Σ dy ⊙ y_adapter against the analytic dA, dB and the
    /// adapter's part of dx, with dropout on (a given mask).
    func testFiniteDifferenceGradients() throws {
        let (out, k, r, tokens) = (6, 32, 3, 4)
        var rng = SplitMix64(seed: 9)
        let w = (0..<(out * k)).map { _ in rng.normal() * 0.1 }
        let q = try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [out, k]) }
        let base = try Linear4BitWeight(q)
        let a = (0..<(r * k)).map { _ in rng.normal() * 0.3 }, b = (0..<(out * r)).map { _ in rng.normal() * 0.3 }
        let config = LoRAConfig(rank: r, alpha: 6, dropout: 0.25)
        let layer = try LoRALinear(base: base, config: config, loraA: a, loraB: b)
        let x = (0..<(tokens * k)).map { _ in rng.normal() }, dy = (0..<(tokens * out)).map { _ in rng.normal() }
        let mask: [Float] = (0..<(tokens * k)).map { $0 % 5 == 0 ? 0 : 1 }
        let (_, saved) = try layer.forward(x, tokens: tokens, dropoutMask: mask)
        let dx = try layer.backward(dy, saved: saved)
        var dxBase = [Float](repeating: 0, count: tokens * k)
        dy.withUnsafeBufferPointer { d in dxBase.withUnsafeMutableBufferPointer { Matmul4Bit.backwardInput(dy: d, tokens: tokens, weight: base, dx: $0, roundOutputToBF16: true) } }

        let s = config.scaling, keep = 1 / (1 - config.dropout)
        func loss(_ a: [Double], _ b: [Double], _ x: [Double]) -> Double {
            var l = 0.0
            for t in 0..<tokens {
                var h = [Double](repeating: 0, count: r)
                for j in 0..<r { for i in 0..<k { h[j] += x[t * k + i] * Double(mask[t * k + i]) * keep * a[j * k + i] } }
                for o in 0..<out {
                    var y = 0.0
                    for j in 0..<r { y += h[j] * b[o * r + j] }
                    l += Double(dy[t * out + o]) * y * s
                }
            }
            return l
        }
        let a64 = a.map(Double.init), b64 = b.map(Double.init), x64 = x.map(Double.init)
        func check(_ analytic: [Float], _ n: Int, _ perturb: (Int, Double) -> Double, _ name: String) {
            for i in 0..<n {
                let h = 1e-6
                let fd = (perturb(i, h) - perturb(i, -h)) / (2 * h)
                XCTAssertEqual(Double(analytic[i]), fd, accuracy: 1e-4 * (1 + abs(fd)), "\(name)[\(i)]")
            }
        }
        check(layer.gradA, r * k, { i, h in var p = a64; p[i] += h; return loss(p, b64, x64) }, "dA")
        check(layer.gradB, out * r, { i, h in var p = b64; p[i] += h; return loss(a64, p, x64) }, "dB")
        let dxAdapter = zip(dx, dxBase).map { $0 - $1 }
        check(dxAdapter, tokens * k, { i, h in var p = x64; p[i] += h; return loss(a64, b64, p) }, "dx (adapter)")
    }

    /// The adapter's products run in 64-row (or column) pieces split between threads: y, dx, dA
    /// and dB equal, bit for bit, the same arithmetic done whole (one sgemm per product, the
    /// elementwise steps as separate passes: the layer as it was before the pieces), whatever
    /// the thread count, in fp32 and bf16 compute, with and without a dropout mask.
    func testPiecesEqualTheWholeProductsAtEveryThreadCount() throws {
        let (out, k, r, tokens) = (136, 200, 8, 150)
        var rng = SplitMix64(seed: 12)
        let w = (0..<(out * k)).map { _ in rng.normal() * 0.1 }
        let base = try Linear4BitWeight(try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [out, k]) })
        let a = (0..<(r * k)).map { _ in rng.normal() * 0.3 }, b = (0..<(out * r)).map { _ in rng.normal() * 0.3 }
        let x = (0..<(tokens * k)).map { _ in HalfPrecision.roundedToBFloat16(rng.normal()) }
        let dy = (0..<(tokens * out)).map { _ in rng.normal() }
        let mask: [Float] = (0..<(tokens * k)).map { $0 % 7 == 0 ? 0 : 1 }
        func gemm(_ ta: Bool, _ tb: Bool, _ m: Int, _ n: Int, _ kk: Int, _ x: [Float], _ lda: Int, _ y: [Float], _ ldb: Int) -> [Float] {
            var c = [Float](repeating: 0, count: m * n)
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, Int32(m), Int32(n), Int32(kk), 1, x, Int32(lda),
                        y, Int32(ldb), 0, &c, Int32(n))
            return c
        }
        for compute in [ElementType.float32, .bfloat16] {
            for dropout in [0.0, 0.25] {
                let bf16Compute = compute == .bfloat16
                func rnd(_ v: Float) -> Float { bf16Compute ? HalfPrecision.roundedToBFloat16(v) : v }
                let config = LoRAConfig(rank: r, alpha: 16, dropout: dropout)
                let s = Float(config.scaling), keep = Float(1 / (1 - dropout))
                // The whole products.
                var yBase = [Float](repeating: 0, count: tokens * out), dxBase = [Float](repeating: 0, count: tokens * k)
                x.withUnsafeBufferPointer { xp in yBase.withUnsafeMutableBufferPointer { Matmul4Bit.forward(x: xp, tokens: tokens, weight: base, y: $0, roundOutputToBF16: true) } }
                dy.withUnsafeBufferPointer { d in dxBase.withUnsafeMutableBufferPointer { Matmul4Bit.backwardInput(dy: d, tokens: tokens, weight: base, dx: $0, roundOutputToBF16: true) } }
                let m = dropout > 0 ? mask.map { $0 * keep } : []
                let xd = dropout > 0 ? zip(x.map(rnd), m).map { rnd($0 * $1) } : x.map(rnd)
                let (ar, br) = (a.map(rnd), b.map(rnd))
                let h = gemm(false, true, tokens, r, k, xd, k, ar, k).map(rnd)
                let l = gemm(false, true, tokens, out, r, h, r, br, r).map(rnd).map { rnd($0 * s) }
                let yWant = zip(yBase, l).map { HalfPrecision.roundedToBFloat16($0 + HalfPrecision.roundedToBFloat16($1)) }
                let g = dy.map(rnd).map { rnd($0 * s) }
                let dBWant = gemm(true, false, out, r, tokens, g, out, h, r).map(rnd)
                let dh = gemm(false, false, tokens, r, out, g, out, br, r).map(rnd)
                let dAWant = gemm(true, false, r, k, tokens, dh, r, xd, k).map(rnd)
                var dxd = gemm(false, false, tokens, k, r, dh, r, ar, k).map(rnd)
                if dropout > 0 { dxd = zip(dxd, m).map { rnd($0 * $1) } }
                let dxWant = zip(dxBase, dxd).map { HalfPrecision.roundedToBFloat16($0 + HalfPrecision.roundedToBFloat16($1)) }
                for threads in [1, 2, 3] {
                    LlamaOps.setThreadCount(threads)
                    defer { LlamaOps.setThreadCount(ProcessInfo.processInfo.activeProcessorCount) }
                    let layer = try LoRALinear(base: base, config: config, loraA: a, loraB: b, computeType: compute)
                    layer.bf16Activations = true
                    let (y, saved) = try layer.forward(x, tokens: tokens, dropoutMask: dropout > 0 ? mask : nil)
                    let dx = try layer.backward(dy, saved: saved)
                    let label = "\(compute) dropout \(dropout) threads \(threads)"
                    XCTAssertEqual(y.map(\.bitPattern), yWant.map(\.bitPattern), "y " + label)
                    XCTAssertEqual(dx.map(\.bitPattern), dxWant.map(\.bitPattern), "dx " + label)
                    XCTAssertEqual(layer.gradA.map(\.bitPattern), dAWant.map(\.bitPattern), "dA " + label)
                    XCTAssertEqual(layer.gradB.map(\.bitPattern), dBWant.map(\.bitPattern), "dB " + label)
                }
            }
        }
    }

    /// Gradient accumulation: backward adds into gradA/gradB until zeroGrad (two micro-batches
    /// with the same data give exactly twice one: a + a is exact in fp32).
    func testGradientsAccumulateUntilZeroGrad() throws {
        var rng = SplitMix64(seed: 8)
        let w = (0..<(24 * 64)).map { _ in rng.normal() }
        let base = try Linear4BitWeight(try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [24, 64]) })
        let layer = try LoRALinear(base: base, config: LoRAConfig(rank: 4, alpha: 8), seed: 2)
        for i in layer.loraB.indices { layer.loraB[i] = rng.normal() }
        let x = (0..<(3 * 64)).map { _ in rng.normal() }, dy = (0..<(3 * 24)).map { _ in rng.normal() }
        let (_, saved) = try layer.forward(x, tokens: 3)
        _ = try layer.backward(dy, saved: saved)
        let (a1, b1) = (layer.gradA, layer.gradB)
        _ = try layer.backward(dy, saved: saved)
        XCTAssertEqual(layer.gradA, a1.map { $0 * 2 })
        XCTAssertEqual(layer.gradB, b1.map { $0 * 2 })
        layer.zeroGrad()
        XCTAssertTrue(layer.gradA.allSatisfy { $0 == 0 } && layer.gradB.allSatisfy { $0 == 0 })
    }

    func testInitializationAndBadInput() throws {
        var rng = SplitMix64(seed: 1)
        let w = (0..<(16 * 64)).map { _ in rng.normal() }
        let base = try Linear4BitWeight(try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [16, 64]) })
        let layer = try LoRALinear(base: base, config: LoRAConfig(rank: 4, alpha: 8), seed: 3)
        XCTAssertTrue(layer.loraB.allSatisfy { $0 == 0 }, "B starts at zero")
        XCTAssertTrue(layer.loraA.allSatisfy { abs($0) <= 1 / 8 }, "A ~ U(-1/sqrt(in), 1/sqrt(in))")
        XCTAssertGreaterThan(Set(layer.loraA).count, 200)
        XCTAssertThrowsError(try LoRALinear(base: base, config: LoRAConfig(rank: 0, alpha: 8), seed: 1)) {
            XCTAssertEqual($0 as? LoRAError, .invalidConfig("rank must be positive, got 0"))
        }
        XCTAssertThrowsError(try LoRALinear(base: base, config: LoRAConfig(rank: 4, alpha: 8), loraA: [Float](repeating: 0, count: 8 * 64),
                                            loraB: [Float](repeating: 0, count: 16 * 4))) { XCTAssertTrue("\($0)".contains("lora_A")) }
        XCTAssertThrowsError(try layer.forward([Float](repeating: 0, count: 63), tokens: 1)) { XCTAssertTrue("\($0)".contains("x has 63")) }
        let (_, saved) = try layer.forward([Float](repeating: 0, count: 64), tokens: 1)
        XCTAssertThrowsError(try layer.backward([Float](repeating: 0, count: 15), saved: saved)) { XCTAssertTrue("\($0)".contains("dy has 15")) }
    }
}
