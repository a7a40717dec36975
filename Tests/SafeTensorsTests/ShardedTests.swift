import Foundation
import SafeTensors
import TestSupport
import XCTest

final class ShardedTests: TemporaryDirectoryTestCase {
    /// Six tensors of 40, 24, 0, 64, 16 and 8 bytes (152 in all).
    private let specs: [(name: String, dtype: DType, shape: [Int])] = [
        ("model.embed.weight", .f32, [2, 5]),
        ("model.layers.0.weight", .bf16, [3, 4]),
        ("model.layers.0.empty", .f32, [0]),
        ("model.layers.1.weight", .f64, [8]),
        ("model.norm.weight", .f16, [8]),
        ("lm_head.bias", .i64, [1]),
    ]

    private func payload(_ i: Int) -> [UInt8] {
        testBytes(specs[i].shape.reduce(1, *) * specs[i].dtype.byteSize, seed: UInt64(100 + i))
    }

    /// Writes all of `specs` (each tensor in two chunks) and finishes.
    private func writeAll(_ writer: ShardedWriter) throws {
        for i in specs.indices {
            let bytes = payload(i)
            let half = bytes.count / 2
            try writer.write(specs[i].name, bytes: Array(bytes[..<half]))
            try writer.write(specs[i].name, bytes: Array(bytes[half...]))
        }
        try writer.finish()
    }

    func testPlanKeepsOrderAndRespectsTheLimit() {
        XCTAssertEqual(ShardedWriter.planShards(byteCounts: [4, 4, 4], maxShardSize: 8), [0..<2, 2..<3])
        XCTAssertEqual(ShardedWriter.planShards(byteCounts: [2, 10, 2, 2], maxShardSize: 5), [0..<1, 1..<2, 2..<4])
        XCTAssertEqual(ShardedWriter.planShards(byteCounts: [0, 8, 0, 0, 1], maxShardSize: 8), [0..<4, 4..<5])
        XCTAssertEqual(ShardedWriter.planShards(byteCounts: [], maxShardSize: 8), [0..<0])
        XCTAssertEqual(ShardedWriter.planShards(byteCounts: [.max, 1], maxShardSize: .max), [0..<1, 1..<2])
        XCTAssertEqual(ShardedWriter.shardFileName(2, of: 13), "model-00002-of-00013.safetensors")
    }

    func testShardedRoundTrip() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        let writer = try ShardedWriter(directory: directory, tensors: specs, maxShardSize: 64, metadata: ["format": "pt"])
        // 40+24+0 | 64 | 16+8
        XCTAssertEqual(writer.shardFileNames, ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                               "model-00003-of-00003.safetensors"])
        XCTAssertEqual(writer.shards.map { $0.tensors.map(\.name) },
                       [Array(specs[0...2].map(\.name)), [specs[3].name], Array(specs[4...5].map(\.name))])
        XCTAssertEqual(writer.shards.map(\.byteCount), [64, 64, 24])
        XCTAssertEqual(writer.index?.totalSize, 152)
        try writeAll(writer)
        XCTAssertEqual(try listing(directory), writer.shardFileNames + [ShardIndex.fileName], "no temporary files left")

        let reader = try CheckpointReader(url: directory)
        XCTAssertEqual(reader.shardFileNames, writer.shardFileNames)
        XCTAssertEqual(reader.tensorNames, specs.map(\.name))
        XCTAssertEqual(reader.index, writer.index)
        for (i, spec) in specs.enumerated() {
            let entry = try XCTUnwrap(reader.entry(named: spec.name))
            XCTAssertEqual(entry.info.dtype, spec.dtype)
            XCTAssertEqual(entry.info.shape, spec.shape)
            XCTAssertEqual(entry.shard, reader.index?.weightMap[spec.name])
            reader.withBytes(of: spec.name) { XCTAssertEqual(Array($0), payload(i), spec.name) }
        }
        for shard in reader.shardFileNames {
            XCTAssertEqual(reader.metadata(ofShard: shard), ["format": "pt"])
            // Every shard is a standalone, valid file.
            XCTAssertNoThrow(try SafeTensorsFile(url: directory.appendingPathComponent(shard)))
        }
        XCTAssertNil(reader.metadata(ofShard: "nope"))
        XCTAssertNil(reader.info(named: "nope"))
    }

    func testSingleFileWhenEverythingFitsUnlessForced() throws {
        let single = tmp.appendingPathComponent("single")
        let writer = try ShardedWriter(directory: single, tensors: specs, maxShardSize: 1 << 30)
        XCTAssertNil(writer.index)
        try writeAll(writer)
        XCTAssertEqual(try listing(single), ["model.safetensors"])
        let reader = try CheckpointReader(url: single)
        XCTAssertEqual(reader.shardFileNames, ["model.safetensors"])
        XCTAssertNil(reader.index)
        XCTAssertEqual(Array(reader.rawBuffer(of: specs[3].name)), payload(3))
        // The file itself can be opened directly too.
        let direct = try CheckpointReader(url: single.appendingPathComponent("model.safetensors"))
        XCTAssertEqual(direct.tensorNames, reader.tensorNames)

        let forced = tmp.appendingPathComponent("forced")
        let forcedWriter = try ShardedWriter(directory: forced, tensors: specs, maxShardSize: 1 << 30, forceSharded: true)
        try writeAll(forcedWriter)
        XCTAssertEqual(try listing(forced), ["model-00001-of-00001.safetensors", ShardIndex.fileName])
        XCTAssertEqual(try CheckpointReader(url: forced).tensorNames, specs.map(\.name))
    }

    func testRewritingReplacesTheStaleLayout() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        try writeAll(try ShardedWriter(directory: directory, tensors: specs, maxShardSize: 64))
        // Re-saving unsharded must not leave an index that would win over model.safetensors.
        let renamed = specs.map { ("new." + $0.name, $0.dtype, $0.shape) }
        let single = try ShardedWriter(directory: directory, tensors: renamed, maxShardSize: 1 << 30)
        for i in specs.indices { try single.write(renamed[i].0, bytes: payload(i)) }
        try single.finish()
        XCTAssertFalse(try listing(directory).contains(ShardIndex.fileName))
        XCTAssertEqual(try CheckpointReader(url: directory).tensorNames, renamed.map(\.0))
        // And the other way round: a stale model.safetensors is removed when writing shards.
        try writeAll(try ShardedWriter(directory: directory, tensors: specs, maxShardSize: 64))
        XCTAssertFalse(try listing(directory).contains("model.safetensors"))
        XCTAssertEqual(try CheckpointReader(url: directory).tensorNames, specs.map(\.name))
    }

    func testAbortDeallocationAndErrorsLeaveNoFiles() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        // Abort after the first shard was sealed and the second started.
        let writer = try ShardedWriter(directory: directory, tensors: specs, maxShardSize: 64)
        for i in 0...3 { try writer.write(specs[i].name, bytes: payload(i)) }
        XCTAssertEqual(try listing(directory).count, 2, "two temporary shards")
        XCTAssertTrue(try listing(directory).allSatisfy { $0.hasPrefix(".model-0000") })
        writer.abort()
        XCTAssertEqual(try listing(directory), [])
        XCTAssertThrowsError(try writer.write(specs[4].name, bytes: payload(4))) {
            assertError($0, "writerClosed", path: directory.path, [])
        }

        do {
            let dropped = try ShardedWriter(directory: directory, tensors: specs, maxShardSize: 64)
            for i in 0...4 { try dropped.write(specs[i].name, bytes: payload(i)) }
        }
        XCTAssertEqual(try listing(directory), [], "deinit without finish removes temporaries")

        let incomplete = try ShardedWriter(directory: directory, tensors: specs, maxShardSize: 64)
        try incomplete.write(specs[0].name, bytes: payload(0))
        XCTAssertThrowsError(try incomplete.write(specs[3].name, bytes: payload(3))) {
            assertError($0, "incompleteTensor", path: directory.appendingPathComponent("model-00001-of-00003.safetensors").path,
                        ["tensor 'model.layers.0.weight' is incomplete: 0 of 24 bytes written"])
        }
        XCTAssertThrowsError(try incomplete.finish()) { assertError($0, "incompleteTensor", path: directory.appendingPathComponent("model-00001-of-00003.safetensors").path, []) }
        XCTAssertEqual(try listing(directory), [], "a thrown finish removes temporaries")
    }

    func testMisuseAcrossShards() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        let writer = try ShardedWriter(directory: directory, tensors: specs, maxShardSize: 64)
        XCTAssertThrowsError(try writer.write("nope", bytes: [])) { assertError($0, "undeclaredTensor", path: directory.path, ["'nope'"]) }
        for i in 0...3 { try writer.write(specs[i].name, bytes: payload(i)) }
        XCTAssertThrowsError(try writer.write(specs[0].name, bytes: [])) {
            assertError($0, "tensorOutOfOrder", path: directory.appendingPathComponent("model-00001-of-00003.safetensors").path,
                        ["'model.embed.weight' written out of order"])
        }
        XCTAssertThrowsError(try writer.write(specs[3].name, bytes: [0])) { assertError($0, "tooManyBytes", path: directory.appendingPathComponent("model-00002-of-00003.safetensors").path, []) }
        for i in 4...5 { try writer.write(specs[i].name, bytes: payload(i)) }
        try writer.finish()
        XCTAssertEqual(try CheckpointReader(url: directory).entries.count, specs.count)
    }

    // MARK: Bad checkpoints

    /// Writes a 2-shard checkpoint by hand: shard 1 holds a, b; shard 2 holds c.
    private func makeCheckpoint(_ directory: URL, weightMap: [String: String]? = nil,
                                shard2Tensors: [String] = ["c"]) throws {
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let s1 = "model-00001-of-00002.safetensors", s2 = "model-00002-of-00002.safetensors"
        try SafeTensorsWriter.write(url: directory.appendingPathComponent(s1), tensors: [("a", .u8, [1], [1]), ("b", .u8, [1], [2])])
        try SafeTensorsWriter.write(url: directory.appendingPathComponent(s2), tensors: shard2Tensors.map { ($0, .u8, [1], [3]) })
        let index = ShardIndex(totalSize: 3, weightMap: weightMap ?? ["a": s1, "b": s1, "c": s2])
        try Data(index.encoded()).write(to: directory.appendingPathComponent(ShardIndex.fileName))
    }

    func testMissingShard() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        try makeCheckpoint(directory)
        try FileManager.default.removeItem(at: directory.appendingPathComponent("model-00002-of-00002.safetensors"))
        XCTAssertThrowsError(try CheckpointReader(url: directory)) {
            assertError($0, "missingShard", path: directory.appendingPathComponent(ShardIndex.fileName).path,
                        ["shard file 'model-00002-of-00002.safetensors' named in the index does not exist"])
        }
    }

    func testTensorNamedInIndexButAbsentFromItsShard() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        try makeCheckpoint(directory, weightMap: ["a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                                                  "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"])
        XCTAssertThrowsError(try CheckpointReader(url: directory)) {
            assertError($0, "tensorMissingFromShard", path: directory.appendingPathComponent(ShardIndex.fileName).path,
                        ["tensor 'd' is mapped to shard 'model-00002-of-00002.safetensors' but that shard does not contain it"])
        }
    }

    func testTensorPresentInTwoShards() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        try makeCheckpoint(directory, shard2Tensors: ["c", "a"])
        XCTAssertThrowsError(try CheckpointReader(url: directory)) {
            assertError($0, "tensorInMultipleShards", path: directory.appendingPathComponent(ShardIndex.fileName).path,
                        ["tensor 'a' is present in several shards: 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'"])
        }
    }

    func testShardTensorNotInIndex() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        try makeCheckpoint(directory, shard2Tensors: ["c", "x"])
        XCTAssertThrowsError(try CheckpointReader(url: directory)) {
            assertError($0, "tensorNotInIndex", path: directory.appendingPathComponent(ShardIndex.fileName).path,
                        ["tensor 'x' in shard 'model-00002-of-00002.safetensors' is not mapped to that shard"])
        }
    }

    func testEmptyDirectory() throws {
        XCTAssertThrowsError(try CheckpointReader(url: tmp)) {
            assertError($0, "noCheckpoint", path: tmp.path, ["directory holds neither model.safetensors.index.json nor model.safetensors"])
        }
        let missing = tmp.appendingPathComponent("missing")
        XCTAssertThrowsError(try CheckpointReader(url: missing)) { assertError($0, "io", path: missing.path, ["No such file"]) }
    }

    func testInvalidIndex() throws {
        let directory = tmp.appendingPathComponent("ckpt")
        try makeCheckpoint(directory)
        let indexURL = directory.appendingPathComponent(ShardIndex.fileName)
        let cases: [(String, String)] = [
            (#"{"weight_map": {"a": "x", "a": "y"}}"#, "duplicate key 'a'"),
            (#"{"metadata": {}}"#, "missing 'weight_map'"),
            (#"{"weight_map": {"a": "../model.safetensors"}}"#, "not a plain file name"),
            (#"{"weight_map": {"a": 1}}"#, "is a number, expected a shard file name"),
            (#"{"metadata": {"total_size": -1}, "weight_map": {}}"#, "'metadata.total_size' is not a non-negative integer"),
            (#"{"weight_map": {"#, "malformed JSON"),
        ]
        for (json, fragment) in cases {
            try Data(json.utf8).write(to: indexURL)
            XCTAssertThrowsError(try CheckpointReader(url: directory)) {
                assertError($0, "invalidIndex", path: indexURL.path, ["invalid shard index", fragment])
            }
        }
    }
}
