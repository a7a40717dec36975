import Foundation
import SafeTensors
#if canImport(Glibc)
import Glibc
#endif

/// Keeps reads observable so the optimizer cannot drop them (ASan checks each read).
nonisolated(unsafe) public var fuzzSink: UInt8 = 0

/// The first bytes of an input, read as small choices (how to shape the companion files);
/// 0 once the input runs out, so a short input takes the first option of every choice.
public struct Choices {
    private var bytes: ArraySlice<UInt8>
    /// The bytes after the choices (the file the harness fuzzes).
    public let rest: [UInt8]

    /// Splits `input` into `count` choice bytes and the rest.
    public init(_ input: UnsafeRawBufferPointer, count: Int) {
        let all = Array(input)
        bytes = all.prefix(count)[...]
        rest = Array(all.dropFirst(count))
    }

    /// The next choice byte, 0 when none is left.
    public mutating func next() -> UInt8 { bytes.popFirst() ?? 0 }

    /// The next choice byte, reduced to 0..<n.
    public mutating func next(_ n: Int) -> Int { Int(next()) % n }
}

/// A directory of this process's own under /dev/shm (`qlora-fuzz-<harness>-<pid>`) (memory-backed; the temporary directory
/// when /dev/shm is missing), so that concurrent fuzzers (`-jobs`, `-fork`) do not share files.
public let scratchDirectory: String = {
    let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
    let harness = (CommandLine.arguments.first.map { ($0 as NSString).lastPathComponent }) ?? "harness"
    let dir = (base as NSString).appendingPathComponent("qlora-fuzz-\(harness)-\(getpid())")
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}()

/// `scratchDirectory/name`.
public func scratchPath(_ name: String) -> String { (scratchDirectory as NSString).appendingPathComponent(name) }

/// Writes `bytes` to `path`, replacing it (plain open/write/close: cheaper than Foundation's
/// atomic write, and nothing reads a half-written file here).
public func writeFile(_ bytes: [UInt8], to path: String) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    require(fd >= 0, "cannot create \(path): errno \(errno)")
    var written = 0
    bytes.withUnsafeBytes { raw in
        while written < raw.count {
            let n = write(fd, raw.baseAddress! + written, raw.count - written)
            require(n > 0, "cannot write \(path): errno \(errno)")
            written += n
        }
    }
    close(fd)
}

/// A tensor to put into a safetensors image: `bytes` must be `dtype × shape` long.
public struct TensorSpec {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var bytes: [UInt8]

    public init(name: String, dtype: DType, shape: [Int], bytes: [UInt8]) {
        (self.name, self.dtype, self.shape, self.bytes) = (name, dtype, shape, bytes)
    }
}

/// A whole safetensors file holding `tensors` in order (header from `SafeTensorsHeader.encode`).
public func safetensorsImage(_ tensors: [TensorSpec]) -> [UInt8] {
    var infos: [TensorInfo] = []
    var offset = 0
    for t in tensors {
        infos.append(TensorInfo(name: t.name, dtype: t.dtype, shape: t.shape, dataOffsets: offset..<(offset + t.bytes.count)))
        offset += t.bytes.count
    }
    var image = SafeTensorsHeader.encode(tensors: infos, metadata: ["format": "pt"])
    for t in tensors { image += t.bytes }
    return image
}

/// `count` deterministic bytes (for tensor contents), varied by `seed`.
public func filler(_ count: Int, seed: UInt8) -> [UInt8] {
    var x = UInt32(seed) &* 2654435761 &+ 12345
    return (0..<count).map { _ in x = x &* 1103515245 &+ 12345; return UInt8(truncatingIfNeeded: x >> 16) }
}

/// `count` finite fp32 values in [0, 2) as little-endian bytes.
public func finiteFloatBytes(_ count: Int, seed: UInt8) -> [UInt8] {
    let raw = filler(count, seed: seed)
    var out: [UInt8] = []
    out.reserveCapacity(count * 4)
    for b in raw { withUnsafeBytes(of: (Float(b) / 128).bitPattern.littleEndian) { out += $0 } }
    return out
}

/// Traps unless `error`'s description is one line that starts with one of `files` and ": "
/// (or ":<line>: " for a line-numbered file), as every error a user sees must.
/// `types` lists the error types allowed here; any other type traps too.
public func checkError(_ error: Error, files: [String], types: [Any.Type]) {
    require(types.contains { $0 == type(of: error) }, "unexpected error type \(type(of: error)): \(error)")
    let text = "\(error)"
    require(files.contains { text.hasPrefix($0 + ":") }, "description does not name the file: \(text)")
    require(!text.contains("\n") && !text.contains("\r"), "description is not one line: \(text)")
}

/// `dims`' product, or nil when it overflows or a dimension is negative.
public func checkedProduct(_ dims: [Int]) -> Int? {
    var n = 1
    for d in dims {
        guard d >= 0 else { return nil }
        let (p, o) = n.multipliedReportingOverflow(by: d)
        if o { return nil }
        n = p
    }
    return n
}

/// `precondition` that keeps its message in an optimized build (where precondition's is
/// dropped), so a crash report says which check failed.
public func require(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String = "check failed",
                    file: StaticString = #fileID, line: UInt = #line) {
    if !condition() { fatalError(message(), file: file, line: line) }
}
