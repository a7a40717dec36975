/// llama.cpp's tensor encodings, each as ggml's scalar reference writes it (ggml-quants.c
/// `quantize_row_*_ref`, ggml-impl.h's fp32 -> bf16), so a GGUF qlora writes holds the bytes
/// llama.cpp's own tools write. Vectors/gguf (made by Vectors/generate_gguf.py with llama.cpp's
/// gguf-py, whose quantizers are written to match ggml's C bit for bit) holds them to it.
///
/// Row-major input; a row's length must be a multiple of the type's block (32 for Q8_0 and
/// Q4_0), as ggml requires.
public enum GGMLQuants {
    /// Elements per block and bytes per block.
    public static let q8_0Block = (elements: 32, bytes: 34)
    public static let q4_0Block = (elements: 32, bytes: 18)

    /// fp32 -> bf16 bits as ggml_compute_fp32_to_bf16: a NaN keeps its sign and top mantissa
    /// bits and is made quiet (| 0x0040); everything else rounds to nearest even (infinities stay).
    @inline(__always)
    public static func bf16Bits(_ x: Float) -> UInt16 {
        x.isNaN ? UInt16(truncatingIfNeeded: x.bitPattern >> 16) | 0x0040 : HalfPrecision.bfloat16Bits(x)
    }

    /// The encodings `bytes(_:as:)` writes.
    public enum Encoding: Sendable { case f32, f16, bf16, q8_0, q4_0, q5_0, q5_1, q4_K, q5_K, q6_K, iq4_nl }

    /// `x` in a GGUF tensor's encoding, little-endian: F32 as is; F16 rounded to nearest even
    /// (ggml's GGML_FP32_TO_FP16 is F16C's vcvtps2ph with that rounding; numpy's astype(float16)
    /// too); BF16 by `bf16Bits`; the block types by their reference quantizers (a whole number of
    /// blocks: 32 values, 256 for the K types).
    public static func bytes(_ x: UnsafeBufferPointer<Float>, as e: Encoding) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: byteCount(x.count, as: e))
        out.withUnsafeMutableBytes { encode(x, as: e, into: $0) }
        return out
    }

    /// Bytes of `count` values in encoding `e` (whole blocks).
    public static func byteCount(_ count: Int, as e: Encoding) -> Int {
        let block: (elements: Int, bytes: Int)
        switch e {
        case .f32: block = (1, 4)
        case .f16, .bf16: block = (1, 2)
        case .q8_0: block = q8_0Block
        case .q4_0: block = q4_0Block
        case .q5_0: block = q5_0Block
        case .q5_1: block = q5_1Block
        case .q4_K: block = q4_KBlock
        case .q5_K: block = q5_KBlock
        case .q6_K: block = q6_KBlock
        case .iq4_nl: block = iq4_nlBlock
        }
        return count / block.elements * block.bytes
    }

    /// `bytes(_:as:)` into `o` (exactly `byteCount(x.count, as: e)` bytes).
    public static func encode(_ x: UnsafeBufferPointer<Float>, as e: Encoding, into o: UnsafeMutableRawBufferPointer) {
        precondition(o.count == byteCount(x.count, as: e), "\(e): \(x.count) values need \(byteCount(x.count, as: e)) bytes")
        switch e {
        case .f32: for i in x.indices { o.storeBytes(of: x[i].bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
        case .f16: for i in x.indices { o.storeBytes(of: HalfPrecision.float16Bits(x[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
        case .bf16: for i in x.indices { o.storeBytes(of: bf16Bits(x[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
        case .q8_0: quantizeQ8_0(x, into: o)
        case .q4_0: quantizeQ4_0(x, into: o)
        case .q5_0: quantizeQ5_0(x, into: o)
        case .q5_1: quantizeQ5_1(x, into: o)
        case .q4_K: quantizeQ4_K(x, into: o)
        case .q5_K: quantizeQ5_K(x, into: o)
        case .q6_K: quantizeQ6_K(x, into: o)
        case .iq4_nl: quantizeIQ4_NL(x, into: o)
        }
    }

    /// C's roundf: halves away from zero.
    @inline(__always)
    static func roundf(_ x: Float) -> Float { x.rounded(.toNearestOrAwayFromZero) }

    /// C's float -> int8_t conversion as x86 compiles it (cvttss2si, low byte): truncation toward
    /// zero for the finite values a block can produce; a NaN gives 0 (INT_MIN's low byte) where
    /// Swift's conversion would trap. Export refuses non-finite weights before they get here.
    @inline(__always)
    static func int8Truncating(_ v: Float) -> Int8 {
        guard v.isFinite, v > -2_147_483_648, v < 2_147_483_648 else { return 0 }
        return Int8(truncatingIfNeeded: Int32(v))
    }

    /// Q8_0 (quantize_row_q8_0_ref): per 32 values, d = amax / 127 stored as fp16, then
    /// q = roundf(x · (1/d)) as int8 (0 where d == 0). Block: d (2 bytes, little-endian), 32 × int8.
    public static func quantizeQ8_0(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer) {
        let (qk, size) = q8_0Block
        precondition(x.count % qk == 0 && out.count == x.count / qk * size, "Q8_0: \(x.count) values need \(x.count / qk * size) bytes")
        for b in 0..<(x.count / qk) {
            var amax: Float = 0
            for j in 0..<qk { amax = max(amax, abs(x[b * qk + j])) }
            let d = amax / 127
            let id: Float = d != 0 ? 1 / d : 0
            let o = b * size
            storeHalf(d, out, o)
            for j in 0..<qk { out[o + 2 + j] = UInt8(bitPattern: int8Truncating(roundf(x[b * qk + j] * id))) }
        }
    }

    /// Q4_0 (quantize_row_q4_0_ref): per 32 values, the value of largest magnitude `max` (the
    /// first such), d = max / -8 as fp16, q = min(15, Int8(x · (1/d) + 8.5)) (truncation toward
    /// zero), element j in the low nibble of byte j and element 16 + j in its high nibble.
    public static func quantizeQ4_0(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer) {
        let (qk, size) = q4_0Block
        precondition(x.count % qk == 0 && out.count == x.count / qk * size, "Q4_0: \(x.count) values need \(x.count / qk * size) bytes")
        for b in 0..<(x.count / qk) {
            var amax: Float = 0, mx: Float = 0
            for j in 0..<qk {
                let v = x[b * qk + j]
                if amax < abs(v) { amax = abs(v); mx = v }
            }
            let d = mx / -8
            let id: Float = d != 0 ? 1 / d : 0
            let o = b * size
            storeHalf(d, out, o)
            for j in 0..<(qk / 2) {
                let q0 = min(15, int8Truncating(x[b * qk + j] * id + 8.5))
                let q1 = min(15, int8Truncating(x[b * qk + qk / 2 + j] * id + 8.5))
                out[o + 2 + j] = UInt8(bitPattern: q0) | (UInt8(bitPattern: q1) << 4)
            }
        }
    }
}
