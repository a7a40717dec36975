import SafeTensors

/// safetensors does not align tensors within the data buffer (the buffer itself starts at a
/// multiple of 8), so a tensor's bytes may not be aligned for its element type. Runs `body`
/// on the bytes in place when they are aligned to `alignment`, else on an aligned copy.
func withAlignedBytes<R>(_ raw: UnsafeRawBufferPointer, alignment: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
    guard let base = raw.baseAddress, Int(bitPattern: base) % alignment != 0 else { return try body(raw) }
    let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: raw.count, alignment: max(alignment, 16))
    defer { copy.deallocate() }
    copy.copyMemory(from: raw)
    return try body(UnsafeRawBufferPointer(copy))
}

/// Little-endian fp32 values from possibly unaligned bytes.
func loadFloats(_ raw: UnsafeRawBufferPointer) -> [Float] {
    (0..<(raw.count / 4)).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) }
}
