import XCTest
import QLoRA
import TestSupport

/// The SIMD kernels against the scalar reference on random shapes, inputs and scales,
/// at every kernel level this CPU can be forced to.
final class KernelCrossCheckTests: XCTestCase {
    override func tearDown() { KernelLevel.setMaximum(.avx512bf16) }

    var levels: [KernelLevel] { [KernelLevel.scalar, .avx2, .avx512].filter { $0.rawValue <= KernelLevel.cpu.rawValue } }

    func testQuantizeFastEqualsReferenceOnRandomShapes() throws {
        var rng = SplitMix64(seed: 42)
        for trial in 0..<120 {
            let n = [1, 2, 7, 31, 33, 63, 64, 65, 1023, 4097, 5000][trial % 11] + Int.random(in: 0..<200, using: &rng)
            let bs = QuantState.validBlocksizes.randomElement(using: &rng)!
            let qt = QuantType.allCases.randomElement(using: &rng)!
            let type = ElementType.allCases[trial % 3]
            let exponents = type == .float16 ? -3.0...3.0 : -30.0...30.0  // stay finite in fp16
            let scale = Float(pow(10.0, Double.random(in: exponents, using: &rng)))
            let values = (0..<n).map { _ in rng.normal() * scale }
            let bytes = encode(values, type)
            try bytes.withUnsafeBytes { raw in
                let x = FloatElements.view(raw, as: type)
                let ref = try quantize4Bit(x, shape: [n], quantType: qt, blocksize: bs, doubleQuant: true, kernel: .reference)
                for level in levels {
                    KernelLevel.setMaximum(level)
                    let fast = try quantize4Bit(x, shape: [n], quantType: qt, blocksize: bs, doubleQuant: true, kernel: .fast)
                    XCTAssertEqual(fast, ref, "n=\(n) bs=\(bs) \(qt) \(type) scale=\(scale) level=\(level)")
                    for out in ElementType.allCases {
                        XCTAssertEqual(fast.dequantizedBytes(as: out, kernel: .fast), ref.dequantizedBytes(as: out, kernel: .reference),
                                       "dequant \(out) n=\(n) bs=\(bs) \(qt) level=\(level)")
                    }
                }
            }
        }
    }

    /// Scales across the whole fp32 range, subnormals included, through every output type:
    /// the C conversions (bf16 rounding, fp16 rounding and subnormals) against Swift's.
    func testDequantizeConversionsOverAllExponents() {
        var rng = SplitMix64(seed: 7)
        let n = 64 * 600
        let packed = (0..<(n / 2)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        var absmax = (0..<(n / 64)).map { _ in Float(bitPattern: UInt32.random(in: 0..<0x7F800000, using: &rng)) }
        absmax[0] = 0; absmax[1] = .leastNonzeroMagnitude; absmax[2] = 65504; absmax[3] = 65520; absmax[4] = .greatestFiniteMagnitude
        for qt in QuantType.allCases {
            for type in ElementType.allCases {
                var expected = [UInt8](repeating: 0, count: n * type.byteSize)
                var got = expected
                packed.withUnsafeBufferPointer { p in
                    absmax.withUnsafeBufferPointer { a in
                        expected.withUnsafeMutableBytes {
                            dequantize4Bit(p, absmax: a, quantType: qt, blocksize: 64, into: .view($0, as: type), kernel: .reference)
                        }
                        for level in levels {
                            KernelLevel.setMaximum(level)
                            got.withUnsafeMutableBytes {
                                dequantize4Bit(p, absmax: a, quantType: qt, blocksize: 64, into: .view($0, as: type), kernel: .fast)
                            }
                            XCTAssertNil(byteMismatch(got, expected, name: "\(qt) -> \(type) at \(level)", elementSize: type.byteSize))
                        }
                    }
                }
            }
        }
    }

    /// The absmax-only pass equals the absmax quantization stores, so the offset it implies
    /// is the one quantize4Bit records.
    func testBlockAbsmaxEqualsQuantizeAbsmax() throws {
        var rng = SplitMix64(seed: 11)
        for trial in 0..<60 {
            let n = 1 + Int.random(in: 0..<6000, using: &rng)
            let bs = QuantState.validBlocksizes.randomElement(using: &rng)!
            let type = ElementType.allCases[trial % 3]
            var values = (0..<n).map { _ in rng.normal() * 0.3 }
            if trial % 5 == 0 { for i in 0..<min(n, bs) { values[i] = 0 } }  // an all-zero block
            let bytes = encode(values, type)
            try bytes.withUnsafeBytes { raw in
                let x = FloatElements.view(raw, as: type)
                let q = try quantize4Bit(x, shape: [n], blocksize: bs, doubleQuant: false, kernel: .reference)
                guard case .plain(let expected) = q.state.absmax else { return XCTFail() }
                for (level, kernel) in [(KernelLevel.avx512, KernelChoice.fast), (.scalar, .fast), (.avx512, .reference)] {
                    KernelLevel.setMaximum(level)
                    let got = try blockAbsmax4Bit(x, blocksize: bs, kernel: kernel)
                    XCTAssertEqual(got.map(\.bitPattern), expected.map(\.bitPattern), "n=\(n) bs=\(bs) \(type) \(kernel) \(level)")
                }
                KernelLevel.setMaximum(.avx512bf16)
            }
        }
        var x = [Float](repeating: 1, count: 100)
        x[70] = .infinity
        XCTAssertThrowsError(try x.withUnsafeBufferPointer { try blockAbsmax4Bit(.float32($0), blocksize: 64) }) {
            XCTAssertEqual($0 as? QuantizationError, .nonFinite(index: 70, value: .infinity))
        }
    }

    func testNonFiniteInputIsRefusedNamingTheElement() {
        for kernel in [KernelChoice.fast, .reference] {
            for (index, bad) in [(0, Float.nan), (77, .infinity), (130, -.infinity), (199, .nan)] {
                var x = [Float](repeating: 0.5, count: 200)
                x[index] = bad
                XCTAssertThrowsError(try x.withUnsafeBufferPointer {
                    try quantize4Bit(.float32($0), shape: [200], blocksize: 64, kernel: kernel)
                }) { error in
                    guard case QuantizationError.nonFinite(let i, _) = error else { return XCTFail("\(error)") }
                    XCTAssertEqual(i, index)
                    XCTAssertTrue("\(error)".contains("element \(index)"))
                }
            }
        }
    }

    func testBadBlocksizeAndShapeAreRefused() {
        let x = [Float](repeating: 1, count: 64)
        XCTAssertThrowsError(try x.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [64], blocksize: 48) }) {
            XCTAssertEqual($0 as? QuantizationError, .invalidBlocksize(48))
        }
        XCTAssertThrowsError(try x.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [8, 9]) }) {
            XCTAssertEqual($0 as? QuantizationError, .shapeMismatch(elements: 64, shape: [8, 9]))
        }
    }

    /// The packing layout: element 2j in the high nibble of byte j.
    func testPackingLayoutEvenElementInHighNibble() throws {
        let x: [Float] = [1, -1, 0]  // NF4 nibbles 15, 0, 7 (+ padding 7)
        let q = try x.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [3], doubleQuant: false) }
        XCTAssertEqual(q.packed, [0xF0, 0x77])
    }

    func testBFloat16Rounding() {
        XCTAssertEqual(HalfPrecision.bfloat16Bits(1.0), 0x3F80)
        XCTAssertEqual(HalfPrecision.bfloat16Bits(Float(bitPattern: 0x3F808000)), 0x3F80)  // tie -> even
        XCTAssertEqual(HalfPrecision.bfloat16Bits(Float(bitPattern: 0x3F818000)), 0x3F82)  // tie -> even
        XCTAssertEqual(HalfPrecision.bfloat16Bits(Float(bitPattern: 0x3F808001)), 0x3F81)
        XCTAssertEqual(HalfPrecision.bfloat16Bits(.nan), 0x7FC0)
        XCTAssertEqual(HalfPrecision.bfloat16Bits(.greatestFiniteMagnitude), 0x7F80)  // rounds up to inf, as torch
    }

    func encode(_ v: [Float], _ t: ElementType) -> [UInt8] {
        switch t {
        case .float32: return rawBytes(v)
        case .bfloat16: return rawBytes(v.map { HalfPrecision.bfloat16Bits($0) })
        case .float16: return rawBytes(v.map { HalfPrecision.float16Bits($0) })
        }
    }
}
