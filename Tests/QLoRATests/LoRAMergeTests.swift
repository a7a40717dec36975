import XCTest
import QLoRA
import TestSupport

/// PEFT's merge_and_unload (Vectors/quant/merge.safetensors).
final class LoRAMergeTests: XCTestCase {
    override func tearDown() { KernelLevel.setMaximum(.avx512bf16) }
    var levels: [KernelLevel] { [KernelLevel.scalar, .avx2, .avx512].filter { $0.rawValue <= KernelLevel.cpu.rawValue } }

    func testDenseMergesMatchPEFT() throws {
        let v = try VectorFile("merge")
        var checked = 0
        for (id, p) in v.cases.sorted(by: { $0.key < $1.key }) where (p["base_dtype"] as? String).map({ $0 != "nf4" }) ?? false {
            let baseType = ElementType(rawValue: p["base_dtype"] as! String)!
            let adapterType = ElementType(rawValue: p["adapter_dtype"] as! String)!
            let rankPattern = p["rank_pattern"] as! [String: Int], alphaPattern = p["alpha_pattern"] as! [String: Int]
            for module in p["modules"] as! [String] {
                let info = v.info("\(id).base.\(module)")
                let fanIn = p["fan_in_fan_out"] as! Bool
                let (n, k) = fanIn ? (info.shape[1], info.shape[0]) : (info.shape[0], info.shape[1])
                let r = rankPattern[module] ?? (p["r"] as! Int)
                let alpha = Double(alphaPattern[module] ?? (p["lora_alpha"] as! Int))
                let config = LoRAConfig(rank: r, alpha: alpha, useRSLoRA: p["use_rslora"] as! Bool)
                let d = LoRAMerge.delta(loraA: v.floats("\(id).\(module).lora_A.weight"), loraB: v.floats("\(id).\(module).lora_B.weight"),
                                        rank: r, inFeatures: k, outFeatures: n, scaling: config.scaling, adapterType: adapterType, fanInFanOut: fanIn)
                var out = [UInt8](repeating: 0, count: n * k * baseType.byteSize)
                v.withElements("\(id).base.\(module)") { base in
                    out.withUnsafeMutableBytes { LoRAMerge.add(base: base, delta: d, into: .view($0, as: baseType)) }
                }
                XCTAssertNil(byteMismatch(out, v.bytes("\(id).merged.\(module)"), name: "\(id) \(module)", elementSize: baseType.byteSize))
                for level in levels {
                    KernelLevel.setMaximum(level)
                    var fused = [UInt8](repeating: 0, count: out.count)
                    let bad = v.bytes("\(id).base.\(module)").withUnsafeBytes { base in
                        fused.withUnsafeMutableBytes { o in
                            LoRAMerge.merge(loraA: v.floats("\(id).\(module).lora_A.weight"), loraB: v.floats("\(id).\(module).lora_B.weight"),
                                            rank: r, inFeatures: k, outFeatures: n, scaling: config.scaling, adapterType: adapterType,
                                            fanInFanOut: fanIn, base: base, baseType: baseType, into: o, outType: baseType, threads: 2)
                        }
                    }
                    XCTAssertNil(bad)
                    XCTAssertNil(byteMismatch(fused, v.bytes("\(id).merged.\(module)"), name: "\(id) \(module) fused at \(level)", elementSize: baseType.byteSize))
                }
                KernelLevel.setMaximum(.avx512bf16)
                checked += 1
            }
        }
        XCTAssertEqual(checked, 13)
    }

    /// A bnb-4bit base: dequantize exactly, add delta in fp32, then either round once to bf16
    /// (the "merged_16bit" export) or re-quantize the fp32 sum (PEFT's merge_and_unload, whose
    /// new quant state records float32).
    func testFourBitMergeMatchesPEFT() throws {
        let v = try VectorFile("merge")
        let p = try XCTUnwrap(v.cases["nf4_r8"])
        let (n, k, r) = (32, 64, 8)
        let q = try v.withElements("nf4_r8.base.proj") { try quantize4Bit($0, shape: [n, k]) }
        // dequantize_4bit returns the recorded dtype: bf16, as the base was quantized from bf16
        let deq = q.dequantizedBytes().withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) } }
        let d = LoRAMerge.delta(loraA: v.floats("nf4_r8.proj.lora_A.weight"), loraB: v.floats("nf4_r8.proj.lora_B.weight"),
                                rank: r, inFeatures: k, outFeatures: n, scaling: LoRAConfig(rank: r, alpha: 16).scaling)
        var m16 = [UInt8](repeating: 0, count: n * k * 2)
        deq.withUnsafeBufferPointer { b in m16.withUnsafeMutableBytes { LoRAMerge.add(base: .float32(b), delta: d, into: .view($0, as: .bfloat16)) } }
        XCTAssertNil(byteMismatch(m16, v.bytes("nf4_r8.merged_16bit.proj"), name: "merged_16bit", elementSize: 2))

        XCTAssertEqual(p["merged_quant_state_dtype"] as? String, "torch.float32")
        var sum = [Float](repeating: 0, count: n * k)
        deq.withUnsafeBufferPointer { b in sum.withUnsafeMutableBufferPointer { LoRAMerge.add(base: .float32(b), delta: d, into: .float32($0)) } }
        let merged = try sum.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [n, k]) }
        XCTAssertNil(byteMismatch(merged.packed, v.bytes("nf4_r8.merged_4bit.proj"), name: "merged 4-bit packed"))
        guard case .nested(let nested) = merged.state.absmax else { return XCTFail("double quant expected") }
        XCTAssertNil(byteMismatch(nested.quantized, v.bytes("nf4_r8.merged_4bit.proj.absmax"), name: "merged absmax"))
        XCTAssertNil(byteMismatch(rawBytes(nested.absmax), v.bytes("nf4_r8.merged_4bit.proj.nested_absmax"), name: "merged nested absmax", elementSize: 4))
        XCTAssertNil(byteMismatch(merged.dequantizedBytes(as: .float32), v.bytes("nf4_r8.merged_4bit.dequantized"), name: "merged 4-bit dequantized", elementSize: 4))
    }

    /// The fused kernel (`LoRAMerge.merge`) against the plain reference (`delta` then `add`), bit
    /// for bit at every level: every base/output/adapter type, fan_in_fan_out, widths with and
    /// without a vector tail, one and two threads, and the first non-finite value found.
    func testFusedMergeEqualsReference() {
        var rng = SplitMix64(seed: 77)
        let types: [ElementType] = [.float32, .bfloat16, .float16]
        for (n, k, r) in [(3, 200, 8), (70, 64, 16), (130, 37, 4), (5, 1, 1)] {
            for fanIn in [false, true] {
                let a = (0..<(r * k)).map { _ in Float(rng.normal()) * 0.3 }, b = (0..<(n * r)).map { _ in Float(rng.normal()) * 0.3 }
                for adapterType in types {
                    let delta = LoRAMerge.delta(loraA: a, loraB: b, rank: r, inFeatures: k, outFeatures: n, scaling: 1.7,
                                                adapterType: adapterType, fanInFanOut: fanIn)
                    for baseType in types {
                        // Large base values make some sums overflow bf16/f16 (and one is Inf in f32).
                        let w = (0..<(n * k)).map { i -> Float in i == n * k / 2 ? 3e38 : Float(rng.normal()) }
                        let baseBytes = encodeForTest(w, as: baseType)
                        for outType in types {
                            var expected = [UInt8](repeating: 0, count: n * k * outType.byteSize)
                            baseBytes.withUnsafeBytes { base in
                                expected.withUnsafeMutableBytes { LoRAMerge.add(base: .view(base, as: baseType), delta: delta, into: .view($0, as: outType)) }
                            }
                            let firstBad = expected.withUnsafeBytes { raw in (0..<(n * k)).first { !FloatElements.view(raw, as: outType)[$0].isFinite } }
                            for level in levels {
                                KernelLevel.setMaximum(level)
                                for threads in [1, 2] {
                                    var got = [UInt8](repeating: 0, count: expected.count)
                                    var gotDelta = [Float](repeating: .nan, count: n * k)
                                    let bad = baseBytes.withUnsafeBytes { base in
                                        got.withUnsafeMutableBytes { o in
                                            gotDelta.withUnsafeMutableBufferPointer { d in
                                                LoRAMerge.merge(loraA: a, loraB: b, rank: r, inFeatures: k, outFeatures: n, scaling: 1.7,
                                                                adapterType: adapterType, fanInFanOut: fanIn, base: base, baseType: baseType,
                                                                into: o, outType: outType, deltaOut: d, threads: threads)
                                            }
                                        }
                                    }
                                    let what = "\(n)x\(k) r\(r) fanIn=\(fanIn) adapter \(adapterType) base \(baseType) out \(outType) \(level) threads \(threads)"
                                    XCTAssertNil(byteMismatch(got, expected, name: what, elementSize: outType.byteSize))
                                    XCTAssertEqual(gotDelta.map(\.bitPattern), delta.map(\.bitPattern), what)
                                    XCTAssertEqual(bad, firstBad, what)
                                }
                            }
                            KernelLevel.setMaximum(.avx512bf16)
                        }
                    }
                }
            }
        }
    }

    /// Levels are ordered: at AVX512-BF16 (level 3) the merge kernels run their AVX-512 code,
    /// not the scalar fallback (they once matched levels exactly, and a BF16 CPU merged in scalar).
    /// The report's Float64 sums show which kernel ran: each level adds its lanes in its own order.
    func testLevelsAboveAVX512RunTheAVX512MergeKernels() throws {
        guard KernelLevel.cpu.rawValue >= KernelLevel.avx512bf16.rawValue else { throw XCTSkip("needs an AVX512-BF16 CPU") }
        var rng = SplitMix64(seed: 9)
        let n = 4099
        let base = encodeForTest((0..<n).map { _ in Float(rng.normal()) }, as: .float32)
        let delta = (0..<n).map { _ in Float(rng.normal()) * 0.01 }
        let written = encodeForTest((0..<n).map { _ in Float(rng.normal()) }, as: .bfloat16)
        func sums(_ level: KernelLevel) -> [Double] {
            KernelLevel.setMaximum(level)
            return base.withUnsafeBytes { b in delta.withUnsafeBufferPointer { d in
                written.withUnsafeBytes { LoRAMerge.reportSums(base: b, baseType: .float32, delta: d, written: $0, writtenType: .bfloat16) } } }
        }
        let (scalar, avx512, top) = (sums(.scalar), sums(.avx512), sums(.avx512bf16))
        XCTAssertNotEqual(scalar, avx512, "the data tells the kernels apart")
        XCTAssertEqual(top, avx512)
    }

    /// The report's Float64 sums at every level and for every element type against a plain loop
    /// (lanes add in another order: agreement to 1e-12 relative).
    func testReportSumsMatchPlainLoop() {
        var rng = SplitMix64(seed: 5)
        let n = 1001
        let delta = (0..<n).map { _ in Float(rng.normal()) * 0.01 }
        for baseType in [ElementType.float32, .bfloat16, .float16] {
            let baseBytes = encodeForTest((0..<n).map { _ in Float(rng.normal()) }, as: baseType)
            let base = baseBytes.withUnsafeBytes { raw in (0..<n).map { FloatElements.view(raw, as: baseType)[$0] } }
            for writtenType in [ElementType.float32, .bfloat16, .float16] {
                let writtenBytes = encodeForTest(zip(base, delta).map { $0 + $1 }, as: writtenType)
                let written = writtenBytes.withUnsafeBytes { raw in (0..<n).map { FloatElements.view(raw, as: writtenType)[$0] } }
                var expected = [Double](repeating: 0, count: 5)
                for i in 0..<n {
                    let s = base[i] + delta[i]
                    let e = Double(written[i]) - Double(s), ap = Double(written[i]) - Double(base[i]), d = Double(delta[i])
                    expected[0] += e * e; expected[1] += d * d; expected[2] += Double(s) * Double(s); expected[3] += ap * d; expected[4] += ap * ap
                }
                for level in levels {
                    KernelLevel.setMaximum(level)
                    let got = baseBytes.withUnsafeBytes { b in
                        delta.withUnsafeBufferPointer { d in
                            writtenBytes.withUnsafeBytes { LoRAMerge.reportSums(base: b, baseType: baseType, delta: d, written: $0, writtenType: writtenType) }
                        }
                    }
                    for (g, e) in zip(got, expected) { XCTAssertEqual(g, e, accuracy: abs(e) * 1e-12, "\(baseType) \(writtenType) \(level)") }
                }
                KernelLevel.setMaximum(.avx512bf16)
            }
        }
    }
}

/// fp32 values rounded once to `type`, as raw bytes.
func encodeForTest(_ v: [Float], as type: ElementType) -> [UInt8] {
    switch type {
    case .float32: return v.withUnsafeBytes { Array($0) }
    case .bfloat16: return v.map { HalfPrecision.bfloat16Bits($0) }.withUnsafeBytes { Array($0) }
    case .float16: return v.map { HalfPrecision.float16Bits($0) }.withUnsafeBytes { Array($0) }
    }
}
