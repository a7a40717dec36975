import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Every file and directory the tool writes goes through this one helper: it is built in a
/// hidden staging directory beside its destination (`.NAME.tmp-PID-RANDOM`) and renamed into
/// place by `commit()` only when complete; `abort()`, or deallocation without a commit, removes
/// everything staged. So an output is either absent or whole.
///
/// Three shapes of output:
/// - `.directory`: the staging directory becomes the destination directory;
/// - `.file`: one file, written at `url` inside the staging directory, renamed to the destination;
/// - `.filesInDirectory`: the files written into the staging directory are each renamed into the
///   destination directory (created when missing), beside whatever else it holds.
public final class StagedOutput {
    public enum Kind: Sendable {
        case directory, file, filesInDirectory
    }

    /// What to do about something already at the destination (for `.filesInDirectory`: at each
    /// file's destination).
    public enum IfExists: Sendable {
        /// Refuse, unless it is an empty directory (a directory output replaces that).
        case refuse
        /// Replace it at commit.
        case replace
    }

    public let destination: URL
    public let kind: Kind
    public let ifExists: IfExists
    /// The hidden directory everything is staged in, beside the destination.
    public let stagingDirectory: URL
    private var done = false

    /// Checks the destination and creates the staging directory.
    /// - Parameter createParent: create the destination's parent directory when missing
    ///   (otherwise a missing parent is an error naming it).
    public init(_ path: String, kind: Kind, ifExists: IfExists, createParent: Bool = false) throws {
        let fm = FileManager.default
        let dest = URL(fileURLWithPath: path).standardizedFileURL
        let parent = kind == .filesInDirectory ? dest : dest.deletingLastPathComponent()
        if createParent {
            do { try fm.createDirectory(at: parent, withIntermediateDirectories: true) } catch {
                throw OutputError(path: parent.path, problem: "cannot create: \(error.localizedDescription)")
            }
        }
        guard Self.isDirectory(parent.path) else {
            throw OutputError(path: path, problem: "directory \(parent.path) does not exist")
        }
        if ifExists == .refuse && fm.fileExists(atPath: dest.path) {
            switch kind {
            case .directory:
                let contents = (try? fm.contentsOfDirectory(atPath: dest.path)) ?? ["?"]
                guard Self.isDirectory(dest.path), contents.isEmpty else {
                    throw OutputError(path: path, problem: "already exists and is not empty; remove it or choose a new directory")
                }
            case .file: throw OutputError(path: path, problem: "already exists")
            case .filesInDirectory: break  // checked per file at commit
            }
        }
        if kind == .file && Self.isDirectory(dest.path) {
            throw OutputError(path: path, problem: "is a directory; INPUT is a single file, so OUTPUT must be a file path")
        }
        let name = kind == .filesInDirectory ? "output" : dest.lastPathComponent
        let staging = parent.appendingPathComponent(".\(name).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        do { try fm.createDirectory(at: staging, withIntermediateDirectories: false) } catch {
            throw OutputError(path: staging.path, problem: "cannot create: \(error.localizedDescription)")
        }
        self.destination = dest
        self.kind = kind
        self.ifExists = ifExists
        self.stagingDirectory = staging
    }

    deinit { abort() }

    /// Where to write: the staged file (`.file`), else the staging directory.
    public var url: URL {
        kind == .file ? stagingDirectory.appendingPathComponent(destination.lastPathComponent) : stagingDirectory
    }

    /// A path inside the staging directory.
    public func url(for relativePath: String) -> URL { stagingDirectory.appendingPathComponent(relativePath) }

    /// Renames what was staged into place.
    public func commit() throws {
        guard !done else { return }
        let fm = FileManager.default
        switch kind {
        case .directory:
            if fm.fileExists(atPath: destination.path) { try fm.removeItem(at: destination) }  // empty, or replaceable (checked in init)
            try rename(stagingDirectory, to: destination)
        case .file:
            try rename(url, to: destination)
            try? fm.removeItem(at: stagingDirectory)
        case .filesInDirectory:
            let names = try fm.contentsOfDirectory(atPath: stagingDirectory.path).sorted()
            if ifExists == .refuse, let taken = names.first(where: { fm.fileExists(atPath: destination.appendingPathComponent($0).path) }) {
                throw OutputError(path: destination.appendingPathComponent(taken).path, problem: "already exists")
            }
            for name in names {
                let target = destination.appendingPathComponent(name)
                if Self.isDirectory(target.path) { try fm.removeItem(at: target) }  // rename replaces files, not directories
                try rename(stagingDirectory.appendingPathComponent(name), to: target)
            }
            try? fm.removeItem(at: stagingDirectory)
        }
        done = true
        syncDirectory(kind == .filesInDirectory ? destination.path : destination.deletingLastPathComponent().path)
    }

    /// Removes everything staged. Idempotent; does nothing after a commit.
    public func abort() {
        guard !done else { return }
        done = true
        try? FileManager.default.removeItem(at: stagingDirectory)
    }

    private func rename(_ from: URL, to: URL) throws {
        guard Foundation.rename(from.path, to.path) == 0 else {
            throw OutputError(path: to.path, problem: "cannot rename staged output into place: \(String(cString: strerror(errno)))")
        }
    }

    /// Writes `data` to `path` through a staged file: complete or absent, an existing file replaced.
    public static func write(_ data: Data, to path: String) throws {
        let out = try StagedOutput(path, kind: .file, ifExists: .replace)
        try data.write(to: out.url)
        try out.commit()
    }

    public static func isDirectory(_ path: String) -> Bool {
        var d: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &d) && d.boolValue
    }

    private func syncDirectory(_ path: String) {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return }
        _ = fsync(fd)
        close(fd)
    }
}

/// An output that cannot be written: one line naming the path and the problem.
public struct OutputError: Error, CustomStringConvertible {
    public var path: String
    public var problem: String
    public init(path: String, problem: String) {
        self.path = path
        self.problem = problem
    }
    public var description: String { "\(path): \(problem)" }
}
