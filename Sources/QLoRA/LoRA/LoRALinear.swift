import COpenBLAS

/// A LoRA adapter's hyper-parameters (PEFT's `LoraConfig` for one module).
public struct LoRAConfig: Sendable, Equatable, Codable {
    /// Rank r (> 0).
    public var rank: Int
    /// lora_alpha.
    public var alpha: Double
    /// rsLoRA: scaling = alpha / sqrt(r) instead of alpha / r.
    public var useRSLoRA: Bool = false
    /// Dropout probability on the adapter's input, in [0, 1).
    public var dropout: Double = 0

    public init(rank: Int, alpha: Double, useRSLoRA: Bool = false, dropout: Double = 0) {
        self.rank = rank
        self.alpha = alpha
        self.useRSLoRA = useRSLoRA
        self.dropout = dropout
    }

    /// PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA (a Python float).
    public var scaling: Double { useRSLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank) }
}

public enum LoRAError: Error, Equatable, CustomStringConvertible {
    case invalidConfig(String)
    case shapeMismatch(String)

    public var description: String {
        switch self {
        case .invalidConfig(let s): return "invalid LoRA config: \(s)"
        case .shapeMismatch(let s): return "LoRA shape mismatch: \(s)"
        }
    }
}

/// A LoRA layer over a frozen 4-bit base weight, as PEFT's bitsandbytes `Linear4bit` LoRA layer
/// computes it with `bnb_4bit_compute_dtype=bfloat16` and fp32 adapters:
///
///     y = base(x) + (dropout(x) · Aᵀ · Bᵀ) · scaling
///
/// where base(x) is bitsandbytes' bf16 matmul cast back to fp32 (`Matmul4Bit`, bf16 output).
/// A: [r, in], B: [out, r], fp32 (the trainable parameters). No gradient exists for the base.
public final class LoRALinear {
    public let base: Linear4BitWeight
    public let config: LoRAConfig
    /// The adapter's compute dtype. `.float32` (PEFT with fp32 adapters) or `.bfloat16` (PEFT with
    /// bf16 adapter weights: x, A, B and every adapter matmul result rounded to bf16, gradients of
    /// A and B bf16). `loraA`, `loraB`, `gradA`, `gradB` are always fp32: with bf16 compute they
    /// are the fp32 master copy, rounded to bf16 for each forward.
    public let computeType: ElementType
    /// A: [r, in] row-major.
    public var loraA: [Float]
    /// B: [out, r] row-major.
    public var loraB: [Float]
    /// Accumulated gradients (zero them with `zeroGrad`).
    public var gradA: [Float]
    public var gradB: [Float]
    /// The layer sits in a bf16 model (inputs, outputs and gradients are bf16 tensors): PEFT then
    /// casts the adapter's output to bf16 before adding it to the base's bf16 result, and the
    /// input's gradient is the bf16 sum of the base's and the adapter's bf16 gradients. Off: the
    /// fp32-input semantics of issue 4 (fp32 result, fp32 sum).
    public var bf16Activations = false
    /// The base layer's bias [out] (bf16 values, frozen), or nil: added to the base matmul's
    /// fp32 sum before its one rounding to bf16, as torch's bf16 `linear` with a bias does.
    public var bias: [Float]? = nil
    /// DoRA's magnitude m [out] (PEFT's `lora_magnitude_vector`, fp32, trained), or nil for
    /// plain LoRA; its accumulated gradient.
    public var magnitude: [Float]? = nil
    public var gradMagnitude: [Float] = []
    /// The base matmul's reusable buffers. Layers that run one after another can share one
    /// (`LlamaModel` gives all its projections the same), so it holds one activation copy and
    /// one weight panel instead of one per layer.
    public var scratch = Matmul4BitScratch()

    public var inFeatures: Int { base.inFeatures }
    public var outFeatures: Int { base.outFeatures }

    /// With given A and B (e.g. loaded from a PEFT adapter).
    public init(base: Linear4BitWeight, config: LoRAConfig, loraA: [Float], loraB: [Float],
                computeType: ElementType = .float32) throws(LoRAError) {
        guard computeType != .float16 else { throw .invalidConfig("adapter compute dtype must be float32 or bfloat16") }
        guard config.rank > 0 else { throw .invalidConfig("rank must be positive, got \(config.rank)") }
        guard config.dropout >= 0 && config.dropout < 1 else { throw .invalidConfig("dropout must be in [0, 1), got \(config.dropout)") }
        guard config.alpha.isFinite else { throw .invalidConfig("lora_alpha must be finite") }
        let r = config.rank
        guard loraA.count == r * base.inFeatures else {
            throw .shapeMismatch("lora_A has \(loraA.count) values, expected [\(r), \(base.inFeatures)] for rank \(r)")
        }
        guard loraB.count == base.outFeatures * r else {
            throw .shapeMismatch("lora_B has \(loraB.count) values, expected [\(base.outFeatures), \(r)] for rank \(r)")
        }
        self.base = base
        self.config = config
        self.computeType = computeType
        self.loraA = loraA
        self.loraB = loraB
        gradA = [Float](repeating: 0, count: loraA.count)
        gradB = [Float](repeating: 0, count: loraB.count)
    }

    /// PEFT's default initialization: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
    /// B = 0, from `seed` (qlora's own generator: the values are not torch's, the distribution is).
    public convenience init(base: Linear4BitWeight, config: LoRAConfig, seed: UInt64, computeType: ElementType = .float32) throws(LoRAError) {
        var rng = SplitMix64(seed: seed)
        let bound = 1 / Double(base.inFeatures).squareRoot()
        let a = (0..<(max(0, config.rank) * base.inFeatures)).map { _ in Float((rng.unit() * 2 - 1) * bound) }
        try self.init(base: base, config: config, loraA: a, loraB: [Float](repeating: 0, count: base.outFeatures * max(0, config.rank)),
                      computeType: computeType)
    }

    /// What `backward` needs from `forward`, and nothing more: the adapter's (dropped-out)
    /// input and its rank-r projection, plus the dropout mask when dropout is on.
    public struct Saved {
        public let tokens: Int
        /// DoRA: the base layer's bf16 result less its bias, the adapter's fp32 result
        /// (B·A·x, unscaled), both [tokens, out], and m / ‖W + s·B·A‖ per output feature.
        var doraBase: [Float] = []
        var doraLoRA: [Float] = []
        var doraScale: [Float] = []
        var doraNorm: [Float] = []
        /// dropout(x): [tokens, in].
        let xDropped: [Float]
        /// dropout(x) · Aᵀ: [tokens, r].
        let h: [Float]
        /// Keep-mask scaled by 1 / (1 - p): [tokens, in], or empty without dropout.
        let mask: [Float]

        /// Bytes held for backward (exact).
        public var byteCount: Int { (xDropped.count + h.count + mask.count + doraBase.count + doraLoRA.count + doraScale.count + doraNorm.count) * MemoryLayout<Float>.size }

        /// The address of the kept input: layers fed the same tensor without dropout keep one
        /// buffer between them (the input array itself, shared copy-on-write).
        var inputAddress: UnsafeRawPointer? { xDropped.withUnsafeBytes { $0.baseAddress } }

        /// Bytes of this layer's own arrays, its input excluded.
        var byteCountWithoutInput: Int { (h.count + mask.count + doraBase.count + doraLoRA.count + doraScale.count + doraNorm.count) * MemoryLayout<Float>.size }
    }

    /// Forward.
    ///
    ///     // x: [tokens, in], A: [r, in], B: [out, r] -> y: [tokens, out]
    /// - Parameters:
    ///   - dropoutMask: keep (1) / drop (0) per input element, [tokens, in]; required exactly
    ///     when dropout > 0 unless `seed` is given, from which a mask is drawn.
    public func forward(_ x: [Float], tokens: Int, dropoutMask: [Float]? = nil, seed: UInt64? = nil) throws(LoRAError) -> (y: [Float], saved: Saved) {
        let k = inFeatures, n = outFeatures, r = config.rank
        guard x.count == tokens * k else { throw .shapeMismatch("x has \(x.count) values, expected [\(tokens), \(k)]") }
        // Every value is written by the 4-bit GEMM: no zero fill first, and its threads fault the pages in.
        var y = LlamaOps.written(tokens * n) { py in
            x.withUnsafeBufferPointer { xp in
                Matmul4Bit.forward(x: xp, tokens: tokens, weight: base, y: UnsafeMutableBufferPointer(start: py.p, count: tokens * n),
                                   threads: LlamaOps.threadCount, scratch: scratch, roundOutputToBF16: bias == nil)
            }
        }
        if let bias {
            for t in 0..<tokens { for j in 0..<n { y[t * n + j] = HalfPrecision.roundedToBFloat16(y[t * n + j] + bias[j]) } }
        }
        var mask: [Float] = []
        var xd = x
        round(&xd)  // PEFT casts x to the adapter dtype first
        if config.dropout > 0 {
            let keepScale = Float(1 / (1 - config.dropout))
            if let m = dropoutMask {
                guard m.count == x.count else { throw .shapeMismatch("dropout mask has \(m.count) values, expected \(x.count)") }
                mask = m.map { $0 * keepScale }
            } else {
                var rng = SplitMix64(seed: seed ?? 0)
                mask = (0..<x.count).map { _ in rng.unit() < config.dropout ? 0 : keepScale }
            }
            for i in xd.indices { xd[i] = xd[i] * mask[i] }
            round(&xd)
        }
        let a = rounded(loraA), b = rounded(loraB)
        let s = Float(config.scaling)
        guard tokens > 0 else { return (y, Saved(tokens: tokens, xDropped: xd, h: [], mask: mask)) }
        // h = xd · Aᵀ: [tokens, r]  (A row-major [r, k]: op(B) = Aᵀ, ldb = k), rounded
        var h = [Float](repeating: 0, count: tokens * r)
        let rnd = computeType == .bfloat16, bf16Out = bf16Activations
        xd.withUnsafeBufferPointer { xp in a.withUnsafeBufferPointer { ap in h.withUnsafeMutableBufferPointer { hp in
            let (px, pa, ph) = (Shared(xp.baseAddress!), Shared(ap.baseAddress!), Shared(hp.baseAddress!))
            Self.onGrid(tokens) { rows, _ in
                let hr = ph.p + rows.lowerBound * r
                Self.sgemmPiece(false, true, rows.count, r, k, px.p + rows.lowerBound * k, k, pa.p, k, hr, r)
                if rnd { for i in 0..<(rows.count * r) { hr[i] = HalfPrecision.roundedToBFloat16(hr[i]) } }
            }
        } } }
        if let magnitude {
            // l = h · Bᵀ: [tokens, n]  (B row-major [n, r]: op(B) = Bᵀ, ldb = r)
            var l = [Float](repeating: 0, count: tokens * n)
            sgemm(false, true, tokens, n, r, h, r, b, r, &l, n)
            round(&l)
            // DoRA, as PEFT's bnb Linear4bit forward with DoraLinearLayer (peft/tuners/lora/
            // bnb.py, dora.py): with W the dequantized bf16 weight in fp32 and the norm detached,
            //   y = bf16(result + ((m/‖W + s·B·A‖ − 1)·(result − bias) + (m/‖…‖ · B·A·x)·s))
            // in fp32, rounded to bf16 once.
            let norm = doraNorm()
            let scale = (0..<n).map { magnitude[$0] / norm[$0] }
            var baseResult = y
            if let bias { for t in 0..<tokens { for j in 0..<n { baseResult[t * n + j] = HalfPrecision.roundedToBFloat16(y[t * n + j] - bias[j]) } } }
            for t in 0..<tokens {
                for j in 0..<n {
                    let i = t * n + j
                    let dora = (scale[j] - 1) * baseResult[i] + (scale[j] * l[i]) * s
                    y[i] = HalfPrecision.roundedToBFloat16(y[i] + dora)
                }
            }
            var saved = Saved(tokens: tokens, xDropped: xd, h: h, mask: mask)
            (saved.doraBase, saved.doraLoRA, saved.doraScale, saved.doraNorm) = (baseResult, l, scale, norm)
            return (y, saved)
        }
        // y += (h · Bᵀ)·s a piece of rows at a time, each piece's product rounded, scaled,
        // rounded and added (result + lora_B(lora_A(x)) * scaling), so [tokens, n] of l never exists.
        h.withUnsafeBufferPointer { hp in b.withUnsafeBufferPointer { bp in y.withUnsafeMutableBufferPointer { yp in
            let (ph, pb, py) = (Shared(hp.baseAddress!), Shared(bp.baseAddress!), Shared(yp.baseAddress!))
            Self.onGrid(tokens, scratchPerItem: n) { rows, l in
                let count = rows.count * n, yr = py.p + rows.lowerBound * n
                Self.sgemmPiece(false, true, rows.count, n, r, ph.p + rows.lowerBound * r, r, pb.p, r, l, n)
                for i in 0..<count {
                    var v = rnd ? HalfPrecision.roundedToBFloat16(l[i]) : l[i]
                    v = rnd ? HalfPrecision.roundedToBFloat16(v * s) : v * s
                    yr[i] = bf16Out ? HalfPrecision.roundedToBFloat16(yr[i] + HalfPrecision.roundedToBFloat16(v)) : yr[i] + v
                }
            }
        } } }
        return (y, Saved(tokens: tokens, xDropped: xd, h: h, mask: mask))
    }

    /// Backward: returns dx and ADDS into gradA and gradB.
    ///
    ///     // dy: [tokens, out] -> dx: [tokens, in]; gradA += [r, in]; gradB += [out, r]
    /// From `y = base(x) + (xd · Aᵀ · Bᵀ) · s`:
    ///   g = dy · s;  dB += gᵀ · h;  dh = g · B;  dA += dhᵀ · xd;  dx = base'(dy) + (dh · A) ⊙ mask,
    /// with base'(dy) = bf16(bf16(dy) · W) as bitsandbytes' MatMul4Bit backward.
    /// - Parameter inputGradient: false where nothing upstream needs dx (the first layer's
    ///   projections, whose input comes from the frozen embedding, as autograd skips it): only
    ///   the adapter's gradients are computed and `[]` is returned.
    public func backward(_ dy: [Float], saved: Saved, inputGradient: Bool = true) throws(LoRAError) -> [Float] {
        let k = inFeatures, n = outFeatures, r = config.rank, t = saved.tokens
        guard dy.count == t * n else { throw .shapeMismatch("dy has \(dy.count) values, expected [\(t), \(n)]") }
        // Every value of dx is written by the 4-bit GEMM (no zero fill first).
        var dx = LlamaOps.written(inputGradient ? t * k : 0) { pdx in
            (magnitude == nil ? dy : doraBaseGradient(dy, saved)).withUnsafeBufferPointer { d in
                Matmul4Bit.backwardInput(dy: d, tokens: t, weight: base, dx: UnsafeMutableBufferPointer(start: pdx.p, count: t * k),
                                         threads: LlamaOps.threadCount, scratch: scratch, roundOutputToBF16: true)
            }
        }
        let s = Float(config.scaling), rnd = computeType == .bfloat16, bf16Out = bf16Activations
        guard t > 0 else { return dx }
        // g: the adapter output's gradient, bf16 (its cast back to fp32 sends a bf16 gradient), times s.
        let g = LlamaOps.written(t * n) { pg in
            guard magnitude == nil else {
                // DoRA: d(m/‖·‖) gathers dy·(result − bias) and dy·s·(B·A·x) over the tokens; the
                // adapter's gradient is dy·s·(m/‖·‖); the base layer's output gets dy from the sum
                // and bf16(dy·(m/‖·‖ − 1)) from the rescaling, added in bf16.
                var dScale = [Double](repeating: 0, count: n)
                for tt in 0..<t {
                    for j in 0..<n {
                        let i = tt * n + j
                        let ds = dy[i] * s
                        dScale[j] += Double(dy[i] * saved.doraBase[i]) + Double(ds * saved.doraLoRA[i])
                        pg.p[i] = ds * saved.doraScale[j]
                    }
                }
                for j in 0..<n { gradMagnitude[j] += Float(dScale[j]) / saved.doraNorm[j] }
                return
            }
            dy.withUnsafeBufferPointer { dp in
                let pd = Shared(dp.baseAddress!)
                Self.onGrid(t) { rows, _ in
                    for i in (rows.lowerBound * n)..<(rows.upperBound * n) {
                        let v = (rnd ? HalfPrecision.roundedToBFloat16(pd.p[i]) : pd.p[i]) * s
                        pg.p[i] = rnd ? HalfPrecision.roundedToBFloat16(v) : v
                    }
                }
            }
        }
        let a = rounded(loraA), b = rounded(loraB)
        var gb = [Float](repeating: 0, count: n * r), dh = [Float](repeating: 0, count: t * r), ga = [Float](repeating: 0, count: r * k)
        g.withUnsafeBufferPointer { gp in saved.h.withUnsafeBufferPointer { hp in b.withUnsafeBufferPointer { bp in
            saved.xDropped.withUnsafeBufferPointer { xp in gb.withUnsafeMutableBufferPointer { gbp in dh.withUnsafeMutableBufferPointer { dhp in
                ga.withUnsafeMutableBufferPointer { gap in
                    let (pg, ph, pb, px) = (Shared(gp.baseAddress!), Shared(hp.baseAddress!), Shared(bp.baseAddress!), Shared(xp.baseAddress!))
                    let (pgb, pdh, pga) = (Shared(gbp.baseAddress!), Shared(dhp.baseAddress!), Shared(gap.baseAddress!))
                    // gb [n, r] = gᵀ [n, t] · h [t, r], pieces of its rows (the sums over t whole), rounded
                    Self.onGrid(n) { rows, _ in
                        let c = pgb.p + rows.lowerBound * r
                        Self.sgemmPiece(true, false, rows.count, r, t, pg.p + rows.lowerBound, n, ph.p, r, c, r)
                        if rnd { for i in 0..<(rows.count * r) { c[i] = HalfPrecision.roundedToBFloat16(c[i]) } }
                    }
                    // dh [t, r] = g [t, n] · B [n, r], rounded
                    Self.onGrid(t) { rows, _ in
                        let c = pdh.p + rows.lowerBound * r
                        Self.sgemmPiece(false, false, rows.count, r, n, pg.p + rows.lowerBound * n, n, pb.p, r, c, r)
                        if rnd { for i in 0..<(rows.count * r) { c[i] = HalfPrecision.roundedToBFloat16(c[i]) } }
                    }
                    // ga [r, k] = dhᵀ [r, t] · xd [t, k], pieces of its columns, rounded
                    Self.onGrid(k) { cols, _ in
                        let c = pga.p + cols.lowerBound
                        Self.sgemmPiece(true, false, r, cols.count, t, pdh.p, r, px.p + cols.lowerBound, k, c, k)
                        if rnd { for row in 0..<r { for j in 0..<cols.count { c[row * k + j] = HalfPrecision.roundedToBFloat16(c[row * k + j]) } } }
                    }
                }
            } } }
        } } }
        // With bf16 compute these are the bf16 gradients, added in fp32.
        for i in gb.indices { gradB[i] += gb[i] }
        for i in ga.indices { gradA[i] += ga[i] }
        guard inputGradient else { return [] }
        // dx += (dh [t, r] · A [r, k]) ⊙ mask, a piece of rows at a time (rounded, masked, rounded, added)
        dh.withUnsafeBufferPointer { dhp in a.withUnsafeBufferPointer { ap in saved.mask.withUnsafeBufferPointer { mp in dx.withUnsafeMutableBufferPointer { dxp in
            let (pdh, pa, pdx) = (Shared(dhp.baseAddress!), Shared(ap.baseAddress!), Shared(dxp.baseAddress!))
            let pm = saved.mask.isEmpty ? nil : mp.baseAddress.map { Shared($0) }
            Self.onGrid(t, scratchPerItem: k) { rows, l in
                let count = rows.count * k, first = rows.lowerBound * k, dxr = pdx.p + first
                Self.sgemmPiece(false, false, rows.count, k, r, pdh.p + rows.lowerBound * r, r, pa.p, k, l, k)
                for i in 0..<count {
                    var v = rnd ? HalfPrecision.roundedToBFloat16(l[i]) : l[i]
                    if let pm { v *= pm.p[first + i]; if rnd { v = HalfPrecision.roundedToBFloat16(v) } }
                    dxr[i] = bf16Out ? HalfPrecision.roundedToBFloat16(dxr[i] + HalfPrecision.roundedToBFloat16(v)) : dxr[i] + v
                }
            }
        } } } }
        return dx
    }

    /// Rounds to bf16 values in place when computing in bf16 (a no-op in fp32).
    func round(_ v: inout [Float]) {
        guard computeType == .bfloat16 else { return }
        for i in v.indices { v[i] = HalfPrecision.roundedToBFloat16(v[i]) }
    }

    func rounded(_ v: [Float]) -> [Float] {
        var c = v
        round(&c)
        return c
    }

    public func zeroGrad() {
        for i in gradA.indices { gradA[i] = 0 }
        for i in gradB.indices { gradB[i] = 0 }
        for i in gradMagnitude.indices { gradMagnitude[i] = 0 }
    }

    /// Makes this a DoRA layer with magnitude `m`, or (nil) PEFT's initial magnitude: the row
    /// norm of the dequantized bf16 weight plus s·B·A with A and B in bf16, rounded to bf16
    /// (`DoraLinearLayer.update_layer` runs after the adapters are moved to the base's bf16
    /// compute dtype; the fp32 cast of the parameter follows).
    public func enableDoRA(magnitude m: [Float]? = nil) throws(LoRAError) {
        if let m, m.count != outFeatures { throw .shapeMismatch("lora_magnitude_vector has \(m.count) values, expected [\(outFeatures)]") }
        guard config.dropout == 0 else { throw .invalidConfig("DoRA with lora_dropout > 0 recomputes the base layer (PEFT's DoraLinearVariant); qlora trains DoRA without dropout") }
        magnitude = m ?? doraNorm(adapterType: .bfloat16).map { HalfPrecision.roundedToBFloat16($0) }
        gradMagnitude = [Float](repeating: 0, count: outFeatures)
    }

    /// ‖W + s·B·A‖ per output feature in fp32 (dora.py `get_weight_norm`: W the dequantized bf16
    /// weight, B·A the adapter's weight, summed in torch's CPU order), with A and B rounded to
    /// `adapterType` first.
    func doraNorm(adapterType: ElementType = .float32) -> [Float] {
        let k = inFeatures, n = outFeatures, r = config.rank
        var w = [Float](repeating: 0, count: n * k)
        w.withUnsafeMutableBufferPointer { base.dequantizeRowsBF16(0..<n, into: $0.baseAddress!, threads: LlamaOps.threadCount) }
        let bf16 = adapterType == .bfloat16
        func round(_ x: Float) -> Float { bf16 ? HalfPrecision.roundedToBFloat16(x) : x }
        let a = loraA.map { round($0) }, b = loraB.map { round($0) }
        var ba = [Float](repeating: 0, count: n * k)
        sgemm(false, false, n, k, r, b, r, a, k, &ba, k)
        let s = Float(config.scaling)
        // W + s·B·A into `ba`'s storage, then each row's norm: no array per row in the forward.
        for i in ba.indices { ba[i] = round(w[i] + round(s * round(ba[i]))) }
        return ba.withUnsafeBufferPointer { sum in (0..<n).map { o in LoRAMerge.rowNorm(UnsafeBufferPointer(rebasing: sum[(o * k)..<((o + 1) * k)])) } }
    }

    /// The base layer output's gradient under DoRA: dy from the sum, bf16(dy·(m/‖·‖ − 1)) from
    /// the rescaling, added in bf16.
    func doraBaseGradient(_ dy: [Float], _ saved: Saved) -> [Float] {
        let n = outFeatures
        return dy.indices.map { i in HalfPrecision.roundedToBFloat16(dy[i] + HalfPrecision.roundedToBFloat16(dy[i] * (saved.doraScale[i % n] - 1))) }
    }

    typealias Shared = LlamaOps.Shared

    /// Rows (or columns) per piece of the adapter's products: each piece is one sgemm on one
    /// OpenBLAS thread and its elementwise tail, and the pieces are split between threads. A
    /// fixed grid, so no value depends on the thread count (OpenBLAS may pick another kernel
    /// for another row count).
    static let gridSize = 64

    /// Runs `body` on 0..<count in `gridSize` pieces split between threads, OpenBLAS held to
    /// one thread (with r on one side its own threads do not pay off, and they spin after each
    /// call, taking the cores from the 4-bit GEMM); each thread's pieces share one scratch of
    /// `scratchPerItem` floats an item.
    static func onGrid(_ count: Int, scratchPerItem: Int = 0, _ body: @Sendable (Range<Int>, UnsafeMutablePointer<Float>) -> Void) {
        let pieces = (count + gridSize - 1) / gridSize
        BLAS.withOneThread {
            LlamaOps.parallelParts(pieces, grain: 1) { range in
                let scratch = UnsafeMutablePointer<Float>.allocate(capacity: max(1, gridSize * scratchPerItem))
                defer { scratch.deallocate() }
                for p in range { body(p * gridSize..<min(count, (p + 1) * gridSize), scratch) }
            }
        }
    }

    /// C = op(A) · op(B) for one piece (row-major, beta 0): m·n values at ldc; k == 0 gives zeros.
    static func sgemmPiece(_ ta: Bool, _ tb: Bool, _ m: Int, _ n: Int, _ k: Int, _ a: UnsafePointer<Float>, _ lda: Int,
                           _ b: UnsafePointer<Float>, _ ldb: Int, _ c: UnsafeMutablePointer<Float>, _ ldc: Int) {
        guard m > 0 && n > 0 else { return }
        if k == 0 { for i in 0..<m { (c + i * ldc).update(repeating: 0, count: n) }; return }
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), 1, a, Int32(lda), b, Int32(ldb), 0, c, Int32(ldc))
    }

    /// `sgemmPiece` over whole arrays, one call on one OpenBLAS thread (DoRA's B·A·x, the merge's B·A).
    func sgemm(_ ta: Bool, _ tb: Bool, _ m: Int, _ n: Int, _ k: Int, _ a: [Float], _ lda: Int,
               _ b: [Float], _ ldb: Int, _ c: inout [Float], _ ldc: Int) {
        guard m > 0 && n > 0 else { return }
        BLAS.withOneThread { Self.sgemmPiece(ta, tb, m, n, k, a, lda, b, ldb, &c, ldc) }
    }
}
