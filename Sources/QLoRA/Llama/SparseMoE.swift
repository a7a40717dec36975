import Foundation

/// One sparse mixture-of-experts block (Qwen3-MoE's `Qwen3MoeSparseMoeBlock`, Mixtral's
/// `MixtralSparseMoeBlock`) as transformers 5.23 runs it on CPU with torch 2.15, forward and the
/// input gradient, to the bit where torch's own arithmetic is known (held to
/// Vectors/moe/block.safetensors):
///
///     // x: [T, H] bf16 (the post-attention norm's output) -> out: [T, H] bf16
///     logits = bf16(x · Wrᵀ)                       // [T, E], the router (frozen, bf16)
///     p = softmax(fp32(logits))                    // torch's AVX-512 kernel: Sleef expf, 16-lane sum, × 1/sum
///     v, idx = topk(p, K)                          // libstdc++'s selection order on ties
///     w = v / Σv                                   // Qwen3 when norm_topk_prob, Mixtral always; Qwen3 then bf16(w)
///     for each routed row (t, k), expert e = idx[t, k]:
///         gu = bf16(x[t] · Wguᵀ[e]); a = silu(gate) · up; d = bf16(a · Wdᵀ[e])
///         y[t, k] = d · w[t, k]                    // Qwen3 bf16, Mixtral fp32
///     out[t] = bf16(Σ_k y[t, k])                   // fp32, in top-k slot order
///
/// transformers' default experts implementation is grouped_mm (integrations/moe.py), which on
/// CPU equals a bf16 matmul per expert; rows are independent, so the order of a group's rows
/// does not matter. The backward reaches x through the experts and, though the router is
/// frozen, through the routing weights into the router's input.
public enum SparseMoE {
    public enum Family: Sendable { case qwen3(normalizesTopK: Bool), mixtral }

    /// The block's frozen weights, bf16 values: router [E, H], gate_up [E, 2I, H] (gate rows
    /// first), down [E, H, I].
    public struct Weights: Sendable {
        public var family: Family
        public var experts: Int, perToken: Int, hidden: Int, intermediate: Int
        public var router: [Float], gateUp: [Float], down: [Float]
        public init(family: Family, experts: Int, perToken: Int, hidden: Int, intermediate: Int, router: [Float], gateUp: [Float], down: [Float]) {
            precondition(router.count == experts * hidden && gateUp.count == experts * 2 * intermediate * hidden && down.count == experts * hidden * intermediate,
                         "SparseMoE.Weights: shapes do not match")
            precondition((1...experts).contains(perToken), "SparseMoE.Weights: top-k must be 1...experts")
            (self.family, self.experts, self.perToken, self.hidden, self.intermediate) = (family, experts, perToken, hidden, intermediate)
            (self.router, self.gateUp, self.down) = (router, gateUp, down)
        }
        var renormalizes: Bool { if case .qwen3(let n) = family { return n }; return true }
        var bf16Weights: Bool { if case .qwen3 = family { return true }; return false }
    }

    /// What the backward needs.
    public struct Cache: Sendable {
        public var tokens: Int
        /// Softmax probabilities [T, E], top-k indices [T, K] in slot order, the chosen values
        /// before renormalisation and their sums, the routing weights as the experts use them.
        public var probabilities: [Float], indices: [Int], chosen: [Float], sums: [Float], weights: [Float]
        /// Per routed row (t·K + k): gate_up's output [2I] and the down projection's output [H], bf16 bits.
        public var gateUp: [UInt16], down: [UInt16]
        /// What the arrays hold (the routing as fp32 and the indices as Int, the kept rows as bf16).
        public var byteCount: Int {
            4 * (probabilities.count + chosen.count + sums.count + weights.count) + MemoryLayout<Int>.stride * indices.count + 2 * (gateUp.count + down.count)
        }
    }

    // MARK: Forward

    /// - Parameter routerLogits: the router's output to route by instead of computing it (a test
    ///   holds the rest of the block to torch's own logits: one ulp there can change a route).
    public static func forward(_ b: Weights, _ x: [Float], tokens t: Int, routerLogits: [Float]? = nil) -> (out: [Float], logits: [Float], cache: Cache) {
        let (e, k, h, i) = (b.experts, b.perToken, b.hidden, b.intermediate)
        precondition(x.count == t * h, "SparseMoE.forward: x must be [tokens, hidden]")
        let logits = routerLogits ?? LlamaOps.linearForward(x, b.router, tokens: t, inFeatures: h, outFeatures: e)
        var p = [Float](repeating: 0, count: t * e)
        var indices = [Int](repeating: 0, count: t * k), chosen = [Float](repeating: 0, count: t * k)
        var sums = [Float](repeating: 1, count: t), weights = [Float](repeating: 0, count: t * k)
        for r in 0..<t {
            let row = softmaxRow(Array(logits[(r * e)..<((r + 1) * e)]))
            p.replaceSubrange((r * e)..<((r + 1) * e), with: row)
            let top = topK(row, k)
            for (slot, j) in top.enumerated() { indices[r * k + slot] = j; chosen[r * k + slot] = row[j] }
            let v = Array(chosen[(r * k)..<((r + 1) * k)])
            if b.renormalizes { sums[r] = v.withUnsafeBufferPointer { TorchMean.rowSum($0) } }
            for slot in 0..<k {
                let w = b.renormalizes ? v[slot] / sums[r] : v[slot]
                weights[r * k + slot] = b.bf16Weights ? LlamaOps.bf16(w) : w
            }
        }
        // Each expert's rows, in any order: every row is its own.
        var gateUp = [UInt16](repeating: 0, count: t * k * 2 * i), down = [UInt16](repeating: 0, count: t * k * h)
        var downValues = [Float](repeating: 0, count: t * k * h)
        for (expert, rows) in rowsByExpert(indices, experts: e) where !rows.isEmpty {
            let xs = rows.flatMap { x[($0 / k * h)..<($0 / k * h + h)] }
            let gu = expertLinear(xs, b.gateUp, expert: expert, rows: rows.count, inFeatures: h, outFeatures: 2 * i)
            let parts = LlamaModel.splitColumns(gu, tokens: rows.count, widths: [i, i])
            let a = LlamaOps.swigluForward(gate: parts[0], up: parts[1])
            let d = expertLinear(a, b.down, expert: expert, rows: rows.count, inFeatures: i, outFeatures: h)
            for (n, row) in rows.enumerated() {
                for j in 0..<(2 * i) { gateUp[row * 2 * i + j] = HalfPrecision.bfloat16Bits(gu[n * 2 * i + j]) }
                for j in 0..<h { (down[row * h + j], downValues[row * h + j]) = (HalfPrecision.bfloat16Bits(d[n * h + j]), d[n * h + j]) }
            }
        }
        var out = [Float](repeating: 0, count: t * h)
        for r in 0..<t {
            for c in 0..<h {
                var acc: Float = 0
                for slot in 0..<k {
                    let y = downValues[(r * k + slot) * h + c] * weights[r * k + slot]
                    acc += b.bf16Weights ? LlamaOps.bf16(y) : y
                }
                out[r * h + c] = LlamaOps.bf16(acc)
            }
        }
        return (out, logits, Cache(tokens: t, probabilities: p, indices: indices, chosen: chosen, sums: sums, weights: weights, gateUp: gateUp, down: down))
    }

    /// One expert's matmul of a stacked [experts, out, in] weight, read in place: bf16(x · W[e]ᵀ),
    /// x [rows, in] -> [rows, out].
    static func expertLinear(_ x: [Float], _ w: [Float], expert e: Int, rows: Int, inFeatures k: Int, outFeatures n: Int) -> [Float] {
        w.withUnsafeBufferPointer { LlamaOps.linearForward(x, $0.baseAddress! + e * n * k, tokens: rows, inFeatures: k, outFeatures: n) }
    }

    /// Its input gradient: bf16(dy · W[e]), dy [rows, out] -> [rows, in].
    static func expertLinearBackward(_ dy: [Float], _ w: [Float], expert e: Int, rows: Int, inFeatures k: Int, outFeatures n: Int) -> [Float] {
        w.withUnsafeBufferPointer { LlamaOps.linearBackwardInput(dy, $0.baseAddress! + e * n * k, tokens: rows, inFeatures: k, outFeatures: n) }
    }

    /// The routed rows (t·K + k) of each expert, ascending.
    static func rowsByExpert(_ indices: [Int], experts: Int) -> [(Int, [Int])] {
        var rows = [[Int]](repeating: [], count: experts)
        for (row, e) in indices.enumerated() { rows[e].append(row) }
        return rows.enumerated().map { ($0.offset, $0.element) }
    }

    // MARK: Backward

    /// g: [T, H] bf16, the gradient of the block's output -> (dx [T, H] bf16, the router logits'
    /// gradient [T, E] bf16).
    public static func backward(_ b: Weights, _ g: [Float], _ c: Cache) -> (dx: [Float], dLogits: [Float]) {
        let (e, k, h, i, t) = (b.experts, b.perToken, b.hidden, b.intermediate, c.tokens)
        // The routing weights' gradient (the product's weight side, summed over H) and the
        // experts' output gradient (its other side).
        var dWeights = [Float](repeating: 0, count: t * k), dDown = [Float](repeating: 0, count: t * k * h)
        var products = [Float](repeating: 0, count: h)
        for r in 0..<t {
            for slot in 0..<k {
                let row = r * k + slot, w = c.weights[row]
                for j in 0..<h {
                    let gj = g[r * h + j], dj = HalfPrecision.float(bfloat16Bits: c.down[row * h + j])
                    dDown[row * h + j] = LlamaOps.bf16(gj * w)
                    products[j] = b.bf16Weights ? LlamaOps.bf16(gj * dj) : gj * dj
                }
                dWeights[row] = products.withUnsafeBufferPointer { b.bf16Weights ? LlamaOps.bf16(TorchMean.bf16RowSum($0)) : TorchMean.rowSum($0) }
            }
        }
        // Renormalisation (an in-place division by the row's sum): d v = d w / s, plus the sum's
        // gradient Σ −d w · ((v / s) / s) added to each.
        var dLogits = [Float](repeating: 0, count: t * e)
        for r in 0..<t {
            var dv = Array(dWeights[(r * k)..<((r + 1) * k)])
            if b.renormalizes {
                let s = c.sums[r]
                let other = (0..<k).map { -dv[$0] * ((c.chosen[r * k + $0] / s) / s) }
                let ds = other.withUnsafeBufferPointer { TorchMean.rowSum($0) }
                dv = dv.map { $0 / s + ds }
            }
            var dp = [Float](repeating: 0, count: e)
            for slot in 0..<k { dp[c.indices[r * k + slot]] = dv[slot] }
            let p = Array(c.probabilities[(r * e)..<((r + 1) * e)])
            let dot = reduce16(zip(dp, p).map { $0 * $1 })
            for j in 0..<e { dLogits[r * e + j] = LlamaOps.bf16((dp[j] - dot) * p[j]) }
        }
        let dxRouter = LlamaOps.linearBackwardInput(dLogits, b.router, tokens: t, inFeatures: h, outFeatures: e)
        // Through the experts, each expert's rows; then each token's rows summed in bf16 in
        // ascending expert order (index_put_ with accumulate into bf16 zeros).
        var dRows = [Float](repeating: 0, count: t * k * h)
        let byExpert = rowsByExpert(c.indices, experts: e)
        for (expert, rows) in byExpert where !rows.isEmpty {
            let dd = rows.flatMap { dDown[($0 * h)..<(($0 + 1) * h)] }
            let da = expertLinearBackward(dd, b.down, expert: expert, rows: rows.count, inFeatures: i, outFeatures: h)
            var gate: [UInt16] = [], up: [UInt16] = []
            for row in rows {
                gate += c.gateUp[(row * 2 * i)..<(row * 2 * i + i)]
                up += c.gateUp[(row * 2 * i + i)..<((row + 1) * 2 * i)]
            }
            let (dg, du) = LlamaOps.swigluBackward(da, gate: gate, up: up)
            let dgu = LlamaModel.joinColumns([dg, du], tokens: rows.count)
            let dx = expertLinearBackward(dgu, b.gateUp, expert: expert, rows: rows.count, inFeatures: h, outFeatures: 2 * i)
            for (n, row) in rows.enumerated() { dRows.replaceSubrange((row * h)..<((row + 1) * h), with: dx[(n * h)..<((n + 1) * h)]) }
        }
        var dx = [Float](repeating: 0, count: t * h)
        for r in 0..<t {
            let slots = (0..<k).sorted { c.indices[r * k + $0] < c.indices[r * k + $1] }
            for j in 0..<h {
                var acc: Float = 0
                for slot in slots { acc = LlamaOps.bf16(acc + dRows[(r * k + slot) * h + j]) }
                dx[r * h + j] = LlamaOps.bf16(dxRouter[r * h + j] + acc)
            }
        }
        return (dx, dLogits)
    }

    // MARK: torch's softmax and top-k on CPU

    /// `_vec_softmax_lastdim` on AVX-512 (aten/src/ATen/native/cpu/SoftMaxKernel.cpp): the row's
    /// maximum, Sleef's expf of each value minus it, their 16-lane sum, and each exponential
    /// times the sum's reciprocal.
    public static func softmaxRow(_ x: [Float]) -> [Float] {
        let m = x.max() ?? 0
        let ex = x.map { sleefExpf($0 - m) }
        let inverse = 1 / reduce16(ex)
        return ex.map { $0 * inverse }
    }

    /// ATen's `vec::reduce_all` sum over 16-lane vectors (functional_base.h): the first 16
    /// values, each further full block added lane by lane, a partial block into its lanes; then
    /// lanes l and l⊕8, ⊕4, ⊕2, ⊕1 into lane 0. Under 16 values, in order.
    public static func reduce16(_ x: [Float]) -> Float {
        guard x.count >= 16 else { return x.dropFirst().reduce(x.first ?? 0, +) }
        var acc = Array(x[0..<16])
        var at = 16
        while at + 16 <= x.count {
            for l in 0..<16 { acc[l] += x[at + l] }
            at += 16
        }
        for l in 0..<(x.count - at) { acc[l] += x[at + l] }
        for shift in [8, 4, 2, 1] {
            let v = acc
            for l in 0..<16 { acc[l] = v[l] + v[l ^ shift] }
        }
        return acc[0]
    }

    /// Sleef_expf16_u10 (torch's `Vectorized<float>::exp` on AVX-512), one lane: the reduced
    /// argument's polynomial with fused multiply-adds, scaled by 2^q in two steps.
    public static func sleefExpf(_ d: Float) -> Float {
        if d < -104 { return 0 }
        let q = Int32((d * Float(1.442695040888963407359924681001892137)).rounded(.toNearestOrEven))
        let fq = Float(q)
        var s = fmaf(fq, -0.693145751953125, d)
        s = fmaf(fq, -1.428606765330187045e-06, s)
        var u: Float = 1.98527617612853646278381e-4
        for c: Float in [1.39304355252534151077271e-3, 8.33336077630519866943359e-3, 4.16664853692054748535156e-2, 1.66666671633720397949219e-1, 0.5] {
            u = fmaf(u, s, c)
        }
        u = 1 + fmaf(s * s, u, s)
        func pow2(_ n: Int32) -> Float { Float(bitPattern: UInt32(bitPattern: (n &+ 0x7f) << 23)) }
        return u * pow2(q >> 1) * pow2(q - (q >> 1))
    }

    /// torch.topk's indices for one row (aten TopKImpl.h `topk_impl_loop`, largest, sorted), as
    /// libstdc++ orders ties: `std::partial_sort` when K·64 ≤ E, else `std::nth_element` at K−1
    /// and `std::sort` of the first K−1, on (value, index) pairs compared by value alone.
    public static func topK(_ values: [Float], _ k: Int) -> [Int] {
        var q = values.enumerated().map { (v: $0.element, i: $0.offset) }
        let n = q.count
        if k * 64 <= n {
            LibStdCxx.heapSelect(&q, 0, k, n)
            LibStdCxx.sortHeap(&q, 0, k)
        } else {
            LibStdCxx.introselect(&q, 0, k - 1, n, depth: 2 * (Int.bitWidth - 1 - n.leadingZeroBitCount))
            LibStdCxx.insertionSort(&q, 0, k - 1)   // std::sort of at most 16 elements
        }
        return q[0..<k].map(\.i)
    }
}

/// The libstdc++ (GCC 13) selection and heap algorithms torch.topk runs, on pairs ordered by
/// `a.v > b.v` (largest first): the order in which they leave equal values is what decides a
/// tie between two experts.
enum LibStdCxx {
    typealias Pair = (v: Float, i: Int)
    @inline(__always) static func before(_ a: Pair, _ b: Pair) -> Bool { a.v > b.v }

    static func moveMedianToFirst(_ q: inout [Pair], _ result: Int, _ a: Int, _ b: Int, _ c: Int) {
        if before(q[a], q[b]) {
            if before(q[b], q[c]) { q.swapAt(result, b) } else if before(q[a], q[c]) { q.swapAt(result, c) } else { q.swapAt(result, a) }
        } else if before(q[a], q[c]) { q.swapAt(result, a) } else if before(q[b], q[c]) { q.swapAt(result, c) } else { q.swapAt(result, b) }
    }

    static func unguardedPartition(_ q: inout [Pair], _ first: Int, _ last: Int, _ pivot: Int) -> Int {
        var (first, last) = (first, last)
        while true {
            while before(q[first], q[pivot]) { first += 1 }
            last -= 1
            while before(q[pivot], q[last]) { last -= 1 }
            if !(first < last) { return first }
            q.swapAt(first, last)
            first += 1
        }
    }

    static func insertionSort(_ q: inout [Pair], _ first: Int, _ last: Int) {
        guard first != last else { return }
        for i in (first + 1)..<last {
            let value = q[i]
            if before(value, q[first]) {
                for j in stride(from: i, to: first, by: -1) { q[j] = q[j - 1] }
                q[first] = value
            } else {
                var j = i
                while before(value, q[j - 1]) { q[j] = q[j - 1]; j -= 1 }
                q[j] = value
            }
        }
    }

    static func adjustHeap(_ q: inout [Pair], _ first: Int, _ hole: Int, _ length: Int, _ value: Pair) {
        let top = hole
        var (hole, child) = (hole, hole)
        while child < (length - 1) / 2 {
            child = 2 * (child + 1)
            if before(q[first + child], q[first + child - 1]) { child -= 1 }
            q[first + hole] = q[first + child]
            hole = child
        }
        if length & 1 == 0 && child == (length - 2) / 2 {
            child = 2 * (child + 1)
            q[first + hole] = q[first + child - 1]
            hole = child - 1
        }
        var parent = (hole - 1) / 2
        while hole > top && before(q[first + parent], value) {
            q[first + hole] = q[first + parent]
            hole = parent
            parent = (hole - 1) / 2
        }
        q[first + hole] = value
    }

    static func makeHeap(_ q: inout [Pair], _ first: Int, _ last: Int) {
        let n = last - first
        guard n >= 2 else { return }
        var parent = (n - 2) / 2
        while true {
            adjustHeap(&q, first, parent, n, q[first + parent])
            if parent == 0 { return }
            parent -= 1
        }
    }

    static func popHeap(_ q: inout [Pair], _ first: Int, _ last: Int, _ result: Int) {
        let value = q[result]
        q[result] = q[first]
        adjustHeap(&q, first, 0, last - first, value)
    }

    static func heapSelect(_ q: inout [Pair], _ first: Int, _ middle: Int, _ last: Int) {
        makeHeap(&q, first, middle)
        for i in middle..<last where before(q[i], q[first]) { popHeap(&q, first, middle, i) }
    }

    static func sortHeap(_ q: inout [Pair], _ first: Int, _ last: Int) {
        var last = last
        while last - first > 1 {
            last -= 1
            popHeap(&q, first, last, last)
        }
    }

    static func introselect(_ q: inout [Pair], _ first: Int, _ nth: Int, _ last: Int, depth: Int) {
        var (first, last, depth) = (first, last, depth)
        while last - first > 3 {
            if depth == 0 {
                heapSelect(&q, first, nth + 1, last)
                q.swapAt(first, nth)
                return
            }
            depth -= 1
            let mid = first + (last - first) / 2
            moveMedianToFirst(&q, first, first + 1, mid, last - 1)
            let cut = unguardedPartition(&q, first + 1, last, first)
            if cut <= nth { first = cut } else { last = cut }
        }
        insertionSort(&q, first, last)
    }
}
