/// torch.optim.AdamW hyper-parameters, with torch's defaults.
public struct AdamWConfig: Sendable, Equatable, Codable {
    public var lr: Double = 1e-3
    public var beta1: Double = 0.9
    public var beta2: Double = 0.999
    public var eps: Double = 1e-8
    public var weightDecay: Double = 1e-2
    public init(lr: Double = 1e-3, beta1: Double = 0.9, beta2: Double = 0.999, eps: Double = 1e-8, weightDecay: Double = 1e-2) {
        (self.lr, self.beta1, self.beta2, self.eps, self.weightDecay) = (lr, beta1, beta2, eps, weightDecay)
    }
}

/// One parameter tensor's AdamW state: the step count and the fp32 moments.
public struct AdamWState: Sendable, Equatable {
    /// Steps taken (torch's `state["step"]`), 0 before the first.
    public var step: Int = 0
    /// First moment (`exp_avg`).
    public var expAvg: [Float]
    /// Second moment (`exp_avg_sq`).
    public var expAvgSq: [Float]

    public init(count: Int) {
        expAvg = [Float](repeating: 0, count: count)
        expAvgSq = [Float](repeating: 0, count: count)
    }
}

/// AdamW exactly as torch's single-tensor CPU path (`torch/optim/adam.py`,
/// `_single_tensor_adam` with decoupled weight decay), https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html.
/// Tensors are fp32; scalars are computed in Double as Python does and rounded to fp32 where
/// torch passes them to a kernel.
public enum AdamW {
    public static func step(param: UnsafeMutableBufferPointer<Float>, grad: UnsafeBufferPointer<Float>,
                            state: inout AdamWState, config c: AdamWConfig) {
        precondition(param.count == grad.count && state.expAvg.count == param.count, "AdamW: sizes differ")
        state.step += 1
        let t = Double(state.step)
        // param.mul_(1 - lr * weight_decay)
        let decay = Float(1 - c.lr * c.weightDecay)
        // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let w1 = Float(1 - c.beta1), b2 = Float(c.beta2), w2 = Float(1 - c.beta2)
        // bias corrections and step size in Python floats (double)
        let bc1 = 1 - pow(c.beta1, t), bc2 = 1 - pow(c.beta2, t)
        let stepSize = c.lr / bc1
        let bc2Sqrt = Float(bc2.squareRoot())
        let eps = Float(c.eps), negStep = Float(-stepSize)
        guard let pBase = param.baseAddress, let gBase = grad.baseAddress else { return }
        state.expAvg.withUnsafeMutableBufferPointer { mb in
            state.expAvgSq.withUnsafeMutableBufferPointer { vb in
                // Elementwise, so split between threads with the same bits.
                let (pp, pg, pm, pv) = (LlamaOps.Shared(pBase), LlamaOps.Shared(gBase), LlamaOps.Shared(mb.baseAddress!), LlamaOps.Shared(vb.baseAddress!))
                LlamaOps.parallelParts(param.count, grain: LlamaOps.elementGrain) { range in
                    let (param, grad, m, v) = (pp.p, pg.p, pm.p, pv.p)
                    for i in range {
                        let g = grad[i]
                        param[i] = param[i] * decay
                        // torch's vectorized lerp for weight < 0.5: fmadd(weight, end - self, self)
                        m[i] = lerp(m[i], g, w1)
                        v[i] = v[i] * b2
                        // addcmul_(grad, grad, value): self + (value * t1) * t2 with one fused
                        // multiply-add, as torch's CPU kernel computes it (vectors: the unfused form
                        // differs in the last bit on ~20% of elements)
                        v[i] = v[i].addingProduct(w2 * g, g)
                        // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                        let denom = v[i].squareRoot() / bc2Sqrt + eps
                        // param.addcdiv_(exp_avg, denom, value=-step_size): self + value * t1 / t2
                        param[i] = param[i] + negStep * m[i] / denom
                    }
                }
            }
        }
    }

    /// `torch.lerp(start, end, weight)` on CPU for |weight| < 0.5, as its vectorized kernel
    /// computes it: one fused multiply-add.
    @inline(__always)
    static func lerp(_ start: Float, _ end: Float, _ weight: Float) -> Float {
        if abs(weight) < 0.5 { return start.addingProduct(weight, end - start) }
        return end - (end - start) * (1 - weight)
    }

    /// The same step on a bf16 parameter with bf16 moments (a trained `modules_to_save` copy):
    /// torch's single-tensor path runs each tensor op in fp32 and rounds its result to bf16, so
    /// the parameter, both moments and every intermediate (the decayed parameter, √v, √v/√bc₂,
    /// the denominator) are bf16 values.
    public static func stepBF16(param: inout [Float], grad: [Float], state: inout AdamWState, config c: AdamWConfig) {
        precondition(param.count == grad.count && state.expAvg.count == param.count, "AdamW: sizes differ")
        let r = HalfPrecision.roundedToBFloat16
        state.step += 1
        let t = Double(state.step)
        let decay = Float(1 - c.lr * c.weightDecay)
        let w1 = Float(1 - c.beta1), b2 = Float(c.beta2), w2 = Float(1 - c.beta2)
        let bc1 = 1 - pow(c.beta1, t), bc2 = 1 - pow(c.beta2, t)
        let bc2Sqrt = Float(bc2.squareRoot()), eps = Float(c.eps), negStep = Float(-(c.lr / bc1))
        for i in param.indices {
            let g = grad[i]
            param[i] = r(param[i] * decay)
            state.expAvg[i] = r(lerp(state.expAvg[i], g, w1))
            state.expAvgSq[i] = r(state.expAvgSq[i] * b2)
            state.expAvgSq[i] = r(state.expAvgSq[i].addingProduct(w2 * g, g))
            let denom = r(r(r(state.expAvgSq[i].squareRoot()) / bc2Sqrt) + eps)
            param[i] = r(param[i] + negStep * state.expAvg[i] / denom)
        }
    }

    public static func step(param: inout [Float], grad: [Float], state: inout AdamWState, config: AdamWConfig) {
        param.withUnsafeMutableBufferPointer { p in grad.withUnsafeBufferPointer { g in step(param: p, grad: g, state: &state, config: config) } }
    }
}

#if canImport(Glibc)
import Glibc
#endif
