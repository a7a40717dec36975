import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads a checkpoint that may be split over several safetensors files.
///
/// The path may be
/// - a safetensors file (any name): one shard;
/// - a directory with `model.safetensors.index.json`: the shards it names (the index wins when
///   a stale `model.safetensors` is also present; `ShardedWriter` removes such leftovers);
/// - a directory with `model.safetensors`: one shard.
///
/// Every shard is memory-mapped and validated up front, and the index is checked against the
/// shards: each indexed tensor must be in its shard, no tensor may be in two shards, and no shard
/// may hold a tensor the index does not map to it. Errors about this cross-file consistency name
/// the index file. Immutable after init and safe to share between threads.
public final class CheckpointReader: Sendable {
    /// Where a tensor lives.
    public struct Entry: Sendable, Equatable {
        /// Shard file name (relative to `directory`).
        public let shard: String
        /// Position of the shard in `shardFileNames` / `shards`.
        public let shardIndex: Int
        /// Offsets are relative to that shard's data buffer.
        public let info: TensorInfo
        public var name: String { info.name }
    }

    /// The path given to `init`.
    public let path: String
    /// Directory holding the shards.
    public let directory: String
    /// The decoded index, or nil for a single file.
    public let index: ShardIndex?
    /// Shard file names in order (sorted for an index).
    public let shardFileNames: [String]
    /// The opened shards, parallel to `shardFileNames`.
    public let shards: [SafeTensorsFile]
    /// All tensors, shard by shard, each shard in file-offset order.
    public let entries: [Entry]
    private let entryIndexByName: [String: Int]

    public convenience init(url: URL) throws {
        try self.init(path: url.path)
    }

    public init(path: String) throws {
        let status = fileExists(path)
        var index: ShardIndex? = nil
        let directory: String
        let names: [String]
        let indexPath: String
        if !status.exists {
            throw SafeTensorsError.io(file: path, operation: "open", errno: ENOENT)
        } else if status.isDirectory {
            directory = path
            let candidateIndex = (path as NSString).appendingPathComponent(ShardIndex.fileName)
            let single = (path as NSString).appendingPathComponent("model.safetensors")
            if fileExists(candidateIndex).exists {
                let decoded = try ShardIndex(contentsOf: URL(fileURLWithPath: candidateIndex))
                index = decoded
                names = decoded.shardFileNames
                indexPath = candidateIndex
            } else if fileExists(single).exists {
                names = ["model.safetensors"]
                indexPath = single
            } else {
                throw SafeTensorsError.noCheckpoint(file: path)
            }
        } else {
            directory = directoryOf(path)
            names = [(path as NSString).lastPathComponent]
            indexPath = path
        }

        var shards: [SafeTensorsFile] = []
        for name in names {
            let shardPath = (directory as NSString).appendingPathComponent(name)
            guard fileExists(shardPath).exists else {
                throw SafeTensorsError.missingShard(file: indexPath, shard: name)
            }
            shards.append(try SafeTensorsFile(path: shardPath))
        }

        var entries: [Entry] = []
        var byName: [String: Int] = [:]
        for (s, shard) in shards.enumerated() {
            for info in shard.tensors {
                if let other = byName[info.name] {
                    throw SafeTensorsError.tensorInMultipleShards(file: indexPath, tensor: info.name,
                                                                  shards: [entries[other].shard, names[s]])
                }
                byName[info.name] = entries.count
                entries.append(Entry(shard: names[s], shardIndex: s, info: info))
            }
        }
        if let index {
            for entry in entries where index.weightMap[entry.name] != entry.shard {
                throw SafeTensorsError.tensorNotInIndex(file: indexPath, tensor: entry.name, shard: entry.shard)
            }
            // Sorted so the reported tensor does not depend on dictionary order.
            for name in index.weightMap.keys.sorted(by: scalarOrder) where byName[name] == nil {
                throw SafeTensorsError.tensorMissingFromShard(file: indexPath, tensor: name, shard: index.weightMap[name]!)
            }
        }

        self.path = path
        self.directory = directory
        self.index = index
        self.shardFileNames = names
        self.shards = shards
        self.entries = entries
        self.entryIndexByName = byName
    }

    /// All tensor names in `entries` order.
    public var tensorNames: [String] { entries.map(\.name) }

    /// Where tensor `name` lives, or nil.
    public func entry(named name: String) -> Entry? {
        entryIndexByName[name].map { entries[$0] }
    }

    /// The file tensor `name` is read from, for messages: its shard, or `path` when there is no
    /// such tensor.
    public func filePath(of name: String) -> String {
        entry(named: name).map { directory + "/" + $0.shard } ?? path
    }

    /// The tensor called `name` (offsets relative to its shard), or nil.
    public func info(named name: String) -> TensorInfo? { entry(named: name)?.info }

    /// `__metadata__` of shard `fileName`, or nil when there is no such shard.
    public func metadata(ofShard fileName: String) -> [String: String]? {
        shardFileNames.firstIndex(of: fileName).map { shards[$0].metadata }
    }

    /// Calls `body` with the bytes of tensor `name` (zero-copy, valid only inside `body`).
    /// - Precondition: the tensor exists (check with `info(named:)`).
    public func withBytes<R>(of name: String, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(rawBuffer(of: name))
    }

    /// Releases tensor `name`'s mapped pages from the resident set (`SafeTensorsFile.releasePages`).
    public func releasePages(of name: String, bytes: Range<Int>? = nil) {
        guard let entry = entry(named: name) else { return }
        shards[entry.shardIndex].releasePages(of: entry.info, bytes: bytes)
    }

    /// The bytes of tensor `name` inside its shard's mapping; valid while this reader is alive.
    /// - Precondition: the tensor exists.
    public func rawBuffer(of name: String) -> UnsafeRawBufferPointer {
        guard let entry = entry(named: name) else {
            preconditionFailure("\(oneLine(path)): no tensor named \(quoted(name))")
        }
        return shards[entry.shardIndex].rawBuffer(of: entry.info)
    }
}
