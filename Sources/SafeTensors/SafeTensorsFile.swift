import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A safetensors file opened for zero-copy reading.
///
/// `init(url:)` maps the whole file read-only (`mmap`, `MAP_PRIVATE`; the descriptor is closed
/// immediately) and validates the header against the file size, so every `TensorInfo` it
/// exposes is in bounds. Tensor bytes are handed out as `UnsafeRawBufferPointer`s into the
/// mapping: little-endian, row-major, with no alignment guarantee beyond what the writer chose
/// (the Rust writer and `SafeTensorsWriter` start the data buffer at a multiple of 8 bytes, but
/// individual tensors are only aligned to their offsets). Copy or use `loadUnaligned` for typed
/// access. The mapping is released when the object is deallocated; buffers must not escape it.
///
/// Immutable after init and therefore safe to share between threads.
public final class SafeTensorsFile: Sendable {
    /// The path given to `init`, or `"<memory>"` (or the name given to `init(bytes:name:)`).
    public let path: String
    /// The validated header.
    public let header: SafeTensorsHeader
    private let region: ByteRegion
    private let indexByName: [String: Int]

    /// Maps and validates the file at `url`.
    /// - Throws: `SafeTensorsError` naming `url.path` (I/O errors or any header problem).
    public convenience init(url: URL) throws {
        try self.init(path: url.path)
    }

    /// Maps and validates the file at `path`.
    public convenience init(path: String) throws {
        let region = try ByteRegion(mapping: path)
        try self.init(region: region, path: path)
    }

    /// Copies `bytes` (a whole file image) and validates it; `name` appears in error messages.
    public convenience init(bytes: [UInt8], name: String = "<memory>") throws {
        try self.init(region: ByteRegion(copying: bytes), path: name)
    }

    private init(region: ByteRegion, path: String) throws {
        let header = try SafeTensorsHeader.parse(region.bytes, source: path)
        var index: [String: Int] = [:]
        index.reserveCapacity(header.tensors.count)
        for (i, tensor) in header.tensors.enumerated() { index[tensor.name] = i }
        self.region = region
        self.path = path
        self.header = header
        self.indexByName = index
    }

    /// All tensors in file-offset order.
    public var tensors: [TensorInfo] { header.tensors }

    /// The `__metadata__` map (empty when absent).
    public var metadata: [String: String] { header.metadata }

    /// File size in bytes.
    public var fileSize: Int { region.bytes.count }

    /// The tensor called `name`, or nil.
    public func info(named name: String) -> TensorInfo? {
        indexByName[name].map { header.tensors[$0] }
    }

    /// Calls `body` with the bytes of tensor `name` (`info.byteCount` bytes, zero-copy).
    /// The buffer is only valid inside `body`.
    ///
    /// - Precondition: the tensor exists (check with `info(named:)` when the name comes from
    ///   outside the file); an unknown name is a programming error and traps.
    public func withBytes<R>(of name: String, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(rawBuffer(of: name))
    }

    /// The bytes of tensor `name` inside the mapping; valid as long as this object is alive.
    ///
    /// - Precondition: the tensor exists (see `withBytes(of:_:)`).
    public func rawBuffer(of name: String) -> UnsafeRawBufferPointer {
        guard let tensor = info(named: name) else {
            preconditionFailure("\(oneLine(path)): no tensor named \(quoted(name))")
        }
        return rawBuffer(of: tensor)
    }

    /// The bytes of `tensor`, which must come from this file's `tensors`.
    public func rawBuffer(of tensor: TensorInfo) -> UnsafeRawBufferPointer {
        let start = header.dataStart + tensor.dataOffsets.lowerBound
        let end = header.dataStart + tensor.dataOffsets.upperBound
        precondition(tensor.dataOffsets.lowerBound >= 0 && end <= region.bytes.count,
                     "tensor \(quoted(tensor.name)) is not in \(oneLine(path))")
        return UnsafeRawBufferPointer(rebasing: region.bytes[start..<end])
    }

    /// Releases the memory-mapped pages of `tensor` from the process's resident set (see
    /// `ByteRegion.releasePages`); its bytes stay readable. Streaming jobs call this after each
    /// tensor so that their resident memory stays near one tensor instead of the whole file.
    /// `bytes`, if given, limits this to a byte range of the tensor.
    public func releasePages(of tensor: TensorInfo, bytes: Range<Int>? = nil) {
        let start = header.dataStart + tensor.dataOffsets.lowerBound
        let r = bytes.map { (start + $0.lowerBound)..<(start + min($0.upperBound, tensor.byteCount)) } ?? start..<(start + tensor.byteCount)
        region.releasePages(r)
    }

    /// The whole file image (prefix, header, data buffer); valid while this object is alive.
    public var fileBytes: UnsafeRawBufferPointer { region.bytes }
}
