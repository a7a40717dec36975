import XCTest
import QLoRA
import TestSupport

/// Every matmul path against a plain reference: W dequantized to bf16 values, the activation
/// rounded to bf16, products summed in Float64.
///
/// Tolerance: the products are exact in fp32 (bf16 × bf16), so the only error is fp32
/// accumulation. For any summation order, |computed − exact| ≤ γ_K · Σ|x·w| with
/// γ_K = K·u / (1 − K·u), u = 2⁻²⁴ (Higham, Accuracy and Stability, §3.1); K = terms summed.
func accumulationBound(terms k: Int, absSum: Double) -> Double {
    let u = 0x1p-24, ku = Double(k) * u
    return ku / (1 - ku) * absSum
}

final class Matmul4BitTests: XCTestCase {
    override func tearDown() { KernelLevel.setMaximum(.avx512bf16) }

    func makeWeight(out: Int, in k: Int, seed: UInt64, blocksize: Int = 64, type: QuantType = .nf4) throws -> (Linear4BitWeight, [Float]) {
        var rng = SplitMix64(seed: seed)
        let w = (0..<(out * k)).map { _ in rng.normal() * 0.05 }
        let q = try w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [out, k], quantType: type, blocksize: blocksize) }
        let wbf = q.dequantizedBytes(as: .bfloat16).withUnsafeBytes { raw in
            raw.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) }
        }
        return (try Linear4BitWeight(q), wbf)
    }

    func check(_ got: [Float], reference: (Int, Int) -> (Double, Double), rows: Int, cols: Int, terms: Int, label: String) {
        var worst = 0.0
        for r in 0..<rows {
            for c in 0..<cols {
                let (exact, absSum) = reference(r, c)
                let err = abs(Double(got[r * cols + c]) - exact)
                let bound = accumulationBound(terms: terms, absSum: absSum)
                if err > bound {
                    XCTFail("\(label) [\(r), \(c)]: \(got[r * cols + c]) vs \(exact), error \(err) > bound \(bound)")
                    return
                }
                if absSum > 0 { worst = max(worst, err / bound) }
            }
        }
        print("\(label): max error \(String(format: "%.3f", worst)) of the fp32 accumulation bound")
    }

    func testForwardAndBackwardEveryPathAgainstFloat64Reference() throws {
        // Shapes that are multiples of nothing (77 × 130), of 32 but not of the panel (300 × 192),
        // of 16 but not 32 (50 × 208), of 8 but not 16 (21 × 72, blocksize 64 rows straddle blocks).
        // The AVX512-BF16 GEMV takes in % 64 == 0 and blocksize % 64 == 0: eight rows at a time
        // where rows hold whole blocks (300 × 192: 37 groups and a remainder; 64 × 512 with
        // blocksize 256: a table every fourth step), one row at a time where they straddle
        // blocks (41 × 320 with blocksize 128).
        for (out, k, bs) in [(77, 130, 64), (300, 192, 64), (33, 64, 64), (50, 208, 64), (21, 72, 64), (41, 320, 128), (64, 512, 256)] {
            let (w, wbf) = try makeWeight(out: out, in: k, seed: UInt64(out * k), blocksize: bs)
            for tokens in [1, 3, 8, 9, 33] {
                var rng = SplitMix64(seed: UInt64(tokens))
                let x = (0..<(tokens * k)).map { _ in rng.normal() }
                let dy = (0..<(tokens * out)).map { _ in rng.normal() }
                let xb = x.map(HalfPrecision.roundedToBFloat16), dyb = dy.map(HalfPrecision.roundedToBFloat16)
                let yRef = { (t: Int, o: Int) -> (Double, Double) in
                    var s = 0.0, a = 0.0
                    for i in 0..<k { let p = Double(xb[t * k + i]) * Double(wbf[o * k + i]); s += p; a += abs(p) }
                    return (s, a)
                }
                let dxRef = { (t: Int, i: Int) -> (Double, Double) in
                    var s = 0.0, a = 0.0
                    for o in 0..<out { let p = Double(dyb[t * out + o]) * Double(wbf[o * k + i]); s += p; a += abs(p) }
                    return (s, a)
                }
                for level in [KernelLevel.avx512bf16, .avx512, .avx2, .scalar] where level.rawValue <= KernelLevel.cpu.rawValue {
                    KernelLevel.setMaximum(level)
                    for path in [Matmul4BitPath.panelGEMM, .fused, .bf16GEMM, .automatic] {
                        var y = [Float](repeating: .nan, count: tokens * out)
                        x.withUnsafeBufferPointer { xp in
                            y.withUnsafeMutableBufferPointer { Matmul4Bit.forward(x: xp, tokens: tokens, weight: w, y: $0, path: path, panelRows: 7) }
                        }
                        check(y, reference: yRef, rows: tokens, cols: out, terms: k, label: "y \(out)x\(k) t=\(tokens) \(path) \(level)")
                    }
                    for path in [Matmul4BitPath.panelGEMM, .bf16GEMM, .automatic] {
                        var dx = [Float](repeating: .nan, count: tokens * k)
                        dy.withUnsafeBufferPointer { d in
                            dx.withUnsafeMutableBufferPointer { Matmul4Bit.backwardInput(dy: d, tokens: tokens, weight: w, dx: $0, path: path, panelRows: 7) }
                        }
                        check(dx, reference: dxRef, rows: tokens, cols: k, terms: out, label: "dx \(out)x\(k) t=\(tokens) \(path) \(level)")
                    }
                }
            }
        }
    }

    /// The bf16 GEMM (`vdpbf16ps` where the CPU has AVX512-BF16, its scalar reference below that)
    /// on shapes that cross its blocks: N and K past one 256 block and not multiples of 16 or 2
    /// (odd K pads a zero pair), tokens not multiples of its 6-row microkernel, 1...3 threads,
    /// NF4 and FP4, blocksizes 64 and 128. Held to the Float64 reference within the same
    /// γ_K·Σ|x·w| bound, and to the sgemm path within twice it (both are off the exact sum).
    ///
    /// Denormals: vdpbf16ps reads denormal inputs as zero and flushes denormal results. The
    /// inputs here are normal(0, 1) activations and weights of about 0.05, so every operand,
    /// product and partial sum is a normal number (|x·w| ≫ 2⁻¹²⁶) and the bound is unchanged;
    /// for inputs near 2⁻¹²⁶ add K·2⁻¹²⁶·max|w| to it.
    func testBF16GEMMAgainstFloat64ReferenceAndSgemm() throws {
        let levels = [KernelLevel.avx512bf16, .scalar].filter { $0.rawValue <= KernelLevel.cpu.rawValue }
        for (out, k, bs, type, tokenList) in [(77, 130, 64, QuantType.nf4, [1, 5, 33, 512]), (300, 521, 128, .fp4, [5, 33]),
                                              (33, 64, 64, .nf4, [1, 7]), (520, 272, 64, .nf4, [13])] {
            let (w, wbf) = try makeWeight(out: out, in: k, seed: UInt64(out * 7 + k), blocksize: bs, type: type)
            for tokens in tokenList {
                var rng = SplitMix64(seed: UInt64(tokens * 31 + k))
                let x = (0..<(tokens * k)).map { _ in rng.normal() }
                let dy = (0..<(tokens * out)).map { _ in rng.normal() }
                let xb = x.map(HalfPrecision.roundedToBFloat16), dyb = dy.map(HalfPrecision.roundedToBFloat16)
                var yRef = [(Double, Double)](repeating: (0, 0), count: tokens * out)
                var dxRef = [(Double, Double)](repeating: (0, 0), count: tokens * k)
                for t in 0..<tokens {
                    for o in 0..<out {
                        for i in 0..<k {
                            let wv = Double(wbf[o * k + i])
                            let p = Double(xb[t * k + i]) * wv, q = Double(dyb[t * out + o]) * wv
                            yRef[t * out + o].0 += p; yRef[t * out + o].1 += abs(p)
                            dxRef[t * k + i].0 += q; dxRef[t * k + i].1 += abs(q)
                        }
                    }
                }
                KernelLevel.setMaximum(.avx512bf16)
                var ySgemm = [Float](repeating: .nan, count: tokens * out), dxSgemm = [Float](repeating: .nan, count: tokens * k)
                x.withUnsafeBufferPointer { xp in ySgemm.withUnsafeMutableBufferPointer { Matmul4Bit.forward(x: xp, tokens: tokens, weight: w, y: $0, path: .panelGEMM) } }
                dy.withUnsafeBufferPointer { d in dxSgemm.withUnsafeMutableBufferPointer { Matmul4Bit.backwardInput(dy: d, tokens: tokens, weight: w, dx: $0, path: .panelGEMM) } }
                for level in levels {
                    KernelLevel.setMaximum(level)
                    for threads in level == .scalar ? [2] : [1, 2, 3] {
                        let label = "\(type) \(out)x\(k) bs\(bs) t=\(tokens) \(level) threads=\(threads)"
                        var y = [Float](repeating: .nan, count: tokens * out), dx = [Float](repeating: .nan, count: tokens * k)
                        x.withUnsafeBufferPointer { xp in
                            y.withUnsafeMutableBufferPointer { Matmul4Bit.forward(x: xp, tokens: tokens, weight: w, y: $0, path: .bf16GEMM, threads: threads) }
                        }
                        dy.withUnsafeBufferPointer { d in
                            dx.withUnsafeMutableBufferPointer { Matmul4Bit.backwardInput(dy: d, tokens: tokens, weight: w, dx: $0, path: .bf16GEMM, threads: threads) }
                        }
                        check(y, reference: { yRef[$0 * out + $1] }, rows: tokens, cols: out, terms: k, label: "bf16 GEMM y " + label)
                        check(dx, reference: { dxRef[$0 * k + $1] }, rows: tokens, cols: k, terms: out, label: "bf16 GEMM dx " + label)
                        // Against the sgemm path: each is within the bound of the exact sum.
                        check(y, reference: { (Double(ySgemm[$0 * out + $1]), 2 * yRef[$0 * out + $1].1) }, rows: tokens, cols: out, terms: k,
                              label: "bf16 GEMM y vs sgemm " + label)
                        check(dx, reference: { (Double(dxSgemm[$0 * k + $1]), 2 * dxRef[$0 * k + $1].1) }, rows: tokens, cols: k, terms: out,
                              label: "bf16 GEMM dx vs sgemm " + label)
                    }
                }
            }
        }
    }

    func testAutomaticTakesTheBF16GEMMOnlyWithAVX512BF16() throws {
        let (w, _) = try makeWeight(out: 64, in: 64, seed: 3)
        XCTAssertEqual(Matmul4Bit.resolvedPath(tokens: 8, weight: w), .fused)
        XCTAssertEqual(Matmul4Bit.resolvedPath(tokens: 9, weight: w), KernelLevel.cpu == .avx512bf16 ? .bf16GEMM : .panelGEMM)
        KernelLevel.setMaximum(.avx512)
        XCTAssertEqual(Matmul4Bit.resolvedPath(tokens: 9, weight: w), .panelGEMM)
        XCTAssertEqual(Matmul4Bit.resolvedPath(tokens: 9, weight: w, path: .bf16GEMM), .bf16GEMM)
    }

    /// Against PyTorch (Vectors/quant/matmul.safetensors): bitsandbytes' dequantized bf16
    /// weight times the bf16 input, fp32 out; dX likewise. Both sides accumulate in fp32 in
    /// different orders, so each may be off the exact sum by the accumulation bound: the
    /// tolerance is twice it. bitsandbytes' own `matmul_4bit` returns bf16: one bf16 ulp more.
    func testGoldenAgainstPyTorchAndBitsandbytes() throws {
        let v = try VectorFile("matmul")
        XCTAssertEqual(v.cases.count, 2, regenerateHint)
        var compared = 0
        defer { print("matmul golden vectors: \(compared) products compared with PyTorch/bitsandbytes") }
        for (id, p) in v.cases.sorted(by: { $0.key < $1.key }) {
            let out = p["out"] as! Int, k = p["in"] as! Int
            let q = try v.withElements(id + ".input") {
                try quantize4Bit($0, shape: [out, k], quantType: QuantType(rawValue: p["quant_type"] as! String)!,
                                 blocksize: 64, doubleQuant: p["double_quant"] as! Bool)
            }
            XCTAssertEqual(q.packed, v.bytes(id + ".packed"), id)
            let wbfBytes = v.bytes(id + ".dequant.bfloat16")
            XCTAssertEqual(q.dequantizedBytes(as: .bfloat16), wbfBytes, id)
            let wbf = wbfBytes.withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) } }
            let w = try Linear4BitWeight(q)
            for tokens in p["tokens"] as! [Int] {
                let pre = "\(id).t\(tokens)"
                let x = v.floats(pre + ".x"), dy = v.floats(pre + ".dy")
                let xb = x.map(HalfPrecision.roundedToBFloat16), dyb = dy.map(HalfPrecision.roundedToBFloat16)
                let yTorch = v.floats(pre + ".y"), dxTorch = v.floats(pre + ".dx")
                let bnb: [Float]? = v.has(pre + ".y_bnb_matmul_4bit")
                    ? v.bytes(pre + ".y_bnb_matmul_4bit").withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) } }
                    : nil
                for path in [Matmul4BitPath.panelGEMM, .fused, .bf16GEMM] {
                    var y = [Float](repeating: .nan, count: tokens * out)
                    x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer { Matmul4Bit.forward(x: xp, tokens: tokens, weight: w, y: $0, path: path) } }
                    for t in 0..<tokens {
                        for o in 0..<out {
                            var absSum = 0.0
                            for i in 0..<k { absSum += abs(Double(xb[t * k + i]) * Double(wbf[o * k + i])) }
                            let bound = 2 * accumulationBound(terms: k, absSum: absSum)
                            let got = y[t * out + o]
                            XCTAssertLessThanOrEqual(abs(Double(got) - Double(yTorch[t * out + o])), bound, "\(pre) \(path) y[\(t), \(o)] vs torch")
                            compared += 1
                            if let bnb {
                                let b = bnb[t * out + o]
                                let ulp = Double(Float(bitPattern: HalfPrecision.roundedToBFloat16(max(abs(b), abs(got))).bitPattern + 0x10000) - HalfPrecision.roundedToBFloat16(max(abs(b), abs(got))))
                                XCTAssertLessThanOrEqual(abs(Double(got) - Double(b)), bound + ulp, "\(pre) \(path) y[\(t), \(o)] vs bnb matmul_4bit")
                            }
                        }
                    }
                }
                for path in [Matmul4BitPath.panelGEMM, .bf16GEMM] {
                    var dx = [Float](repeating: .nan, count: tokens * k)
                    dy.withUnsafeBufferPointer { d in dx.withUnsafeMutableBufferPointer { Matmul4Bit.backwardInput(dy: d, tokens: tokens, weight: w, dx: $0, path: path) } }
                    for t in 0..<tokens {
                        for i in 0..<k {
                            var absSum = 0.0
                            for o in 0..<out { absSum += abs(Double(dyb[t * out + o]) * Double(wbf[o * k + i])) }
                            XCTAssertLessThanOrEqual(abs(Double(dx[t * k + i]) - Double(dxTorch[t * k + i])),
                                                     2 * accumulationBound(terms: out, absSum: absSum), "\(pre) \(path) dx[\(t), \(i)] vs torch")
                        }
                    }
                }
            }
        }
    }

    func testBF16OutputIsTheFP32ResultRoundedOnce() throws {
        let (w, _) = try makeWeight(out: 70, in: 96, seed: 5)
        var rng = SplitMix64(seed: 6)
        for tokens in [1, 20] {
            let x = (0..<(tokens * 96)).map { _ in rng.normal() }
            var y32 = [Float](repeating: 0, count: tokens * 70), y16 = y32
            x.withUnsafeBufferPointer { xp in
                y32.withUnsafeMutableBufferPointer { Matmul4Bit.forward(x: xp, tokens: tokens, weight: w, y: $0) }
                y16.withUnsafeMutableBufferPointer { Matmul4Bit.forward(x: xp, tokens: tokens, weight: w, y: $0, roundOutputToBF16: true) }
            }
            XCTAssertEqual(y16, y32.map(HalfPrecision.roundedToBFloat16))
            XCTAssertNotEqual(y16, y32)
        }
    }

    func testScratchIsOnePanelPlusTheActivation() throws {
        let (w, _) = try makeWeight(out: 4096, in: 1024, seed: 1)
        let p = Matmul4Bit.panelRows(inFeatures: 1024, outFeatures: 4096)
        XCTAssertEqual(p, Matmul4Bit.panelTargetBytes / (4 * 1024))  // panelTargetBytes of fp32 rows
        XCTAssertEqual(Matmul4Bit.scratchBytes(tokens: 64, weight: w, path: .panelGEMM), 64 * 1024 * 4 + p * 1024 * 4)
        // bf16 GEMM: the activation as bf16 plus one packing block per thread.
        let block = Int(Matmul4Bit.bf16BlockBytes)
        XCTAssertEqual(Matmul4Bit.scratchBytes(tokens: 64, weight: w, path: .bf16GEMM, threads: 2), 64 * 1024 * 2 + 2 * block)
        XCTAssertEqual(Matmul4Bit.scratchBytes(tokens: 64, weight: w, path: .bf16GEMM, backward: true, threads: 1), 64 * 4096 * 2 + block)
        let scratch = Matmul4BitScratch()
        let x = [Float](repeating: 1, count: 64 * 1024)
        var y = [Float](repeating: 0, count: 64 * 4096)
        x.withUnsafeBufferPointer { xp in
            y.withUnsafeMutableBufferPointer { Matmul4Bit.forward(x: xp, tokens: 64, weight: w, y: $0, path: .bf16GEMM, threads: 2, scratch: scratch) }
        }
        XCTAssertEqual(scratch.byteCount, Matmul4Bit.scratchBytes(tokens: 64, weight: w, path: .bf16GEMM, threads: 2))
        XCTAssertEqual(Matmul4Bit.panelRows(inFeatures: 1 << 20, outFeatures: 4096), 16)  // at least 16 rows
        XCTAssertEqual(Matmul4Bit.panelRows(inFeatures: 8, outFeatures: 100), 100)  // never more than W has
        XCTAssertEqual(Matmul4Bit.scratchBytes(tokens: 1, weight: w), 1024 * 4)  // fused: no panel
    }
}
