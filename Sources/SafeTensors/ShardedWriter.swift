import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Streams a checkpoint into a directory, split into shards in the `transformers` layout.
///
/// The full tensor list is declared up front and the shards are planned immediately (see
/// `planShards`): tensors keep their declaration order and fill shards of at most
/// `maxShardSize` data bytes (a tensor larger than that gets a shard of its own). Shard files
/// are `model-00001-of-00003.safetensors`, ... with `model.safetensors.index.json`; when one
/// shard suffices and `forceSharded` is false the output is a single `model.safetensors` and
/// no index.
///
/// Tensors are then written in declaration order with `write(_:bytes:)` (chunks allowed), as for
/// `SafeTensorsWriter`. Each shard goes to its own temporary file, created when its first tensor
/// is reached and sealed (flushed, fsynced, closed) when the next shard starts, so at most one
/// file is open and memory use is one write buffer. `finish()` renames all shards into place,
/// then writes the index through a temporary file and a rename, and finally removes a stale
/// counterpart layout (an old index when writing a single file, an old `model.safetensors` when
/// writing shards) so that `CheckpointReader` cannot pick up the old checkpoint. `abort()`, a
/// thrown `finish()` or deallocation without `finish()` remove all temporary files. (If a rename
/// itself fails half-way, shards renamed before it stay and no index is written.)
public final class ShardedWriter {
    /// One planned output file.
    public struct Shard: Sendable, Equatable {
        /// File name inside `directory`.
        public let fileName: String
        /// The shard's tensors with offsets relative to the shard's data buffer.
        public let tensors: [TensorInfo]
        /// Data bytes in the shard (header excluded).
        public var byteCount: Int { tensors.last?.dataOffsets.upperBound ?? 0 }
    }

    public let directory: URL
    public let shards: [Shard]
    /// The index `finish()` writes, or nil when the output is a single `model.safetensors`.
    public let index: ShardIndex?
    public let metadata: [String: String]
    public var shardFileNames: [String] { shards.map(\.fileName) }

    private let bufferSize: Int
    /// Each shard's encoded header.
    private let headers: [[UInt8]]
    private let shardOfTensor: [String: Int]
    private var writers: [SafeTensorsWriter?]
    private var current = 0
    private var closed = false
    private var finished = false

    /// Plans the shards and creates `directory` if needed. No shard file is created yet.
    ///
    /// - Parameters:
    ///   - maxShardSize: maximum data bytes per shard (> 0); `transformers`' `max_shard_size`.
    ///   - metadata: written as `__metadata__` into every shard (e.g. `["format": "pt"]`).
    ///   - forceSharded: write `model-00001-of-00001.safetensors` plus an index even when
    ///     everything fits in one shard.
    public init(directory: URL, tensors: [(name: String, dtype: DType, shape: [Int])], maxShardSize: Int,
                metadata: [String: String] = [:], forceSharded: Bool = false,
                bufferSize: Int = SafeTensorsWriter.defaultBufferSize) throws {
        precondition(maxShardSize > 0, "maxShardSize must be positive")
        let laidOut = try SafeTensorsWriter.assignOffsets(tensors, file: directory.path)
        let groups = Self.planShards(byteCounts: laidOut.map(\.byteCount), maxShardSize: maxShardSize)
        let sharded = groups.count > 1 || forceSharded
        var shards: [Shard] = []
        var shardOfTensor: [String: Int] = [:]
        var weightMap: [String: String] = [:]
        for (s, group) in groups.enumerated() {
            let fileName = sharded ? Self.shardFileName(s + 1, of: groups.count) : "model.safetensors"
            // Re-base offsets to each shard's own data buffer.
            let base = group.isEmpty ? 0 : laidOut[group.lowerBound].dataOffsets.lowerBound
            var members: [TensorInfo] = []
            for i in group {
                var info = laidOut[i]
                info.dataOffsets = (info.dataOffsets.lowerBound - base)..<(info.dataOffsets.upperBound - base)
                members.append(info)
                shardOfTensor[info.name] = s
                weightMap[info.name] = fileName
            }
            shards.append(Shard(fileName: fileName, tensors: members))
        }
        let totalSize = laidOut.last?.dataOffsets.upperBound ?? 0
        // Every shard's header is encoded and checked against the reader's limit before anything
        // is written (shards are created lazily); each writer then writes the bytes encoded here.
        let headers = try shards.map { try SafeTensorsWriter.header($0.tensors, metadata: metadata, file: directory.appendingPathComponent($0.fileName).path) }

        try makeDirectories(directory.path)
        self.directory = directory
        self.shards = shards
        self.headers = headers
        self.index = sharded ? ShardIndex(totalSize: totalSize, weightMap: weightMap) : nil
        self.metadata = metadata
        self.bufferSize = bufferSize
        self.shardOfTensor = shardOfTensor
        self.writers = Array(repeating: nil, count: shards.count)
    }

    deinit {
        if !finished { abort() }
    }

    /// `transformers`' shard name: `model-00002-of-00005.safetensors` (1-based, 5 digits).
    public static func shardFileName(_ number: Int, of count: Int) -> String {
        func pad(_ n: Int) -> String {
            let digits = String(n)
            return String(repeating: "0", count: max(0, 5 - digits.count)) + digits
        }
        return "model-\(pad(number))-of-\(pad(count)).safetensors"
    }

    /// Splits tensors (by data byte counts, in order) into consecutive groups of at most
    /// `maxShardSize` bytes; a tensor larger than the limit forms a group on its own. Unlike
    /// `huggingface_hub`, which moves oversized tensors ahead, order is always preserved, so the
    /// writer can stream. An empty list gives one empty group (an empty checkpoint is one file).
    public static func planShards(byteCounts: [Int], maxShardSize: Int) -> [Range<Int>] {
        var groups: [Range<Int>] = []
        var start = 0
        var size = 0
        for (i, count) in byteCounts.enumerated() {
            if i > start && (size > maxShardSize - count) {  // size + count > max, without overflow
                groups.append(start..<i)
                start = i
                size = 0
            }
            size += count
        }
        groups.append(start..<byteCounts.count)
        return groups
    }

    private func shardPath(_ s: Int) -> String {
        directory.appendingPathComponent(shards[s].fileName).path
    }

    /// The writer for shard `s`, creating its temporary file on first use.
    private func writer(_ s: Int) throws -> SafeTensorsWriter {
        if let existing = writers[s] { return existing }
        let created = try SafeTensorsWriter(url: directory.appendingPathComponent(shards[s].fileName), planned: shards[s].tensors,
                                            header: headers[s], metadata: metadata, bufferSize: bufferSize)
        writers[s] = created
        return created
    }

    /// Runs `body`; on any error other than argument misuse, aborts everything.
    private func failingAll<R>(_ body: () throws -> R) throws -> R {
        do {
            return try body()
        } catch {
            abort()
            throw error
        }
    }

    /// Checks that shard `s` (from the current position on) needs no more bytes.
    private func ensureComplete(_ s: Int) throws {
        if let existing = writers[s] {
            if let (index, done) = existing.incompleteTensor {
                throw SafeTensorsError.incompleteTensor(file: shardPath(s), tensor: existing.tensors[index].name,
                                                        expected: existing.tensors[index].byteCount, written: done)
            }
        } else if let first = shards[s].tensors.first(where: { $0.byteCount > 0 }) {
            throw SafeTensorsError.incompleteTensor(file: shardPath(s), tensor: first.name, expected: first.byteCount, written: 0)
        }
    }

    /// Appends `bytes` to tensor `name` (declaration order, chunks allowed).
    /// - Throws: as `SafeTensorsWriter.write`; misuse errors have no side effects, I/O errors
    ///   abort the whole checkpoint.
    public func write(_ name: String, bytes: UnsafeRawBufferPointer) throws {
        guard !closed else { throw SafeTensorsError.writerClosed(file: directory.path) }
        guard let s = shardOfTensor[name] else { throw SafeTensorsError.undeclaredTensor(file: directory.path, tensor: name) }
        guard s >= current else {
            let expected = writers[current]?.nextExpectedName ?? "?"
            throw SafeTensorsError.tensorOutOfOrder(file: shardPath(s), tensor: name, expected: expected)
        }
        if s > current {
            for k in current..<s { try ensureComplete(k) }
            try failingAll {
                for k in current..<s { try writer(k).seal() }
            }
            current = s
        }
        let target = try failingAll { try writer(s) }
        do {
            try target.write(name, bytes: bytes)
        } catch {
            if target.isClosed { abort() }
            throw error
        }
    }

    /// `write(_:bytes:)` for an array.
    public func write(_ name: String, bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write(name, bytes: $0) }
    }

    /// Seals the remaining shards, renames every shard into place, writes the index (or removes
    /// a stale one) and fsyncs the directory. If it throws, temporary files have been removed.
    public func finish() throws {
        guard !closed else { throw SafeTensorsError.writerClosed(file: directory.path) }
        try failingAll {
            for k in current..<shards.count { try ensureComplete(k) }
            for k in current..<shards.count { try writer(k).seal() }
            for k in 0..<shards.count { try writers[k]!.commitSealed() }
        }
        closed = true
        finished = true
        let indexPath = directory.appendingPathComponent(ShardIndex.fileName).path
        if let index {
            try writeAtomically(index.encoded(), to: indexPath)
            if !shardFileNames.contains("model.safetensors") {
                removeFileIfPresent(directory.appendingPathComponent("model.safetensors").path)
            }
        } else {
            removeFileIfPresent(indexPath)
        }
        syncDirectory(directory.path)
    }

    /// Removes every temporary file. Idempotent; does nothing after a successful `finish()`.
    public func abort() {
        guard !finished else { return }
        for writer in writers { writer?.abort() }
        closed = true
    }
}
