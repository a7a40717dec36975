import CQLoRAKernels

/// Which implementation runs: the SIMD kernels (chosen at run time from the CPU's features)
/// or the plain scalar reference that defines the answer.
public enum KernelChoice: Sendable {
    case fast
    case reference
}

/// A writable flat output buffer in one of the float formats (16-bit ones as raw bits).
public enum FloatOutput {
    case float32(UnsafeMutableBufferPointer<Float>)
    case bfloat16(UnsafeMutableBufferPointer<UInt16>)
    case float16(UnsafeMutableBufferPointer<UInt16>)

    public var count: Int {
        switch self {
        case .float32(let b): return b.count
        case .bfloat16(let b): return b.count
        case .float16(let b): return b.count
        }
    }

    public var elementType: ElementType {
        switch self {
        case .float32: return .float32
        case .bfloat16: return .bfloat16
        case .float16: return .float16
        }
    }

    /// Views raw bytes as an output of the given type.
    public static func view(_ bytes: UnsafeMutableRawBufferPointer, as type: ElementType) -> FloatOutput {
        switch type {
        case .float32: return .float32(bytes.bindMemory(to: Float.self))
        case .bfloat16: return .bfloat16(bytes.bindMemory(to: UInt16.self))
        case .float16: return .float16(bytes.bindMemory(to: UInt16.self))
        }
    }
}

/// bitsandbytes' floor on a block's scale: `absmax.clamp(min=1e-38)` (an fp32 subnormal).
let absmaxFloor: Float = 1e-38

// MARK: - Quantize

/// Blockwise 4-bit quantization, bit for bit with bitsandbytes 0.50.2 `quantize_4bit` on CPU
/// (its torch "default" backend), optionally with double quantization of the absmax.
///
/// - Parameters:
///   - x: the elements, flattened row-major; 16-bit inputs are converted exactly to fp32.
///   - shape: the tensor's shape (recorded in the state; its product must equal `x.count`).
///   - quantType: `.nf4` or `.fp4`.
///   - blocksize: elements per absmax block, one of `QuantState.validBlocksizes` (default 64).
///   - doubleQuant: quantize the absmax again (8-bit dynamic code, blocks of 256).
///   - meanThreads: which torch thread count the double-quant offset (a torch fp32 mean)
///     reproduces; see `TorchMean`.
///   - kernel: `.fast` (SIMD) or `.reference` (scalar); the results are identical.
/// - Throws: `QuantizationError.nonFinite` naming the first NaN/Inf element; bad blocksize
///   or shape.
public func quantize4Bit(
    _ x: FloatElements, shape: [Int], quantType: QuantType = .nf4, blocksize: Int = 64,
    doubleQuant: Bool = true, meanThreads: Int = 1, kernel: KernelChoice = .fast
) throws(QuantizationError) -> Quantized4Bit {
    guard QuantState.validBlocksizes.contains(blocksize) else { throw .invalidBlocksize(blocksize) }
    let n = x.count
    guard shape.allSatisfy({ $0 >= 0 }), shape.reduce(1, *) == n else { throw .shapeMismatch(elements: n, shape: shape) }

    let (packed, absmax) = try quantizeBlocks(x, quantType: quantType, blocksize: blocksize, kernel: kernel)
    let state = QuantState(
        quantType: quantType, blocksize: blocksize, dtype: x.elementType, shape: shape,
        absmax: doubleQuant ? .nested(doubleQuantize(absmax, meanThreads: meanThreads)) : .plain(absmax))
    return Quantized4Bit(packed: packed, state: state)
}

/// Double quantization of first-level scales: offset = torch fp32 mean; `absmax - offset`
/// quantized with `Blockwise8Bit` in blocks of 256.
public func doubleQuantize(_ absmax: [Float], meanThreads: Int = 1) -> NestedAbsmax {
    let offset = TorchMean.mean(absmax, threads: meanThreads)
    let centered = absmax.map { $0 - offset }
    let (q, nested) = Blockwise8Bit.quantize(centered, blocksize: 256)
    return NestedAbsmax(quantized: q, absmax: nested, blocksize: 256, offset: offset, code: Codes.dynamic8)
}

/// The first level: packed nibbles and fp32 absmax per block.
func quantizeBlocks(
    _ x: FloatElements, quantType: QuantType, blocksize: Int, kernel: KernelChoice
) throws(QuantizationError) -> (packed: [UInt8], absmax: [Float]) {
    let n = x.count
    let fullBlocks = n / blocksize
    let blocks = (n + blocksize - 1) / blocksize
    var packed = [UInt8](repeating: 0, count: (n + 1) / 2)
    var absmax = [Float](repeating: 0, count: blocks)
    let mids = quantType.midpoints, order = quantType.order

    var bad = -1
    switch kernel {
    case .reference:
        bad = quantizeFullBlocksReference(x, blocks: fullBlocks, blocksize: blocksize, quantType: quantType,
                                          absmax: &absmax, packed: &packed)
    case .fast:
        bad = mids.withUnsafeBufferPointer { m in
            order.withUnsafeBufferPointer { o in
                absmax.withUnsafeMutableBufferPointer { a in
                    packed.withUnsafeMutableBufferPointer { p in
                        let nb = Int64(fullBlocks), bs = Int64(blocksize)
                        switch x {
                        case .float32(let b):
                            return Int(qlora_quantize4_blocks_f32(b.baseAddress, nb, bs, m.baseAddress, o.baseAddress, a.baseAddress, p.baseAddress))
                        case .bfloat16(let b):
                            return Int(qlora_quantize4_blocks_bf16(b.baseAddress, nb, bs, m.baseAddress, o.baseAddress, a.baseAddress, p.baseAddress))
                        case .float16(let b):
                            return Int(qlora_quantize4_blocks_f16(b.baseAddress, nb, bs, m.baseAddress, o.baseAddress, a.baseAddress, p.baseAddress))
                        }
                    }
                }
            }
        }
    }
    if bad >= 0 {
        let start = bad * blocksize
        for i in start..<(start + blocksize) where !x[i].isFinite { throw .nonFinite(index: i, value: x[i]) }
    }
    if fullBlocks < blocks {
        try quantizePartialBlockReference(x, start: fullBlocks * blocksize, quantType: quantType,
                                          absmax: &absmax[blocks - 1], packed: &packed)
    }
    return (packed, absmax)
}

// MARK: - Scalar reference

/// Sorted bucket of a scaled value: the number of midpoints strictly below it.
@inline(__always)
func bucketReference(_ v: Float, _ mids: [Float]) -> Int {
    var c = 0
    for k in 0..<15 where v > mids[k] { c += 1 }
    return c
}

@inline(__always)
func setNibble(_ packed: inout [UInt8], _ i: Int, _ nibble: UInt8) {
    if i & 1 == 0 {
        packed[i >> 1] = (packed[i >> 1] & 0x0F) | (nibble << 4)
    } else {
        packed[i >> 1] = (packed[i >> 1] & 0xF0) | nibble
    }
}

/// Full blocks, as bitsandbytes' torch code does them:
/// `absmax = |A|.max(-1)` (stored unclamped), `scaled = clamp(A * (1 / absmax.clamp(1e-38)), -1, 1)`,
/// `q = bucketize(scaled, midpoints)`, FP4 mapped through `argsort(code)`.
/// Returns the first block with a non-finite value, or -1.
func quantizeFullBlocksReference(
    _ x: FloatElements, blocks: Int, blocksize: Int, quantType: QuantType,
    absmax: inout [Float], packed: inout [UInt8]
) -> Int {
    let mids = quantType.midpoints, order = quantType.order
    for b in 0..<blocks {
        let start = b * blocksize
        var am: Float = 0
        for i in start..<(start + blocksize) {
            let v = x[i]
            if !v.isFinite { return b }
            am = max(am, abs(v))
        }
        absmax[b] = am
        let inv = 1 / max(am, absmaxFloor)
        for i in start..<(start + blocksize) {
            let scaled = min(max(x[i] * inv, -1), 1)
            setNibble(&packed, i, order[bucketReference(scaled, mids)])
        }
    }
    return -1
}

/// The final partial block differs: its absmax is stored CLAMPED to 1e-38 and values are
/// DIVIDED by it (`A[full:] / am`), not multiplied by a reciprocal. An odd element count is
/// padded with a scaled 0.0.
func quantizePartialBlockReference(
    _ x: FloatElements, start: Int, quantType: QuantType, absmax: inout Float, packed: inout [UInt8]
) throws(QuantizationError) {
    let mids = quantType.midpoints, order = quantType.order
    let n = x.count
    var am: Float = 0
    for i in start..<n {
        guard x[i].isFinite else { throw .nonFinite(index: i, value: x[i]) }
        am = max(am, abs(x[i]))
    }
    am = max(am, absmaxFloor)
    absmax = am
    for i in start..<n {
        let scaled = min(max(x[i] / am, -1), 1)
        setNibble(&packed, i, order[bucketReference(scaled, mids)])
    }
    if n & 1 == 1 { setNibble(&packed, n, order[bucketReference(0, mids)]) }
}

/// The whole of `quantize4Bit` in plain scalar code.
public func quantize4BitReference(
    _ x: FloatElements, shape: [Int], quantType: QuantType = .nf4, blocksize: Int = 64,
    doubleQuant: Bool = true, meanThreads: Int = 1
) throws(QuantizationError) -> Quantized4Bit {
    try quantize4Bit(x, shape: shape, quantType: quantType, blocksize: blocksize,
                     doubleQuant: doubleQuant, meanThreads: meanThreads, kernel: .reference)
}

// MARK: - Absmax only

/// The first-level absmax of every block exactly as `quantize4Bit` computes it (full blocks
/// unclamped, the final partial block clamped to 1e-38), from one read of `x` without
/// quantizing. Streamed checkpoint writes use it to learn the double-quant offset, which the
/// quant-state JSON (and so the safetensors header, written first) depends on.
/// - Throws: `QuantizationError.nonFinite` naming the first NaN/Inf element; bad blocksize.
public func blockAbsmax4Bit(_ x: FloatElements, blocksize: Int, kernel: KernelChoice = .fast) throws(QuantizationError) -> [Float] {
    guard QuantState.validBlocksizes.contains(blocksize) else { throw .invalidBlocksize(blocksize) }
    let n = x.count, full = n / blocksize
    var absmax = [Float](repeating: 0, count: (n + blocksize - 1) / blocksize)
    var bad = -1
    switch kernel {
    case .reference:
        blocks: for b in 0..<full {
            var am: Float = 0
            for i in (b * blocksize)..<((b + 1) * blocksize) {
                guard x[i].isFinite else { bad = b; break blocks }
                am = max(am, abs(x[i]))
            }
            absmax[b] = am
        }
    case .fast:
        bad = absmax.withUnsafeMutableBufferPointer { a in
            let nb = Int64(full), bs = Int64(blocksize)
            switch x {
            case .float32(let p): return Int(qlora_absmax_blocks_f32(p.baseAddress, nb, bs, a.baseAddress))
            case .bfloat16(let p): return Int(qlora_absmax_blocks_bf16(p.baseAddress, nb, bs, a.baseAddress))
            case .float16(let p): return Int(qlora_absmax_blocks_f16(p.baseAddress, nb, bs, a.baseAddress))
            }
        }
    }
    if bad >= 0 {
        for i in (bad * blocksize)..<((bad + 1) * blocksize) where !x[i].isFinite { throw .nonFinite(index: i, value: x[i]) }
    }
    if full * blocksize < n {
        var am: Float = 0
        for i in (full * blocksize)..<n {
            guard x[i].isFinite else { throw .nonFinite(index: i, value: x[i]) }
            am = max(am, abs(x[i]))
        }
        absmax[full] = max(am, absmaxFloor)
    }
    return absmax
}

// MARK: - Dequantize

/// Dequantizes `out.count` elements: `code[nibble] * absmax[i / blocksize]` in fp32, then
/// rounded to the output type (bf16: nearest even as torch; fp16: IEEE nearest even).
///
/// - Parameters:
///   - packed: nibbles starting at element 0 of the range (block-aligned when dequantizing
///     a tensor in chunks).
///   - absmax: fp32 scales starting at the range's first block (see `QuantState.absmaxValues`).
///   - quantType: selects the 16-entry code.
///   - blocksize: elements per scale.
///   - out: destination, one element per value.
///
/// bitsandbytes 0.50.2's own CPU dequantize has two machine-dependent deviations from this
/// (its portable path agrees with it): on AVX-512 CPUs it indexes absmax per row, wrong
/// when the last dimension is not a multiple of blocksize; with AVX512-BF16 it flushes
/// subnormal bf16 results to zero. See Vectors/README.md.
public func dequantize4Bit(
    _ packed: UnsafeBufferPointer<UInt8>, absmax: UnsafeBufferPointer<Float>, quantType: QuantType,
    blocksize: Int, into out: FloatOutput, kernel: KernelChoice = .fast
) {
    let n = out.count
    precondition(packed.count >= (n + 1) / 2, "packed data too short for \(n) elements")
    precondition(absmax.count >= (n + blocksize - 1) / blocksize, "absmax too short for \(n) elements")
    let code = quantType.code
    if kernel == .reference {
        dequantize4BitReference(packed, absmax: absmax, code: code, blocksize: blocksize, into: out)
        return
    }
    code.withUnsafeBufferPointer { c in
        let p = packed.baseAddress, a = absmax.baseAddress, cn = Int64(n), bs = Int64(blocksize)
        switch out {
        case .float32(let o): qlora_dequantize4_f32(p, cn, bs, c.baseAddress, a, o.baseAddress)
        case .bfloat16(let o): qlora_dequantize4_bf16(p, cn, bs, c.baseAddress, a, o.baseAddress)
        case .float16(let o): qlora_dequantize4_f16(p, cn, bs, c.baseAddress, a, o.baseAddress)
        }
    }
}

/// Scalar reference of `dequantize4Bit`.
func dequantize4BitReference(
    _ packed: UnsafeBufferPointer<UInt8>, absmax: UnsafeBufferPointer<Float>, code: [Float],
    blocksize: Int, into out: FloatOutput
) {
    @inline(__always) func value(_ i: Int) -> Float {
        let byte = packed[i >> 1]
        let nibble = i & 1 == 0 ? byte >> 4 : byte & 0x0F
        return code[Int(nibble)] * absmax[i / blocksize]
    }
    switch out {
    case .float32(let o): for i in 0..<o.count { o[i] = value(i) }
    case .bfloat16(let o): for i in 0..<o.count { o[i] = HalfPrecision.bfloat16Bits(value(i)) }
    case .float16(let o): for i in 0..<o.count { o[i] = HalfPrecision.float16Bits(value(i)) }
    }
}

extension Quantized4Bit {
    /// Dequantizes the whole tensor to `type` (default: the dtype recorded in the state),
    /// returning its raw little-endian bytes.
    public func dequantizedBytes(as type: ElementType? = nil, kernel: KernelChoice = .fast) -> [UInt8] {
        let t = type ?? state.dtype
        let n = state.elementCount
        var bytes = [UInt8](repeating: 0, count: n * t.byteSize)
        let absmax = state.absmaxValues()
        packed.withUnsafeBufferPointer { p in
            absmax.withUnsafeBufferPointer { a in
                bytes.withUnsafeMutableBytes { raw in
                    dequantize4Bit(p, absmax: a, quantType: state.quantType, blocksize: state.blocksize,
                                   into: .view(raw, as: t), kernel: kernel)
                }
            }
        }
        return bytes
    }

    /// Dequantizes to fp32 values.
    public func dequantizedFloat32(kernel: KernelChoice = .fast) -> [Float] {
        let bytes = dequantizedBytes(as: .float32, kernel: kernel)
        return bytes.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
    }
}

/// Run-time CPU dispatch of the SIMD kernels.
public enum KernelLevel: Int, Sendable, CustomStringConvertible {
    case scalar = 0
    case avx2 = 1
    case avx512 = 2
    /// AVX-512 plus AVX512-BF16 (`vdpbf16ps`): the bf16 GEMM and GEMV of `Matmul4Bit` and the
    /// attention's GEMM use it; every other kernel runs its AVX-512 version (levels are minimums).
    case avx512bf16 = 3

    /// The best level this CPU supports.
    public static var cpu: KernelLevel { KernelLevel(rawValue: Int(qlora_cpu_level())) ?? .scalar }
    /// The level kernels use now.
    public static var active: KernelLevel { KernelLevel(rawValue: Int(qlora_active_level())) ?? .scalar }
    /// Caps the level every kernel may use (tests force the fallback with `.scalar`).
    public static func setMaximum(_ level: KernelLevel) { qlora_set_max_level(Int32(level.rawValue)) }

    public var description: String {
        switch self {
        case .scalar: return "scalar"
        case .avx2: return "AVX2"
        case .avx512: return "AVX-512"
        case .avx512bf16: return "AVX512-BF16"
        }
    }
}
