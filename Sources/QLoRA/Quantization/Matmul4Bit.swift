import COpenBLAS
import CQLoRAKernels
import Dispatch

/// A frozen 4-bit weight `W: [out, in]` (nn.Linear layout) ready to multiply: the packed
/// nibbles and the decoded fp32 block scales. W stays 4-bit at rest; it is turned into bf16
/// values one panel of rows at a time, only while it is multiplied.
public struct Linear4BitWeight: Sendable {
    public let outFeatures: Int
    public let inFeatures: Int
    public let quantType: QuantType
    public let blocksize: Int
    /// ceil(out * in / 2) bytes, row-major elements, even element in the high nibble.
    public let packed: [UInt8]
    /// One fp32 scale per block of `blocksize` consecutive elements.
    public let absmax: [Float]

    public init(_ q: Quantized4Bit) throws(QuantizationError) {
        guard q.state.shape.count == 2 else { throw .invalidState("matmul needs a 2-D weight, got shape \(q.state.shape)") }
        try q.state.validate()
        outFeatures = q.state.shape[0]
        inFeatures = q.state.shape[1]
        quantType = q.state.quantType
        blocksize = q.state.blocksize
        packed = q.packed
        absmax = q.state.absmaxValues()
    }

    /// Rows `rows` of W as bf16 values held in fp32, into `out` ([rows.count, in]), the rows
    /// split between `threads` threads.
    public func dequantizeRowsBF16(_ rows: Range<Int>, into out: UnsafeMutablePointer<Float>, threads: Int = 1) {
        let code = quantType.code
        let k = inFeatures, bs = blocksize, r0 = rows.lowerBound, count = rows.count
        let parts = max(1, min(threads, count / 16))
        packed.withUnsafeBufferPointer { p in
            absmax.withUnsafeBufferPointer { a in
                code.withUnsafeBufferPointer { c in
                    // Addresses cross into the worker threads as integers; each writes its own rows.
                    let (pa, aa, ca, oa) = (Int(bitPattern: p.baseAddress), Int(bitPattern: a.baseAddress),
                                            Int(bitPattern: c.baseAddress), Int(bitPattern: out))
                    let run: @Sendable (Int) -> Void = { part in
                        let lo = count * part / parts, hi = count * (part + 1) / parts
                        qlora_dequantize4_range_f32(UnsafePointer(bitPattern: pa), Int64((r0 + lo) * k), Int64((hi - lo) * k), Int64(bs),
                                                    UnsafePointer(bitPattern: ca), UnsafePointer(bitPattern: aa), 1,
                                                    UnsafeMutablePointer<Float>(bitPattern: oa)! + lo * k)
                    }
                    if parts == 1 { run(0) } else { DispatchQueue.concurrentPerform(iterations: parts, execute: run) }
                }
            }
        }
    }
}

/// Reusable scratch for `Matmul4Bit` (the bf16 activation copy and one panel of W), so
/// repeated calls neither allocate nor page-fault. Not for concurrent use by two calls.
public final class Matmul4BitScratch: @unchecked Sendable {
    private var activation: UnsafeMutablePointer<Float>? = nil, activationCount = 0
    private var panel: UnsafeMutablePointer<Float>? = nil, panelCount = 0

    public init() {}
    deinit { activation?.deallocate(); panel?.deallocate() }

    /// Bytes held now.
    public var byteCount: Int { (activationCount + panelCount) * 4 }

    func activation(_ n: Int) -> UnsafeMutablePointer<Float> {
        if n > activationCount { activation?.deallocate(); activation = .allocate(capacity: n); activationCount = n }
        return activation!
    }

    func panel(_ n: Int) -> UnsafeMutablePointer<Float> {
        if n > panelCount { panel?.deallocate(); panel = .allocate(capacity: n); panelCount = n }
        return panel!
    }
}

/// How a 4-bit matmul runs.
public enum Matmul4BitPath: Sendable {
    /// The fused kernel for `tokens <= fusedMaxTokens`, panels + sgemm otherwise.
    case automatic
    /// Dequantize panels of W into scratch and multiply them with `cblas_sgemm`.
    case panelGEMM
    /// Decode nibbles in registers and accumulate directly (tokens 1...8), no scratch.
    case fused
}

/// Matmul with a 4-bit weight and bitsandbytes' bf16 compute semantics
/// (`bnb_4bit_compute_dtype=bfloat16`): W's values are exactly `dequantize` in bf16, the
/// activation is rounded to bf16, products (exact in fp32) accumulate in fp32. Debian's
/// OpenBLAS exports no sbgemm, so the bf16 values are held in fp32 and `cblas_sgemm` runs.
public enum Matmul4Bit {
    /// Largest token count the fused path takes under `.automatic`.
    public static let fusedMaxTokens = 8
    /// Target size of one dequantized panel of W (fp32). Each panel is one sgemm call, which
    /// re-packs X: panels much smaller than this made the 512-token GEMM up to 3.9x slower.
    public static let panelTargetBytes = 16 << 20

    /// Rows of W per panel for a given `in`: about `panelTargetBytes` of fp32, at least 16.
    public static func panelRows(inFeatures: Int, outFeatures: Int) -> Int {
        min(outFeatures, max(16, panelTargetBytes / (4 * max(1, inFeatures))))
    }

    /// Scratch bytes `forward`/`backwardInput` allocate besides their output: one panel of W
    /// plus the bf16-rounded copy of the activation (the fused path: the copy only).
    public static func scratchBytes(tokens: Int, weight w: Linear4BitWeight, path: Matmul4BitPath = .automatic, backward: Bool = false) -> Int {
        let activation = tokens * (backward ? w.outFeatures : w.inFeatures) * 4
        if !backward && usesFused(tokens: tokens, path: path) { return activation }
        return activation + panelRows(inFeatures: w.inFeatures, outFeatures: w.outFeatures) * w.inFeatures * 4
    }

    static func usesFused(tokens: Int, path: Matmul4BitPath) -> Bool {
        switch path {
        case .automatic: return tokens <= fusedMaxTokens
        case .fused: return true
        case .panelGEMM: return false
        }
    }

    /// Forward: `y = bf16(x) · bf16(W)ᵀ`.
    ///
    ///     // x: [tokens, in], w: [out, in] -> y: [tokens, out]  (row-major, fp32 out)
    /// - Parameters:
    ///   - threads: threads for the fused path (rows split between them); the GEMM path uses
    ///     OpenBLAS's own threads.
    ///   - panelRows: rows of W per dequantized panel (default `panelRows(inFeatures:outFeatures:)`).
    ///   - scratch: reused buffers (a fresh one per call when nil).
    ///   - roundOutputToBF16: round y to bf16 values (still stored as fp32), as a bf16 output.
    public static func forward(x: UnsafeBufferPointer<Float>, tokens: Int, weight w: Linear4BitWeight,
                               y: UnsafeMutableBufferPointer<Float>, path: Matmul4BitPath = .automatic, threads: Int = 2,
                               panelRows panelOverride: Int? = nil, scratch: Matmul4BitScratch? = nil, roundOutputToBF16: Bool = false) {
        let k = w.inFeatures, n = w.outFeatures
        precondition(x.count >= tokens * k && y.count >= tokens * n, "x or y too small for \(tokens) tokens")
        defer {
            // bitsandbytes with a bf16 compute dtype returns bf16: the fp32 result rounded once.
            if roundOutputToBF16 { qlora_round_bf16_f32(y.baseAddress, Int64(tokens * n), y.baseAddress) }
        }
        let work = scratch ?? Matmul4BitScratch()
        let xb = UnsafeMutableBufferPointer(start: work.activation(max(1, tokens * k)), count: max(1, tokens * k))
        qlora_round_bf16_f32(x.baseAddress, Int64(tokens * k), xb.baseAddress)

        if usesFused(tokens: tokens, path: path) && tokens >= 1 {
            var t0 = 0
            while t0 < tokens {  // the kernel takes up to 8 tokens at a time
                let tc = min(8, tokens - t0)
                fusedRows(w, x: xb.baseAddress! + t0 * k, tokens: tc, y: y.baseAddress! + t0 * n, threads: threads)
                t0 += tc
            }
            return
        }
        forEachPanel(w, panelRows: panelOverride, threads: threads, scratch: work) { r0, rows, panel in
            // Y[:, r0 ..< r0+rows] = Xb [tokens, k] · panelᵀ (panel is [rows, k] row-major, so
            // op(B) = Bᵀ with ldb = k); C starts at column r0 of Y with ldc = n.
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(tokens), Int32(rows), Int32(k),
                        1, xb.baseAddress, Int32(k), panel, Int32(k), 0, y.baseAddress! + r0, Int32(n))
        }
    }

    /// Dequantizes W a band of rows at a time (bf16 values in fp32, into the scratch panel) and
    /// calls `body(firstRow, rowCount, panel)` for each band, in order.
    static func forEachPanel(_ w: Linear4BitWeight, panelRows panelOverride: Int?, threads: Int, scratch: Matmul4BitScratch,
                             _ body: (Int, Int, UnsafeMutablePointer<Float>) -> Void) {
        let k = w.inFeatures, n = w.outFeatures
        let p = max(1, panelOverride ?? panelRows(inFeatures: k, outFeatures: n))
        let panel = scratch.panel(p * k)
        var r0 = 0
        while r0 < n {
            let rows = min(p, n - r0)
            w.dequantizeRowsBF16(r0..<(r0 + rows), into: panel, threads: threads)
            body(r0, rows, panel)
            r0 += rows
        }
    }

    /// Backward to the input: `dx = bf16(dy) · bf16(W)`. No gradient for the frozen W.
    ///
    ///     // dy: [tokens, out], w: [out, in] -> dx: [tokens, in]
    /// (backward of `y = x · Wᵀ`: dx[t, i] = Σ_o dy[t, o] · W[o, i])
    public static func backwardInput(dy: UnsafeBufferPointer<Float>, tokens: Int, weight w: Linear4BitWeight,
                                     dx: UnsafeMutableBufferPointer<Float>, panelRows panelOverride: Int? = nil,
                                     threads: Int = 2, scratch: Matmul4BitScratch? = nil, roundOutputToBF16: Bool = false) {
        let k = w.inFeatures, n = w.outFeatures
        precondition(dy.count >= tokens * n && dx.count >= tokens * k, "dy or dx too small for \(tokens) tokens")
        defer {
            // bitsandbytes' backward returns the input gradient in the bf16 compute dtype.
            if roundOutputToBF16 { qlora_round_bf16_f32(dx.baseAddress, Int64(tokens * k), dx.baseAddress) }
        }
        let work = scratch ?? Matmul4BitScratch()
        let db = UnsafeMutableBufferPointer(start: work.activation(max(1, tokens * n)), count: max(1, tokens * n))
        qlora_round_bf16_f32(dy.baseAddress, Int64(tokens * n), db.baseAddress)
        if n == 0 { for i in 0..<(tokens * k) { dx[i] = 0 }; return }
        forEachPanel(w, panelRows: panelOverride, threads: threads, scratch: work) { r0, rows, panel in
            // dX += dYb[:, r0 ..< r0+rows] (lda = n) · panel [rows, k] (ldb = k); beta 0 on
            // the first panel overwrites dX.
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(tokens), Int32(k), Int32(rows),
                        1, db.baseAddress! + r0, Int32(n), panel, Int32(k), r0 == 0 ? 0 : 1, dx.baseAddress, Int32(k))
        }
    }

    static func fusedRows(_ w: Linear4BitWeight, x: UnsafeMutablePointer<Float>, tokens: Int, y: UnsafeMutablePointer<Float>, threads: Int) {
        let n = w.outFeatures, k = w.inFeatures, bs = w.blocksize
        let parts = max(1, min(threads, n / 64))
        let code = w.quantType.code
        w.packed.withUnsafeBufferPointer { p in
            w.absmax.withUnsafeBufferPointer { a in
                code.withUnsafeBufferPointer { c in
                    // Addresses cross into the worker threads as integers: each thread writes
                    // its own rows of y and only reads the rest.
                    let (pa, aa, ca, xa, ya) = (Int(bitPattern: p.baseAddress), Int(bitPattern: a.baseAddress),
                                                Int(bitPattern: c.baseAddress), Int(bitPattern: x), Int(bitPattern: y))
                    let run: @Sendable (Int) -> Void = { part in
                        let r0 = n * part / parts, r1 = n * (part + 1) / parts
                        qlora_gemv4_bf16(UnsafePointer(bitPattern: pa), Int64(r0), Int64(r1), Int64(k), Int64(bs),
                                         UnsafePointer(bitPattern: ca), UnsafePointer(bitPattern: aa),
                                         UnsafePointer(bitPattern: xa), Int64(tokens), UnsafeMutablePointer(bitPattern: ya), Int64(n))
                    }
                    if parts == 1 { run(0) } else { DispatchQueue.concurrentPerform(iterations: parts, execute: run) }
                }
            }
        }
    }
}
