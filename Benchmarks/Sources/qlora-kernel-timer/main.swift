// qlora-kernel-timer: times one qlora 4-bit operation on a 4096 x 11008 fp32 tensor and prints
// one JSON object (median seconds of N timed runs after one warm-up run). Single-threaded.
//
//   qlora-kernel-timer OP [REPEATS] [--input FILE.f32] [--dump DIR]
//
// OP:
//   quantize              quantize4Bit nf4, blocksize 64, double quant (new arrays each call,
//                         as bitsandbytes' quantize_4bit allocates its outputs)
//   quantize-nodq         the same without double quantization (first level only)
//   dequantize-f32        absmaxValues() (decode the double-quantized scales) + dequantize4Bit
//                         into a preallocated fp32 buffer: the work of bnb's dequantize_4bit
//   dequantize-bf16       the same with a bf16 output
//   dequantize-f32-kernel / dequantize-bf16-kernel
//                         dequantize4Bit alone, scales decoded beforehand
//   absmax-values         absmaxValues() alone
//   memcpy-f32            memcpy of the 180 MB fp32 output (the machine's streaming limit)
// --input: raw little-endian fp32 values (45,088,768 of them) instead of the seeded normal tensor.
// --dump DIR: write packed.u8 and absmax.f32 (decoded scales) of the quantized tensor to DIR.

import BenchmarkSupport
import QLoRA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

func fail(_ message: String) -> Never {
    let line = "qlora-kernel-timer: \(message)\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
    exit(2)
}

@inline(__always)
func nowSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

@inline(never)
func blackHole<T>(_ x: T) { withExtendedLifetime(x) {} }

func writeFile(_ path: String, _ bytes: UnsafeRawBufferPointer) {
    guard let f = fopen(path, "wb") else { fail("cannot write \(path)") }
    defer { fclose(f) }
    guard fwrite(bytes.baseAddress, 1, bytes.count, f) == bytes.count else { fail("short write to \(path)") }
}

let ops = ["quantize", "quantize-nodq", "dequantize-f32", "dequantize-bf16", "dequantize-f32-kernel",
           "dequantize-bf16-kernel", "absmax-values", "memcpy-f32"]

var positional: [String] = []
var inputPath: String?
var dumpDir: String?
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--input":
        guard let v = args.popFirst() else { fail("--input needs a file") }
        inputPath = v
    case "--dump":
        guard let v = args.popFirst() else { fail("--dump needs a folder") }
        dumpDir = v
    case "-h", "--help":
        print("usage: qlora-kernel-timer {\(ops.joined(separator: "|"))} [REPEATS] [--input FILE.f32] [--dump DIR]")
        exit(0)
    default: positional.append(a)
    }
}
guard let op = positional.first, ops.contains(op) else {
    fail("usage: qlora-kernel-timer {\(ops.joined(separator: "|"))} [REPEATS] [--input FILE.f32] [--dump DIR]")
}
var repeats = 7
if positional.count > 1 {
    guard let r = Int(positional[1]), r >= 1 else { fail("bad repeat count \(positional[1])") }
    repeats = r
}

let n = TestTensor.count
let input: [Float]
if let inputPath {
    guard let x = TestTensor.readRawFloat32(path: inputPath) else { fail("cannot read \(n) fp32 values from \(inputPath)") }
    input = x
} else {
    input = TestTensor.normal()
}

let quantized: Quantized4Bit
do {
    quantized = try input.withUnsafeBufferPointer { x in
        try quantize4Bit(.float32(x), shape: TestTensor.shape, quantType: .nf4, blocksize: 64, doubleQuant: true)
    }
} catch {
    fail("quantize4Bit failed: \(error)")
}
let absmax = quantized.state.absmaxValues()

if let dumpDir {
    quantized.packed.withUnsafeBytes { writeFile(dumpDir + "/packed.u8", $0) }
    absmax.withUnsafeBytes { writeFile(dumpDir + "/absmax.f32", $0) }
}

// Preallocated, pre-faulted outputs: page faults are not part of what we time.
let outF32 = UnsafeMutableBufferPointer<Float>.allocate(capacity: n)
outF32.initialize(repeating: 0)
let outBF16 = UnsafeMutableBufferPointer<UInt16>.allocate(capacity: n)
outBF16.initialize(repeating: 0)

@MainActor func runOnce() {
    switch op {
    case "quantize", "quantize-nodq":
        let q = try! input.withUnsafeBufferPointer { x in
            try quantize4Bit(.float32(x), shape: TestTensor.shape, quantType: .nf4, blocksize: 64,
                             doubleQuant: op == "quantize")
        }
        blackHole(q)
    case "dequantize-f32", "dequantize-bf16":
        let a = quantized.state.absmaxValues()
        let out: FloatOutput = op == "dequantize-f32" ? .float32(outF32) : .bfloat16(outBF16)
        quantized.packed.withUnsafeBufferPointer { p in
            a.withUnsafeBufferPointer { dequantize4Bit(p, absmax: $0, quantType: .nf4, blocksize: 64, into: out) }
        }
    case "dequantize-f32-kernel", "dequantize-bf16-kernel":
        let out: FloatOutput = op == "dequantize-f32-kernel" ? .float32(outF32) : .bfloat16(outBF16)
        quantized.packed.withUnsafeBufferPointer { p in
            absmax.withUnsafeBufferPointer { dequantize4Bit(p, absmax: $0, quantType: .nf4, blocksize: 64, into: out) }
        }
    case "absmax-values":
        blackHole(quantized.state.absmaxValues())
    case "memcpy-f32":
        input.withUnsafeBytes { src in _ = memcpy(outF32.baseAddress!, src.baseAddress!, n * 4) }
    default:
        fail("unknown op \(op)")
    }
    blackHole(outF32[n - 1])
    blackHole(outBF16[n - 1])
}

runOnce()  // warm-up
var times: [Double] = []
for _ in 0..<repeats {
    let t0 = nowSeconds()
    runOnce()
    times.append(nowSeconds() - t0)
}
times.sort()
let median = times.count % 2 == 1 ? times[times.count / 2] : (times[times.count / 2 - 1] + times[times.count / 2]) / 2

/// Swift's shortest round-trip spelling of a finite Double is valid JSON.
func json(_ d: Double) -> String { "\(d)" }
print("""
{"op": "\(op)", "params": \(n), "repeats": \(repeats), "median_s": \(json(median)), "min_s": \(json(times[0])), \
"max_s": \(json(times[times.count - 1])), "params_per_s": \(json(Double(n) / median)), \
"kernel_level": "\(KernelLevel.active)", "threads": 1}
""")
