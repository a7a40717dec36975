import Foundation
import QLoRA
import SafeTensors

/// OCP Microscaling FP4 (MXFP4) as gpt-oss' checkpoints store their experts
/// (`…experts.gate_up_proj_blocks` / `_scales`, `quantization_config.quant_method` "mxfp4"):
/// per 32 values one byte of scale, an e8m0 power of two (2^(s − 127)), and 16 bytes of e2m1
/// codes, two a byte, the low nibble first. Decoded as transformers does it
/// (integrations/mxfp4.py `_convert_moe_packed_tensors`): each code looked up in bf16, scaled by
/// `torch.ldexp`, and the [experts, out, in] result transposed to the [experts, in, out] the
/// model holds.
public enum MXFP4 {
    /// The e2m1 values by code (transformers' `FP4_VALUES`).
    public static let values: [Float] = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]  // -0.0: a negative zero, as torch keeps it

    /// A pair of stored tensors and what they decode to.
    public struct Pair: Sendable, Equatable {
        /// The parameter's name (`…experts.gate_up_proj`), and its two stored tensors.
        public var name: String
        public var blocks: String { name + "_blocks" }
        public var scales: String { name + "_scales" }
        /// blocks [experts, out, groups, 16]; the decoded tensor [experts, groups·32, out].
        public var experts, out, groups: Int
        public var shape: [Int] { [experts, groups * 32, out] }

        public init(name: String, experts: Int, out: Int, groups: Int) {
            (self.name, self.experts, self.out, self.groups) = (name, experts, out, groups)
        }
    }

    /// The MXFP4 pairs among `tensors` (name, dtype, shape): a U8 `X_blocks` [e, out, g, 16] beside a
    /// U8 `X_scales` [e, out, g]. A `_blocks` tensor without its scales, or of another shape, is an
    /// error naming it.
    public static func pairs(_ tensors: [(name: String, dtype: DType, shape: [Int])]) throws -> [Pair] {
        let byName = Dictionary(tensors.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        return try tensors.filter { $0.name.hasSuffix("_blocks") }.map { b in
            let name = String(b.name.dropLast("_blocks".count))
            guard let s = byName[name + "_scales"] else { throw MXFP4Error("\(b.name) has no \(name)_scales beside it") }
            guard b.dtype == .u8, s.dtype == .u8, b.shape.count == 4, b.shape[3] == 16, s.shape == Array(b.shape.dropLast()) else {
                throw MXFP4Error("\(b.name) \(b.dtype.rawValue)\(b.shape) and \(name)_scales \(s.dtype.rawValue)\(s.shape) are not MXFP4's U8 [experts, out, groups, 16] and [experts, out, groups]")
            }
            return Pair(name: name, experts: b.shape[0], out: b.shape[1], groups: b.shape[2])
        }
    }

    /// Decodes a pair to bf16 bits, [experts, groups·32, out].
    public static func decode(_ p: Pair, blocks: UnsafeRawBufferPointer, scales: UnsafeRawBufferPointer) -> [UInt16] {
        (0..<p.experts).flatMap { decode(p, expert: $0, blocks: blocks, scales: scales) }
    }

    /// Expert `e`'s slice, [groups·32, out] bf16 bits: what a job writes one expert at a time.
    public static func decode(_ p: Pair, expert e: Int, blocks: UnsafeRawBufferPointer, scales: UnsafeRawBufferPointer) -> [UInt16] {
        let inner = p.groups * 32
        var out = [UInt16](repeating: 0, count: inner * p.out)
        for o in 0..<p.out {
            for g in 0..<p.groups {
                let row = (e * p.out + o) * p.groups + g
                // torch.ldexp(x, n): x · 2^n exactly (2^128 too: 0.5 · 2^128 is 2^127, 0 · 2^128 is
                // 0), then rounded to bf16. An e2m1 value times a power of two has at most 3
                // significant bits, so it is exact in bf16 unless it overflows to infinity.
                let power = pow(2.0, Double(Int(scales[row]) - 127))
                for j in 0..<16 {
                    let byte = blocks[row * 16 + j], i = g * 32 + 2 * j
                    out[i * p.out + o] = HalfPrecision.bfloat16Bits(Float(Double(values[Int(byte & 0x0F)]) * power))       // low nibble first
                    out[(i + 1) * p.out + o] = HalfPrecision.bfloat16Bits(Float(Double(values[Int(byte >> 4)]) * power))
                }
            }
        }
        return out
    }
}

/// A malformed MXFP4 pair: one line.
public struct MXFP4Error: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
