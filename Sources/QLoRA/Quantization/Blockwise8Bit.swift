/// Blockwise 8-bit quantization with bitsandbytes' signed dynamic code: the second level of
/// double quantization (the first-level absmax, minus its mean, in blocks of 256).
///
/// This reproduces bitsandbytes 0.50.2's CPU kernel (`quantize_cpu_impl` in csrc/cpu_ops.cpp),
/// which does NOT search the code for the nearest value: it maps the scaled value to one of
/// 65,536 bins over [-1, 1] and looks the code index up in a table built from the code's
/// midpoints. Exact nearest-value search (the CUDA kernel) disagrees on ~0.2% of bytes.
public enum Blockwise8Bit {
    /// Entries in the lookup table over [-1, 1].
    static let lutSize = 65536

    /// `build_quantize_lut`: bin i holds value -1 + 2i/65535; its index is the count of code
    /// midpoints `0.5 * (c[j] + c[j+1])` strictly below that value.
    static func buildLUT(code: [Float]) -> [UInt8] {
        precondition(code.count == 256)
        let mids = (0..<255).map { 0.5 * (code[$0] + code[$0 + 1]) }
        var lut = [UInt8](repeating: 0, count: lutSize)
        var codeIndex = 0
        for i in 0..<lutSize {
            let value: Float = -1.0 + (2.0 * Float(i)) / Float(lutSize - 1)
            while codeIndex < 255 && mids[codeIndex] < value { codeIndex += 1 }
            lut[i] = UInt8(codeIndex)
        }
        return lut
    }

    static let dynamicLUT: [UInt8] = buildLUT(code: Codes.dynamic8)

    /// `norm_to_lut_index`: clamp to [-1, 1], then `(v + 1) * 0.5 * 65535 + 0.5`, truncated;
    /// each operation rounded in fp32 (the compiled kernel does not fuse them: vectors confirm).
    @inline(__always)
    static func lutIndex(_ v: Float) -> Int {
        let c = min(max(v, -1), 1)
        var t = c + 1
        t = t * 0.5
        t = t * 65535
        t = t + 0.5
        return Int(UInt16(t))
    }

    /// Quantizes `x` in blocks of `blocksize` with the dynamic code.
    /// - Returns: one code index per element, and each block's absmax (max |x|, fp32; 0 for
    ///   an all-zero block, whose indices are then all 0).
    public static func quantize(_ x: [Float], blocksize: Int) -> (indices: [UInt8], absmax: [Float]) {
        let n = x.count
        let blocks = (n + blocksize - 1) / blocksize
        var out = [UInt8](repeating: 0, count: n)
        var absmax = [Float](repeating: 0, count: blocks)
        let lut = dynamicLUT
        for b in 0..<blocks {
            let start = b * blocksize, end = min(start + blocksize, n)
            var am: Float = 0
            for i in start..<end { am = max(am, abs(x[i])) }
            absmax[b] = am
            if am == 0 { continue }
            let inv = 1 / am
            for i in start..<end { out[i] = lut[lutIndex(x[i] * inv)] }
        }
        return (out, absmax)
    }

    /// `code[index] * absmax[block]` in fp32 (`dequantizeBlockwise8bitCpu<float>`).
    public static func dequantize(_ indices: [UInt8], absmax: [Float], blocksize: Int, code: [Float]) -> [Float] {
        var out = [Float](repeating: 0, count: indices.count)
        out.withUnsafeMutableBufferPointer { o in
            indices.withUnsafeBufferPointer { q in
                code.withUnsafeBufferPointer { c in
                    var start = 0
                    for scale in absmax where start < q.count {  // one scale per block, no division per element
                        let end = min(start + blocksize, q.count)
                        for i in start..<end { o[i] = c[Int(q[i])] * scale }
                        start = end
                    }
                }
            }
        }
        return out
    }
}
