// POSIX plumbing shared by the reader and the writers: read-only mappings, buffered exclusive
// output files, temporary names, atomic renames. All raw pointers and file descriptors of the
// module live in this file.

import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The current C `errno` as a `SafeTensorsError.io`.
func ioError(_ file: String, _ operation: String, _ code: Int32 = errno) -> SafeTensorsError {
    .io(file: file, operation: operation, errno: code)
}

// MARK: - Reading

/// Bytes of a whole file or buffer, owned for the lifetime of this object: either a read-only
/// What a file of type `type` (`st_mode & S_IFMT`) is, in the words of every refusal of an input
/// that is not a regular file (safetensors files here, every other input in FileOutput's
/// `InputFile`); nil for a regular file.
public func nonRegularFileKind(_ type: mode_t) -> String? {
    switch type {
    case S_IFREG: return nil
    case S_IFDIR: return "a directory"
    case S_IFIFO: return "a FIFO"
    case S_IFCHR: return "a character device"
    case S_IFBLK: return "a block device"
    case S_IFSOCK: return "a socket"
    default: return "not a plain file"
    }
}

/// private mapping (unmapped on deinit) or a heap copy (freed on deinit).
final class ByteRegion: @unchecked Sendable {
    // @unchecked: the memory is never written after init, so sharing across threads is safe.
    let bytes: UnsafeRawBufferPointer
    private let isMapped: Bool

    /// Maps `path` read-only. The descriptor is closed right away; the mapping stays valid.
    /// An empty file gets an empty region (mmap rejects length 0).
    init(mapping path: String) throws {
        // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { throw ioError(path, "open") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw ioError(path, "stat") }
        // A directory keeps its errno (EISDIR), as open(2) reports it for a write.
        if info.st_mode & S_IFMT == S_IFDIR { throw ioError(path, "open as a regular file", EISDIR) }
        if let kind = nonRegularFileKind(info.st_mode & S_IFMT) { throw SafeTensorsError.notRegularFile(file: path, kind: kind) }
        let size = Int(info.st_size)
        guard size > 0 else {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            isMapped = false
            return
        }
        guard let base = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0),
              base != UnsafeMutableRawPointer(bitPattern: -1) else {  // MAP_FAILED
            throw ioError(path, "mmap")
        }
        bytes = UnsafeRawBufferPointer(start: base, count: size)
        isMapped = true
    }

    /// Copies `source` into memory owned by the region.
    init(copying source: [UInt8]) {
        let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(source.count, 1), alignment: 16)
        source.withUnsafeBytes { storage.copyMemory(from: $0) }
        bytes = UnsafeRawBufferPointer(rebasing: storage[0..<source.count])
        isMapped = false
    }

    /// Drops the mapped pages wholly inside `range` from this process (`MADV_DONTNEED`): they
    /// stop counting in its resident set, and a later read faults them in from the file again.
    /// Nothing happens for a heap copy.
    func releasePages(_ range: Range<Int>) {
        guard isMapped, let base = bytes.baseAddress, range.lowerBound >= 0, range.upperBound <= bytes.count else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = (Int(bitPattern: base) + range.lowerBound + page - 1) / page * page
        let end = (Int(bitPattern: base) + range.upperBound) / page * page
        guard end > start else { return }
        _ = madvise(UnsafeMutableRawPointer(bitPattern: start), end - start, Int32(MADV_DONTNEED))
    }

    deinit {
        guard let base = bytes.baseAddress else { return }
        if isMapped {
            munmap(UnsafeMutableRawPointer(mutating: base), bytes.count)
        } else {
            base.deallocate()
        }
    }
}

// MARK: - Writing

/// A new file opened exclusively (`O_CREAT | O_EXCL`) and written through a fixed-size buffer,
/// so that arbitrarily large outputs use `capacity` bytes of memory.
public final class BufferedOutput {
    /// Path named in error messages (the final target; `operationSuffix` names the temp file).
    let reportedPath: String
    let path: String
    private var fd: Int32
    private let buffer: UnsafeMutableRawBufferPointer
    private var used = 0
    private let suffix: String

    public init(creating path: String, reportedAs reportedPath: String, capacity: Int) throws {
        self.path = path
        self.reportedPath = reportedPath
        self.suffix = " of temporary file '\((path as NSString).lastPathComponent)'"
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ioError(reportedPath, "create temporary file '\(path)'") }
        buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(capacity, 4096), alignment: 4096)
    }

    deinit {
        closeDescriptor()
        buffer.deallocate()
    }

    /// Appends bytes; chunks at least as large as the buffer bypass it.
    public func append(_ bytes: UnsafeRawBufferPointer) throws {
        guard bytes.count > 0 else { return }
        if used + bytes.count > buffer.count {
            try flush()
        }
        if bytes.count >= buffer.count {
            try writeAll(bytes)
        } else {
            UnsafeMutableRawBufferPointer(rebasing: buffer[used..<used + bytes.count]).copyMemory(from: bytes)
            used += bytes.count
        }
    }

    func flush() throws {
        guard used > 0 else { return }
        try writeAll(UnsafeRawBufferPointer(rebasing: buffer[0..<used]))
        used = 0
    }

    /// Flushes, fsyncs and closes; after this only `path` remains.
    public func syncAndClose() throws {
        try flush()
        guard fsync(fd) == 0 else { throw ioError(reportedPath, "fsync" + suffix) }
        let result = close(fd)
        fd = -1
        guard result == 0 else { throw ioError(reportedPath, "close" + suffix) }
    }

    func closeDescriptor() {
        if fd >= 0 {
            close(fd)
            fd = -1
        }
    }

    private func writeAll(_ bytes: UnsafeRawBufferPointer) throws {
        guard fd >= 0 else { throw ioError(reportedPath, "write" + suffix, EBADF) }
        var offset = 0
        while offset < bytes.count {
            let n = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                throw ioError(reportedPath, "write" + suffix)
            }
            offset += n
        }
    }
}

/// `<dir>/.<name>.tmp-<pid>-<random>`: hidden, next to `target` so that rename(2) is atomic
/// (same filesystem), and unique per process and call.
func makeTemporaryPath(for target: String) -> String {
    let url = URL(fileURLWithPath: target)
    let name = "." + url.lastPathComponent + ".tmp-\(getpid())-" + String(UInt64.random(in: 0...UInt64.max), radix: 16)
    return url.deletingLastPathComponent().appendingPathComponent(name).path
}

/// Atomically replaces `target` with `temporary`.
func renameIntoPlace(_ temporary: String, _ target: String) throws {
    guard rename(temporary, target) == 0 else {
        throw ioError(target, "rename temporary file '\((temporary as NSString).lastPathComponent)' into place")
    }
}

/// Makes renames in `directory` durable. Best effort: some filesystems refuse to fsync a
/// directory, which does not make the data written so far wrong.
func syncDirectory(_ directory: String) {
    let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { return }
    _ = fsync(fd)
    close(fd)
}

/// `mkdir -p`: creates `path` and missing parents (mode 0755 before umask).
func makeDirectories(_ path: String) throws {
    if fileExists(path).isDirectory { return }
    let parent = directoryOf(path)
    if parent != path && !fileExists(parent).exists { try makeDirectories(parent) }
    guard mkdir(path, 0o755) == 0 || errno == EEXIST else { throw ioError(path, "create directory") }
    guard fileExists(path).isDirectory else { throw ioError(path, "create directory", ENOTDIR) }
}

func removeFileIfPresent(_ path: String) {
    _ = unlink(path)
}

func fileExists(_ path: String) -> (exists: Bool, isDirectory: Bool) {
    var info = stat()
    guard stat(path, &info) == 0 else { return (false, false) }
    return (true, (info.st_mode & S_IFMT) == S_IFDIR)
}

/// Writes small `contents` (an index file) to `target` via a temporary file, fsync and rename.
func writeAtomically(_ contents: [UInt8], to target: String) throws {
    let temporary = makeTemporaryPath(for: target)
    do {
        let output = try BufferedOutput(creating: temporary, reportedAs: target, capacity: contents.count)
        try contents.withUnsafeBytes { try output.append($0) }
        try output.syncAndClose()
        try renameIntoPlace(temporary, target)
    } catch {
        removeFileIfPresent(temporary)
        throw error
    }
    syncDirectory(directoryOf(target))
}

/// The directory containing `path` ("." for a bare file name).
func directoryOf(_ path: String) -> String {
    let directory = (path as NSString).deletingLastPathComponent
    return directory.isEmpty ? "." : directory
}
