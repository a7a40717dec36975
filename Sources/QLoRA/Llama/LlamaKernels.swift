import COpenBLAS
import CQLoRAKernels
import Foundation

/// The fast kernels of `LlamaOps`: the same ops as each `…Reference` in LlamaOps.swift, which
/// defines the answer (LlamaKernelsTests holds every one of these to its reference).
///
/// - The elementwise and per-row ops (RMSNorm, RoPE, SwiGLU, the residual adds) do the reference's
///   operations in the reference's order per element, and each row's reductions in the same
///   sequential order, so they give the same bits; they only drop the bounds checks and closures
///   (loops over buffer pointers that the compiler vectorizes) and split the rows between threads.
/// - Attention runs per (batch, head) and block of query rows, its products on the bf16
///   dot-product GEMM where the CPU has AVX512-BF16 (`qlora_gemm_bf16_packed`: q, k, v, P and the
///   score gradient are bf16 values, so every product is exact) and on OpenBLAS sgemm below it,
///   with every bf16 rounding where the reference has it; only the order of the fp32 sums inside
///   each GEMM differs, so a rounded score, product or gradient can land on the adjacent bf16 value.
///
/// Threads: `threadCount` (all cores by default). Work is split into fixed parts, each element or row written by
/// exactly one part and computed the same way whichever thread runs it, so no result depends on
/// the scheduling (training resumes bit-identically).
extension LlamaOps {
    /// A pointer that crosses into the worker threads; each part writes only its own elements.
    struct Shared<T>: @unchecked Sendable {
        let p: UnsafeMutablePointer<T>
        init(_ p: UnsafeMutablePointer<T>) { self.p = p }
        init(_ p: UnsafePointer<T>) { self.p = UnsafeMutablePointer(mutating: p) }
    }

    /// Worker threads for the layer ops and the 4-bit kernels under them: all cores unless
    /// `setThreadCount` said otherwise (`qlora bench --threads`). Set before work starts, never
    /// during it.
    nonisolated(unsafe) private static var threadLimit: Int?
    static var threadCount: Int { threadLimit ?? ProcessInfo.processInfo.activeProcessorCount }
    public static func setThreadCount(_ n: Int) { threadLimit = max(1, n) }

    /// Runs `body` on contiguous parts of 0..<count, one part per thread, each at least `grain`
    /// items (small jobs stay on the calling thread).
    static func parallelParts(_ count: Int, grain: Int, _ body: @Sendable (Range<Int>) -> Void) {
        let parts = max(1, min(threadCount, count / max(grain, 1)))
        Parallel.run(parts: parts) { p in body(Parallel.range(p, of: parts, count: count)) }
    }

    /// Elements per thread below which an elementwise op is not split (thread start-up costs more).
    static let elementGrain = 1 << 15

    /// `count` values, every one written by `body` through the pointer (on the worker threads):
    /// no zero fill first, so the pages are first touched by the threads that write them.
    static func written(_ count: Int, _ body: (Shared<Float>) -> Void) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0, let base = buffer.baseAddress { body(Shared(base)) }
            initialized = count
        }
    }

    // MARK: Residual adds

    /// bf16(a + b), elementwise (the residual adds).
    public static func addRounded(_ a: [Float], _ b: [Float]) -> [Float] {
        precondition(a.count == b.count, "addRounded: lengths differ")
        return written(a.count) { py in a.withUnsafeBufferPointer { ap in b.withUnsafeBufferPointer { bp in
            let (pa, pb) = (Shared(ap.baseAddress!), Shared(bp.baseAddress!))
            parallelParts(a.count, grain: elementGrain) { r in
                for i in r { py.p[i] = bf16(pa.p[i] + pb.p[i]) }
            }
        } } }
    }

    /// bf16(bf16(a + b) + c), elementwise (three gradients into one input, summed in that order).
    public static func addRounded(_ a: [Float], _ b: [Float], _ c: [Float]) -> [Float] {
        precondition(a.count == b.count && a.count == c.count, "addRounded: lengths differ")
        return written(a.count) { py in a.withUnsafeBufferPointer { ap in b.withUnsafeBufferPointer { bp in c.withUnsafeBufferPointer { cp in
            let (pa, pb, pc) = (Shared(ap.baseAddress!), Shared(bp.baseAddress!), Shared(cp.baseAddress!))
            parallelParts(a.count, grain: elementGrain) { r in
                for i in r { py.p[i] = bf16(bf16(pa.p[i] + pb.p[i]) + pc.p[i]) }
            }
        } } } }
    }

    // MARK: RMSNorm

    /// `rmsnormForwardReference`, rows split between threads. x: [T, h], w: [h] -> y: [T, h], rstd: [T].
    public static func rmsnormForward(_ x: [Float], _ w: [Float], tokens: Int, eps: Float) -> (y: [Float], rstd: [Float]) {
        let h = w.count
        precondition(x.count == tokens * h, "rmsnorm: x must be [tokens, h]")
        var rstd = [Float](repeating: 0, count: tokens)
        guard !x.isEmpty else { return ([], rstd) }
        let y = written(x.count) { py in x.withUnsafeBufferPointer { xp in w.withUnsafeBufferPointer { wp in
            rstd.withUnsafeMutableBufferPointer { rp in
                let (px, pw, pr) = (Shared(xp.baseAddress!), Shared(wp.baseAddress!), Shared(rp.baseAddress!))
                parallelParts(tokens, grain: max(1, elementGrain / max(h, 1))) { rows in
                    for t in rows {
                        let xr = px.p + t * h, yr = py.p + t * h
                        // Sequential, as the reference: the same fp32 sum.
                        var ss: Float = 0
                        for i in 0..<h { ss += xr[i] * xr[i] }
                        let r = 1 / (ss / Float(h) + eps).squareRoot()
                        pr.p[t] = r
                        for i in 0..<h { yr[i] = bf16(pw.p[i] * bf16(xr[i] * r)) }
                    }
                }
            } }
        } }
        return (y, rstd)
    }

    /// `rmsnormBackwardReference`, rows split between threads. dy: [T, h] -> dx: [T, h].
    public static func rmsnormBackward(_ dy: [Float], _ x: [Float], _ w: [Float], rstd: [Float], tokens: Int) -> [Float] {
        let h = w.count
        precondition(x.count == tokens * h && dy.count == x.count && rstd.count == tokens, "rmsnorm backward: shapes")
        return written(x.count) { pdx in
            dy.withUnsafeBufferPointer { dyp in x.withUnsafeBufferPointer { xp in w.withUnsafeBufferPointer { wp in rstd.withUnsafeBufferPointer { rp in
                let (pdy, px, pw, pr) = (Shared(dyp.baseAddress!), Shared(xp.baseAddress!), Shared(wp.baseAddress!), Shared(rp.baseAddress!))
                parallelParts(tokens, grain: max(1, elementGrain / max(h, 1))) { rows in
                    let g = UnsafeMutablePointer<Float>.allocate(capacity: h)
                    defer { g.deallocate() }
                    for t in rows {
                        let dyr = pdy.p + t * h, xr = px.p + t * h, dxr = pdx.p + t * h, r = pr.p[t]
                        for i in 0..<h { g[i] = bf16(dyr[i] * pw.p[i]) }
                        var dot: Float = 0
                        for i in 0..<h { dot += g[i] * xr[i] }  // sequential, as the reference
                        let c = -0.5 * dot * r * r * r * 2 / Float(h)
                        for i in 0..<h { dxr[i] = bf16(g[i] * r + xr[i] * c) }
                    }
                }
            } } } }
        }
    }

    // MARK: Rotary embeddings

    /// `ropeForwardReference`, tokens split between threads. x: [T, heads·d] -> [T, heads·d].
    public static func ropeForward(_ x: [Float], heads: Int, headDim d: Int, seq: Int, cos: [Float], sin: [Float]) -> [Float] {
        rope(x, heads: heads, headDim: d, seq: seq, cos: cos, sin: sin, backward: false)
    }

    /// `ropeBackwardReference`, tokens split between threads.
    public static func ropeBackward(_ dy: [Float], heads: Int, headDim d: Int, seq: Int, cos: [Float], sin: [Float]) -> [Float] {
        rope(dy, heads: heads, headDim: d, seq: seq, cos: cos, sin: sin, backward: true)
    }

    static func rope(_ x: [Float], heads: Int, headDim d: Int, seq: Int, cos: [Float], sin: [Float], backward: Bool) -> [Float] {
        let half = d / 2, width = heads * d, tokens = x.count / max(width, 1)
        precondition(x.count == tokens * width && d % 2 == 0, "rope: x must be [tokens, heads·headDim], headDim even")
        precondition(cos.count >= min(seq, tokens) * d && sin.count == cos.count, "rope: tables too short")
        return written(x.count) { py in x.withUnsafeBufferPointer { xp in cos.withUnsafeBufferPointer { cp in sin.withUnsafeBufferPointer { sp in
            let (px, pc, ps) = (Shared(xp.baseAddress!), Shared(cp.baseAddress!), Shared(sp.baseAddress!))
            parallelParts(tokens, grain: max(1, elementGrain / max(width, 1))) { rows in
                for t in rows {
                    let c = pc.p + (t % seq) * d, s = ps.p + (t % seq) * d
                    for hh in 0..<heads {
                        let xr = px.p + (t * heads + hh) * d, yr = py.p + (t * heads + hh) * d
                        if backward {
                            // dx = bf16(bf16(dy·cos) + via rotate_half): rotate_half(x)[j] = -x[j+half] (j < half),
                            // x[j-half] (j ≥ half), so dy[j] reaches x[j-half] with +sin[j], x[j+half] with -sin[j].
                            for i in 0..<half { yr[i] = bf16(bf16(xr[i] * c[i]) + bf16(xr[i + half] * s[i + half])) }
                            for i in half..<d { yr[i] = bf16(bf16(xr[i] * c[i]) + -bf16(xr[i - half] * s[i - half])) }
                        } else {
                            // y = bf16(bf16(x·cos) + bf16(rotate_half(x)·sin))
                            for i in 0..<half { yr[i] = bf16(bf16(xr[i] * c[i]) + bf16(-xr[i + half] * s[i])) }
                            for i in half..<d { yr[i] = bf16(bf16(xr[i] * c[i]) + bf16(xr[i - half] * s[i])) }
                        }
                    }
                }
            }
        } } } }
    }

    // MARK: SwiGLU

    /// `swigluForwardReference`, split between threads (expf stays glibc's scalar one: the same bits).
    public static func swigluForward(gate: [Float], up: [Float]) -> [Float] {
        precondition(gate.count == up.count, "swiglu: gate and up differ in length")
        return written(gate.count) { py in gate.withUnsafeBufferPointer { gp in up.withUnsafeBufferPointer { upp in
            let (pg, pu) = (Shared(gp.baseAddress!), Shared(upp.baseAddress!))
            parallelParts(gate.count, grain: elementGrain / 4) { r in
                for i in r {
                    let g = pg.p[i]
                    py.p[i] = bf16(bf16(g / (1 + Foundation.exp(-g))) * pu.p[i])
                }
            }
        } } }
    }

    /// `swigluBackwardReference`, split between threads; exp(-gate) computed once (the reference's
    /// two calls give the same value).
    public static func swigluBackward(_ dy: [Float], gate gateBits: [UInt16], up upBits: [UInt16]) -> (dgate: [Float], dup: [Float]) {
        precondition(dy.count == gateBits.count && dy.count == upBits.count, "swiglu backward: lengths differ")
        var du: [Float] = []
        let dg = written(dy.count) { pdg in du = written(dy.count) { pdu in
            dy.withUnsafeBufferPointer { dyp in gateBits.withUnsafeBufferPointer { gp in upBits.withUnsafeBufferPointer { upp in
                let (pdy, pg, pu) = (Shared(dyp.baseAddress!), Shared(gp.baseAddress!), Shared(upp.baseAddress!))
                parallelParts(dy.count, grain: elementGrain / 4) { r in
                    for i in r {
                        let gate = HalfPrecision.float(bfloat16Bits: pg.p[i]), up = HalfPrecision.float(bfloat16Bits: pu.p[i])
                        let e = Foundation.exp(-gate)
                        let sg = 1 / (1 + e)
                        let a = bf16(gate / (1 + e))
                        pdu.p[i] = bf16(pdy.p[i] * a)
                        let da = bf16(pdy.p[i] * up)
                        pdg.p[i] = bf16(da * sg * (1 + gate * (1 - sg)))
                    }
                }
            } }
        } } }
        return (dg, du)
    }

    // MARK: Causal grouped-query attention

    /// Query rows per block: a block's scores [block, keys] stay in cache, and the causal mask
    /// wastes at most one block's triangle of each GEMM (keys 0..<end of the block).
    static let attentionBlock = 64

    /// One block's scores into probabilities, row by row, as `attentionRow` does: `s` holds
    /// rows × n raw fp32 q·k sums (row r is query i0 + r, keys 0..<n); each becomes
    /// bf16(bf16(s) · scale), softmax in fp32 over keys 0...i; entries past i are set to 0
    /// (`qlora_softmax_causal_rows`: vectorized where the CPU has AVX-512, its exp within about
    /// an ulp of expf and its sums in 16 lanes; the scalar level is the reference's arithmetic).
    @inline(__always)
    static func softmaxBlock(_ s: UnsafeMutablePointer<Float>, rows: Int, n: Int, i0: Int, scale: Float) {
        qlora_softmax_causal_rows(s, Int64(rows), Int64(n), Int64(i0), scale)
    }

    /// `attentionForwardReference` with BLAS, threaded over (batch, head).
    /// q: [T, H·d], k, v: [T, KV·d] -> out: [T, H·d] (query head hh reads kv head hh / (H/KV)).
    public static func attentionForward(q: [Float], k: [Float], v: [Float], batch: Int, seq: Int, heads: Int, kvHeads: Int,
                                        headDim d: Int) -> [Float] {
        precondition(heads % kvHeads == 0, "attention: heads must be a multiple of kvHeads")
        precondition(q.count == batch * seq * heads * d && k.count == batch * seq * kvHeads * d && v.count == k.count, "attention: shapes")
        if KernelLevel.active == .avx512bf16 {
            return attentionForwardBF16(q: q, k: k, v: v, batch: batch, seq: seq, heads: heads, kvHeads: kvHeads, headDim: d)
        }
        let rep = heads / kvHeads, scale = 1 / Float(d).squareRoot()
        let ldq = heads * d, ldk = kvHeads * d, blk = attentionBlock
        return withForwardBuffers(q: q, k: k, v: v) { pq, pk, pv, po in
            BLAS.withOneThread {
                parallelParts(batch * heads, grain: 1) { units in
                    let s = UnsafeMutablePointer<Float>.allocate(capacity: blk * seq)
                    defer { s.deallocate() }
                    for u in units {
                        let b = u / heads, hh = u % heads, kh = hh / rep
                        // Row i of this head's q (and out) is at qh + i·H·d; row j of its k, v at kvh + j·KV·d.
                        let qh = pq.p + b * seq * ldq + hh * d, oh = po.p + b * seq * ldq + hh * d
                        let kvOffset = b * seq * ldk + kh * d
                        let kh0 = pk.p + kvOffset, vh0 = pv.p + kvOffset
                        var i0 = 0
                        while i0 < seq {
                            let m = min(blk, seq - i0), n = i0 + m
                            // S [m, n] = Q[i0..<i0+m] [m, d] · K[0..<n]ᵀ: K row-major [n, d] with row stride KV·d,
                            // so op(B) = Kᵀ, ldb = KV·d; Q's rows stride H·d: lda = H·d.
                            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(d), 1,
                                        qh + i0 * ldq, Int32(ldq), kh0, Int32(ldk), 0, s, Int32(n))
                            softmaxBlock(s, rows: m, n: n, i0: i0, scale: scale)
                            // Eager attention multiplies bf16 probabilities: P = bf16(softmax) (0 past the diagonal).
                            for x in 0..<(m * n) { s[x] = bf16(s[x]) }
                            // O[i0..<i0+m] [m, d] = P [m, n] · V[0..<n] [n, d] (ldb = KV·d), written in place (ldc = H·d).
                            let o = oh + i0 * ldq
                            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(m), Int32(d), Int32(n), 1,
                                        s, Int32(n), vh0, Int32(ldk), 0, o, Int32(ldq))
                            for r in 0..<m { for e in 0..<d { o[r * ldq + e] = bf16(o[r * ldq + e]) } }
                            i0 += m
                        }
                    }
                }
            }
        }
    }

    /// `attentionBackwardReference` with BLAS, threaded over (batch, head): recomputes each block's
    /// probabilities as the forward does. dout: [T, H·d] -> dq: [T, H·d], dk, dv: [T, KV·d].
    public static func attentionBackward(dout: [Float], q: [Float], k: [Float], v: [Float], batch: Int, seq: Int,
                                         heads: Int, kvHeads: Int, headDim d: Int) -> (dq: [Float], dk: [Float], dv: [Float]) {
        precondition(heads % kvHeads == 0, "attention: heads must be a multiple of kvHeads")
        precondition(q.count == batch * seq * heads * d && dout.count == q.count && k.count == batch * seq * kvHeads * d && v.count == k.count,
                     "attention backward: shapes")
        if KernelLevel.active == .avx512bf16 {
            return attentionBackwardBF16(dout: dout, q: q, k: k, v: v, batch: batch, seq: seq, heads: heads, kvHeads: kvHeads, headDim: d)
        }
        let rep = heads / kvHeads, scale = 1 / Float(d).squareRoot()
        let ldq = heads * d, ldk = kvHeads * d, blk = attentionBlock
        return withBackwardBuffers(dout: dout, q: q, k: k, v: v, batch: batch, seq: seq, heads: heads, kvHeads: kvHeads, headDim: d) { b in
            let (pg, pq, pk, pv, pdq, pdkh, pdvh) = (b.dout, b.q, b.k, b.v, b.dq, b.dkHead, b.dvHead)
            BLAS.withOneThread {
                parallelParts(batch * heads, grain: 1) { units in
                    let probs = UnsafeMutablePointer<Float>.allocate(capacity: blk * seq)
                    let dp = UnsafeMutablePointer<Float>.allocate(capacity: blk * seq)
                    defer { probs.deallocate(); dp.deallocate() }
                    for u in units {
                        let b = u / heads, hh = u % heads, kh = hh / rep
                        let qh = pq.p + b * seq * ldq + hh * d, gh = pg.p + b * seq * ldq + hh * d, dqh = pdq.p + b * seq * ldq + hh * d
                        let kvOffset = b * seq * ldk + kh * d
                        let kh0 = pk.p + kvOffset, vh0 = pv.p + kvOffset
                        let dkh = pdkh.p + u * seq * d, dvh = pdvh.p + u * seq * d  // [seq, d], row stride d
                        var i0 = 0
                        while i0 < seq {
                            let m = min(blk, seq - i0), n = i0 + m
                            let qb = qh + i0 * ldq, gb = gh + i0 * ldq
                            // Probabilities as in the forward: S [m, n] = Q_blk · K[0..<n]ᵀ (see attentionForward).
                            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(d), 1,
                                        qb, Int32(ldq), kh0, Int32(ldk), 0, probs, Int32(n))
                            softmaxBlock(probs, rows: m, n: n, i0: i0, scale: scale)
                            // dP [m, n] = dO_blk [m, d] · V[0..<n]ᵀ (op(B) = Vᵀ, ldb = KV·d), rounded to bf16.
                            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(d), 1,
                                        gb, Int32(ldq), vh0, Int32(ldk), 0, dp, Int32(n))
                            // Reference: ds = bf16(probs[j] · (bf16(dp[j]) - dot)) · scale; pb = bf16(probs[j]).
                            qlora_softmax_backward_rows(probs, dp, Int64(m), Int64(n), Int64(i0), scale)
                            // dQ_blk [m, d] = dS [m, n] · K[0..<n] [n, d] (ldb = KV·d): every key of these rows is
                            // here, so the sum is complete; written in place (ldc = H·d), then rounded.
                            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(m), Int32(d), Int32(n), 1,
                                        dp, Int32(n), kh0, Int32(ldk), 0, dqh + i0 * ldq, Int32(ldq))
                            for r in 0..<m { let o = dqh + (i0 + r) * ldq; for e in 0..<d { o[e] = bf16(o[e]) } }
                            // dK_head[0..<n] [n, d] += dSᵀ [n, m] · Q_blk [m, d] (op(A) = dSᵀ, lda = n; ldb = H·d).
                            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(n), Int32(d), Int32(m), 1,
                                        dp, Int32(n), qb, Int32(ldq), 1, dkh, Int32(d))
                            // dV_head[0..<n] [n, d] += Pᵀ [n, m] · dO_blk [m, d], P the bf16 probabilities.
                            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(n), Int32(d), Int32(m), 1,
                                        probs, Int32(n), gb, Int32(ldq), 1, dvh, Int32(d))
                            i0 += m
                        }
                    }
                }
            }
        }
    }

    /// The output both attention forwards fill ([T, H·d], zeros), and the pointers they work on.
    static func withForwardBuffers(q: [Float], k: [Float], v: [Float],
                                   _ body: (Shared<Float>, Shared<Float>, Shared<Float>, Shared<Float>) -> Void) -> [Float] {
        written(q.count) { po in q.withUnsafeBufferPointer { qp in k.withUnsafeBufferPointer { kp in v.withUnsafeBufferPointer { vp in
            body(Shared(qp.baseAddress!), Shared(kp.baseAddress!), Shared(vp.baseAddress!), po)
        } } } }
    }

    /// What both attention backwards work on: the inputs, dq, and each query head's dk and dv
    /// ([batch·H][seq, d], fp32 sums), which are then summed over the heads sharing a kv head in
    /// head order (repeat_kv's backward), as the reference does.
    struct BackwardBuffers {
        let dout, q, k, v, dq, dkHead, dvHead: Shared<Float>
    }

    static func withBackwardBuffers(dout: [Float], q: [Float], k: [Float], v: [Float], batch: Int, seq: Int, heads: Int, kvHeads: Int,
                                    headDim d: Int, _ body: (BackwardBuffers) -> Void) -> (dq: [Float], dk: [Float], dv: [Float]) {
        guard !q.isEmpty else { return ([], [Float](repeating: 0, count: k.count), [Float](repeating: 0, count: k.count)) }
        // The per-head sums accumulate from zero; the zeros are written by the threads too.
        func zeros() -> [Float] {
            written(q.count) { p in parallelParts(q.count, grain: elementGrain) { r in (p.p + r.lowerBound).update(repeating: 0, count: r.count) } }
        }
        var dkHead = zeros(), dvHead = zeros()
        let dq = written(q.count) { pdq in
            dout.withUnsafeBufferPointer { gp in q.withUnsafeBufferPointer { qp in k.withUnsafeBufferPointer { kp in v.withUnsafeBufferPointer { vp in
            dkHead.withUnsafeMutableBufferPointer { dkhp in dvHead.withUnsafeMutableBufferPointer { dvhp in
                body(BackwardBuffers(dout: Shared(gp.baseAddress!), q: Shared(qp.baseAddress!), k: Shared(kp.baseAddress!), v: Shared(vp.baseAddress!),
                                     dq: pdq, dkHead: Shared(dkhp.baseAddress!), dvHead: Shared(dvhp.baseAddress!)))
            } } } } } }
        }
        let (dk, dv) = reduceHeadGradients(dkHead, dvHead, batch: batch, seq: seq, heads: heads, kvHeads: kvHeads, headDim: d)
        return (dq, dk, dv)
    }

    /// dk, dv = bf16(Σ_r bf16(head r's sum)), r in head order (repeat_kv's backward), from each
    /// query head's fp32 sums ([batch·H][seq, d]); tokens split between threads.
    static func reduceHeadGradients(_ dkHead: [Float], _ dvHead: [Float], batch: Int, seq: Int, heads: Int, kvHeads: Int,
                                    headDim d: Int) -> (dk: [Float], dv: [Float]) {
        let rep = heads / kvHeads, ldq = heads * d, count = batch * seq * kvHeads * d
        var dv: [Float] = []
        let dk = written(count) { pdk in dv = written(count) { pdv in
        dkHead.withUnsafeBufferPointer { dkhp in dvHead.withUnsafeBufferPointer { dvhp in
            let (pdkh, pdvh) = (Shared(dkhp.baseAddress!), Shared(dvhp.baseAddress!))
            parallelParts(batch * seq, grain: max(1, elementGrain / max(ldq, 1))) { rows in
                for t in rows {
                    let b = t / seq, s = t % seq
                    for kh in 0..<kvHeads {
                        let o = pdk.p + (t * kvHeads + kh) * d, ov = pdv.p + (t * kvHeads + kh) * d
                        for e in 0..<d { o[e] = 0; ov[e] = 0 }
                        for r in 0..<rep {
                            let src = ((b * heads + kh * rep + r) * seq + s) * d
                            let hk = pdkh.p + src, hv = pdvh.p + src
                            for e in 0..<d { o[e] += bf16(hk[e]); ov[e] += bf16(hv[e]) }
                        }
                        for e in 0..<d { o[e] = bf16(o[e]); ov[e] = bf16(ov[e]) }
                    }
                }
            }
        } } } }
        return (dk, dv)
    }

    // MARK: Attention on the bf16 dot-product GEMM (AVX512-BF16)

    /// `attentionForward` where the CPU has AVX512-BF16: the same blocks, softmax and bf16
    /// rounding points, with q·kᵀ and P·v on `qlora_gemm_bf16_packed` (q, k, v and P are bf16
    /// values, so the products are exact in fp32 as with sgemm; only the fp32 summation order
    /// differs). A KV head's k and v are packed once for all the query blocks of its query heads
    /// in a part.
    static func attentionForwardBF16(q: [Float], k: [Float], v: [Float], batch: Int, seq: Int, heads: Int, kvHeads: Int,
                                     headDim d: Int) -> [Float] {
        let rep = heads / kvHeads, scale = 1 / Float(d).squareRoot()
        let ldq = heads * d, ldk = kvHeads * d, blk = attentionBlock
        let ldD = (d + 1) & ~1, kpsD = (d + 1) / 2, kpsSeq = (seq + 1) / 2, ldSeq = (seq + 1) & ~1
        return withForwardBuffers(q: q, k: k, v: v) { pq, pk, pv, po in
            parallelParts(batch * heads, grain: 1) { units in
                let kS = UnsafeMutablePointer<UInt16>.allocate(capacity: (seq + 15) / 16 * kpsD * 32)
                let vPV = UnsafeMutablePointer<UInt16>.allocate(capacity: (d + 15) / 16 * kpsSeq * 32)
                let qa = UnsafeMutablePointer<UInt16>.allocate(capacity: blk * ldD)
                let s = UnsafeMutablePointer<Float>.allocate(capacity: blk * seq)
                let pa = UnsafeMutablePointer<UInt16>.allocate(capacity: blk * ldSeq)
                defer { kS.deallocate(); vPV.deallocate(); qa.deallocate(); s.deallocate(); pa.deallocate() }
                var packedKV = -1  // the (batch, kv head) kS and vPV hold: the query heads of a group share them
                for u in units {
                    let b = u / heads, hh = u % heads, kh = hh / rep
                    let qh = pq.p + b * seq * ldq + hh * d, oh = po.p + b * seq * ldq + hh * d
                    let kh0 = pk.p + b * seq * ldk + kh * d, vh0 = pv.p + b * seq * ldk + kh * d
                    if packedKV != b * kvHeads + kh {
                        // kS: B(e, j) = K[j][e] (keys in lanes, pairs along d); vPV: B(j, e) = V[j][e].
                        qlora_pack_bf16_pairs(kh0, Int64(ldk), 0, Int64(d), Int64(seq), kS)
                        qlora_pack_bf16_pairs(vh0, Int64(ldk), 1, Int64(seq), Int64(d), vPV)
                        packedKV = b * kvHeads + kh
                    }
                    var i0 = 0
                    while i0 < seq {
                        let m = min(blk, seq - i0), n = i0 + m, ldn = (n + 1) & ~1
                        for r in 0..<m { qlora_f32_to_bf16_rows(qh + (i0 + r) * ldq, 1, Int64(d), Int64(ldD), qa + r * ldD) }
                        // S [m, n] = Q_blk · K[0..<n]ᵀ, then the reference's softmax, then P = bf16(softmax).
                        qlora_gemm_bf16_packed(qa, Int64(ldD), kS, Int64(kpsD), Int64(m), Int64(n), Int64(d), s, Int64(n), 0)
                        softmaxBlock(s, rows: m, n: n, i0: i0, scale: scale)
                        qlora_f32_to_bf16_rows(s, Int64(m), Int64(n), Int64(ldn), pa)
                        // O_blk [m, d] = P · V[0..<n], in place (ldc = H·d), then rounded.
                        let o = oh + i0 * ldq
                        qlora_gemm_bf16_packed(pa, Int64(ldn), vPV, Int64(kpsSeq), Int64(m), Int64(d), Int64(n), o, Int64(ldq), 0)
                        for r in 0..<m { for e in 0..<d { o[r * ldq + e] = bf16(o[r * ldq + e]) } }
                        i0 += m
                    }
                }
            }
        }
    }

    /// `attentionBackward` where the CPU has AVX512-BF16: every product on the bf16 GEMM. The
    /// score gradient's bf16 value bf16(p·(dp − dot)) goes in unscaled and the 1/√d scale is
    /// applied to dq and to each head's dk sums afterwards (the reference multiplies each term;
    /// in fp32 the two differ by rounding only).
    static func attentionBackwardBF16(dout: [Float], q: [Float], k: [Float], v: [Float], batch: Int, seq: Int,
                                      heads: Int, kvHeads: Int, headDim d: Int) -> (dq: [Float], dk: [Float], dv: [Float]) {
        let rep = heads / kvHeads, scale = 1 / Float(d).squareRoot()
        let ldq = heads * d, ldk = kvHeads * d, blk = attentionBlock
        let ldD = (d + 1) & ~1, kpsD = (d + 1) / 2, kpsSeq = (seq + 1) / 2, ldSeq = (seq + 1) & ~1, ldB = (blk + 1) & ~1
        return withBackwardBuffers(dout: dout, q: q, k: k, v: v, batch: batch, seq: seq, heads: heads, kvHeads: kvHeads, headDim: d) { b in
            let (pg, pq, pk, pv, pdq, pdkh, pdvh) = (b.dout, b.q, b.k, b.v, b.dq, b.dkHead, b.dvHead)
            parallelParts(batch * heads, grain: 1) { units in
                let keyLanes = (seq + 15) / 16 * kpsD * 32, dLanes = (d + 15) / 16 * kpsSeq * 32, blockLanes = (d + 15) / 16 * ((blk + 1) / 2) * 32
                let kS = UnsafeMutablePointer<UInt16>.allocate(capacity: keyLanes), vS = UnsafeMutablePointer<UInt16>.allocate(capacity: keyLanes)
                let kD = UnsafeMutablePointer<UInt16>.allocate(capacity: dLanes)
                let qP = UnsafeMutablePointer<UInt16>.allocate(capacity: blockLanes), gP = UnsafeMutablePointer<UInt16>.allocate(capacity: blockLanes)
                let qa = UnsafeMutablePointer<UInt16>.allocate(capacity: blk * ldD), ga = UnsafeMutablePointer<UInt16>.allocate(capacity: blk * ldD)
                let probs = UnsafeMutablePointer<Float>.allocate(capacity: blk * seq), dp = UnsafeMutablePointer<Float>.allocate(capacity: blk * seq)
                let dsa = UnsafeMutablePointer<UInt16>.allocate(capacity: blk * ldSeq)
                let dsT = UnsafeMutablePointer<UInt16>.allocate(capacity: seq * ldB), pT = UnsafeMutablePointer<UInt16>.allocate(capacity: seq * ldB)
                defer {
                    for p in [kS, vS, kD, qP, gP, qa, ga, dsa, dsT, pT] { p.deallocate() }
                    probs.deallocate(); dp.deallocate()
                }
                var packedKV = -1  // the (batch, kv head) kS, vS and kD hold: the query heads of a group share them
                for u in units {
                    let b = u / heads, hh = u % heads, kh = hh / rep
                    let qh = pq.p + b * seq * ldq + hh * d, gh = pg.p + b * seq * ldq + hh * d, dqh = pdq.p + b * seq * ldq + hh * d
                    let kh0 = pk.p + b * seq * ldk + kh * d, vh0 = pv.p + b * seq * ldk + kh * d
                    let dkh = pdkh.p + u * seq * d, dvh = pdvh.p + u * seq * d  // [seq, d]
                    if packedKV != b * kvHeads + kh {
                        qlora_pack_bf16_pairs(kh0, Int64(ldk), 0, Int64(d), Int64(seq), kS)  // for Q·Kᵀ
                        qlora_pack_bf16_pairs(vh0, Int64(ldk), 0, Int64(d), Int64(seq), vS)  // for dO·Vᵀ
                        qlora_pack_bf16_pairs(kh0, Int64(ldk), 1, Int64(seq), Int64(d), kD)  // for dS·K
                        packedKV = b * kvHeads + kh
                    }
                    var i0 = 0
                    while i0 < seq {
                        let m = min(blk, seq - i0), n = i0 + m, ldn = (n + 1) & ~1, ldm = (m + 1) & ~1
                        let qb = qh + i0 * ldq, gb = gh + i0 * ldq
                        for r in 0..<m {
                            qlora_f32_to_bf16_rows(qb + r * ldq, 1, Int64(d), Int64(ldD), qa + r * ldD)
                            qlora_f32_to_bf16_rows(gb + r * ldq, 1, Int64(d), Int64(ldD), ga + r * ldD)
                        }
                        qlora_gemm_bf16_packed(qa, Int64(ldD), kS, Int64(kpsD), Int64(m), Int64(n), Int64(d), probs, Int64(n), 0)
                        softmaxBlock(probs, rows: m, n: n, i0: i0, scale: scale)
                        qlora_gemm_bf16_packed(ga, Int64(ldD), vS, Int64(kpsD), Int64(m), Int64(n), Int64(d), dp, Int64(n), 0)
                        // The reference's ds before its × scale, and the bf16 probabilities.
                        qlora_softmax_backward_rows(probs, dp, Int64(m), Int64(n), Int64(i0), 1)
                        // dQ_blk = scale · (dS · K[0..<n]): every key of these rows is here; rounded.
                        qlora_f32_to_bf16_rows(dp, Int64(m), Int64(n), Int64(ldn), dsa)
                        qlora_gemm_bf16_packed(dsa, Int64(ldn), kD, Int64(kpsSeq), Int64(m), Int64(d), Int64(n), dqh + i0 * ldq, Int64(ldq), 0)
                        for r in 0..<m { let o = dqh + (i0 + r) * ldq; for e in 0..<d { o[e] = bf16(o[e] * scale) } }
                        // dK_head[0..<n] += dSᵀ · Q_blk and dV_head[0..<n] += Pᵀ · dO_blk (scale on dK at the end).
                        qlora_f32_to_bf16_transposed(dp, Int64(m), Int64(n), Int64(n), dsT, Int64(ldm))
                        qlora_f32_to_bf16_transposed(probs, Int64(m), Int64(n), Int64(n), pT, Int64(ldm))
                        qlora_pack_bf16_pairs(qb, Int64(ldq), 1, Int64(m), Int64(d), qP)
                        qlora_pack_bf16_pairs(gb, Int64(ldq), 1, Int64(m), Int64(d), gP)
                        qlora_gemm_bf16_packed(dsT, Int64(ldm), qP, Int64((m + 1) / 2), Int64(n), Int64(d), Int64(m), dkh, Int64(d), 1)
                        qlora_gemm_bf16_packed(pT, Int64(ldm), gP, Int64((m + 1) / 2), Int64(n), Int64(d), Int64(m), dvh, Int64(d), 1)
                        i0 += m
                    }
                    for x in 0..<(seq * d) { dkh[x] *= scale }
                }
            }
        }
    }

}
