// Throughput of qlora's 4-bit kernels on one 4096 x 11008 fp32 tensor (45.1 M params).
//
// Every suite streams through DRAM: the fp32 input/output is 180 MB (bf16: 90 MB, packed
// nibbles: 22.5 MB), far above the L3, so one tensor per iteration is an honest measure of the
// cold-cache, memory-bound case. Inputs and output buffers are made (and pre-faulted) in
// `setup`, which is not timed. Each iteration processes the whole tensor once.
//
// Metric "params/s (M)": millions of tensor elements per second of one iteration, timed with a
// monotonic clock around the work itself. Run with `swift package --disable-sandbox benchmark`.

import Benchmark
import BenchmarkSupport
import QLoRA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Millions of parameters per second; larger is better.
let paramsPerSecond = BenchmarkMetric.custom("params/s (M)", polarity: .prefersLarger, useScalingFactor: false)

/// Everything a suite needs, built once per benchmark process in `setup`.
final class Fixture: @unchecked Sendable {
    let count = TestTensor.count
    let input: [Float]
    let quantized: Quantized4Bit
    let absmax: [Float]
    let outF32: UnsafeMutableBufferPointer<Float>
    let outBF16: UnsafeMutableBufferPointer<UInt16>
    let copySource: UnsafeMutableBufferPointer<Float>

    init() throws {
        input = TestTensor.normal()
        quantized = try input.withUnsafeBufferPointer { x in
            try quantize4Bit(.float32(x), shape: TestTensor.shape, quantType: .nf4, blocksize: 64, doubleQuant: true)
        }
        absmax = quantized.state.absmaxValues()
        // Pre-touch every page so first-touch page faults are not timed.
        outF32 = .allocate(capacity: count)
        outF32.initialize(repeating: 0)
        outBF16 = .allocate(capacity: count)
        outBF16.initialize(repeating: 0)
        copySource = .allocate(capacity: count)
        _ = copySource.initialize(from: input)
    }

    deinit {
        outF32.deallocate()
        outBF16.deallocate()
        copySource.deallocate()
    }
}

/// Nanoseconds on the monotonic clock.
@inline(__always)
func nowNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Runs `body` once per scaled iteration and records millions of params per second.
@inline(__always)
func measure(_ benchmark: Benchmark, params: Int, _ body: () throws -> Void) rethrows {
    let start = nowNanoseconds()
    for _ in benchmark.scaledIterations {
        try body()
    }
    let elapsed = Double(nowNanoseconds() - start)
    let total = Double(params * benchmark.scaledIterations.count)
    benchmark.measurement(paramsPerSecond, Int((total / elapsed * 1e3).rounded()))  // params/ns * 1e3 = M/s
}

/// A Llama-2-7B MLP up/gate projection (out 11008, in 4096) in NF4, an input for 1 and 512
/// tokens, and reusable scratch: the 4-bit matmul's inputs, made in `setup`.
final class MatmulFixture: @unchecked Sendable {
    static let (out, inFeatures) = (11008, 4096)
    let weight: Linear4BitWeight
    let x: [Float]
    let y: UnsafeMutableBufferPointer<Float>
    let scratch = Matmul4BitScratch()

    init(tokens: Int) throws {
        var rng = SplitMix64(seed: 7)
        let w = (0..<(Self.out * Self.inFeatures)).map { _ in Float(rng.unit() * 2 - 1) * 0.04 }
        weight = try Linear4BitWeight(w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [Self.out, Self.inFeatures]) })
        x = (0..<(tokens * Self.inFeatures)).map { _ in Float(rng.unit() * 2 - 1) }
        y = .allocate(capacity: tokens * Self.out)
        y.initialize(repeating: 0)
    }

    deinit { y.deallocate() }
}

let benchmarks: @Sendable () -> Void = {
    // A few seconds per suite; each iteration is tens of milliseconds, so that is ~50-150
    // samples. One warm-up iteration brings the code and the page tables in.
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, paramsPerSecond],
        timeUnits: .microseconds,
        units: [paramsPerSecond: .count, .throughput: .count],
        warmupIterations: 1,
        scalingFactor: .one,
        maxDuration: .seconds(3),
        maxIterations: 200
    )

    Benchmark(
        "NF4 quantize fp32 4096x11008 (blocksize 64, double quant)",
        closure: { benchmark, fixture in
            try fixture.input.withUnsafeBufferPointer { x in
                try measure(benchmark, params: fixture.count) {
                    let q = try quantize4Bit(.float32(x), shape: TestTensor.shape, quantType: .nf4,
                                             blocksize: 64, doubleQuant: true)
                    blackHole(q)
                }
            }
        },
        setup: { try Fixture() }
    )

    Benchmark(
        "NF4 dequantize to fp32 4096x11008",
        closure: { benchmark, fixture in
            fixture.quantized.packed.withUnsafeBufferPointer { p in
                fixture.absmax.withUnsafeBufferPointer { a in
                    measure(benchmark, params: fixture.count) {
                        dequantize4Bit(p, absmax: a, quantType: .nf4, blocksize: 64, into: .float32(fixture.outF32))
                        blackHole(fixture.outF32[fixture.count - 1])
                    }
                }
            }
        },
        setup: { try Fixture() }
    )

    Benchmark(
        "NF4 dequantize to bf16 4096x11008",
        closure: { benchmark, fixture in
            fixture.quantized.packed.withUnsafeBufferPointer { p in
                fixture.absmax.withUnsafeBufferPointer { a in
                    measure(benchmark, params: fixture.count) {
                        dequantize4Bit(p, absmax: a, quantType: .nf4, blocksize: 64, into: .bfloat16(fixture.outBF16))
                        blackHole(fixture.outBF16[fixture.count - 1])
                    }
                }
            }
        },
        setup: { try Fixture() }
    )

    // The machine's own limit for the fp32 dequantize: memcpy of the same 180 MB of output
    // (it also reads 180 MB, where dequantize reads 22.5 MB of nibbles + 2.8 MB of scales).
    Benchmark(
        "memcpy fp32 output bytes (180 MB)",
        closure: { benchmark, fixture in
            measure(benchmark, params: fixture.count) {
                memcpy(fixture.outF32.baseAddress!, fixture.copySource.baseAddress!, fixture.count * 4)
                blackHole(fixture.outF32[fixture.count - 1])
            }
        },
        setup: { try Fixture() }
    )

    // Pure store bandwidth for the same 180 MB: the write-only bound (dequantize writes 8x
    // what it reads).
    Benchmark(
        "memset fp32 output bytes (180 MB)",
        closure: { benchmark, fixture in
            measure(benchmark, params: fixture.count) {
                memset(fixture.outF32.baseAddress!, 0x3F, fixture.count * 4)
                blackHole(fixture.outF32[fixture.count - 1])
            }
        },
        setup: { try Fixture() }
    )

    // The 4-bit matmul (bf16 compute), regression-tracked here; `qlora bench` times it next to
    // OpenBLAS sgemv/sgemm. OpenBLAS's kernels follow OPENBLAS_CORETYPE (run with SkylakeX on
    // AVX-512 machines to match `qlora bench`). Metric: weights (params) per second. The GEMV
    // here is warm (one 22.5 MB weight stays in the L3); `qlora bench` times it cold.
    for tokens in [1, 512] {
        Benchmark(
            "NF4 matmul \(tokens) token(s) x 11008x4096 (\(tokens <= Matmul4Bit.fusedMaxTokens ? "fused GEMV" : "panel GEMM"))",
            closure: { benchmark, fixture in
                fixture.x.withUnsafeBufferPointer { xp in
                    measure(benchmark, params: MatmulFixture.out * MatmulFixture.inFeatures) {
                        Matmul4Bit.forward(x: xp, tokens: tokens, weight: fixture.weight, y: fixture.y, scratch: fixture.scratch)
                        blackHole(fixture.y[0])
                    }
                }
            },
            setup: { try MatmulFixture(tokens: tokens) }
        )
    }

    // One LoRA training step (issue 4): forward, backward and AdamW on A and B for a 4096x4096
    // NF4 base, r = 16, 512 tokens. `qlora bench` times it against the base's forward+backward.
    Benchmark(
        "LoRA step 512 tokens x 4096x4096 r=16 (fwd + bwd + AdamW)",
        closure: { benchmark, fixture in
            measure(benchmark, params: 4096 * 4096) {
                let layer = fixture.layer
                layer.zeroGrad()
                let (_, saved) = try! layer.forward(fixture.x, tokens: 512)
                blackHole(try! layer.backward(fixture.dy, saved: saved))
                AdamW.step(param: &layer.loraA, grad: layer.gradA, state: &fixture.stateA, config: AdamWConfig())
                AdamW.step(param: &layer.loraB, grad: layer.gradB, state: &fixture.stateB, config: AdamWConfig())
            }
        },
        setup: { try LoRAFixture() }
    )
}

final class LoRAFixture: @unchecked Sendable {
    let layer: LoRALinear
    let x: [Float], dy: [Float]
    var stateA: AdamWState, stateB: AdamWState

    init() throws {
        var rng = SplitMix64(seed: 11)
        let w = (0..<(4096 * 4096)).map { _ in Float(rng.unit() * 2 - 1) * 0.04 }
        let base = try Linear4BitWeight(w.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [4096, 4096]) })
        layer = try LoRALinear(base: base, config: LoRAConfig(rank: 16, alpha: 32), seed: 1)
        x = (0..<(512 * 4096)).map { _ in Float(rng.unit() * 2 - 1) }
        dy = (0..<(512 * 4096)).map { _ in Float(rng.unit() * 2 - 1) }
        stateA = AdamWState(count: layer.loraA.count)
        stateB = AdamWState(count: layer.loraB.count)
    }
}
