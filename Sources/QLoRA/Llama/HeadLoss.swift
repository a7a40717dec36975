import COpenBLAS
import CQLoRAKernels
import Foundation

/// The lm_head and transformers' causal-LM loss, fused and chunked over tokens (the idea of
/// Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy): for a block of tokens the
/// head's bf16 logits, their fp32 log-softmax, the loss and the logits' bf16 gradient, that
/// gradient times the head's weight into the hidden states' gradient, then the next block. The
/// [tokens × vocab] logits never exist at once. Every row's arithmetic is the same whatever the
/// block (each logit and each hidden-gradient element is one fp32 sum in a fixed order, each row's
/// softmax its own), so any `chunkRows` gives the same bits as all the rows at once: the
/// unchunked path, which `LlamaModel.forward` runs when asked for the logits.
///
///     // normed: [T, hidden] (bf16 values), W: [vocab, hidden]
///     // logits = bf16(normed · Wᵀ)          [T, vocab], upcast to fp32
///     // loss   = Σ (lse − logit[target]) / count over the counted rows
///     // dl     = bf16((softmax − onehot) / count)      [T, vocab]
///     // dn     = bf16(dl · W)                [T, hidden]
///
/// Where the CPU has AVX512-BF16 both products run on `qlora_gemm_bf16_packed` (every product of
/// two bf16 values exact, one fp32 sum per output in k order), with the weight packed once in
/// both layouts; elsewhere on OpenBLAS sgemm over the fp32 weight. The loss rows run on
/// `qlora_cross_entropy_rows` (scalar: `LlamaOps.crossEntropy`'s arithmetic; AVX-512: a
/// polynomial exp and 16-lane sums).
public final class HeadLoss: @unchecked Sendable {
    public let vocab: Int, hidden: Int
    /// The weight [vocab, hidden] (bf16 values), for the sgemm path.
    let weight: [Float]
    /// Where the bf16 GEMM runs: B(e, j) = W[j][e] (k = hidden, 16 vocabulary entries a group),
    /// and B(j, e) = W[j][e] (k = vocab, 16 hidden columns a group). Empty otherwise.
    let forwardPack: [UInt16], backwardPack: [UInt16]
    let usesBF16GEMM: Bool

    /// Bytes of the packed copies (what the head holds beyond its fp32 weight).
    public var packedBytes: Int { 2 * (forwardPack.count + backwardPack.count) }

    public init(weight: [Float], vocab: Int, hidden: Int) {
        precondition(weight.count == vocab * hidden, "HeadLoss: weight is not [vocab, hidden]")
        self.weight = weight
        self.vocab = vocab
        self.hidden = hidden
        usesBF16GEMM = KernelLevel.active == .avx512bf16
        guard usesBF16GEMM else { forwardPack = []; backwardPack = []; return }
        forwardPack = Self.pack(weight, hidden: hidden, k: hidden, n: vocab, bIsKN: false)
        backwardPack = Self.pack(weight, hidden: hidden, k: vocab, n: hidden, bIsKN: true)
    }

    /// W [vocab, hidden] packed by `qlora_pack_bf16_pairs` as B [k, n] (B = W with `bIsKN`, else
    /// Wᵀ), its 16-column groups split between threads.
    static func pack(_ weight: [Float], hidden: Int, k: Int, n: Int, bIsKN: Bool) -> [UInt16] {
        let kps = (k + 1) / 2, groups = (n + 15) / 16
        return weight.withUnsafeBufferPointer { w in
            let pw = LlamaOps.Shared(w.baseAddress!)
            return [UInt16](unsafeUninitializedCapacity: groups * kps * 32) { out, count in
                let po = LlamaOps.Shared(out.baseAddress!)
                LlamaOps.parallelParts(groups, grain: 1) { g in
                    // Column 16·g of B: W's column (bIsKN) or row 16·g.
                    let first = 16 * g.lowerBound * (bIsKN ? 1 : hidden), cols = min(n, 16 * g.upperBound) - 16 * g.lowerBound
                    qlora_pack_bf16_pairs(pw.p + first, Int64(hidden), bIsKN ? 1 : 0, Int64(k), Int64(cols), po.p + g.lowerBound * kps * 32)
                }
                count = groups * kps * 32
            }
        }
    }

    /// The loss's targets: labels shifted left by one within each sequence, `ignoreIndex` at
    /// each sequence's last position and wherever the label is; and how many count.
    public static func targets(labels: [Int], batch: Int, seq: Int, ignoreIndex: Int = -100) -> (targets: [Int64], count: Int) {
        var t = [Int64](repeating: -1, count: batch * seq)
        var count = 0
        for b in 0..<batch {
            for s in 0..<max(seq - 1, 0) where labels[b * seq + s + 1] != ignoreIndex {
                t[b * seq + s] = Int64(labels[b * seq + s + 1])
                count += 1
            }
        }
        return (t, count)
    }

    /// Rows per block that keep a block's fp32 logits and bf16 gradient near 64 MiB (at least 16
    /// rows, so the head's weight is streamed once per 16 tokens or fewer times).
    public static func defaultChunkRows(vocab: Int) -> Int { max(16, (64 << 20) / (6 * max(vocab, 1))) }

    /// The loss and the hidden states' gradient for `normed` [tokens, hidden], `chunkRows` rows
    /// at a time (`tokens` or more: all at once). Returns the loss's sum over the counted rows
    /// (Float64, in row order), dn [tokens, hidden] as bf16 values, and, with `keepLogits`, the
    /// bf16 logits [tokens, vocab], with `keepGradient` their bf16 gradient [tokens, vocab] (a
    /// trained lm_head's weight gradient needs it).
    public func run(normed: [Float], targets: [Int64], count: Int, tokens: Int, chunkRows: Int,
                    keepLogits: Bool = false, keepGradient: Bool = false) -> (lossSum: Double, dn: [Float], logits: [Float], dlogits: [Float]) {
        precondition(normed.count == tokens * hidden && targets.count == tokens, "HeadLoss: shapes")
        precondition(targets.allSatisfy { $0 < Int64(vocab) }, "HeadLoss: a target outside the vocabulary")
        // sgemm's result for a row depends on the call's row count (OpenBLAS takes other kernels
        // for small and edge blocks), so there every call gets exactly `sgemmRows` rows, padded,
        // on a grid from row 0: any chunking then makes the same calls.
        let rows = usesBF16GEMM ? max(1, min(chunkRows, tokens)) : Self.roundUp(max(1, min(chunkRows, tokens)), Self.sgemmRows)
        let v = vocab, h = hidden
        let ldv = (v + 1) & ~1, ldh = (h + 1) & ~1
        var dn = [Float](repeating: 0, count: tokens * h)
        var logits = [Float](repeating: 0, count: keepLogits ? tokens * v : 0)
        var dlogits = [Float](repeating: 0, count: keepGradient ? tokens * v : 0)
        var total = 0.0
        // One block's buffers, reused: the fp32 logits, the gradient's bf16 bits (the backward
        // GEMM's A operand), the normed rows' bf16 bits (the forward's), the loss terms.
        let block = UnsafeMutablePointer<Float>.allocate(capacity: rows * v)
        let dl = UnsafeMutablePointer<UInt16>.allocate(capacity: rows * ldv)
        let a = UnsafeMutablePointer<UInt16>.allocate(capacity: usesBF16GEMM ? rows * ldh : 2 * Self.sgemmRows * h)  // sgemm: a padded block of fp32 rows
        let dlFloats = usesBF16GEMM ? nil : UnsafeMutablePointer<Float>.allocate(capacity: Self.sgemmRows * (v + h))
        var terms = [Float](repeating: 0, count: rows)
        defer { block.deallocate(); dl.deallocate(); a.deallocate(); dlFloats?.deallocate() }
        let counted = Float(max(count, 1))  // the mean's divisor (no row counts when 0: all gradients 0)
        normed.withUnsafeBufferPointer { np in targets.withUnsafeBufferPointer { tp in dn.withUnsafeMutableBufferPointer { dp in
            var r0 = 0
            while r0 < tokens {
                let m = min(rows, tokens - r0)
                forward(np.baseAddress! + r0 * h, rows: m, bf16Rows: a, into: block)
                // Rows are independent: split between threads.
                let (pb, pdl, pt) = (LlamaOps.Shared(block), LlamaOps.Shared(dl), LlamaOps.Shared(tp.baseAddress! + r0))
                terms.withUnsafeMutableBufferPointer { ts in
                    let pts = LlamaOps.Shared(ts.baseAddress!)
                    LlamaOps.parallelParts(m, grain: 1) { part in
                        qlora_cross_entropy_rows(pb.p + part.lowerBound * v, Int64(part.count), Int64(v), Int64(v), pt.p + part.lowerBound, counted,
                                                 pdl.p + part.lowerBound * ldv, Int64(ldv), pts.p + part.lowerBound)
                    }
                }
                for i in 0..<m where tp[r0 + i] >= 0 { total += Double(terms[i]) }
                if keepLogits { logits.withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: r0 * v).update(from: block, count: m * v) } }
                if keepGradient {
                    for i in 0..<m { for j in 0..<v { dlogits[(r0 + i) * v + j] = HalfPrecision.float(bfloat16Bits: dl[i * ldv + j]) } }
                }
                backward(dl, ld: ldv, rows: m, floats: dlFloats, into: dp.baseAddress! + r0 * h)
                r0 += m
            }
        } } }
        return (total, dn, logits, dlogits)
    }

    /// Rows of every sgemm call below AVX512-BF16 (the grid above).
    static let sgemmRows = 64
    static func roundUp(_ n: Int, _ m: Int) -> Int { (n + m - 1) / m * m }

    /// Vocabulary entries per k block of the input gradient's GEMM: the block's slice of dl
    /// (rows × 2 bytes each) stays in a core's L2 while every hidden column's pairs sweep it.
    static let backwardKBlockBytes = 512 << 10
    /// Hidden elements per k block of the logits' GEMM (the same reason, for the normed rows).
    static let forwardKBlock = 512

    /// c [rows, vocab] = raw fp32 sums of x [rows, hidden] · Wᵀ (the loss kernel rounds them).
    func forward(_ x: UnsafePointer<Float>, rows m: Int, bf16Rows a: UnsafeMutablePointer<UInt16>, into c: UnsafeMutablePointer<Float>) {
        let v = vocab, h = hidden
        guard usesBF16GEMM else {
            // Blocks of exactly `sgemmRows` rows; a short last block reads zero rows past m (in
            // a's space, free here) and writes its extra rows past m too (c holds whole blocks).
            let g = Self.sgemmRows
            let pad = UnsafeMutableRawPointer(a).bindMemory(to: Float.self, capacity: g * h)
            weight.withUnsafeBufferPointer { w in
                for r0 in stride(from: 0, to: m, by: g) {
                    let mr = min(g, m - r0)
                    var src = x + r0 * h
                    if mr < g {
                        pad.update(from: src, count: mr * h)
                        (pad + mr * h).update(repeating: 0, count: (g - mr) * h)
                        src = UnsafePointer(pad)
                    }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(g), Int32(v), Int32(h), 1, src, Int32(h), w.baseAddress!, Int32(h), 0,
                                c + r0 * v, Int32(v))
                }
            }
            return
        }
        let ldh = (h + 1) & ~1
        qlora_f32_to_bf16_rows(x, Int64(m), Int64(h), Int64(ldh), a)
        Self.packedGEMM(a, lda: ldh, forwardPack, m: m, n: v, k: h, kBlock: Self.forwardKBlock, c: c)
    }

    /// c [m, n] = a [m, k] (bf16 bits, row stride lda) · B [k, n] (packed, `pack`): threads take
    /// 64-column panels, k runs in blocks of `kBlock` accumulated in c (one fp32 chain per
    /// output in k order all the same, so the blocks change no bit).
    static func packedGEMM(_ a: UnsafePointer<UInt16>, lda: Int, _ pack: [UInt16], m: Int, n: Int, k: Int, kBlock: Int, c: UnsafeMutablePointer<Float>) {
        let kps = (k + 1) / 2
        let (pa, pc) = (LlamaOps.Shared(a), LlamaOps.Shared(c))
        pack.withUnsafeBufferPointer { bp in
            let pb = LlamaOps.Shared(bp.baseAddress!)
            LlamaOps.parallelParts((n + 63) / 64, grain: 1) { panels in
                let g0 = 4 * panels.lowerBound, cols = min(n, 64 * panels.upperBound) - 16 * g0
                var k0 = 0
                repeat {
                    let kk = min(kBlock, k - k0)
                    qlora_gemm_bf16_packed(pa.p + k0, Int64(lda), pb.p + (g0 * kps + k0 / 2) * 32, Int64(kps), Int64(m), Int64(cols), Int64(kk),
                                           pc.p + 16 * g0, Int64(n), k0 > 0 ? 1 : 0)
                    k0 += kk
                } while k0 < k
            }
        }
    }

    /// dn [rows, hidden] = bf16(dl · W), dl as bf16 bits [rows, ld].
    func backward(_ dl: UnsafePointer<UInt16>, ld: Int, rows m: Int, floats: UnsafeMutablePointer<Float>?, into dn: UnsafeMutablePointer<Float>) {
        let v = vocab, h = hidden
        if let f = floats {
            // Blocks of exactly `sgemmRows` rows, zero rows past m; f holds a block's dl, then its dn.
            let g = Self.sgemmRows, out = f + g * v
            weight.withUnsafeBufferPointer { w in
                for r0 in stride(from: 0, to: m, by: g) {
                    let mr = min(g, m - r0)
                    for i in 0..<g { for j in 0..<v { f[i * v + j] = i < mr ? Float(bitPattern: UInt32(dl[(r0 + i) * ld + j]) << 16) : 0 } }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(g), Int32(h), Int32(v), 1, f, Int32(v), w.baseAddress!, Int32(h), 0, out, Int32(h))
                    (dn + r0 * h).update(from: out, count: mr * h)
                }
            }
        } else {
            Self.packedGEMM(dl, lda: ld, backwardPack, m: m, n: h, k: v, kBlock: max(64, Self.backwardKBlockBytes / (2 * m)) & ~1, c: dn)
        }
        let pc = LlamaOps.Shared(dn)
        LlamaOps.parallelParts(m * h, grain: LlamaOps.elementGrain) { r in for i in r { pc.p[i] = LlamaOps.bf16(pc.p[i]) } }
    }
}
