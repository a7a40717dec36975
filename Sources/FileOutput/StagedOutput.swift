import CFileOps
import SafeTensors
import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Every file and directory the tool writes goes through this one helper, and so do its rules:
///
/// - An output is built in a hidden staging directory beside its destination
///   (`.NAME.tmp-PID-RANDOM`) and renamed into place by `commit()` only when complete; `abort()`,
///   deallocation without a commit, or SIGINT/SIGTERM/SIGHUP (`installSignalCleanup`) remove
///   everything staged. Staging left by a run that was killed (its PID no longer runs) is removed
///   by the next run into the same place.
/// - An output is never any input: not the same file or directory (by device and inode), not
///   inside an input directory, and no input inside it.
/// - An existing output (a file, or a directory that is not empty) is refused unless the caller
///   says `overwrite`, and even then never an input.
/// - The final name is taken exclusively (renameat2 RENAME_NOREPLACE): of two runs writing one
///   OUTPUT one fails cleanly, and nothing this run did not create is ever replaced or deleted
///   (except what `overwrite` names, and then only after the new output is complete).
///
/// Three shapes of output:
/// - `.directory`: the staging directory becomes the destination directory;
/// - `.file`: one file, written at `url` inside the staging directory, renamed to the destination;
/// - `.filesInDirectory`: the files written into the staging directory are each renamed into the
///   destination directory (created when missing), beside whatever else it holds; each file is
///   an output under the rules above.
public final class StagedOutput {
    public enum Kind: Sendable {
        case directory, file, filesInDirectory
    }

    public let destination: URL
    public let kind: Kind
    public let overwrite: Bool
    /// The hidden directory everything is staged in, beside the destination.
    public let stagingDirectory: URL
    /// The destination was an empty directory when the run began: `rename` replaces it only if
    /// it is still empty (a directory filled meanwhile is never replaced).
    private let replacesEmptyDirectory: Bool
    /// Directories this output created for its destination (`createParent`), removed on abort
    /// when still empty.
    private let createdDirectories: [URL]
    private let inputs: [String]
    private var done = false

    /// Checks the destination against the rules and creates the staging directory.
    /// - Parameters:
    ///   - inputs: every path the run reads (files or directories); the output may be none of them.
    ///   - createParent: create the destination's directory when missing (otherwise a missing
    ///     directory is an error naming it).
    public init(_ path: String, kind: Kind, overwrite: Bool = false, inputs: [String] = [], createParent: Bool = false) throws {
        let fm = FileManager.default
        let dest = URL(fileURLWithPath: path).standardizedFileURL
        let parent = kind == .filesInDirectory ? dest : dest.deletingLastPathComponent()
        try Self.checkNotInput(dest, kind: kind, path: path, inputs: inputs)
        if kind == .filesInDirectory, fm.fileExists(atPath: dest.path), !Self.isDirectory(dest.path) {
            throw FileError(path: path, problem: "exists and is not a directory")
        }
        var created: [URL] = []
        if createParent {
            var missing: [URL] = []
            var d = parent
            while !fm.fileExists(atPath: d.path) && d.path != "/" { missing.insert(d, at: 0); d = d.deletingLastPathComponent() }
            do { try fm.createDirectory(at: parent, withIntermediateDirectories: true) } catch {
                throw FileError(path: parent.path, problem: "cannot create: \(error.localizedDescription)")
            }
            created = missing
        }
        guard Self.isDirectory(parent.path) else {
            throw FileError(path: path, problem: "directory \(parent.path) does not exist")
        }
        var emptyDirectory = false
        if kind != .filesInDirectory, Self.exists(dest.path) {
            if kind == .file && Self.isDirectory(dest.path) {
                throw FileError(path: path, problem: "is a directory; INPUT is a single file, so OUTPUT must be a file path")
            }
            let empty = kind == .directory && Self.isDirectory(dest.path) && ((try? fm.contentsOfDirectory(atPath: dest.path))?.isEmpty ?? false)
            if !empty && !overwrite {
                throw FileError(path: path, problem: kind == .directory
                    ? "already exists and is not empty; remove it, choose a new path, or give --overwrite"
                    : "already exists; remove it, choose a new path, or give --overwrite")
            }
            emptyDirectory = empty && !overwrite
        }
        let name = kind == .filesInDirectory ? "output" : dest.lastPathComponent
        Self.removeStaleStaging(in: parent, name: name)
        let staging = parent.appendingPathComponent(".\(name).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        do { try fm.createDirectory(at: staging, withIntermediateDirectories: false) } catch {
            throw FileError(path: staging.path, problem: "cannot create: \(error.localizedDescription)")
        }
        self.destination = dest
        self.kind = kind
        self.overwrite = overwrite
        self.stagingDirectory = staging
        self.replacesEmptyDirectory = emptyDirectory
        self.createdDirectories = created
        self.inputs = inputs
        Self.registry.add(staging.path)
    }

    deinit { abort() }

    /// Where to write: the staged file (`.file`), else the staging directory.
    public var url: URL {
        kind == .file ? stagingDirectory.appendingPathComponent(destination.lastPathComponent) : stagingDirectory
    }

    /// A path inside the staging directory.
    public func url(for relativePath: String) -> URL { stagingDirectory.appendingPathComponent(relativePath) }

    /// Renames what was staged into place, exclusively.
    public func commit() throws {
        guard !done else { return }
        let fm = FileManager.default
        switch kind {
        case .directory, .file:
            try place(kind == .file ? url : stagingDirectory, at: destination, replacingEmptyDirectory: replacesEmptyDirectory)
            if kind == .file { try? fm.removeItem(at: stagingDirectory) }
        case .filesInDirectory:
            let names = try fm.contentsOfDirectory(atPath: stagingDirectory.path).sorted()
            if !overwrite, let taken = names.first(where: { Self.exists(destination.appendingPathComponent($0).path) }) {
                throw FileError(path: destination.appendingPathComponent(taken).path, problem: "already exists; remove it or give --overwrite")
            }
            for name in names {
                let target = destination.appendingPathComponent(name)
                try Self.checkNotInput(target, kind: .file, path: target.path, inputs: inputs)
                try place(stagingDirectory.appendingPathComponent(name), at: target, replacingEmptyDirectory: false)
            }
            try? fm.removeItem(at: stagingDirectory)
        }
        done = true
        Self.registry.remove(stagingDirectory.path)
        Self.syncDirectory(kind == .filesInDirectory ? destination.path : destination.deletingLastPathComponent().path)
    }

    /// Puts `source` at `target`: exclusively; over an empty directory only while it is empty;
    /// over an existing output (`overwrite`) by moving it aside first and removing it only once
    /// the new one is in place.
    private func place(_ source: URL, at target: URL, replacingEmptyDirectory: Bool) throws {
        if replacingEmptyDirectory {
            // rename(2) replaces an empty directory and fails on one that is not.
            guard Foundation.rename(source.path, target.path) == 0 else { throw Self.renameError(target) }
            return
        }
        var aside: URL? = nil
        if overwrite && Self.exists(target.path) {
            let old = target.deletingLastPathComponent().appendingPathComponent(".\(target.lastPathComponent).old-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
            guard qlora_rename_noreplace(target.path, old.path) == 0 else { throw Self.renameError(target) }
            aside = old
        }
        guard qlora_rename_noreplace(source.path, target.path) == 0 else {
            let error = Self.renameError(target)
            if let aside { _ = qlora_rename_noreplace(aside.path, target.path) }
            throw error
        }
        if let aside { try? FileManager.default.removeItem(at: aside) }
    }

    private static func renameError(_ target: URL) -> FileError {
        let code = errno
        if code == EEXIST || code == ENOTEMPTY {
            return FileError(path: target.path, problem: "appeared while this run was writing it; nothing was replaced (the new output is discarded)")
        }
        return FileError(path: target.path, problem: "cannot rename the staged output into place: \(String(cString: strerror(code)))")
    }

    /// Removes everything staged, and the directories this output created if still empty.
    /// Idempotent; does nothing after a commit.
    public func abort() {
        guard !done else { return }
        done = true
        try? FileManager.default.removeItem(at: stagingDirectory)
        Self.registry.remove(stagingDirectory.path)
        for d in createdDirectories.reversed() { rmdir(d.path) }  // only empty ones go
    }

    /// Writes `data` to `path` through a staged file: complete or absent.
    public static func write(_ data: Data, to path: String, overwrite: Bool = false, inputs: [String] = []) throws {
        let out = try StagedOutput(path, kind: .file, overwrite: overwrite, inputs: inputs)
        try data.write(to: out.url)
        try out.commit()
    }

    // MARK: Inputs

    /// The output may be no input: not the same file or directory, not inside an input directory,
    /// and (a directory output) holding no input.
    public static func checkNotInput(_ dest: URL, kind: Kind, path: String, inputs: [String]) throws {
        let out = resolved(dest)
        let outID = identity(out.path)
        for input in inputs where !input.isEmpty {
            let inURL = URL(fileURLWithPath: input).standardizedFileURL.resolvingSymlinksInPath()
            if let outID, let inID = identity(inURL.path), outID == inID {
                throw FileError(path: path, problem: "OUTPUT is the same as INPUT \(input); write to a new path")
            }
            if out.path == inURL.path {
                throw FileError(path: path, problem: "OUTPUT is the same as INPUT \(input); write to a new path")
            }
            if isDirectory(inURL.path), out.path.hasPrefix(inURL.path + "/") {
                throw FileError(path: path, problem: "OUTPUT is inside the INPUT directory \(input)")
            }
            if kind != .file, inURL.path.hasPrefix(out.path + "/") {
                throw FileError(path: path, problem: "INPUT \(input) is inside OUTPUT")
            }
        }
    }

    /// `url` with its directory's symlinks resolved (the last component may not exist yet).
    static func resolved(_ url: URL) -> URL {
        if exists(url.path) { return url.resolvingSymlinksInPath() }
        return url.deletingLastPathComponent().resolvingSymlinksInPath().appendingPathComponent(url.lastPathComponent)
    }

    /// Device and inode of `path` (symlinks followed), or nil.
    static func identity(_ path: String) -> [UInt64]? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return [UInt64(st.st_dev), UInt64(st.st_ino)]
    }

    public static func isDirectory(_ path: String) -> Bool {
        var d: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &d) && d.boolValue
    }

    /// Something is at `path` (a dangling symlink counts).
    static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    // MARK: Staging left behind

    /// Removes `.NAME.tmp-PID-N` / `.NAME.old-PID-N` entries of `directory` whose PID no longer runs:
    /// what a run killed with SIGKILL (or a power cut) left.
    static func removeStaleStaging(in directory: URL, name: String) {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: directory.path) else { return }
        for entry in entries {
            for marker in [".\(name).tmp-", ".\(name).old-"] where entry.hasPrefix(marker) {
                let rest = entry.dropFirst(marker.count).split(separator: "-")
                guard rest.count == 2, let pid = Int32(rest[0]), UInt32(rest[1]) != nil, pid > 0, pid != getpid() else { continue }
                if kill(pid, 0) != 0 && errno == ESRCH {
                    try? FileManager.default.removeItem(at: directory.appendingPathComponent(entry))
                }
            }
        }
    }

    // MARK: Signals

    /// Staging directories of outputs not yet committed or aborted, for the signal handlers.
    final class Registry: @unchecked Sendable {
        private let lock = NSLock()
        private var paths = Set<String>()
        func add(_ p: String) { lock.lock(); paths.insert(p); lock.unlock() }
        func remove(_ p: String) { lock.lock(); paths.remove(p); lock.unlock() }
        func removeAll() {
            lock.lock()
            let all = paths
            paths.removeAll()
            lock.unlock()
            for p in all { try? FileManager.default.removeItem(atPath: p) }
        }
    }
    static let registry = Registry()

    /// Set when a cleanup signal arrived: the process is about to die of it.
    final class Flag: @unchecked Sendable {
        private let lock = NSLock()
        private var value = false
        func set() { lock.lock(); value = true; lock.unlock() }
        var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
    }
    static let dying = Flag()

    /// Whether a cleanup signal arrived. An error the main thread meets meanwhile (its staging
    /// vanished under it) is the signal's doing: it should wait to be killed, not exit 1 with
    /// that error.
    public static var isDyingOfSignal: Bool { dying.isSet }
    nonisolated(unsafe) private static var signalSources: [DispatchSourceSignal] = []

    /// On each of `signals`, removes every output being staged, then dies of the signal as it
    /// would have (the shell sees 128 + signal). Call once, before the work starts.
    public static func installSignalCleanup(_ signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]) {
        for sig in signals {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: DispatchQueue.global())
            source.setEventHandler {
                dying.set()
                registry.removeAll()
                signal(sig, SIG_DFL)
                kill(getpid(), sig)
            }
            source.resume()
            signalSources.append(source)
        }
    }

    static func syncDirectory(_ path: String) {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return }
        _ = fsync(fd)
        close(fd)
    }
}

/// Reading inputs: only regular files (after following symlinks) are read, so a FIFO or a
/// device given as a config, data file or sidecar is refused at once instead of blocking or
/// reading forever.
public enum InputFile {
    /// Refuses anything at `path` that is not a regular file.
    public static func requireRegular(_ path: String) throws {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw FileError(path: path, problem: errno == ENOENT ? "does not exist" : "cannot be read: \(String(cString: strerror(errno)))")
        }
        if let kind = nonRegularFileKind(st.st_mode & S_IFMT) { throw notRegular(path, kind) }
    }

    /// The refusal of a non-regular input, worded as SafeTensors' `notRegularFile`.
    static func notRegular(_ path: String, _ kind: String) -> FileError {
        FileError(path: path, problem: "is not a regular file (\(kind)); only regular files are read")
    }

    /// The bytes of the regular file at `path`.
    public static func read(_ path: String) throws -> Data {
        // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just after.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            throw FileError(path: path, problem: errno == ENOENT ? "does not exist" : "cannot be read: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw FileError(path: path, problem: "cannot be read: \(String(cString: strerror(errno)))") }
        if let kind = nonRegularFileKind(st.st_mode & S_IFMT) { throw notRegular(path, kind) }
        var data = Data(count: Int(st.st_size))
        var done = 0
        while done < data.count {
            let n = data.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, $0.count - done) }
            guard n > 0 else {
                if n < 0 && errno == EINTR { continue }
                if n == 0 { data.count = done; break }  // shrank while read
                throw FileError(path: path, problem: "cannot be read: \(String(cString: strerror(errno)))")
            }
            done += n
        }
        return data
    }
}

/// A file that cannot be read or written: one line naming the path and the problem.
public struct FileError: Error, CustomStringConvertible {
    public var path: String
    public var problem: String
    public init(path: String, problem: String) {
        self.path = path
        self.problem = problem
    }
    public var description: String { "\(path): \(problem)" }
}
