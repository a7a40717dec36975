import CQLoRAKernels
import Foundation

/// One decoder layer: two RMSNorm weights (bf16 values), Qwen3's per-head q/k norms, and the
/// LoRA projections on 4-bit bases (biases, where the family has them, on the projections).
public final class LlamaLayer {
    public let inputNorm: [Float]
    public let postAttentionNorm: [Float]
    /// RMSNorm weights [headDim] of each head's query and key before rope (Qwen3), or nil.
    public let qNorm: [Float]?, kNorm: [Float]?
    /// In `ModelArchitecture.moduleNames` order: q, k, v, o, gate, up, down, or with fused
    /// projections (Phi-3) qkv, o, gate_up, down; a sparse layer's q, k, v, o.
    public let projections: [LoRALinear]
    /// A mixture of experts' sparse block in place of the MLP (frozen bf16 router and experts).
    public let experts: SparseMoE.Weights?
    public var isFused: Bool { projections.count == 4 && experts == nil }

    public init(inputNorm: [Float], postAttentionNorm: [Float], projections: [LoRALinear], qNorm: [Float]? = nil, kNorm: [Float]? = nil,
                experts: SparseMoE.Weights? = nil) {
        precondition(experts == nil ? projections.count == 7 || projections.count == 4 : projections.count == 4,
                     "a decoder layer has seven projections, or four when fused or when its MLP is a sparse block")
        self.experts = experts
        precondition((qNorm == nil) == (kNorm == nil), "q and k norms come together")
        self.inputNorm = inputNorm
        self.postAttentionNorm = postAttentionNorm
        self.projections = projections
        self.qNorm = qNorm
        self.kNorm = kNorm
        for p in projections { p.bf16Activations = true }
    }
    /// A layer of `a` for measuring: unit norms, each projection's base quantized from the first
    /// out·in values of `source`, adapters from `lora` (zero biases where the family has them),
    /// one matmul scratch shared by the projections (as `LlamaModel` shares one).
    public static func quantized(_ a: ModelArchitecture, source: [Float], blocksize: Int = 64, doubleQuant: Bool = true,
                                 lora: LoRAConfig, seed: UInt64) throws -> LlamaLayer {
        let shared = Matmul4BitScratch()
        let projections = try a.moduleNames.map { p in
            let s = a.projectionShape(p)
            precondition(source.count >= s.out * s.in, "quantized: source holds fewer values than \(p)'s weight")
            let q = try source.withUnsafeBufferPointer {
                try quantize4Bit(.float32(UnsafeBufferPointer(rebasing: $0[0..<(s.out * s.in)])), shape: [s.out, s.in], blocksize: blocksize, doubleQuant: doubleQuant)
            }
            let l = try LoRALinear(base: try Linear4BitWeight(q), config: lora, seed: seed)
            if a.projection(p).hasBias { l.bias = [Float](repeating: 0, count: s.out) }
            l.scratch = shared
            return l
        }
        let ones = [Float](repeating: 1, count: a.hiddenSize), headOnes = a.qkNorm ? [Float](repeating: 1, count: a.headDim) : nil
        return LlamaLayer(inputNorm: ones, postAttentionNorm: ones, projections: projections, qNorm: headOnes, kNorm: headOnes)
    }

    public var o: LoRALinear { projections[isFused ? 1 : 3] }
    public var down: LoRALinear { projections[isFused ? 3 : 6] }
}

/// A Llama-style causal LM for QLoRA training (Llama, Mistral, Qwen2, Qwen3, Phi-3, and Qwen3-MoE
/// and Mixtral with a frozen `SparseMoE` block in place of the MLP: see
/// `ModelArchitecture.unsupportedForTraining`): bf16 embeddings, norms and lm_head (frozen),
/// 4-bit projections with LoRA adapters (trained), bf16 activations. Forward and backward follow
/// transformers' model classes with eager attention and PEFT's LoRA, op by op (`LlamaOps`).
public final class LlamaModel {
    public let config: ModelArchitecture
    /// [vocab, hidden], bf16 values.
    public var embedTokens: [Float]
    public let layers: [LlamaLayer]
    public let finalNorm: [Float]
    /// [vocab, hidden], bf16 values (the embedding matrix when tied).
    public var lmHead: [Float] { didSet { frozenHead = nil } }
    /// The frozen head packed for the fused loss, built on first use (and again when the kernel
    /// level changes, as tests force it to).
    private var frozenHead: HeadLoss?
    /// The head the loss runs on: a trained lm_head changes every step, so it is packed afresh.
    func headLoss() -> HeadLoss {
        if let h = frozenHead, h.usesBF16GEMM == (KernelLevel.active == .avx512bf16) { return h }
        let h = HeadLoss(weight: lmHead, vocab: config.vocabSize, hidden: config.hiddenSize)
        if !trainedModules.contains(.lmHead) { frozenHead = h }
        return h
    }
    let inverseFrequencies: [Float]

    /// Modules trained whole (PEFT's `modules_to_save`): PEFT trains a bf16 copy of each (the
    /// wrapper is no tuner layer, so `autocast_adapter_dtype` leaves it bf16), with a bf16
    /// gradient. A trained lm_head of a tied model is its own copy, as PEFT's (untied) is.
    public enum WholeModule: String, Sendable, CaseIterable {
        case lmHead = "lm_head", embedTokens = "embed_tokens"
        /// The tensor's name in the checkpoint.
        public var tensorName: String { self == .lmHead ? "lm_head.weight" : "model.embed_tokens.weight" }
    }
    public var trainedModules: Set<WholeModule> = [] {
        didSet {
            gradLMHead = trainedModules.contains(.lmHead) ? [Float](repeating: 0, count: lmHead.count) : []
            gradEmbedTokens = trainedModules.contains(.embedTokens) ? [Float](repeating: 0, count: embedTokens.count) : []
        }
    }
    /// Their accumulated gradients (bf16 values), [vocab, hidden].
    public var gradLMHead: [Float] = []
    public var gradEmbedTokens: [Float] = []

    public init(config: ModelArchitecture, embedTokens: [Float], layers: [LlamaLayer], finalNorm: [Float], lmHead: [Float]?) {
        precondition(embedTokens.count == config.vocabSize * config.hiddenSize && layers.count == config.layers)
        self.config = config
        self.embedTokens = embedTokens
        self.layers = layers
        self.finalNorm = finalNorm
        self.lmHead = lmHead ?? embedTokens
        let shared = Matmul4BitScratch()
        for l in layers { for p in l.projections { p.scratch = shared } }
        inverseFrequencies = LlamaOps.ropeInverseFrequencies(headDim: config.headDim, theta: config.ropeTheta, llama3: config.llama3RopeScaling)
    }

    /// bf16 values held in 2 bytes each, as torch holds a bf16 tensor. Both conversions are
    /// elementwise (nearest even, NaN to 0x7FC0 as `HalfPrecision`), split between threads.
    struct BF16Array {
        let bits: [UInt16]
        init(_ values: [Float]) {
            bits = [UInt16](unsafeUninitializedCapacity: values.count) { out, count in
                values.withUnsafeBufferPointer { v in
                    guard let src = v.baseAddress, let dst = out.baseAddress else { return }
                    let (pv, po) = (LlamaOps.Shared(src), LlamaOps.Shared(dst))
                    LlamaOps.parallelParts(v.count, grain: LlamaOps.elementGrain) { r in
                        qlora_f32_to_bf16_rows(pv.p + r.lowerBound, 1, Int64(r.count), Int64(r.count), po.p + r.lowerBound)
                    }
                }
                count = values.count
            }
        }
        var floats: [Float] {
            LlamaOps.written(bits.count) { po in
                bits.withUnsafeBufferPointer { b in
                    let pb = LlamaOps.Shared(b.baseAddress!)
                    LlamaOps.parallelParts(b.count, grain: LlamaOps.elementGrain) { r in
                        for i in r { po.p[i] = Float(bitPattern: UInt32(pb.p[i]) << 16) }
                    }
                }
            }
        }
        var byteCount: Int { 2 * bits.count }
    }

    /// Everything one layer's backward needs: bf16 tensors in 2 bytes, the adapters' fp32 inputs
    /// (`LoRALinear.Saved`), the norms' 1/rms in fp32. Attention probabilities are recomputed.
    struct LayerCache {
        var x: BF16Array, rstd1: [Float]
        var saved: [LoRALinear.Saved]
        /// q and k before their per-head norms, and the norms' 1/rms (Qwen3); empty otherwise.
        var qPre: BF16Array, kPre: BF16Array, qRstd: [Float], kRstd: [Float]
        var qr: BF16Array, kr: BF16Array, v: BF16Array
        var h: BF16Array, rstd2: [Float], gate: BF16Array, up: BF16Array
        /// A sparse block's routing and its experts' kept outputs.
        var experts: SparseMoE.Cache? = nil

        /// Exact bytes kept; an input buffer the adapters share is counted once.
        var byteCount: Int {
            var inputs: [UnsafeRawPointer?: Int] = [:]
            for s in saved { inputs[s.inputAddress] = 4 * s.xDropped.count }
            return x.byteCount + 4 * rstd1.count + saved.reduce(0) { $0 + $1.byteCountWithoutInput } + inputs.values.reduce(0, +)
                + qPre.byteCount + kPre.byteCount + 4 * (qRstd.count + kRstd.count)
                + qr.byteCount + kr.byteCount + v.byteCount + h.byteCount + 4 * rstd2.count + gate.byteCount + up.byteCount + (experts?.byteCount ?? 0)
        }
    }

    /// Splits rows of `x` ([tokens, Σwidths]) into one array per width.
    static func splitColumns(_ x: [Float], tokens: Int, widths: [Int]) -> [[Float]] {
        let total = widths.reduce(0, +)
        var offset = 0
        return widths.map { w in
            defer { offset += w }
            var part = [Float](repeating: 0, count: tokens * w)
            for t in 0..<tokens { for j in 0..<w { part[t * w + j] = x[t * total + offset + j] } }
            return part
        }
    }

    /// The inverse of `splitColumns`.
    static func joinColumns(_ parts: [[Float]], tokens: Int) -> [Float] {
        let widths = parts.map { $0.count / max(tokens, 1) }, total = widths.reduce(0, +)
        var x = [Float](repeating: 0, count: tokens * total)
        var offset = 0
        for (p, w) in zip(parts, widths) {
            for t in 0..<tokens { for j in 0..<w { x[t * total + offset + j] = p[t * w + j] } }
            offset += w
        }
        return x
    }

    /// What `backward` needs from `forward`.
    public struct Activations {
        public let batch: Int, seq: Int
        var caches: [LayerCache?]
        /// With checkpointing: each layer's input, recomputed from in backward.
        var layerInputs: [BF16Array]
        var finalInput: BF16Array, finalRstd: [Float]
        /// The final norm's output gradient, computed with the loss in the forward (`HeadLoss`).
        var headGradient: BF16Array
        /// The logits' bf16 gradient [tokens, vocab], kept only for a trained lm_head's weight gradient.
        var dlogits: [Float]
        /// The batch's token ids, for a trained embedding's gradient.
        var ids: [Int] = []
        /// Bytes held for backward by the decoder layers (exact count of the arrays kept).
        public var layerBytes: Int { layerInputs.reduce(0) { $0 + $1.byteCount } + caches.reduce(0) { $0 + ($1?.byteCount ?? 0) } }
        /// All bytes held for backward: the layers, the final norm's input and 1/rms, its output's
        /// gradient, and with a trained lm_head the logits' gradient (bf16 values held in fp32).
        public var byteCount: Int { layerBytes + finalInput.byteCount + 4 * finalRstd.count + headGradient.byteCount + 4 * dlogits.count }
    }

    func layerForward(_ l: LlamaLayer, _ x: [Float], batch: Int, seq: Int, cos: [Float], sin: [Float]) throws -> ([Float], LayerCache) {
        try Self.layerForward(l, x, config: config, batch: batch, seq: seq, cos: cos, sin: sin)
    }

    static func layerForward(_ l: LlamaLayer, _ x: [Float], config c: ModelArchitecture, batch: Int, seq: Int, cos: [Float], sin: [Float]) throws -> ([Float], LayerCache) {
        let t = batch * seq
        let eps = Float(c.rmsNormEps)
        // Scopes end each fp32 temporary's life as soon as its bf16 copy is kept.
        let (n1, rstd1) = LlamaOps.rmsnormForward(x, l.inputNorm, tokens: t, eps: eps)
        var saved: [LoRALinear.Saved] = []
        let att: [Float], qrB, krB, vB: BF16Array
        var qPre = BF16Array([]), kPre = BF16Array([]), qRstd: [Float] = [], kRstd: [Float] = []
        do {
            var q: [Float], k: [Float], v: [Float]
            if l.isFused {
                // Phi-3: one qkv_proj, its rows [q | k | v].
                let (qkv, s) = try l.projections[0].forward(n1, tokens: t)
                saved.append(s)
                let parts = splitColumns(qkv, tokens: t, widths: [c.queryDim, c.keyValueDim, c.keyValueDim])
                (q, k, v) = (parts[0], parts[1], parts[2])
            } else {
                let (q1, sq) = try l.projections[0].forward(n1, tokens: t)
                let (k1, sk) = try l.projections[1].forward(n1, tokens: t)
                let (v1, sv) = try l.projections[2].forward(n1, tokens: t)
                saved += [sq, sk, sv]
                (q, k, v) = (q1, k1, v1)
            }
            if let qn = l.qNorm, let kn = l.kNorm {
                // Qwen3: RMSNorm over each head's dimensions, before rope.
                (qPre, kPre) = (BF16Array(q), BF16Array(k))
                (q, qRstd) = LlamaOps.rmsnormForward(q, qn, tokens: t * c.attentionHeads, eps: eps)
                (k, kRstd) = LlamaOps.rmsnormForward(k, kn, tokens: t * c.keyValueHeads, eps: eps)
            }
            let qr = LlamaOps.ropeForward(q, heads: c.attentionHeads, headDim: c.headDim, seq: seq, cos: cos, sin: sin)
            let kr = LlamaOps.ropeForward(k, heads: c.keyValueHeads, headDim: c.headDim, seq: seq, cos: cos, sin: sin)
            att = LlamaOps.attentionForward(q: qr, k: kr, v: v, batch: batch, seq: seq, heads: c.attentionHeads, kvHeads: c.keyValueHeads, headDim: c.headDim)
            (qrB, krB, vB) = (BF16Array(qr), BF16Array(kr), BF16Array(v))
        }
        let (o, so) = try l.o.forward(att, tokens: t)
        saved.append(so)
        let h = LlamaOps.addRounded(x, o)
        let (n2, rstd2) = LlamaOps.rmsnormForward(h, l.postAttentionNorm, tokens: t, eps: eps)
        if let moe = l.experts {
            let (d, _, routed) = SparseMoE.forward(moe, n2, tokens: t)
            var cache = LayerCache(x: BF16Array(x), rstd1: rstd1, saved: saved, qPre: qPre, kPre: kPre, qRstd: qRstd, kRstd: kRstd,
                                   qr: qrB, kr: krB, v: vB, h: BF16Array(h), rstd2: rstd2, gate: BF16Array([]), up: BF16Array([]))
            cache.experts = routed
            return (LlamaOps.addRounded(h, d), cache)
        }
        let m: [Float], gB, uB: BF16Array
        do {
            let g: [Float], u: [Float]
            if l.isFused {
                // Phi-3: one gate_up_proj, its rows [gate | up].
                let (gu, s) = try l.projections[2].forward(n2, tokens: t)
                saved.append(s)
                let parts = splitColumns(gu, tokens: t, widths: [c.intermediateSize, c.intermediateSize])
                (g, u) = (parts[0], parts[1])
            } else {
                let (g1, sg) = try l.projections[4].forward(n2, tokens: t)
                let (u1, su) = try l.projections[5].forward(n2, tokens: t)
                saved += [sg, su]
                (g, u) = (g1, u1)
            }
            m = LlamaOps.swigluForward(gate: g, up: u)
            (gB, uB) = (BF16Array(g), BF16Array(u))
        }
        let (d, sd) = try l.down.forward(m, tokens: t)
        saved.append(sd)
        let out = LlamaOps.addRounded(h, d)
        return (out, LayerCache(x: BF16Array(x), rstd1: rstd1, saved: saved, qPre: qPre, kPre: kPre, qRstd: qRstd, kRstd: kRstd,
                                qr: qrB, kr: krB, v: vB, h: BF16Array(h), rstd2: rstd2, gate: gB, up: uB))
    }

    func layerBackward(_ l: LlamaLayer, _ dout: [Float], _ cache: LayerCache, batch: Int, seq: Int, cos: [Float], sin: [Float],
                       inputGradient: Bool = true) throws -> [Float] {
        try Self.layerBackward(l, dout, cache, config: config, batch: batch, seq: seq, cos: cos, sin: sin, inputGradient: inputGradient)
    }

    /// - Parameter inputGradient: false for the first layer (its input, the frozen embedding's
    ///   output, needs no gradient, and autograd computes none): q, k and v (or qkv) then give only
    ///   their adapters' gradients, and `[]` is returned.
    static func layerBackward(_ l: LlamaLayer, _ dout: [Float], _ cache: LayerCache, config c: ModelArchitecture, batch: Int, seq: Int, cos: [Float], sin: [Float],
                              inputGradient: Bool = true) throws -> [Float] {
        let t = batch * seq
        let s = cache.saved
        let dn2: [Float]
        if let moe = l.experts, let routed = cache.experts {
            dn2 = SparseMoE.backward(moe, dout, routed).dx
        } else {
            let dm = try l.down.backward(dout, saved: s[s.count - 1])
            let (dg, du) = LlamaOps.swigluBackward(dm, gate: cache.gate.bits, up: cache.up.bits)
            if l.isFused {
                dn2 = try l.projections[2].backward(joinColumns([dg, du], tokens: t), saved: s[2])
            } else {
                let dnUp = try l.projections[5].backward(du, saved: s[5]), dnGate = try l.projections[4].backward(dg, saved: s[4])
                dn2 = LlamaOps.addRounded(dnUp, dnGate)
            }
        }
        let dNorm2 = LlamaOps.rmsnormBackward(dn2, cache.h.floats, l.postAttentionNorm, rstd: cache.rstd2, tokens: t)
        let dh = LlamaOps.addRounded(dout, dNorm2)
        let datt = try l.o.backward(dh, saved: s[l.isFused ? 1 : 3])
        let (dqr, dkr, dv) = LlamaOps.attentionBackward(dout: datt, q: cache.qr.floats, k: cache.kr.floats, v: cache.v.floats, batch: batch, seq: seq,
                                                        heads: c.attentionHeads, kvHeads: c.keyValueHeads, headDim: c.headDim)
        var dq = LlamaOps.ropeBackward(dqr, heads: c.attentionHeads, headDim: c.headDim, seq: seq, cos: cos, sin: sin)
        var dk = LlamaOps.ropeBackward(dkr, heads: c.keyValueHeads, headDim: c.headDim, seq: seq, cos: cos, sin: sin)
        if let qn = l.qNorm, let kn = l.kNorm {
            dq = LlamaOps.rmsnormBackward(dq, cache.qPre.floats, qn, rstd: cache.qRstd, tokens: t * c.attentionHeads)
            dk = LlamaOps.rmsnormBackward(dk, cache.kPre.floats, kn, rstd: cache.kRstd, tokens: t * c.keyValueHeads)
        }
        let dn1: [Float]
        if l.isFused {
            dn1 = try l.projections[0].backward(joinColumns([dq, dk, dv], tokens: t), saved: s[0], inputGradient: inputGradient)
        } else {
            let dnV = try l.projections[2].backward(dv, saved: s[2], inputGradient: inputGradient)
            let dnK = try l.projections[1].backward(dk, saved: s[1], inputGradient: inputGradient)
            let dnQ = try l.projections[0].backward(dq, saved: s[0], inputGradient: inputGradient)
            dn1 = inputGradient ? LlamaOps.addRounded(dnV, dnK, dnQ) : []
        }
        guard inputGradient else { return [] }
        let dNorm1 = LlamaOps.rmsnormBackward(dn1, cache.x.floats, l.inputNorm, rstd: cache.rstd1, tokens: t)
        return LlamaOps.addRounded(dh, dNorm1)
    }

    /// Forward through the whole model and the loss (and the head's backward: `HeadLoss`).
    ///
    ///     // ids, labels: [batch, seq] -> logits: [batch·seq, vocab] (bf16 values), loss (fp32)
    /// - Parameter checkpointing: keep only each layer's input; `backward` recomputes the layer.
    /// - Parameter headChunkRows: run the head and loss this many tokens at a time and return no
    ///   logits (the same loss and gradients to the bit); nil: all tokens at once, logits returned.
    public func forward(ids: [Int], labels: [Int], batch: Int, seq: Int, checkpointing: Bool = false,
                        headChunkRows: Int? = nil) throws -> (loss: Float, logits: [Float], activations: Activations) {
        let c = config, h = c.hiddenSize, t = batch * seq
        precondition(ids.count == t && labels.count == t, "ids and labels must be [batch, seq]")
        if let bad = ids.first(where: { $0 < 0 || $0 >= c.vocabSize }) {
            throw LoRAError.shapeMismatch("token id \(bad) outside the vocabulary (\(c.vocabSize))")
        }
        // The embedding's rows, copied whole and split between threads.
        var x = LlamaOps.written(t * h) { px in embedTokens.withUnsafeBufferPointer { e in ids.withUnsafeBufferPointer { idp in
            let (pe, pi) = (LlamaOps.Shared(e.baseAddress!), LlamaOps.Shared(idp.baseAddress!))
            LlamaOps.parallelParts(t, grain: max(1, LlamaOps.elementGrain / max(h, 1))) { rows in
                for i in rows { (px.p + i * h).update(from: pe.p + pi.p[i] * h, count: h) }
            }
        } } }
        let (cos, sin) = LlamaOps.ropeTables(seq: seq, inverseFrequencies: inverseFrequencies)
        var caches: [LayerCache?] = []
        var inputs: [BF16Array] = []
        for l in layers {
            let (y, cache) = try layerForward(l, x, batch: batch, seq: seq, cos: cos, sin: sin)
            if checkpointing { inputs.append(BF16Array(x)); caches.append(nil) } else { caches.append(cache) }
            x = y
        }
        let (n, rstd) = LlamaOps.rmsnormForward(x, finalNorm, tokens: t, eps: Float(c.rmsNormEps))
        if let bad = labels.first(where: { $0 != -100 && ($0 < 0 || $0 >= c.vocabSize) }) {
            throw LoRAError.shapeMismatch("label \(bad) outside the vocabulary (\(c.vocabSize))")
        }
        let (targets, count) = HeadLoss.targets(labels: labels, batch: batch, seq: seq)
        let trainsHead = trainedModules.contains(.lmHead)
        let head = headLoss().run(normed: n, targets: targets, count: count, tokens: t, chunkRows: trainsHead ? t : headChunkRows ?? t,
                                  keepLogits: headChunkRows == nil, keepGradient: trainsHead)
        let loss = count > 0 ? Float(head.lossSum / Double(count)) : .nan
        return (loss, head.logits, Activations(batch: batch, seq: seq, caches: caches, layerInputs: inputs, finalInput: BF16Array(x), finalRstd: rstd,
                                               headGradient: BF16Array(head.dn), dlogits: head.dlogits, ids: trainedModules.contains(.embedTokens) ? ids : []))
    }

    /// Backward from the loss: adds every LoRA gradient into the layers' `gradA` / `gradB`.
    public func backward(_ a: Activations) throws {
        let c = config, t = a.batch * a.seq
        let (cos, sin) = LlamaOps.ropeTables(seq: a.seq, inverseFrequencies: inverseFrequencies)
        let dn = a.headGradient.floats
        if trainedModules.contains(.lmHead) {
            // lm_head's bf16 weight gradient, dlogitsᵀ · normed: [vocab, hidden], added to .grad in bf16.
            let (n, _) = LlamaOps.rmsnormForward(a.finalInput.floats, finalNorm, tokens: t, eps: Float(c.rmsNormEps))
            let g = LlamaOps.linearBackwardWeight(a.dlogits, n, tokens: t, inFeatures: c.hiddenSize, outFeatures: c.vocabSize)
            for i in g.indices { gradLMHead[i] = HalfPrecision.roundedToBFloat16(gradLMHead[i] + g[i]) }
        }
        var dx = LlamaOps.rmsnormBackward(dn, a.finalInput.floats, finalNorm, rstd: a.finalRstd, tokens: t)
        let embedding = trainedModules.contains(.embedTokens)
        for i in layers.indices.reversed() {
            let cache: LayerCache
            if let kept = a.caches[i] { cache = kept } else {
                cache = try layerForward(layers[i], a.layerInputs[i].floats, batch: a.batch, seq: a.seq, cos: cos, sin: sin).1
            }
            dx = try layerBackward(layers[i], dx, cache, batch: a.batch, seq: a.seq, cos: cos, sin: sin, inputGradient: i > 0 || embedding)
        }
        if embedding {
            // The embedding's bf16 gradient: each token's row of dx added into its id's row, one
            // after another, each sum rounded to bf16 (torch's CPU embedding backward on bf16).
            let h = c.hiddenSize
            for (k, id) in a.ids.enumerated() {
                for j in 0..<h { gradEmbedTokens[id * h + j] = HalfPrecision.roundedToBFloat16(gradEmbedTokens[id * h + j] + dx[k * h + j]) }
            }
        }
    }

    /// Every trainable adapter, with its module path.
    public var adapters: [(path: String, layer: LoRALinear)] {
        layers.enumerated().flatMap { l, layer in zip(config.projections(layer: l), layer.projections).map { ($0.modulePath(layer: l), $1) } }
    }

    public func zeroGrad() {
        for a in adapters { a.layer.zeroGrad() }
        for i in gradLMHead.indices { gradLMHead[i] = 0 }
        for i in gradEmbedTokens.indices { gradEmbedTokens[i] = 0 }
    }

    /// One decoder layer's training step on its own (forward, backward from `dout`), for
    /// measuring: returns dx and the bytes the forward kept for backward (`afterForward` runs
    /// while they are held). `layerForwardKeeping` measures the checkpointed forward.
    ///
    ///     // x, dout: [batch·seq, hidden] -> dx: [batch·seq, hidden]
    public static func layerStep(_ l: LlamaLayer, config: ModelArchitecture, x: [Float], dout: [Float], batch: Int, seq: Int,
                                 afterForward: ((Int) -> Void)? = nil) throws -> (dx: [Float], keptBytes: Int) {
        let inv = LlamaOps.ropeInverseFrequencies(headDim: config.headDim, theta: config.ropeTheta, llama3: config.llama3RopeScaling)
        let (cos, sin) = LlamaOps.ropeTables(seq: seq, inverseFrequencies: inv)
        let (_, cache) = try layerForward(l, x, config: config, batch: batch, seq: seq, cos: cos, sin: sin)
        afterForward?(cache.byteCount)
        return (try layerBackward(l, dout, cache, config: config, batch: batch, seq: seq, cos: cos, sin: sin), cache.byteCount)
    }

    /// One decoder layer's forward on its own, returning the bytes it keeps for backward: the
    /// whole cache, or with `checkpointing` only the layer's bf16 input (the cache is dropped;
    /// backward would recompute it). `whileKept` runs while those bytes are held.
    public static func layerForwardKeeping(_ l: LlamaLayer, config: ModelArchitecture, x: [Float], batch: Int, seq: Int, checkpointing: Bool,
                                           beforeForward: () -> Void = {}, whileKept: (Int) -> Void) throws {
        let inv = LlamaOps.ropeInverseFrequencies(headDim: config.headDim, theta: config.ropeTheta, llama3: config.llama3RopeScaling)
        let (cos, sin) = LlamaOps.ropeTables(seq: seq, inverseFrequencies: inv)
        beforeForward()
        if checkpointing {
            let input = BF16Array(x)
            _ = try layerForward(l, x, config: config, batch: batch, seq: seq, cos: cos, sin: sin)
            whileKept(input.byteCount)
            withExtendedLifetime(input) {}
        } else {
            let (_, cache) = try layerForward(l, x, config: config, batch: batch, seq: seq, cos: cos, sin: sin)
            whileKept(cache.byteCount)
            withExtendedLifetime(cache) {}
        }
    }
}
