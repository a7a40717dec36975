/// llama-quantize's other encodings, each as ggml's scalar reference writes it without an
/// importance matrix (ggml-quants.c: Q5_0 and Q5_1 `quantize_row_*_ref`; Q4_K, Q5_K and Q6_K
/// `quantize_row_*_K_ref`; IQ4_NL `quantize_iq4_nl`, which has no separate reference). ggml
/// compiles these in ggml-base without -march flags, so its float arithmetic is plain IEEE single
/// precision in source order, with no fused multiply-adds: every sum below is accumulated in the
/// same order and with the same grouping as ggml's, which is what makes the bytes equal
/// (Vectors/gguf/llama-small/quantize.json holds them to llama-quantize's output).
///
/// Layouts (fp16 little-endian `d`):
/// - Q5_0 (22 bytes / 32): d, qh (u32: bit j = 5th bit of element j), qs[16] (j low, 16 + j high nibble);
/// - Q5_1 (24 / 32): d, m (the min), qh, qs — as Q5_0 with an offset;
/// - Q4_K (144 / 256): d, dmin, scales[12] (eight 6-bit scales and mins), qs[128];
/// - Q5_K (176 / 256): d, dmin, scales[12], qh[32], qs[128];
/// - Q6_K (210 / 256): ql[128], qh[64], scales[16] (int8), d;
/// - IQ4_NL (18 / 32): d, qs[16]: indices into the non-linear table `iq4nlValues`.
extension GGMLQuants {
    public static let q5_0Block = (elements: 32, bytes: 22)
    public static let q5_1Block = (elements: 32, bytes: 24)
    public static let q4_KBlock = (elements: 256, bytes: 144)
    public static let q5_KBlock = (elements: 256, bytes: 176)
    public static let q6_KBlock = (elements: 256, bytes: 210)
    public static let iq4_nlBlock = (elements: 32, bytes: 18)

    /// IQ4_NL's 16 levels (ggml-common.h kvalues_iq4nl).
    public static let iq4nlValues: [Int8] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    static let iq4nlFloats = iq4nlValues.map(Float.init)

    /// ggml's smallest group maximum treated as non-zero (GROUP_MAX_EPS).
    static let groupMaxEps: Float = 1e-15

    /// ggml's nearest_int: round half to even through the 1.5·2^23 trick (|x| < 2^22).
    @inline(__always)
    static func nearestInt(_ x: Float) -> Int {
        Int((x + 12_582_912).bitPattern & 0x007F_FFFF) - 0x0040_0000
    }

    @inline(__always)
    static func storeHalf(_ x: Float, _ out: UnsafeMutableRawBufferPointer, _ at: Int) {
        let h = HalfPrecision.float16Bits(x)
        out[at] = UInt8(truncatingIfNeeded: h)
        out[at + 1] = UInt8(truncatingIfNeeded: h >> 8)
    }

    @inline(__always)
    static func loadHalf(_ bytes: UnsafeRawBufferPointer, _ at: Int) -> Float {
        HalfPrecision.float(float16Bits: UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8)
    }

    /// C's (uint8_t) of a float: truncation toward zero, low byte.
    @inline(__always)
    static func uint8Truncating(_ v: Float) -> UInt8 { UInt8(bitPattern: int8Truncating(v)) }

    // MARK: Q5_0, Q5_1

    /// Q5_0 (quantize_row_q5_0_ref): as Q4_0 with 32 levels: d = max / -16, q = min(31, Int8(x/d + 16.5)).
    public static func quantizeQ5_0(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer) {
        let (qk, size) = q5_0Block
        precondition(x.count % qk == 0 && out.count == x.count / qk * size, "Q5_0: \(x.count) values need \(x.count / qk * size) bytes")
        for b in 0..<(x.count / qk) {
            let v = UnsafeBufferPointer(rebasing: x[(b * qk)..<(b * qk + qk)])
            var amax: Float = 0, mx: Float = 0
            for j in 0..<qk where amax < abs(v[j]) { amax = abs(v[j]); mx = v[j] }
            let d = mx / -16
            let id: Float = d != 0 ? 1 / d : 0
            let o = b * size
            storeHalf(d, out, o)
            var qh: UInt32 = 0
            for j in 0..<(qk / 2) {
                let q0 = UInt8(bitPattern: min(31, int8Truncating(v[j] * id + 16.5)))
                let q1 = UInt8(bitPattern: min(31, int8Truncating(v[qk / 2 + j] * id + 16.5)))
                out[o + 6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
                qh |= UInt32((q0 & 0x10) >> 4) << j
                qh |= UInt32((q1 & 0x10) >> 4) << (j + qk / 2)
            }
            for k in 0..<4 { out[o + 2 + k] = UInt8(truncatingIfNeeded: qh >> (8 * k)) }
        }
    }

    /// Q5_1 (quantize_row_q5_1_ref): d = (max − min)/31, m = min, q = UInt8((x − min)/d + 0.5).
    public static func quantizeQ5_1(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer) {
        let (qk, size) = q5_1Block
        precondition(x.count % qk == 0 && out.count == x.count / qk * size, "Q5_1: \(x.count) values need \(x.count / qk * size) bytes")
        for b in 0..<(x.count / qk) {
            let v = UnsafeBufferPointer(rebasing: x[(b * qk)..<(b * qk + qk)])
            var lo = Float.greatestFiniteMagnitude, hi = -Float.greatestFiniteMagnitude
            for j in 0..<qk {
                if v[j] < lo { lo = v[j] }
                if v[j] > hi { hi = v[j] }
            }
            let d = (hi - lo) / 31
            let id: Float = d != 0 ? 1 / d : 0
            let o = b * size
            storeHalf(d, out, o)
            storeHalf(lo, out, o + 2)
            var qh: UInt32 = 0
            for j in 0..<(qk / 2) {
                let q0 = uint8Truncating((v[j] - lo) * id + 0.5)
                let q1 = uint8Truncating((v[qk / 2 + j] - lo) * id + 0.5)
                out[o + 8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
                qh |= UInt32((q0 & 0x10) >> 4) << j
                qh |= UInt32((q1 & 0x10) >> 4) << (j + qk / 2)
            }
            for k in 0..<4 { out[o + 4 + k] = UInt8(truncatingIfNeeded: qh >> (8 * k)) }
        }
    }

    // MARK: Q4_K, Q5_K

    /// make_qkx2_quants: levels 0...nmax with a scale and a min for `n` values, chosen by
    /// weighted least squares over nstep + 1 trial scales; returns the scale and −min.
    static func makeQKX2Quants(_ n: Int, _ nmax: Int, _ x: UnsafePointer<Float>, _ weights: UnsafePointer<Float>, _ L: UnsafeMutablePointer<UInt8>,
                               _ laux: UnsafeMutablePointer<UInt8>, rmin: Float, rdelta: Float, nstep: Int) -> (scale: Float, negMin: Float) {
        var lo = x[0], hi = x[0]
        var sumW = weights[0]
        var sumX = sumW * x[0]
        for i in 1..<n {
            if x[i] < lo { lo = x[i] }
            if x[i] > hi { hi = x[i] }
            let w = weights[i]
            sumW += w
            sumX += w * x[i]
        }
        if lo > 0 { lo = 0 }
        if hi == lo {
            for i in 0..<n { L[i] = 0 }
            return (0, -lo)
        }
        let fmax = Float(nmax)
        var iscale = fmax / (hi - lo)
        var scale = 1 / iscale
        var bestError: Float = 0
        for i in 0..<n {
            let l = max(0, min(nmax, nearestInt(iscale * (x[i] - lo))))
            L[i] = UInt8(l)
            let diff = scale * Float(l) + lo - x[i]
            bestError += weights[i] * (diff * diff)
        }
        guard nstep >= 1 else { return (scale, -lo) }
        for step in 0...nstep {
            iscale = (rmin + rdelta * Float(step) + fmax) / (hi - lo)
            var sumL: Float = 0, sumL2: Float = 0, sumXL: Float = 0
            for i in 0..<n {
                let l = max(0, min(nmax, nearestInt(iscale * (x[i] - lo))))
                laux[i] = UInt8(l)
                let w = weights[i], fl = Float(l)
                sumL += w * fl
                sumL2 += w * fl * fl
                sumXL += w * fl * x[i]
            }
            let D = sumW * sumL2 - sumL * sumL
            if D > 0 {
                var thisScale = (sumW * sumXL - sumX * sumL) / D
                var thisMin = (sumL2 * sumX - sumL * sumXL) / D
                if thisMin > 0 {
                    thisMin = 0
                    thisScale = sumXL / sumL2
                }
                var curError: Float = 0
                for i in 0..<n {
                    let diff = thisScale * Float(laux[i]) + thisMin - x[i]
                    curError += weights[i] * (diff * diff)
                }
                if curError < bestError {
                    for i in 0..<n { L[i] = laux[i] }
                    bestError = curError
                    scale = thisScale
                    lo = thisMin
                }
            }
        }
        return (scale, -lo)
    }

    /// Per-call scratch of the K-quant super-blocks: levels, 8 scales, 8 mins, 32 weights, 32 trial levels.
    struct KScratch {
        let L: UnsafeMutablePointer<UInt8>, floats: UnsafeMutablePointer<Float>, laux: UnsafeMutablePointer<UInt8>
        static func with<R>(_ body: (KScratch) -> R) -> R {
            let L = UnsafeMutablePointer<UInt8>.allocate(capacity: 256 + 32), f = UnsafeMutablePointer<Float>.allocate(capacity: 48)
            defer { L.deallocate(); f.deallocate() }
            return body(KScratch(L: L, floats: f, laux: L + 256))
        }
    }

    /// One 256-value super-block of Q4_K (nmax 15) or Q5_K (nmax 31): eight sub-blocks' scale and
    /// min by `makeQKX2Quants`, both quantized to 6 bits against the largest, then the levels
    /// recomputed from the stored scales. Writes d, dmin and scales[12]; returns the levels in scratch.L.
    static func superBlockK(_ x: UnsafePointer<Float>, nmax: Int, rmin: Float, nstep: Int, _ out: UnsafeMutableRawBufferPointer, _ o: Int,
                            _ scratch: KScratch) {
        let L = scratch.L, scales = scratch.floats, mins = scratch.floats + 8, w = scratch.floats + 16, aux = scratch.laux
        var maxScale: Float = 0, maxMin: Float = 0
        for j in 0..<8 {
            let xb = x + 32 * j
            var sumX2: Float = 0
            for l in 0..<32 { sumX2 += xb[l] * xb[l] }
            let avX = (sumX2 / 32).squareRoot()
            for l in 0..<32 { w[l] = avX + abs(xb[l]) }
            let r = makeQKX2Quants(32, nmax, xb, w, L + 32 * j, aux, rmin: rmin, rdelta: 0.1, nstep: nstep)
            scales[j] = r.scale
            mins[j] = r.negMin
            if r.scale > maxScale { maxScale = r.scale }
            if r.negMin > maxMin { maxMin = r.negMin }
        }
        let invScale: Float = maxScale > 0 ? 63 / maxScale : 0, invMin: Float = maxMin > 0 ? 63 / maxMin : 0
        let s = o + 4
        for k in 0..<12 { out[s + k] = 0 }
        for j in 0..<8 {
            let ls = min(63, UInt8(truncatingIfNeeded: nearestInt(invScale * scales[j])))
            let lm = min(63, UInt8(truncatingIfNeeded: nearestInt(invMin * mins[j])))
            if j < 4 {
                out[s + j] = ls
                out[s + j + 4] = lm
            } else {
                out[s + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                out[s + j - 4] |= (ls >> 4) << 6
                out[s + j] |= (lm >> 4) << 6
            }
        }
        storeHalf(maxScale / 63, out, o)
        storeHalf(maxMin / 63, out, o + 2)
        let dAll = loadHalf(UnsafeRawBufferPointer(out), o), dminAll = loadHalf(UnsafeRawBufferPointer(out), o + 2)
        for j in 0..<8 {
            let (sc, m): (UInt8, UInt8) = j < 4 ? (out[s + j] & 63, out[s + j + 4] & 63)
                : ((out[s + j + 4] & 0xF) | ((out[s + j - 4] >> 6) << 4), (out[s + j + 4] >> 4) | ((out[s + j] >> 6) << 4))
            let d = dAll * Float(sc)
            if d == 0 { continue }
            let dm = dminAll * Float(m)
            for i in 0..<32 { L[32 * j + i] = UInt8(max(0, min(nmax, nearestInt((x[32 * j + i] + dm) / d)))) }
        }
    }

    /// Q4_K (quantize_row_q4_K_ref): 4-bit levels, qs byte l of each 64-value group holds
    /// element l (low nibble) and element 32 + l (high).
    public static func quantizeQ4_K(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer) {
        superBlocks(x, into: out, "Q4_K", q4_KBlock, nmax: 15, rmin: -1, nstep: 20) { L, o in
            for g in 0..<4 {
                for l in 0..<32 { out[o + 16 + 32 * g + l] = L[64 * g + l] | (L[64 * g + l + 32] << 4) }
            }
        }
    }

    /// Q5_K (quantize_row_q5_K_ref): 5-bit levels; the low four bits as Q4_K's qs, the fifth
    /// in qh (bit 2g of byte l for element 64g + l, bit 2g + 1 for element 64g + 32 + l).
    public static func quantizeQ5_K(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer) {
        superBlocks(x, into: out, "Q5_K", q5_KBlock, nmax: 31, rmin: -0.5, nstep: 15) { L, o in
            let qh = o + 16, ql = o + 48
            for j in 0..<32 { out[qh + j] = 0 }
            for g in 0..<4 {
                let m1 = UInt8(1) << (2 * g), m2 = UInt8(2) << (2 * g)
                for j in 0..<32 {
                    var l1 = L[64 * g + j], l2 = L[64 * g + j + 32]
                    if l1 > 15 { l1 -= 16; out[qh + j] |= m1 }
                    if l2 > 15 { l2 -= 16; out[qh + j] |= m2 }
                    out[ql + 32 * g + j] = l1 | (l2 << 4)
                }
            }
        }
    }

    /// Q4_K's and Q5_K's loop: each super-block's scales by `superBlockK`, then `pack` writes its
    /// levels L into the block at byte offset o.
    static func superBlocks(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer, _ name: String, _ block: (elements: Int, bytes: Int),
                            nmax: Int, rmin: Float, nstep: Int, pack: (UnsafeMutablePointer<UInt8>, Int) -> Void) {
        let (qk, size) = block
        precondition(x.count % qk == 0 && out.count == x.count / qk * size, "\(name): \(x.count) values need \(x.count / qk * size) bytes")
        KScratch.with { scratch in
            for b in 0..<(x.count / qk) {
                superBlockK(x.baseAddress! + b * qk, nmax: nmax, rmin: rmin, nstep: nstep, out, b * size, scratch)
                pack(scratch.L, b * size)
            }
        }
    }

    // MARK: Q6_K

    /// make_qx_quants with rmse_type 1 and no importance weights: symmetric levels −nmax...nmax−1
    /// for `n` values, the scale refined by weighted least squares (weights x²) over 19 trials.
    static func makeQXQuants(_ n: Int, _ nmax: Int, _ x: UnsafePointer<Float>, _ L: UnsafeMutablePointer<Int8>) -> Float {
        var mx: Float = 0, amax: Float = 0
        for i in 0..<n where abs(x[i]) > amax { amax = abs(x[i]); mx = x[i] }
        if amax < groupMaxEps {
            for i in 0..<n { L[i] = 0 }
            return 0
        }
        let fmax = Float(nmax)
        var iscale = -fmax / mx
        var sumLX: Float = 0, sumL2: Float = 0
        for i in 0..<n {
            let l = max(-nmax, min(nmax - 1, nearestInt(iscale * x[i])))
            L[i] = Int8(l + nmax)
            let w = x[i] * x[i], fl = Float(l)
            sumLX += w * x[i] * fl
            sumL2 += w * fl * fl
        }
        var scale: Float = sumL2 != 0 ? sumLX / sumL2 : 0
        var best = scale * sumLX
        for step in -9...9 where step != 0 {
            iscale = -(fmax + 0.1 * Float(step)) / mx
            sumLX = 0
            sumL2 = 0
            for i in 0..<n {
                let l = max(-nmax, min(nmax - 1, nearestInt(iscale * x[i])))
                let w = x[i] * x[i], fl = Float(l)
                sumLX += w * x[i] * fl
                sumL2 += w * fl * fl
            }
            if sumL2 > 0 && sumLX * sumLX > best * sumL2 {
                for i in 0..<n { L[i] = Int8(nmax + max(-nmax, min(nmax - 1, nearestInt(iscale * x[i])))) }
                scale = sumLX / sumL2
                best = scale * sumLX
            }
        }
        return scale
    }

    /// Q6_K (quantize_row_q6_K_ref): sixteen 16-value groups with 6-bit levels and an int8 scale
    /// each (against the scale of largest magnitude); a super-block of near-zero scales is all zero.
    public static func quantizeQ6_K(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer) {
        let (qk, size) = q6_KBlock
        precondition(x.count % qk == 0 && out.count == x.count / qk * size, "Q6_K: \(x.count) values need \(x.count / qk * size) bytes")
        var L = [Int8](repeating: 0, count: qk), scales = [Float](repeating: 0, count: 16)
        L.withUnsafeMutableBufferPointer { L in
            let L = L.baseAddress!
            for b in 0..<(x.count / qk) {
                let xb = x.baseAddress! + b * qk, o = b * size
                let ql = o, qh = o + 128, sc = o + 192, dAt = o + 208
                var maxScale: Float = 0, maxAbsScale: Float = 0
                for g in 0..<16 {
                    let s = makeQXQuants(16, 32, xb + 16 * g, L + 16 * g)
                    scales[g] = s
                    if abs(s) > maxAbsScale { maxAbsScale = abs(s); maxScale = s }
                }
                if maxAbsScale < groupMaxEps {
                    for k in 0..<size { out[o + k] = 0 }
                    continue
                }
                let iscale = -128 / maxScale
                storeHalf(1 / iscale, out, dAt)
                for g in 0..<16 { out[sc + g] = UInt8(bitPattern: Int8(truncatingIfNeeded: min(127, nearestInt(iscale * scales[g])))) }
                let dAll = loadHalf(UnsafeRawBufferPointer(out), dAt)
                for g in 0..<16 {
                    let d = dAll * Float(Int8(bitPattern: out[sc + g]))
                    if d == 0 { continue }
                    for i in 0..<16 { L[16 * g + i] = Int8(max(-32, min(31, nearestInt(xb[16 * g + i] / d))) + 32) }
                }
                for half in 0..<2 {
                    let j = 128 * half
                    for l in 0..<32 {
                        let q0 = UInt8(bitPattern: L[j + l]), q1 = UInt8(bitPattern: L[j + l + 32])
                        let q2 = UInt8(bitPattern: L[j + l + 64]), q3 = UInt8(bitPattern: L[j + l + 96])
                        out[ql + 64 * half + l] = (q0 & 0xF) | ((q2 & 0xF) << 4)
                        out[ql + 64 * half + l + 32] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                        out[qh + 32 * half + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)
                    }
                }
            }
        }
    }

    // MARK: IQ4_NL

    /// ggml's best_index_int8: the index of the table value nearest `x` (ties to the upper one).
    @inline(__always)
    static func nearestIQ4NLIndex(_ x: Float, _ v: UnsafePointer<Float>) -> Int {
        if x <= v[0] { return 0 }
        if x >= v[15] { return 15 }
        var lo = 0, hi = 15
        while hi - lo > 1 {
            let mid = (lo + hi) / 2
            if x < v[mid] { hi = mid } else { lo = mid }
        }
        return x - v[hi - 1] < v[hi] - x ? hi - 1 : hi
    }

    /// IQ4_NL (quantize_iq4_nl, no importance matrix, 7 trials each way): per 32 values a scale
    /// fitted by weighted least squares (weights x²) onto the non-linear levels, stored as fp16,
    /// and each value's nearest level under that scale.
    public static func quantizeIQ4_NL(_ x: UnsafeBufferPointer<Float>, into out: UnsafeMutableRawBufferPointer) {
        let (qk, size) = iq4_nlBlock
        precondition(x.count % qk == 0 && out.count == x.count / qk * size, "IQ4_NL: \(x.count) values need \(x.count / qk * size) bytes")
        iq4nlFloats.withUnsafeBufferPointer { vp in
            let v = vp.baseAddress!
            let ntry = 7
            for b in 0..<(x.count / qk) {
                let xb = x.baseAddress! + b * qk, o = b * size
                var amax: Float = 0, mx: Float = 0
                for j in 0..<qk where abs(xb[j]) > amax { amax = abs(xb[j]); mx = xb[j] }
                var scale: Float = 0
                if amax >= groupMaxEps {
                    var d = -mx / v[0]
                    var id = 1 / d
                    var sumQX: Float = 0, sumQ2: Float = 0
                    for j in 0..<qk {
                        let q = v[nearestIQ4NLIndex(id * xb[j], v)], w = xb[j] * xb[j]
                        sumQX += w * q * xb[j]
                        sumQ2 += w * q * q
                    }
                    d = sumQ2 > 0 ? sumQX / sumQ2 : 0
                    var best = d * sumQX
                    for t in -ntry...ntry {
                        id = Float(t + Int(iq4nlValues[0])) / mx
                        sumQX = 0
                        sumQ2 = 0
                        for j in 0..<qk {
                            let q = v[nearestIQ4NLIndex(id * xb[j], v)], w = xb[j] * xb[j]
                            sumQX += w * q * xb[j]
                            sumQ2 += w * q * q
                        }
                        if sumQ2 > 0 && sumQX * sumQX > best * sumQ2 {
                            d = sumQX / sumQ2
                            best = d * sumQX
                        }
                    }
                    scale = d
                }
                storeHalf(scale, out, o)
                let id: Float = scale != 0 ? 1 / scale : 0
                for j in 0..<(qk / 2) {
                    out[o + 2 + j] = UInt8(nearestIQ4NLIndex(id * xb[j], v)) | (UInt8(nearestIQ4NLIndex(id * xb[j + 16], v)) << 4)
                }
            }
        }
    }
}

// MARK: - Dequantization

extension GGMLQuants {
    /// The fp32 values of `count` elements stored in encoding `e` (ggml's `dequantize_row_*` /
    /// `to_float`, in their arithmetic order), for reports of what a serving format keeps.
    public static func decode(_ bytes: UnsafeRawBufferPointer, as e: Encoding, count: Int) -> [Float] {
        precondition(bytes.count == byteCount(count, as: e), "\(e): \(count) values are \(byteCount(count, as: e)) bytes, not \(bytes.count)")
        func half(_ at: Int) -> Float { loadHalf(bytes, at) }
        var y = [Float](repeating: 0, count: count)
        switch e {
        case .f32:
            for i in 0..<count { y[i] = Float(bitPattern: bytes.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self).littleEndian) }
        case .f16:
            for i in 0..<count { y[i] = half(2 * i) }
        case .bf16:
            for i in 0..<count { y[i] = HalfPrecision.float(bfloat16Bits: UInt16(bytes[2 * i]) | UInt16(bytes[2 * i + 1]) << 8) }
        case .q8_0:
            for b in 0..<(count / 32) {
                let o = b * q8_0Block.bytes, d = half(o)
                for j in 0..<32 { y[b * 32 + j] = Float(Int8(bitPattern: bytes[o + 2 + j])) * d }
            }
        case .q4_0:
            for b in 0..<(count / 32) {
                let o = b * q4_0Block.bytes, d = half(o)
                for j in 0..<16 {
                    y[b * 32 + j] = Float(Int(bytes[o + 2 + j] & 0xF) - 8) * d
                    y[b * 32 + j + 16] = Float(Int(bytes[o + 2 + j] >> 4) - 8) * d
                }
            }
        case .q5_0, .q5_1:
            let size = e == .q5_0 ? q5_0Block.bytes : q5_1Block.bytes, qs = e == .q5_0 ? 6 : 8
            for b in 0..<(count / 32) {
                let o = b * size, d = half(o), m: Float = e == .q5_1 ? half(o + 2) : 0
                var qh: UInt32 = 0
                for k in 0..<4 { qh |= UInt32(bytes[o + qs - 4 + k]) << (8 * k) }
                for j in 0..<16 {
                    let h0 = Int((qh >> j) << 4 & 0x10), h1 = Int(qh >> (j + 12) & 0x10)
                    let x0 = Int(bytes[o + qs + j] & 0xF) | h0, x1 = Int(bytes[o + qs + j] >> 4) | h1
                    if e == .q5_0 {
                        y[b * 32 + j] = Float(x0 - 16) * d
                        y[b * 32 + j + 16] = Float(x1 - 16) * d
                    } else {
                        y[b * 32 + j] = Float(x0) * d + m
                        y[b * 32 + j + 16] = Float(x1) * d + m
                    }
                }
            }
        case .q4_K, .q5_K:
            let size = e == .q4_K ? q4_KBlock.bytes : q5_KBlock.bytes, qs = e == .q4_K ? 16 : 48
            for b in 0..<(count / 256) {
                let o = b * size, d = half(o), dmin = half(o + 2), s = o + 4
                func scaleMin(_ j: Int) -> (Float, Float) {
                    j < 4 ? (Float(bytes[s + j] & 63), Float(bytes[s + j + 4] & 63))
                        : (Float((bytes[s + j + 4] & 0xF) | ((bytes[s + j - 4] >> 6) << 4)), Float((bytes[s + j + 4] >> 4) | ((bytes[s + j] >> 6) << 4)))
                }
                for g in 0..<4 {
                    let (sc1, m1) = scaleMin(2 * g), (sc2, m2) = scaleMin(2 * g + 1)
                    let d1 = d * sc1, mm1 = dmin * m1, d2 = d * sc2, mm2 = dmin * m2
                    for l in 0..<32 {
                        let q = bytes[o + qs + 32 * g + l]
                        var lo = Int(q & 0xF), hi = Int(q >> 4)
                        if e == .q5_K {
                            let h = bytes[o + 16 + l]
                            if h & (1 << (2 * g)) != 0 { lo += 16 }
                            if h & (2 << (2 * g)) != 0 { hi += 16 }
                        }
                        y[b * 256 + 64 * g + l] = d1 * Float(lo) - mm1
                        y[b * 256 + 64 * g + 32 + l] = d2 * Float(hi) - mm2
                    }
                }
            }
        case .q6_K:
            for b in 0..<(count / 256) {
                let o = b * q6_KBlock.bytes, d = half(o + 208)
                for half128 in 0..<2 {
                    let ql = o + 64 * half128, qh = o + 128 + 32 * half128, sc = o + 192 + 8 * half128, base = b * 256 + 128 * half128
                    for l in 0..<32 {
                        let isc = l / 16, h = bytes[qh + l]
                        let q1 = Int((bytes[ql + l] & 0xF) | ((h & 3) << 4)) - 32
                        let q2 = Int((bytes[ql + l + 32] & 0xF) | (((h >> 2) & 3) << 4)) - 32
                        let q3 = Int((bytes[ql + l] >> 4) | (((h >> 4) & 3) << 4)) - 32
                        let q4 = Int((bytes[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32
                        func s(_ k: Int) -> Float { Float(Int8(bitPattern: bytes[sc + isc + k])) }
                        y[base + l] = d * s(0) * Float(q1)
                        y[base + l + 32] = d * s(2) * Float(q2)
                        y[base + l + 64] = d * s(4) * Float(q3)
                        y[base + l + 96] = d * s(6) * Float(q4)
                    }
                }
            }
        case .iq4_nl:
            for b in 0..<(count / 32) {
                let o = b * iq4_nlBlock.bytes, d = half(o)
                for j in 0..<16 {
                    y[b * 32 + j] = d * Float(iq4nlValues[Int(bytes[o + 2 + j] & 0xF)])
                    y[b * 32 + j + 16] = d * Float(iq4nlValues[Int(bytes[o + 2 + j] >> 4)])
                }
            }
        }
        return y
    }
}
