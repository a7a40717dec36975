import CQLoRAKernels
import Dispatch

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

extension LoRAMerge {
    /// `W + delta` in one pass per row (the C kernel `qlora_lora_merge_rows`), without an
    /// [out, in] delta buffer: the same bits as `add(base:delta:into:)` of `delta(...)`, on
    /// `threads` threads.
    ///
    ///     // A: [r, in], B: [out, r], base/out: [out, in] (or [in, out] with fanInFanOut)
    ///
    /// - Parameters:
    ///   - base: the stored weight, `baseType` elements (any alignment).
    ///   - out: receives the merged weight as `outType` elements (any alignment).
    ///   - deltaOut: if given ([out·in] fp32), receives the delta as applied.
    /// - Returns: nil, or the flat index of the first merged value that is not finite once
    ///   written as `outType` (PEFT's safe_merge check).
    public static func merge(loraA a: [Float], loraB b: [Float], rank r: Int, inFeatures k: Int, outFeatures n: Int,
                             scaling: Double, adapterType: ElementType = .float32, fanInFanOut: Bool = false,
                             base: UnsafeRawBufferPointer, baseType: ElementType,
                             into out: UnsafeMutableRawBufferPointer, outType: ElementType,
                             deltaOut: UnsafeMutableBufferPointer<Float>? = nil, threads: Int = 1) -> Int? {
        precondition(a.count == r * k && b.count == n * r, "LoRA merge: A must be [r, in] and B [out, r]")
        precondition(base.count == n * k * baseType.byteSize && out.count == n * k * outType.byteSize, "LoRA merge: weight sizes differ")
        precondition(deltaOut.map { $0.count == n * k } ?? true, "LoRA merge: delta buffer size differs")
        // Row i of W is Σ_j coef[i, j] · m[j, :]. With fan_in_fan_out, W = deltaᵀ: coef = Aᵀ, m = Bᵀ
        // (the products and their order per element are unchanged; fma is commutative).
        let (coef, m, rows, cols): ([Float], [Float], Int, Int) = fanInFanOut
            ? ((0..<(k * r)).map { a[($0 % r) * k + $0 / r] }, (0..<(r * n)).map { b[($0 % n) * r + $0 / n] }, k, n)
            : (b, a, n, k)
        let parts = max(1, min(threads, rows / 64))
        var firstBad = [Int64](repeating: -1, count: parts)
        coef.withUnsafeBufferPointer { c in
            m.withUnsafeBufferPointer { mp in
                firstBad.withUnsafeMutableBufferPointer { bad in
                    // Addresses cross into the worker threads as integers; each writes its own rows.
                    let (ca, ma, ba, oa, da, bada) = (Int(bitPattern: c.baseAddress), Int(bitPattern: mp.baseAddress),
                                                      Int(bitPattern: base.baseAddress), Int(bitPattern: out.baseAddress),
                                                      Int(bitPattern: deltaOut?.baseAddress), Int(bitPattern: bad.baseAddress))
                    let (at, bt, ot) = (Int32(adapterType.kernelCode), Int32(baseType.kernelCode), Int32(outType.kernelCode))
                    let run: @Sendable (Int) -> Void = { p in
                        let part = Parallel.range(p, of: parts, count: rows), (r0, r1) = (part.lowerBound, part.upperBound)
                        UnsafeMutablePointer<Int64>(bitPattern: bada)![p] = qlora_lora_merge_rows(
                            UnsafePointer(bitPattern: ca), UnsafePointer(bitPattern: ma), Int64(r), Int64(cols), Int64(r0), Int64(r1),
                            Float(scaling), at, UnsafeRawPointer(bitPattern: ba), bt, UnsafeMutableRawPointer(bitPattern: oa), ot,
                            UnsafeMutablePointer(bitPattern: da))
                    }
                    Parallel.run(parts: parts, run)
                }
            }
        }
        return firstBad.first { $0 >= 0 }.map(Int.init)
    }

    /// The sums a merge report needs, in Float64 (the C kernel `qlora_merge_report_sums`): with
    /// b, w the fp32 values of `base` and `written` (elements of their types, any alignment) and
    /// s = fl(b + delta), [Σ(w − s)², Σdelta², Σs², Σ(w − b)·delta, Σ(w − b)²].
    public static func reportSums(base: UnsafeRawBufferPointer, baseType: ElementType, delta: UnsafeBufferPointer<Float>,
                                  written: UnsafeRawBufferPointer, writtenType: ElementType) -> [Double] {
        precondition(base.count == delta.count * baseType.byteSize && written.count == delta.count * writtenType.byteSize,
                     "merge report: sizes differ")
        var acc = [Double](repeating: 0, count: 5)
        acc.withUnsafeMutableBufferPointer {
            qlora_merge_report_sums(base.baseAddress, Int32(baseType.kernelCode), delta.baseAddress, written.baseAddress,
                                    Int32(writtenType.kernelCode), Int64(delta.count), $0.baseAddress)
        }
        return acc
    }
}

extension ElementType {
    /// `qlora_float_type` in the C kernels.
    var kernelCode: Int { self == .float32 ? 0 : self == .bfloat16 ? 1 : 2 }
}

extension LoRAMerge {
    /// DoRA's merge of one weight (Liu et al. 2024; PEFT's `DoraLinearVariant.merge_unsafe`, and
    /// `merge_safe` for a 4-bit base, peft/tuners/lora/variants.py):
    ///
    ///     // W: [out, in] base (stored elements), A: [r, in], B: [out, r], m: [out]
    ///     s = fl32(W + ΔW)                    // ΔW = get_delta_weight, fp32; W promoted exactly
    ///     n[o] = ‖s[o, :]‖₂                   // get_weight_norm: torch.linalg.norm(dim=1), fp32
    ///     W'[o, i] = fl32(fl32(m[o] / n[o]) · s[o, i]), rounded once to `outType` (`.to(orig_dtype)`)
    ///
    /// PEFT takes the norm from the unmerged base with scaling 1 (ΔW already holds the scaling),
    /// and the sum it scales is the same s. The norm's fp32 sum follows torch's CPU reduction
    /// (`rowNorm`). `deltaOut` receives W' − W in fp32, what DoRA changed (the report's ΔW).
    /// - Returns: nil, or the flat index of the first merged value that is not finite.
    public static func doraMerge(loraA a: [Float], loraB b: [Float], rank r: Int, inFeatures k: Int, outFeatures n: Int,
                                 scaling: Double, adapterType: ElementType = .float32, magnitude: [Float],
                                 base: UnsafeRawBufferPointer, baseType: ElementType,
                                 into out: UnsafeMutableRawBufferPointer, outType: ElementType,
                                 deltaOut: UnsafeMutableBufferPointer<Float>? = nil, threads: Int = 1) -> Int? {
        precondition(magnitude.count == n, "DoRA merge: one magnitude per output feature")
        var sum = [Float](repeating: 0, count: n * k)
        let bad = sum.withUnsafeMutableBytes { s in
            merge(loraA: a, loraB: b, rank: r, inFeatures: k, outFeatures: n, scaling: scaling, adapterType: adapterType,
                  base: base, baseType: baseType, into: s, outType: .float32, threads: threads)
        }
        if let bad { return bad }
        let baseValues = deltaOut == nil ? [] : loadFloats(base, as: baseType)
        var firstBad: Int? = nil
        sum.withUnsafeBufferPointer { s in
            for o in 0..<n {
                let row = UnsafeBufferPointer(rebasing: s[(o * k)..<((o + 1) * k)])
                let factor = magnitude[o] / rowNorm(row)
                for i in 0..<k {
                    let v = factor * row[i]
                    let j = o * k + i
                    let written: Float
                    switch outType {
                    case .float32:
                        out.storeBytes(of: v, toByteOffset: 4 * j, as: Float.self)
                        written = v
                    case .bfloat16:
                        let h = HalfPrecision.bfloat16Bits(v)
                        out.storeBytes(of: h, toByteOffset: 2 * j, as: UInt16.self)
                        written = HalfPrecision.float(bfloat16Bits: h)
                    case .float16:
                        let h = HalfPrecision.float16Bits(v)
                        out.storeBytes(of: h, toByteOffset: 2 * j, as: UInt16.self)
                        written = HalfPrecision.float(float16Bits: h)
                    }
                    if firstBad == nil && !written.isFinite { firstBad = j }
                    if let deltaOut { deltaOut[j] = written - baseValues[j] }
                }
            }
        }
        return firstBad
    }

    /// ‖x‖₂ in fp32 as torch 2.15's CPU `linalg.norm` sums a contiguous row: x·x accumulated into
    /// 8 fp32 partial sums (element i into partial i mod 8) over the row's multiples of 8, the
    /// partials added in order, then the remaining elements one by one, then the square root
    /// (matched bit for bit to torch on rows of 16 and more; shorter rows take another path in
    /// torch).
    public static func rowNorm(_ x: UnsafeBufferPointer<Float>) -> Float {
        var lanes = SIMD8<Float>(repeating: 0)
        let full = x.count / 8 * 8
        var i = 0
        while i < full {
            var v = SIMD8<Float>()
            for l in 0..<8 { v[l] = x[i + l] }
            let square = v * v
            lanes = lanes + square
            i += 8
        }
        var total: Float = 0
        for l in 0..<8 { total = total + lanes[l] }
        while i < x.count {
            let square = x[i] * x[i]
            total = total + square
            i += 1
        }
        return total.squareRoot()
    }
}
