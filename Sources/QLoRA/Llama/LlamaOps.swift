import COpenBLAS
import Foundation

/// The ops of a Llama decoder, each a forward/backward pair on flat row-major fp32 arrays that
/// hold bf16 values: every op rounds its output to bf16 where transformers' bf16 tensors are
/// rounded (intermediate math in fp32, as torch's CPU kernels do). T is tokens (batch × seq).
///
/// Each op's scalar `…Reference` here defines the answer; the decoder calls the fast kernels of
/// the same name without the suffix (LlamaKernels.swift: OpenBLAS attention threaded over
/// (batch, head), vectorized elementwise ops threaded over tokens), held to these references by
/// LlamaKernelsTests: bit-identical except attention, whose GEMM sums run in another order.
///
/// Speed (llama-2-7b layer shapes, one decoder layer step forward + backward, `qlora memory
/// --measure`, 2-core AMD EPYC): 132 -> 363 tokens/s at 512 tokens, 31 -> 334 tokens/s at 2048
/// (the scalar attention, quadratic in the sequence, was most of the step at 2048).
public enum LlamaOps {
    @inline(__always) static func bf16(_ x: Float) -> Float { HalfPrecision.roundedToBFloat16(x) }

    // MARK: RMSNorm (HF LlamaRMSNorm: fp32 math, weight * bf16(normalized))

    /// x: [T, h], w: [h] -> y: [T, h]; saves rstd: [T] (1/sqrt(mean(x²) + eps), fp32).
    public static func rmsnormForwardReference(_ x: [Float], _ w: [Float], tokens: Int, eps: Float) -> (y: [Float], rstd: [Float]) {
        let h = w.count
        var y = [Float](repeating: 0, count: x.count), rstd = [Float](repeating: 0, count: tokens)
        for t in 0..<tokens {
            var ss: Float = 0
            for i in 0..<h { ss += x[t * h + i] * x[t * h + i] }
            let r = 1 / (ss / Float(h) + eps).squareRoot()
            rstd[t] = r
            for i in 0..<h { y[t * h + i] = bf16(w[i] * bf16(x[t * h + i] * r)) }
        }
        return (y, rstd)
    }

    /// dy: [T, h] -> dx: [T, h] (the weight is frozen).
    public static func rmsnormBackwardReference(_ dy: [Float], _ x: [Float], _ w: [Float], rstd: [Float], tokens: Int) -> [Float] {
        let h = w.count
        var dx = [Float](repeating: 0, count: x.count)
        for t in 0..<tokens {
            let r = rstd[t]
            var dot: Float = 0
            var g = [Float](repeating: 0, count: h)
            for i in 0..<h {
                g[i] = bf16(dy[t * h + i] * w[i])  // d(bf16 normalized), cast to fp32
                dot += g[i] * x[t * h + i]
            }
            // xn = x·r, r = (mean(x²)+eps)^-1/2: dx = g·r + x · (-0.5 · dot · r³) · 2/h
            let c = -0.5 * dot * r * r * r * 2 / Float(h)
            for i in 0..<h { dx[t * h + i] = bf16(g[i] * r + x[t * h + i] * c) }
        }
        return dx
    }

    // MARK: Rotary embeddings

    /// Inverse frequencies [headDim/2] (fp32), with Llama-3 scaling when given.
    public static func ropeInverseFrequencies(headDim d: Int, theta: Double, llama3: ModelArchitecture.Llama3RopeScaling?) -> [Float] {
        var inv = (0..<(d / 2)).map { i -> Float in 1 / Float(pow(theta, Double(Float(2 * i) / Float(d)))) }
        guard let s = llama3 else { return inv }
        let lowWavelen = Float(s.originalMaxPositions) / Float(s.lowFreqFactor)
        let highWavelen = Float(s.originalMaxPositions) / Float(s.highFreqFactor)
        // transformers' `2 * math.pi / inv_freq`: torch rounds Python's 2π to the nearest fp32.
        // (Swift's Float.pi is rounded toward zero, one ulp lower, which moved the medium
        // frequencies by up to 2 ulps.)
        let twoPi = Float(2 * Double.pi)
        for i in inv.indices {
            let f = inv[i]
            let wavelen = twoPi / f
            var v = wavelen > lowWavelen ? f / Float(s.factor) : f
            let smooth = (Float(s.originalMaxPositions) / wavelen - Float(s.lowFreqFactor)) / (Float(s.highFreqFactor) - Float(s.lowFreqFactor))
            let medium = !(wavelen < highWavelen) && !(wavelen > lowWavelen)
            if medium { v = (1 - smooth) * v / Float(s.factor) + smooth * v }
            inv[i] = v
        }
        return inv
    }

    /// cos and sin tables [seq, headDim] as bf16 values (HF: cat(freqs, freqs), computed in fp32).
    public static func ropeTables(seq: Int, inverseFrequencies inv: [Float]) -> (cos: [Float], sin: [Float]) {
        let half = inv.count, d = 2 * half
        var c = [Float](repeating: 0, count: seq * d), s = c
        for p in 0..<seq {
            for i in 0..<d {
                let a = Float(p) * inv[i % half]
                c[p * d + i] = bf16(Foundation.cos(a))
                s[p * d + i] = bf16(Foundation.sin(a))
            }
        }
        return (c, s)
    }

    /// x: [T, heads·d] (token t at position t % seq) -> bf16(bf16(x·cos) + bf16(rotate_half(x)·sin)).
    public static func ropeForwardReference(_ x: [Float], heads: Int, headDim d: Int, seq: Int, cos: [Float], sin: [Float]) -> [Float] {
        var y = x
        let half = d / 2, tokens = x.count / (heads * d)
        for t in 0..<tokens {
            let p = t % seq
            for hh in 0..<heads {
                let o = (t * heads + hh) * d
                for i in 0..<d {
                    let rot = i < half ? -x[o + i + half] : x[o + i - half]
                    y[o + i] = bf16(bf16(x[o + i] * cos[p * d + i]) + bf16(rot * sin[p * d + i]))
                }
            }
        }
        return y
    }

    public static func ropeBackwardReference(_ dy: [Float], heads: Int, headDim d: Int, seq: Int, cos: [Float], sin: [Float]) -> [Float] {
        var dx = dy
        let half = d / 2, tokens = dy.count / (heads * d)
        for t in 0..<tokens {
            let p = t % seq
            for hh in 0..<heads {
                let o = (t * heads + hh) * d
                for i in 0..<d {
                    let direct = bf16(dy[o + i] * cos[p * d + i])
                    // rotate_half(x)[j] = -x[j+half] (j < half), x[j-half] (j ≥ half)
                    let viaRot = i < half ? bf16(dy[o + i + half] * sin[p * d + i + half]) : -bf16(dy[o + i - half] * sin[p * d + i - half])
                    dx[o + i] = bf16(direct + viaRot)
                }
            }
        }
        return dx
    }

    // MARK: Causal grouped-query attention (HF eager attention)

    /// One query row's softmax probabilities over keys 0...i, as the forward computes them:
    /// scores bf16(bf16(q·k) · 1/√d), fp32 softmax. Returns (max, sum) and fills `row`.
    @inline(__always)
    static func attentionRow(q: [Float], k: [Float], qo: Int, b: Int, i: Int, kh: Int, seq: Int, kvHeads: Int, d: Int,
                             scale: Float, row: inout [Float]) -> (mx: Float, sum: Float) {
        var mx = -Float.infinity
        for j in 0...i {
            let ko = ((b * seq + j) * kvHeads + kh) * d
            var s: Float = 0
            for e in 0..<d { s += q[qo + e] * k[ko + e] }
            row[j] = bf16(bf16(s) * scale)
            mx = max(mx, row[j])
        }
        var sum: Float = 0
        for j in 0...i { row[j] = Foundation.exp(row[j] - mx); sum += row[j] }
        for j in 0...i { row[j] = row[j] / sum }
        return (mx, sum)
    }

    /// q: [T, H·d], k, v: [T, KV·d] -> out: [T, H·d], as HF's eager attention (causal, grouped
    /// keys/values). Nothing of size seq² is kept: backward recomputes each row's probabilities
    /// from q and k with the same operations (the same bits), as flash attention does.
    public static func attentionForwardReference(q: [Float], k: [Float], v: [Float], batch: Int, seq: Int, heads: Int, kvHeads: Int,
                                        headDim d: Int) -> [Float] {
        let rep = heads / kvHeads, scale = 1 / Float(d).squareRoot()
        var out = [Float](repeating: 0, count: batch * seq * heads * d)
        var row = [Float](repeating: 0, count: seq)
        for b in 0..<batch {
            for hh in 0..<heads {
                let kh = hh / rep
                for i in 0..<seq {
                    let qo = ((b * seq + i) * heads + hh) * d
                    _ = attentionRow(q: q, k: k, qo: qo, b: b, i: i, kh: kh, seq: seq, kvHeads: kvHeads, d: d, scale: scale, row: &row)
                    for e in 0..<d {
                        var acc: Float = 0
                        for j in 0...i { acc += bf16(row[j]) * v[((b * seq + j) * kvHeads + kh) * d + e] }
                        out[qo + e] = bf16(acc)
                    }
                }
            }
        }
        return out
    }

    /// dout: [T, H·d] -> dq: [T, H·d], dk, dv: [T, KV·d].
    public static func attentionBackwardReference(dout: [Float], q: [Float], k: [Float], v: [Float], batch: Int, seq: Int,
                                         heads: Int, kvHeads: Int, headDim d: Int) -> (dq: [Float], dk: [Float], dv: [Float]) {
        let rep = heads / kvHeads, scale = 1 / Float(d).squareRoot()
        var dq = [Float](repeating: 0, count: q.count)
        // Per query head, then summed over the heads sharing a key/value head (repeat_kv's backward).
        var dkHead = [Float](repeating: 0, count: batch * seq * heads * d), dvHead = dkHead
        var dp = [Float](repeating: 0, count: seq), probs = dp
        for b in 0..<batch {
            for hh in 0..<heads {
                let kh = hh / rep
                for i in 0..<seq {
                    let qo = ((b * seq + i) * heads + hh) * d
                    _ = attentionRow(q: q, k: k, qo: qo, b: b, i: i, kh: kh, seq: seq, kvHeads: kvHeads, d: d, scale: scale, row: &probs)
                    var dot: Float = 0
                    for j in 0...i {
                        var s: Float = 0
                        for e in 0..<d { s += dout[qo + e] * v[((b * seq + j) * kvHeads + kh) * d + e] }
                        dp[j] = bf16(s)
                        dot += dp[j] * probs[j]
                    }
                    for j in 0...i {
                        let ds = bf16(probs[j] * (dp[j] - dot)) * scale  // softmax backward in fp32, cast to bf16; × 2^-k exact
                        let ko = ((b * seq + j) * kvHeads + kh) * d
                        let jo = ((b * seq + j) * heads + hh) * d
                        let pb = bf16(probs[j])
                        for e in 0..<d {
                            dq[qo + e] += ds * k[ko + e]
                            dkHead[jo + e] += ds * q[qo + e]
                            dvHead[jo + e] += pb * dout[qo + e]
                        }
                    }
                }
            }
        }
        for i in dq.indices { dq[i] = bf16(dq[i]) }
        var dk = [Float](repeating: 0, count: k.count), dv = dk
        for t in 0..<(batch * seq) {
            for kh in 0..<kvHeads {
                for e in 0..<d {
                    var sk: Float = 0, sv: Float = 0
                    for r in 0..<rep {
                        let o = (t * heads + kh * rep + r) * d + e
                        sk += bf16(dkHead[o])
                        sv += bf16(dvHead[o])
                    }
                    dk[(t * kvHeads + kh) * d + e] = bf16(sk)
                    dv[(t * kvHeads + kh) * d + e] = bf16(sv)
                }
            }
        }
        return (dq, dk, dv)
    }

    // MARK: SwiGLU

    /// gate, up: [T, i] -> bf16(bf16(silu(gate)) · up).
    public static func swigluForwardReference(gate: [Float], up: [Float]) -> [Float] {
        (0..<gate.count).map { i in bf16(bf16(gate[i] / (1 + Foundation.exp(-gate[i]))) * up[i]) }
    }

    /// gate and up as kept: bf16 bit patterns.
    public static func swigluBackwardReference(_ dy: [Float], gate gateBits: [UInt16], up upBits: [UInt16]) -> (dgate: [Float], dup: [Float]) {
        var dg = [Float](repeating: 0, count: gateBits.count), du = dg
        for i in gateBits.indices {
            let gate = HalfPrecision.float(bfloat16Bits: gateBits[i]), up = HalfPrecision.float(bfloat16Bits: upBits[i])
            let sg = 1 / (1 + Foundation.exp(-gate))
            let a = bf16(gate / (1 + Foundation.exp(-gate)))
            du[i] = bf16(dy[i] * a)
            let da = bf16(dy[i] * up)
            dg[i] = bf16(da * sg * (1 + gate * (1 - sg)))
        }
        return (dg, du)
    }

    // MARK: Dense bf16 matmul (embeddings, lm_head) and cross-entropy

    /// x: [T, in], w: [out, in] -> bf16(x · wᵀ): [T, out] (fp32 accumulation).
    public static func linearForward(_ x: [Float], _ w: [Float], tokens: Int, inFeatures k: Int, outFeatures n: Int) -> [Float] {
        w.withUnsafeBufferPointer { linearForward(x, $0.baseAddress!, tokens: tokens, inFeatures: k, outFeatures: n) }
    }

    /// The same on a weight in place (one expert's slice of a stacked [experts, out, in] weight).
    static func linearForward(_ x: [Float], _ w: UnsafePointer<Float>, tokens: Int, inFeatures k: Int, outFeatures n: Int) -> [Float] {
        var y = [Float](repeating: 0, count: tokens * n)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(tokens), Int32(n), Int32(k), 1, x, Int32(k), w, Int32(k), 0, &y, Int32(n))
        return y.map(bf16)
    }

    /// The bf16 weight gradient of `y = x · wᵀ`: dyᵀ [out, T] · x [T, in] -> [out, in], the fp32
    /// sum rounded to bf16 once (torch's bf16 matmul on CPU accumulates in fp32).
    public static func linearBackwardWeight(_ dy: [Float], _ x: [Float], tokens: Int, inFeatures k: Int, outFeatures n: Int) -> [Float] {
        var dw = [Float](repeating: 0, count: n * k)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(n), Int32(k), Int32(tokens), 1, dy, Int32(n), x, Int32(k), 0, &dw, Int32(k))
        return dw.map(bf16)
    }

    /// dy: [T, out] -> bf16(dy · w): [T, in].
    public static func linearBackwardInput(_ dy: [Float], _ w: [Float], tokens: Int, inFeatures k: Int, outFeatures n: Int) -> [Float] {
        w.withUnsafeBufferPointer { linearBackwardInput(dy, $0.baseAddress!, tokens: tokens, inFeatures: k, outFeatures: n) }
    }

    /// The same on a weight in place.
    static func linearBackwardInput(_ dy: [Float], _ w: UnsafePointer<Float>, tokens: Int, inFeatures k: Int, outFeatures n: Int) -> [Float] {
        var dx = [Float](repeating: 0, count: tokens * k)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(tokens), Int32(k), Int32(n), 1, dy, Int32(n), w, Int32(k), 0, &dx, Int32(k))
        return dx.map(bf16)
    }

    /// transformers' causal-LM loss: logits [B·S, V] upcast to fp32, labels shifted left by one
    /// within each sequence, ignore index -100, mean over the counted positions. Returns the loss
    /// (Float64 sum, fp32 result), dlogits as bf16 values (the gradient of the fp32 upcast), and
    /// the count.
    public static func crossEntropy(logits: [Float], labels: [Int], batch: Int, seq: Int, vocab: Int,
                                    ignoreIndex: Int = -100) -> (loss: Float, dlogits: [Float], count: Int) {
        var targets = [Int](repeating: ignoreIndex, count: batch * seq)
        for b in 0..<batch { for s in 0..<(seq - 1) { targets[b * seq + s] = labels[b * seq + s + 1] } }
        let count = targets.filter { $0 != ignoreIndex }.count
        var dl = [Float](repeating: 0, count: logits.count)
        var total = 0.0
        guard count > 0 else { return (.nan, dl, 0) }
        for t in 0..<(batch * seq) where targets[t] != ignoreIndex {
            let o = t * vocab
            var mx = -Float.infinity
            for v in 0..<vocab { mx = max(mx, logits[o + v]) }
            var sum: Float = 0
            for v in 0..<vocab { sum += Foundation.exp(logits[o + v] - mx) }
            let lse = mx + Foundation.log(sum)
            total += Double(lse - logits[o + targets[t]])
            for v in 0..<vocab {
                let p = Foundation.exp(logits[o + v] - lse)
                dl[o + v] = bf16((p - (v == targets[t] ? 1 : 0)) / Float(count))
            }
        }
        return (Float(total / Double(count)), dl, count)
    }
}
