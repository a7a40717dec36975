/// Element types of the safetensors format. Raw values are the exact strings stored in the
/// `"dtype"` field of a header entry.
///
/// Every element is stored little-endian and densely packed (no padding between elements);
/// `BOOL` is one byte per element (0 or 1).
public enum DType: String, Sendable, CaseIterable, Hashable {
    case bool = "BOOL"
    case u8 = "U8"
    case i8 = "I8"
    /// 8-bit float, 1 sign / 5 exponent / 2 mantissa bits (OCP FP8 E5M2).
    case f8e5m2 = "F8_E5M2"
    /// 8-bit float, 1 sign / 4 exponent / 3 mantissa bits, no infinities (OCP FP8 E4M3 "fn").
    case f8e4m3 = "F8_E4M3"
    case i16 = "I16"
    case u16 = "U16"
    /// IEEE 754 binary16.
    case f16 = "F16"
    /// bfloat16: the top 16 bits of an IEEE 754 binary32.
    case bf16 = "BF16"
    case i32 = "I32"
    case u32 = "U32"
    /// IEEE 754 binary32.
    case f32 = "F32"
    /// IEEE 754 binary64.
    case f64 = "F64"
    case i64 = "I64"
    case u64 = "U64"

    /// Size of one element in bytes (1, 2, 4 or 8).
    public var byteSize: Int {
        switch self {
        case .bool, .u8, .i8, .f8e5m2, .f8e4m3: return 1
        case .i16, .u16, .f16, .bf16: return 2
        case .i32, .u32, .f32: return 4
        case .f64, .i64, .u64: return 8
        }
    }

    /// True for the floating-point formats (FP8 variants, F16, BF16, F32, F64).
    public var isFloatingPoint: Bool {
        switch self {
        case .f8e5m2, .f8e4m3, .f16, .bf16, .f32, .f64: return true
        case .bool, .u8, .i8, .i16, .u16, .i32, .u32, .i64, .u64: return false
        }
    }
}

/// One tensor entry of a safetensors header.
///
/// The tensor's bytes are the half-open range `dataOffsets` of the file's data buffer, i.e.
/// file bytes `dataStart + dataOffsets.lowerBound ..< dataStart + dataOffsets.upperBound`,
/// holding `elementCount` elements of `dtype` in row-major (C) order, little-endian.
public struct TensorInfo: Sendable, Equatable, Hashable {
    /// The tensor's key in the header (any UTF-8 string except `__metadata__`).
    public var name: String
    public var dtype: DType
    /// Dimensions, outermost first. `[]` is a 0-d scalar (one element); any zero dimension
    /// makes an empty tensor (zero elements, zero bytes).
    public var shape: [Int]
    /// Byte range relative to the start of the data buffer (not to the start of the file).
    public var dataOffsets: Range<Int>

    public init(name: String, dtype: DType, shape: [Int], dataOffsets: Range<Int>) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.dataOffsets = dataOffsets
    }

    /// Number of elements: the product of `shape` (1 for a 0-d scalar). Tensors produced by the
    /// parser or the writers are checked not to overflow.
    public var elementCount: Int { shape.reduce(1, *) }

    /// Number of bytes in the data buffer: `dataOffsets.count`, which the parser has checked
    /// equals `elementCount * dtype.byteSize`.
    public var byteCount: Int { dataOffsets.count }
}

extension DType {
    /// Bytes needed for `shape` elements of this type, or nil when a dimension is negative or
    /// the product overflows `Int` (hostile headers and bad writer arguments).
    func byteCount(shape: [Int]) -> Int? {
        var count = byteSize
        for dimension in shape {
            guard dimension >= 0 else { return nil }
            let (product, overflow) = count.multipliedReportingOverflow(by: dimension)
            guard !overflow else { return nil }
            count = product
        }
        return count
    }
}
