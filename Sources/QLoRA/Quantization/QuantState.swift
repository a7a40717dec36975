/// Everything needed to turn a packed 4-bit tensor back into floats: bitsandbytes'
/// `QuantState` for `quantize_4bit`, as a value.
public struct QuantState: Sendable, Equatable {
    /// The 4-bit data type.
    public var quantType: QuantType
    /// Elements per absmax block (32 ... 4096, a power of two).
    public var blocksize: Int
    /// The weight's dtype before quantization: the default dequantization output.
    public var dtype: ElementType
    /// The weight's shape (row-major); elements are flattened and blocked in that order.
    public var shape: [Int]
    /// One scale per block, plain or double-quantized.
    public var absmax: Absmax

    public enum Absmax: Sendable, Equatable {
        /// fp32, one per block (`NAME.absmax` F32 in a checkpoint).
        case plain([Float])
        /// Double quantization (`compress_statistics=True`).
        case nested(NestedAbsmax)
    }

    /// The 4-bit blocksizes bitsandbytes accepts.
    public static let validBlocksizes = [32, 64, 128, 256, 512, 1024, 2048, 4096]

    public init(quantType: QuantType, blocksize: Int, dtype: ElementType, shape: [Int], absmax: Absmax) {
        self.quantType = quantType
        self.blocksize = blocksize
        self.dtype = dtype
        self.shape = shape
        self.absmax = absmax
    }

    /// Number of elements (product of `shape`).
    public var elementCount: Int { shape.reduce(1, *) }
    /// Number of absmax blocks: ceil(elementCount / blocksize).
    public var blockCount: Int { CheckedSize.ceilingDivision(elementCount, blocksize) }
    /// Bytes of packed 4-bit data: ceil(elementCount / 2).
    public var packedByteCount: Int { CheckedSize.ceilingDivision(elementCount, 2) }
    public var isDoubleQuantized: Bool { if case .nested = absmax { return true } else { return false } }

    /// The fp32 scale of every block, as bitsandbytes' `dequantize_4bit` computes it; double-quantized,
    /// `NestedAbsmax.dequantized()`.
    public func absmaxValues() -> [Float] {
        switch absmax {
        case .plain(let a):
            return a
        case .nested(let n):
            return n.dequantized()
        }
    }

    /// Bytes of quantization constants as stored: absmax (1 byte each when nested, else 4),
    /// nested absmax, the 16-entry code, the 256-entry nested code, and the offset.
    public var constantByteCount: Int {
        switch absmax {
        case .plain(let a): return a.count * 4 + 16 * 4
        case .nested(let n): return n.quantized.count + n.absmax.count * 4 + 16 * 4 + n.code.count * 4 + 4
        }
    }

    /// Checks internal consistency (counts match the shape and blocksize).
    public func validate() throws(QuantizationError) {
        guard QuantState.validBlocksizes.contains(blocksize) else { throw .invalidBlocksize(blocksize) }
        guard shape.allSatisfy({ $0 >= 0 }) else { throw .invalidState("negative dimension in shape \(shape)") }
        switch absmax {
        case .plain(let a):
            guard a.count == blockCount else {
                throw .invalidState("absmax has \(a.count) values, expected \(blockCount) for \(elementCount) elements at blocksize \(blocksize)")
            }
        case .nested(let n):
            guard n.quantized.count == blockCount else {
                throw .invalidState("absmax has \(n.quantized.count) bytes, expected \(blockCount) for \(elementCount) elements at blocksize \(blocksize)")
            }
            guard n.blocksize > 0 else { throw .invalidState("nested blocksize \(n.blocksize)") }
            let nestedBlocks = CheckedSize.ceilingDivision(blockCount, n.blocksize)
            guard n.absmax.count == nestedBlocks else {
                throw .invalidState("nested_absmax has \(n.absmax.count) values, expected \(nestedBlocks)")
            }
            guard n.code.count == 256 else { throw .invalidState("nested_quant_map has \(n.code.count) values, expected 256") }
        }
    }
}

/// The second level of double quantization: the first-level absmax minus `offset`,
/// 8-bit quantized in blocks of `blocksize` (256) with the dynamic code.
public struct NestedAbsmax: Sendable, Equatable {
    /// One dynamic-code index per first-level block (`NAME.absmax`, U8).
    public var quantized: [UInt8]
    /// fp32 absmax of each nested block (`NAME.nested_absmax`; fp32 whatever `dtype` is).
    public var absmax: [Float]
    /// First-level blocks per nested block (`nested_blocksize`, 256).
    public var blocksize: Int
    /// Mean of the first-level absmax (`nested_offset`), as torch's fp32 mean; with a 16-bit
    /// `dtype`, the mean bitsandbytes took in that dtype.
    public var offset: Float
    /// The 256-entry dynamic code (`NAME.nested_quant_map`).
    public var code: [Float]
    /// `nested_dtype`: the dtype the second level dequantizes in. fp32 when bitsandbytes quantizes;
    /// bf16 or fp16 (the weight's dtype) in a checkpoint saved after a CPU forward pass, when
    /// bitsandbytes double-quantizes its bf16 copy of the absmax again (see `dequantized()`).
    public var dtype: ElementType

    public init(quantized: [UInt8], absmax: [Float], blocksize: Int = 256, offset: Float, code: [Float] = dynamicCode8,
                dtype: ElementType = .float32) {
        self.quantized = quantized
        self.absmax = absmax
        self.blocksize = blocksize
        self.offset = offset
        self.code = code
        self.dtype = dtype
    }

    /// The first-level absmax, as bitsandbytes' `dequantize_4bit` computes it before its 4-bit
    /// kernel: `a = dequantize_blockwise(absmax, state2); a += offset; a = a.float()`.
    ///
    /// - fp32: `code[q] * nestedAbsmax[i / blocksize]`, then `+ offset`: two fp32 roundings.
    /// - bf16/fp16 (`dtype`): the CPU kernel `dequantizeBlockwise8bitCpu<bf16/fp16>` rounds the
    ///   fp32 product to `dtype` (nearest even); `+=` casts the 0-d fp32 offset to `dtype`, adds
    ///   in fp32 and rounds to `dtype`; `.float()` widens exactly. Three roundings to `dtype`.
    public func dequantized() -> [Float] {
        // code[q] * nestedAbsmax in fp32 (bitsandbytes' fp32 kernel; the 16-bit ones start the same way).
        var a = Blockwise8Bit.dequantize(quantized, absmax: absmax, blocksize: blocksize, code: code)
        let round: (Float) -> Float
        switch dtype {
        case .float32: round = { $0 }
        case .bfloat16: round = HalfPrecision.roundedToBFloat16
        case .float16: round = { HalfPrecision.float(float16Bits: HalfPrecision.float16Bits($0)) }
        }
        let offset = round(self.offset)
        a.withUnsafeMutableBufferPointer { out in
            for i in out.indices { out[i] = round(round(out[i]) + offset) }
        }
        return a
    }
}

/// A quantized tensor: packed nibbles plus the state to undo it.
public struct Quantized4Bit: Sendable, Equatable {
    /// ceil(n / 2) bytes; element 2j in the high nibble of byte j, 2j+1 in the low nibble;
    /// an odd count is padded with the nibble of 0.0.
    public var packed: [UInt8]
    public var state: QuantState

    public init(packed: [UInt8], state: QuantState) {
        self.packed = packed
        self.state = state
    }
}

public enum QuantizationError: Error, Equatable, CustomStringConvertible {
    case invalidBlocksize(Int)
    case nonFinite(index: Int, value: Float)
    case shapeMismatch(elements: Int, shape: [Int])
    case invalidState(String)

    public var description: String {
        switch self {
        case .invalidBlocksize(let b):
            return "invalid blocksize \(b) (expected one of \(QuantState.validBlocksizes.map(String.init).joined(separator: ", ")))"
        case .nonFinite(let i, let v):
            return "element \(i) is \(v); 4-bit quantization needs finite values (bitsandbytes would write NaN scales)"
        case .shapeMismatch(let n, let shape):
            return "\(n) elements do not match shape \(shape)"
        case .invalidState(let s):
            return "invalid quant state: \(s)"
        }
    }
}
