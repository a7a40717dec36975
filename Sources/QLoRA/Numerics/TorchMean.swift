/// `torch.Tensor.mean()` of a contiguous fp32 tensor on CPU, to the bit.
///
/// bitsandbytes' double quantization stores `offset = absmax.mean()`, and torch's fp32 sum is
/// not a sequential sum: `cascade_sum` in aten/src/ATen/native/cpu/SumKernel.cpp adds 8-lane
/// vectors through four levels of partial sums, and above 32,768 elements
/// (`at::internal::GRAIN_SIZE`) each thread sums its own contiguous chunk and the chunk sums
/// are added at the end. The result therefore depends on torch's thread count; `threads`
/// selects which torch this reproduces (1 = `torch.set_num_threads(1)`, this project's
/// reference). The mean is then `sum / n` as one fp32 division.
public enum TorchMean {
    public static func mean(_ x: UnsafeBufferPointer<Float>, threads: Int = 1) -> Float {
        let n = x.count
        guard n > 0 else { return .nan }
        return sum(x, threads: threads) / Float(n)
    }

    public static func mean(_ x: [Float], threads: Int = 1) -> Float {
        x.withUnsafeBufferPointer { mean($0, threads: threads) }
    }

    static let grainSize = 32768

    /// torch's full-reduction fp32 sum (`TensorIterator::parallel_reduce`, two-pass).
    public static func sum(_ x: UnsafeBufferPointer<Float>, threads: Int = 1) -> Float {
        let n = x.count
        if n < grainSize || threads <= 1 {
            return 0 + rowSum(x)
        }
        // at::parallel_for: min(threads, ceil(n / grain)) chunks of ceil(n / chunks) elements.
        let chunks = min(threads, (n + grainSize - 1) / grainSize)
        let chunk = (n + chunks - 1) / chunks
        var partial = [Float](repeating: 0, count: threads)
        var begin = 0, t = 0
        while begin < n {
            let end = min(n, begin + chunk)
            partial[t] = 0 + rowSum(UnsafeBufferPointer(rebasing: x[begin..<end]))
            begin = end
            t += 1
        }
        return partial.withUnsafeBufferPointer { 0 + rowSum($0) }
    }

    /// One thread's contribution: the vectorized inner sum when there is at least one full
    /// 8-lane vector, else the scalar `row_sum`.
    static func rowSum(_ x: UnsafeBufferPointer<Float>) -> Float {
        x.count >= 8 ? vectorizedInnerSum(x) : scalarRowSum(x)
    }

    /// `row_sum<float>` with ilp_factor 4 over scalars.
    static func scalarRowSum(_ x: UnsafeBufferPointer<Float>) -> Float {
        let n = x.count, sizeILP = n / 4
        var p = multiRowSum(count: sizeILP, rows: 4) { i, k in SIMD8<Float>(repeating: x[i * 4 + k]) }
        for i in (sizeILP * 4)..<n { p[0] += SIMD8(repeating: x[i]) }
        for k in 1..<4 { p[0] += p[k] }
        return p[0][0]
    }

    /// `vectorized_inner_sum` with `Vectorized<float>` of 8 lanes.
    static func vectorizedInnerSum(_ x: UnsafeBufferPointer<Float>) -> Float {
        innerSum(x, step: 8) { i in SIMD8(UnsafeBufferPointer(rebasing: x[(i * 8)..<(i * 8 + 8)])) }
    }

    /// The inner sum of a bf16 row (SumKernel's `InnerSumCastLoadPolicy<Vectorized<BFloat16>,
    /// Vectorized<float>>`): 16 bf16 values per step, loaded as the 8 fp32 lanes x[16i + l] +
    /// x[16i + 8 + l], through the same cascade. The caller rounds the result to bf16 once. `x`
    /// holds bf16 values.
    static func bf16RowSum(_ x: UnsafeBufferPointer<Float>) -> Float {
        guard x.count >= 16 else { return scalarRowSum(x) }
        return innerSum(x, step: 16) { i in
            SIMD8(UnsafeBufferPointer(rebasing: x[(i * 16)..<(i * 16 + 8)])) + SIMD8(UnsafeBufferPointer(rebasing: x[(i * 16 + 8)..<(i * 16 + 16)]))
        }
    }

    /// `vectorized_inner_sum`'s shape: `n / step` vectors through `multi_row_sum` four at a time
    /// and the rest into the first, folded; the tail's scalars first, then the 8 lanes in order.
    static func innerSum(_ x: UnsafeBufferPointer<Float>, step: Int, vec: (Int) -> SIMD8<Float>) -> Float {
        let n = x.count, vecCount = n / step
        let sizeILP = vecCount / 4
        var p = multiRowSum(count: sizeILP, rows: 4) { i, k in vec(i * 4 + k) }
        for i in (sizeILP * 4)..<vecCount { p[0] += vec(i) }
        for k in 1..<4 { p[0] += p[k] }
        var acc: Float = 0
        for k in (vecCount * step)..<n { acc += x[k] }
        for lane in 0..<8 { acc += p[0][lane] }
        return acc
    }

    /// `multi_row_sum`: four levels of accumulators; level j is folded into j+1 every
    /// 2^(j * levelPower) steps.
    static func multiRowSum(count size: Int, rows: Int, load: (Int, Int) -> SIMD8<Float>) -> [SIMD8<Float>] {
        let levels = 4
        let levelPower = max(4, ceilLog2(size) / levels)
        let levelStep = 1 << levelPower
        let levelMask = levelStep - 1
        var acc = [[SIMD8<Float>]](repeating: [SIMD8<Float>](repeating: .zero, count: rows), count: levels)
        var i = 0
        while i + levelStep <= size {
            for _ in 0..<levelStep {
                for k in 0..<rows { acc[0][k] += load(i, k) }
                i += 1
            }
            for j in 1..<levels {
                for k in 0..<rows {
                    acc[j][k] += acc[j - 1][k]
                    acc[j - 1][k] = .zero
                }
                if i & (levelMask << (j * levelPower)) != 0 { break }
            }
        }
        while i < size {
            for k in 0..<rows { acc[0][k] += load(i, k) }
            i += 1
        }
        for j in 1..<levels {
            for k in 0..<rows { acc[0][k] += acc[j][k] }
        }
        return acc[0]
    }

    static func ceilLog2(_ x: Int) -> Int {
        x <= 2 ? 1 : (Int.bitWidth - (x - 1).leadingZeroBitCount)
    }
}
