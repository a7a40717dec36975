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
                        let mine = Parallel.range(part, of: parts, count: count), (lo, hi) = (mine.lowerBound, mine.upperBound)
                        qlora_dequantize4_range_f32(UnsafePointer(bitPattern: pa), Int64((r0 + lo) * k), Int64((hi - lo) * k), Int64(bs),
                                                    UnsafePointer(bitPattern: ca), UnsafePointer(bitPattern: aa), 1,
                                                    UnsafeMutablePointer<Float>(bitPattern: oa)! + lo * k)
                    }
                    Parallel.run(parts: parts, run)
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
    /// Dequantize and pack blocks of W as bf16 and multiply with `vdpbf16ps` (AVX512-BF16),
    /// x rounded to bf16 once (`qlora_gemm4_bf16`); below that level its scalar reference runs.
    case bf16GEMM
}

/// Matmul with a 4-bit weight and bitsandbytes' bf16 compute semantics
/// (`bnb_4bit_compute_dtype=bfloat16`): W's values are exactly `dequantize` in bf16, the
/// activation is rounded to bf16, products (exact in fp32) accumulate in fp32. Debian's
/// OpenBLAS exports no sbgemm: with AVX512-BF16 our own bf16 GEMM runs (`.bf16GEMM`),
/// otherwise the bf16 values are held in fp32 and `cblas_sgemm` runs (`.panelGEMM`).
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
    /// plus the bf16-rounded copy of the activation (the fused path: the copy only; the bf16
    /// GEMM: the copy as bf16 plus one packing block per thread).
    public static func scratchBytes(tokens: Int, weight w: Linear4BitWeight, path: Matmul4BitPath = .automatic, backward: Bool = false,
                                    threads: Int = 2) -> Int {
        let kdim = backward ? w.outFeatures : w.inFeatures
        let activation = tokens * kdim * 4
        if !backward && usesFused(tokens: tokens, path: path) { return activation }
        if usesBF16GEMM(path: path, weight: w) {
            let parts = bf16Parts(columns: backward ? w.inFeatures : w.outFeatures, threads: threads)
            return (tokens * ((kdim + 1) & ~1) + 1) / 2 * 4 + parts * Int(qlora_gemm4_bf16_scratch_floats()) * 4
        }
        return activation + panelRows(inFeatures: w.inFeatures, outFeatures: w.outFeatures) * w.inFeatures * 4
    }

    static func usesFused(tokens: Int, path: Matmul4BitPath) -> Bool {
        switch path {
        case .automatic: return tokens <= fusedMaxTokens
        case .fused: return true
        case .panelGEMM, .bf16GEMM: return false
        }
    }

    /// Whether a GEMM (not fused) call takes the bf16 GEMM: when forced, or under `.automatic`
    /// when the CPU (and the level cap) has AVX512-BF16 and 16 divides the blocksize.
    static func usesBF16GEMM(path: Matmul4BitPath, weight w: Linear4BitWeight) -> Bool {
        switch path {
        case .bf16GEMM: return true
        case .automatic: return KernelLevel.active.rawValue >= KernelLevel.avx512bf16.rawValue && w.blocksize % 16 == 0
        case .panelGEMM, .fused: return false
        }
    }

    /// The path a forward call with `tokens` takes (benchmarks print it).
    public static func resolvedPath(tokens: Int, weight w: Linear4BitWeight, path: Matmul4BitPath = .automatic) -> Matmul4BitPath {
        if usesFused(tokens: tokens, path: path) { return .fused }
        return usesBF16GEMM(path: path, weight: w) ? .bf16GEMM : .panelGEMM
    }

    /// Bytes of one bf16 GEMM thread's packing block (a dequantized and a packed block of W).
    public static var bf16BlockBytes: Int { Int(qlora_gemm4_bf16_scratch_floats()) * 4 }

    /// Threads of the bf16 GEMM: at least 64 columns each.
    static func bf16Parts(columns: Int, threads: Int) -> Int { max(1, min(threads, columns / 64)) }

    /// Forward: `y = bf16(x) · bf16(W)ᵀ`.
    ///
    ///     // x: [tokens, in], w: [out, in] -> y: [tokens, out]  (row-major, fp32 out)
    /// - Parameters:
    ///   - threads: threads for the fused path and the bf16 GEMM (columns of y split between
    ///     them); the sgemm path uses OpenBLAS's own threads.
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
        if !usesFused(tokens: tokens, path: path) && usesBF16GEMM(path: path, weight: w) {
            // y [tokens, out] = bf16(x) [tokens, in] · Bᵀ with B(k, n) = W[n, k].
            bf16GEMM(w, a: x.baseAddress!, tokens: tokens, backward: false, c: y.baseAddress!, threads: threads, scratch: work)
            return
        }
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
    /// `path`: `.bf16GEMM` or `.panelGEMM` (`.fused` runs the panels: there is no fused backward).
    public static func backwardInput(dy: UnsafeBufferPointer<Float>, tokens: Int, weight w: Linear4BitWeight,
                                     dx: UnsafeMutableBufferPointer<Float>, path: Matmul4BitPath = .automatic, panelRows panelOverride: Int? = nil,
                                     threads: Int = 2, scratch: Matmul4BitScratch? = nil, roundOutputToBF16: Bool = false) {
        let k = w.inFeatures, n = w.outFeatures
        precondition(dy.count >= tokens * n && dx.count >= tokens * k, "dy or dx too small for \(tokens) tokens")
        defer {
            // bitsandbytes' backward returns the input gradient in the bf16 compute dtype.
            if roundOutputToBF16 { qlora_round_bf16_f32(dx.baseAddress, Int64(tokens * k), dx.baseAddress) }
        }
        let work = scratch ?? Matmul4BitScratch()
        if usesBF16GEMM(path: path, weight: w) {
            // dx [tokens, in] = bf16(dy) [tokens, out] · B with B(k, n) = W[k, n] (zeros when out == 0).
            bf16GEMM(w, a: dy.baseAddress!, tokens: tokens, backward: true, c: dx.baseAddress!, threads: threads, scratch: work)
            return
        }
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

    /// `qlora_gemm4_bf16` over all of C [tokens, N]: a [tokens, K] rounded to bf16 bits once
    /// (rows padded to even), C's columns split between threads in multiples of 16, each with
    /// its own packing block. Forward: K = in, N = out; backward: K = out, N = in.
    static func bf16GEMM(_ w: Linear4BitWeight, a: UnsafePointer<Float>, tokens: Int, backward: Bool, c: UnsafeMutablePointer<Float>,
                         threads: Int, scratch work: Matmul4BitScratch) {
        guard tokens > 0 else { return }
        let kdim = backward ? w.outFeatures : w.inFeatures, ncols = backward ? w.inFeatures : w.outFeatures
        let lda = (kdim + 1) & ~1
        let bits = UnsafeMutablePointer<UInt16>(OpaquePointer(work.activation(max(1, (tokens * lda + 1) / 2))))
        qlora_f32_to_bf16_rows(a, Int64(tokens), Int64(kdim), Int64(lda), bits)
        let parts = bf16Parts(columns: ncols, threads: threads)
        let perPart = Int(qlora_gemm4_bf16_scratch_floats())
        let blocks = work.panel(parts * perPart)
        let code = w.quantType.code
        let (out, inF, bs) = (Int64(w.outFeatures), Int64(w.inFeatures), Int64(w.blocksize))
        w.packed.withUnsafeBufferPointer { p in
            w.absmax.withUnsafeBufferPointer { am in
                code.withUnsafeBufferPointer { cd in
                    // Addresses cross into the worker threads as integers; each writes its own columns of C.
                    let (pa, aa, ca, ba, ca2, sa) = (Int(bitPattern: p.baseAddress), Int(bitPattern: am.baseAddress), Int(bitPattern: cd.baseAddress),
                                                     Int(bitPattern: bits), Int(bitPattern: c), Int(bitPattern: blocks))
                    let run: @Sendable (Int) -> Void = { part in
                        let n0 = part == 0 ? 0 : ncols * part / parts / 16 * 16
                        let n1 = part == parts - 1 ? ncols : ncols * (part + 1) / parts / 16 * 16
                        qlora_gemm4_bf16(UnsafePointer(bitPattern: pa), out, inF, bs, UnsafePointer(bitPattern: ca), UnsafePointer(bitPattern: aa),
                                         backward ? 1 : 0, UnsafePointer(bitPattern: ba), Int64(lda), Int64(tokens), Int64(n0), Int64(n1),
                                         UnsafeMutablePointer(bitPattern: ca2), Int64(ncols), UnsafeMutablePointer<Float>(bitPattern: sa)! + part * perPart)
                    }
                    Parallel.run(parts: parts, run)
                }
            }
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
                        let rows = Parallel.range(part, of: parts, count: n), (r0, r1) = (rows.lowerBound, rows.upperBound)
                        qlora_gemv4_bf16(UnsafePointer(bitPattern: pa), Int64(r0), Int64(r1), Int64(k), Int64(bs),
                                         UnsafePointer(bitPattern: ca), UnsafePointer(bitPattern: aa),
                                         UnsafePointer(bitPattern: xa), Int64(tokens), UnsafeMutablePointer(bitPattern: ya), Int64(n))
                    }
                    Parallel.run(parts: parts, run)
                }
            }
        }
    }
}
