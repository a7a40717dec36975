/// `torch.nn.utils.clip_grad_norm_` (L2): scales every gradient by
/// min(1, max_norm / (total_norm + 1e-6)), total_norm = ‖(‖g₁‖, ‖g₂‖, …)‖₂.
///
/// The norms are accumulated in Float64 and rounded once (torch sums fp32 in its own order, so
/// the total may differ from torch's in the last bit; the scaled gradients then differ by at most
/// one fp32 rounding of the coefficient). Non-finite gradients are refused instead of spreading
/// NaN through every parameter (torch's default `error_if_nonfinite=False` would): the caller
/// skips the step, as torch's GradScaler does.
public enum GradientClipping {
    public struct NonFiniteGradient: Error, CustomStringConvertible {
        /// Index of the first gradient tensor holding a NaN or infinity.
        public let tensor: Int
        public var description: String { "gradient \(tensor) is not finite; skip this step (as torch's GradScaler does)" }
    }

    /// Clips in place and returns the total norm before clipping.
    @discardableResult
    public static func clipGradNorm(_ grads: [UnsafeMutableBufferPointer<Float>], maxNorm: Double) throws(NonFiniteGradient) -> Float {
        let (total, coef) = try coefficient(grads.map { g in g.reduce(0.0) { $0 + Double($1) * Double($1) } }, maxNorm: maxNorm)
        if coef < 1 { for g in grads { for i in g.indices { g[i] *= coef } } }
        return total
    }

    /// The same on arrays.
    @discardableResult
    public static func clipGradNorm(_ grads: inout [[Float]], maxNorm: Double) throws(NonFiniteGradient) -> Float {
        let (total, coef) = try coefficient(grads.map { g in g.reduce(0.0) { $0 + Double($1) * Double($1) } }, maxNorm: maxNorm)
        if coef < 1 { for t in grads.indices { for i in grads[t].indices { grads[t][i] *= coef } } }
        return total
    }

    /// total = ‖(‖g₁‖, …)‖₂ with each tensor norm rounded to fp32 as torch's per-tensor norms are;
    /// coefficient = min(1, max_norm / (total + 1e-6)) in fp32.
    static func coefficient(_ sumsOfSquares: [Double], maxNorm: Double) throws(NonFiniteGradient) -> (Float, Float) {
        var sum = 0.0
        for (t, s) in sumsOfSquares.enumerated() {
            guard s.isFinite else { throw NonFiniteGradient(tensor: t) }
            let norm = Double(Float(s.squareRoot()))
            sum += norm * norm
        }
        let total = Float(sum.squareRoot())
        return (total, min(Float(maxNorm) / (total + Float(1e-6)), 1))
    }
}
