import QLoRA
import SafeTensors

// The bridge between a stored tensor (safetensors `DType`, possibly unaligned bytes) and the
// numerics core's float element types. Written once here for every module above the core.

extension ElementType {
    /// The float element type of a stored dtype; nil for integer and 8-bit float dtypes.
    public init?(_ dtype: DType) {
        switch dtype {
        case .f32: self = .float32
        case .bf16: self = .bfloat16
        case .f16: self = .float16
        default: return nil
        }
    }
}

extension DType {
    /// The safetensors dtype that stores `type`.
    public init(_ type: ElementType) {
        switch type {
        case .float32: self = .f32
        case .bfloat16: self = .bf16
        case .float16: self = .f16
        }
    }
}

/// safetensors does not align tensors within the data buffer (the buffer itself starts at a
/// multiple of 8), so a tensor's bytes may not be aligned for its element type. Runs `body`
/// on the bytes in place when they are aligned to `alignment`, else on an aligned copy.
public func withAlignedBytes<R>(_ raw: UnsafeRawBufferPointer, alignment: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
    guard let base = raw.baseAddress, Int(bitPattern: base) % alignment != 0 else { return try body(raw) }
    let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: raw.count, alignment: max(alignment, 16))
    defer { copy.deallocate() }
    copy.copyMemory(from: raw)
    return try body(UnsafeRawBufferPointer(copy))
}

/// fp32 values rounded once to `type` (sign of zero kept), as raw bytes.
public func encode(_ v: [Float], as type: ElementType) -> [UInt8] {
    switch type {
    case .float32: return v.withUnsafeBytes { Array($0) }
    case .bfloat16: return v.map { HalfPrecision.bfloat16Bits($0) }.withUnsafeBytes { Array($0) }
    case .float16: return v.map { HalfPrecision.float16Bits($0) }.withUnsafeBytes { Array($0) }
    }
}
