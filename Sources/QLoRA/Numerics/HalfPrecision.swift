/// Conversions between fp32 and the 16-bit float formats, with torch's rounding.
///
/// bf16 and fp16 values are carried as their raw `UInt16` bit patterns (the layout they
/// have in a safetensors file), so no Swift type stands between the bits and the file.
public enum HalfPrecision {
    /// fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (as torch's scalar `c10::BFloat16`; its
    /// vectorized CPU cast writes 0xFFFF instead: both are NaN, LlamaOpsTests pins the difference).
    @inline(__always)
    public static func bfloat16Bits(_ x: Float) -> UInt16 {
        UInt16(truncatingIfNeeded: roundedToBFloat16(x).bitPattern >> 16)
    }

    /// bf16 bits -> fp32 (exact).
    @inline(__always)
    public static func float(bfloat16Bits b: UInt16) -> Float {
        Float(bitPattern: UInt32(b) << 16)
    }

    /// fp32 -> IEEE binary16 bits, round to nearest even.
    @inline(__always)
    public static func float16Bits(_ x: Float) -> UInt16 {
        Float16(x).bitPattern
    }

    /// IEEE binary16 bits -> fp32 (exact).
    @inline(__always)
    public static func float(float16Bits h: UInt16) -> Float {
        Float(Float16(bitPattern: h))
    }

    /// Rounds through bf16 and back: the value a bf16 tensor would hold, the same as
    /// `float(bfloat16Bits: bfloat16Bits(x))` for every input. Written without a branch, so
    /// loops of it vectorize (the Llama kernels' elementwise ops rely on that).
    @inline(__always)
    public static func roundedToBFloat16(_ x: Float) -> Float {
        let u = x.bitPattern
        let r = Float(bitPattern: (u &+ 0x7FFF &+ ((u >> 16) & 1)) & 0xFFFF_0000)
        return x.isNaN ? Float(bitPattern: 0x7FC0_0000) : r
    }
}
