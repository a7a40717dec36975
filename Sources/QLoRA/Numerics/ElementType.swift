/// The floating-point element types a weight may have before quantization or after
/// dequantization. Raw values are torch's dtype names as bitsandbytes records them in a
/// quant state (`"float32"`, `"bfloat16"`, `"float16"`).
public enum ElementType: String, Sendable, CaseIterable, Codable {
    case float32
    case bfloat16
    case float16

    /// Bytes per element.
    public var byteSize: Int { self == .float32 ? 4 : 2 }
}

/// A read-only view of a flat tensor's elements in one of the supported float formats.
/// 16-bit formats are raw bit patterns.
public enum FloatElements {
    case float32(UnsafeBufferPointer<Float>)
    case bfloat16(UnsafeBufferPointer<UInt16>)
    case float16(UnsafeBufferPointer<UInt16>)

    public var elementType: ElementType {
        switch self {
        case .float32: return .float32
        case .bfloat16: return .bfloat16
        case .float16: return .float16
        }
    }

    public var count: Int {
        switch self {
        case .float32(let b): return b.count
        case .bfloat16(let b): return b.count
        case .float16(let b): return b.count
        }
    }

    /// Element `i` converted exactly to fp32.
    @inline(__always)
    public subscript(i: Int) -> Float {
        switch self {
        case .float32(let b): return b[i]
        case .bfloat16(let b): return HalfPrecision.float(bfloat16Bits: b[i])
        case .float16(let b): return HalfPrecision.float(float16Bits: b[i])
        }
    }

    /// Interprets raw little-endian bytes of the given type as elements.
    /// - Precondition: `bytes` is aligned to the element size.
    public static func view(_ bytes: UnsafeRawBufferPointer, as type: ElementType) -> FloatElements {
        precondition(Int(bitPattern: bytes.baseAddress) % type.byteSize == 0, "\(type) elements must be aligned to \(type.byteSize) bytes")
        switch type {
        case .float32: return .float32(bytes.bindMemory(to: Float.self))
        case .bfloat16: return .bfloat16(bytes.bindMemory(to: UInt16.self))
        case .float16: return .float16(bytes.bindMemory(to: UInt16.self))
        }
    }
}

/// Float values of stored elements of `type`, from possibly unaligned little-endian bytes.
public func loadFloats(_ raw: UnsafeRawBufferPointer, as type: ElementType = .float32) -> [Float] {
    switch type {
    case .float32: return (0..<(raw.count / 4)).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) }
    case .bfloat16: return (0..<(raw.count / 2)).map { HalfPrecision.float(bfloat16Bits: raw.loadUnaligned(fromByteOffset: $0 * 2, as: UInt16.self)) }
    case .float16: return (0..<(raw.count / 2)).map { HalfPrecision.float(float16Bits: raw.loadUnaligned(fromByteOffset: $0 * 2, as: UInt16.self)) }
    }
}
