import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Streams a safetensors file to disk without holding it in memory.
///
/// All tensors are declared up front, which fixes the header: data offsets are assigned
/// contiguously in declaration order (no alignment padding between tensors) and the JSON header
/// is padded with spaces so the data buffer starts at a multiple of 8 bytes, as the Rust library
/// does. The header is written immediately; then each tensor's bytes are appended with
/// `write(_:bytes:)`, in declaration order, in as many chunks as convenient. Tensors with zero
/// bytes may be skipped.
///
/// Output goes to a temporary file `.<name>.tmp-<pid>-<random>` in the target's directory.
/// `finish()` checks that every tensor is complete, flushes, fsyncs and renames it over the
/// target atomically, so the target path either keeps its old contents or holds a complete new
/// file. `abort()`, a failed `finish()`, or deallocation without `finish()` remove the
/// temporary file. Memory use is the write buffer (`bufferSize`, 8 MiB by default).
///
/// Not thread-safe: use from one thread (task) at a time.
public final class SafeTensorsWriter {
    /// Where `finish()` puts the file.
    public let url: URL
    /// Declared tensors with their assigned `dataOffsets`, in declaration (= file) order.
    public let tensors: [TensorInfo]
    public let metadata: [String: String]
    /// Header bytes including the 8-byte prefix and padding (= data start offset).
    public let headerByteCount: Int
    /// Size of the finished file in bytes.
    public var fileSize: Int { headerByteCount + (tensors.last?.dataOffsets.upperBound ?? 0) }

    /// The temporary file being written.
    let temporaryPath: String
    private var output: BufferedOutput?
    private var state: State = .writing
    private let indexByName: [String: Int]
    /// Index of the tensor currently being filled, and bytes written to it so far.
    private var current = 0
    private var written = 0

    private enum State { case writing, sealed, finished, closed }

    /// Default write buffer size: 8 MiB.
    public static let defaultBufferSize = 8 << 20

    /// Declares the file's tensors and metadata, creates the temporary file and writes the header.
    ///
    /// - Throws: `SafeTensorsError` for duplicate names, a tensor named `__metadata__`, negative
    ///   dimensions, sizes that overflow, or I/O errors.
    public convenience init(url: URL, tensors: [(name: String, dtype: DType, shape: [Int])],
                            metadata: [String: String] = [:], bufferSize: Int = SafeTensorsWriter.defaultBufferSize) throws {
        let planned = try Self.assignOffsets(tensors, file: url.path)
        try self.init(url: url, planned: planned, header: try Self.header(planned, metadata: metadata, file: url.path),
                      metadata: metadata, bufferSize: bufferSize)
    }

    /// The same, for tensors already laid out (`assignOffsets`) and their encoded, checked header
    /// (`header`): `ShardedWriter` checks every shard's header before it creates the first file.
    init(url: URL, planned: [TensorInfo], header: [UInt8], metadata: [String: String], bufferSize: Int) throws {
        let path = url.path
        var index: [String: Int] = [:]
        for (i, tensor) in planned.enumerated() { index[tensor.name] = i }

        self.url = url
        self.tensors = planned
        self.metadata = metadata
        self.headerByteCount = header.count
        self.indexByName = index
        self.temporaryPath = makeTemporaryPath(for: path)
        let output = try BufferedOutput(creating: temporaryPath, reportedAs: path, capacity: bufferSize)
        self.output = output
        do {
            try header.withUnsafeBytes { try output.append($0) }
        } catch {
            abort()
            throw error
        }
    }

    deinit {
        if state != .finished { abort() }
    }

    /// The encoded header, refused (before any file exists) when it is longer than the reader
    /// accepts (`SafeTensorsHeader.maxHeaderLength`, as the Rust library): a file qlora writes
    /// must be one it, and safetensors, can read back.
    static func header(_ planned: [TensorInfo], metadata: [String: String], file: String) throws -> [UInt8] {
        let header = SafeTensorsHeader.encode(tensors: planned, metadata: metadata)
        // The encoded bytes include the 8-byte length prefix.
        guard header.count - 8 <= SafeTensorsHeader.maxHeaderLength else {
            throw SafeTensorsError.headerTooLarge(file: file, headerLength: header.count - 8, limit: SafeTensorsHeader.maxHeaderLength)
        }
        return header
    }

    /// Validates declarations and lays tensors out back to back from offset 0.
    static func assignOffsets(_ tensors: [(name: String, dtype: DType, shape: [Int])], file: String) throws -> [TensorInfo] {
        var seen = Set<String>()
        var offset = 0
        var planned: [TensorInfo] = []
        planned.reserveCapacity(tensors.count)
        for (name, dtype, shape) in tensors {
            guard name != SafeTensorsHeader.metadataKey else {
                throw SafeTensorsError.reservedTensorName(file: file, tensor: name)
            }
            guard seen.insert(name).inserted else { throw SafeTensorsError.duplicateTensor(file: file, tensor: name) }
            guard shape.allSatisfy({ $0 >= 0 }) else { throw SafeTensorsError.invalidShape(file: file, tensor: name, shape: shape) }
            guard let count = dtype.byteCount(shape: shape) else {
                throw SafeTensorsError.shapeTooLarge(file: file, tensor: name, shape: shape)
            }
            let (end, overflow) = offset.addingReportingOverflow(count)
            guard !overflow else { throw SafeTensorsError.shapeTooLarge(file: file, tensor: name, shape: shape) }
            planned.append(TensorInfo(name: name, dtype: dtype, shape: shape, dataOffsets: offset..<end))
            offset = end
        }
        return planned
    }

    /// Appends `bytes` to tensor `name`. Starting a later tensor requires every earlier one to be
    /// complete (zero-byte tensors are complete without any call).
    ///
    /// - Throws: `.undeclaredTensor`, `.tensorOutOfOrder`, `.incompleteTensor` (the previous
    ///   tensor is short), `.tooManyBytes` (nothing is written in these four cases, so the writer
    ///   stays usable), `.writerClosed`, or `.io` (after which the writer is closed and the
    ///   temporary file removed).
    public func write(_ name: String, bytes: UnsafeRawBufferPointer) throws {
        guard state == .writing, let output else { throw SafeTensorsError.writerClosed(file: url.path) }
        guard let target = indexByName[name] else { throw SafeTensorsError.undeclaredTensor(file: url.path, tensor: name) }
        guard target >= current else {
            throw SafeTensorsError.tensorOutOfOrder(file: url.path, tensor: name, expected: nextExpectedName)
        }
        // Check everything before touching state, so a misuse error has no side effects.
        for i in current..<target {
            let done = i == current ? written : 0
            guard done == tensors[i].byteCount else {
                throw SafeTensorsError.incompleteTensor(file: url.path, tensor: tensors[i].name,
                                                        expected: tensors[i].byteCount, written: done)
            }
        }
        let already = target == current ? written : 0
        guard bytes.count <= tensors[target].byteCount - already else {
            throw SafeTensorsError.tooManyBytes(file: url.path, tensor: name, expected: tensors[target].byteCount,
                                                received: already + bytes.count)
        }
        if target != current {
            current = target
            written = 0
        }
        do {
            try output.append(bytes)
        } catch {
            abort()
            throw error
        }
        written += bytes.count
    }

    /// `write(_:bytes:)` for an array.
    public func write(_ name: String, bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write(name, bytes: $0) }
    }

    /// True after `abort()`, a failed `finish()` or an I/O error.
    var isClosed: Bool { state == .closed }

    /// The first tensor, from the current one on, that still lacks bytes (index into `tensors`,
    /// bytes written to it), or nil when the file is complete.
    var incompleteTensor: (index: Int, written: Int)? {
        for i in current..<tensors.count {
            let done = i == current ? written : 0
            if done != tensors[i].byteCount { return (i, done) }
        }
        return nil
    }

    /// Name of the tensor the next `write` should target, for error messages.
    var nextExpectedName: String {
        incompleteTensor.map { tensors[$0.index].name } ?? "(none: all tensors are complete)"
    }

    /// Checks completeness, flushes, fsyncs and renames the temporary file over `url`.
    /// If it throws, the temporary file has been removed and the writer is closed.
    public func finish() throws {
        try seal()
        try commitSealed()
        syncDirectory(directoryOf(url.path))
    }

    /// First half of `finish()`: everything but the rename (used by `ShardedWriter`, which renames
    /// all shards only once all are written). On error the temporary file is removed.
    func seal() throws {
        guard state == .writing, let output else { throw SafeTensorsError.writerClosed(file: url.path) }
        if let (index, done) = incompleteTensor {
            abort()
            throw SafeTensorsError.incompleteTensor(file: url.path, tensor: tensors[index].name,
                                                    expected: tensors[index].byteCount, written: done)
        }
        do {
            try output.syncAndClose()
        } catch {
            abort()
            throw error
        }
        self.output = nil
        state = .sealed
    }

    /// Second half of `finish()` after `seal()`.
    func commitSealed() throws {
        guard state == .sealed else { throw SafeTensorsError.writerClosed(file: url.path) }
        do {
            try renameIntoPlace(temporaryPath, url.path)
        } catch {
            abort()
            throw error
        }
        state = .finished
    }

    /// Discards the output: closes and removes the temporary file. The target is untouched.
    /// Idempotent; does nothing after a successful `finish()`.
    public func abort() {
        guard state == .writing || state == .sealed else { return }
        output?.closeDescriptor()
        output = nil
        removeFileIfPresent(temporaryPath)
        state = .closed
    }

    /// Writes a whole file in one call (small files, tests). `bytes` must match each tensor's
    /// dtype x shape size.
    public static func write(url: URL, tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])],
                             metadata: [String: String] = [:]) throws {
        let writer = try SafeTensorsWriter(url: url, tensors: tensors.map { ($0.name, $0.dtype, $0.shape) },
                                           metadata: metadata, bufferSize: 1 << 20)
        do {
            for tensor in tensors { try writer.write(tensor.name, bytes: tensor.bytes) }
            try writer.finish()
        } catch {
            writer.abort()
            throw error
        }
    }
}
