/// Merging a LoRA adapter into its base weight as PEFT does (`merge_and_unload`,
/// peft/tuners/lora/layer.py `get_delta_weight` and `merge`).
public enum LoRAMerge {
    /// `delta = (B · A) · scaling` in fp32: [out, in], or [in, out] with `fanInFanOut` (GPT-2
    /// Conv1D layout). With a 16-bit adapter PEFT computes in fp32 on CPU and casts delta back to
    /// the adapter's dtype: pass `adapterType: .bfloat16` (A and B hold bf16 values) for that.
    ///
    ///     // A: [r, in], B: [out, r] -> delta: [out, in] (or [in, out])
    public static func delta(loraA a: [Float], loraB b: [Float], rank r: Int, inFeatures k: Int, outFeatures n: Int,
                             scaling: Double, adapterType: ElementType = .float32, fanInFanOut: Bool = false) -> [Float] {
        precondition(a.count == r * k && b.count == n * r, "LoRA merge: A must be [r, in] and B [out, r]")
        let s = Float(scaling)
        // Each element is a sequential fused multiply-add over j = 0 ..< r (torch's order: the PEFT
        // vectors hold it to the bit; OpenBLAS's sgemm orders differently), then one multiply by
        // scaling. Looping j outside a whole row keeps that order and lets the row vectorize.
        var d = [Float](repeating: 0, count: n * k)
        var row = [Float](repeating: 0, count: k)
        a.withUnsafeBufferPointer { ap in
            row.withUnsafeMutableBufferPointer { rp in
                for o in 0..<n {
                    for i in 0..<k { rp[i] = 0 }
                    for j in 0..<r {
                        let bj = b[o * r + j]
                        let aj = ap.baseAddress! + j * k
                        for i in 0..<k { rp[i] = rp[i].addingProduct(bj, aj[i]) }
                    }
                    for i in 0..<k {
                        var v = rp[i] * s
                        if adapterType == .bfloat16 { v = HalfPrecision.roundedToBFloat16(v) }
                        if adapterType == .float16 { v = HalfPrecision.float(float16Bits: HalfPrecision.float16Bits(v)) }
                        d[fanInFanOut ? i * n + o : o * k + i] = v
                    }
                }
            }
        }
        return d
    }

    /// `W += delta` with torch's type promotion: the sum is formed in fp32 (W and delta converted
    /// exactly) and rounded once to the output's type (W's dtype for an in-place merge).
    public static func add(base: FloatElements, delta: [Float], into out: FloatOutput) {
        precondition(base.count == delta.count && out.count == delta.count, "LoRA merge: sizes differ")
        switch out {
        case .float32(let o): for i in 0..<o.count { o[i] = base[i] + delta[i] }
        case .bfloat16(let o): for i in 0..<o.count { o[i] = HalfPrecision.bfloat16Bits(base[i] + delta[i]) }
        case .float16(let o): for i in 0..<o.count { o[i] = HalfPrecision.float16Bits(base[i] + delta[i]) }
        }
    }
}
