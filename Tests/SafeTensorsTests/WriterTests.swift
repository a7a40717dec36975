import Foundation
import SafeTensors
import TestSupport
import XCTest

final class WriterTests: TemporaryDirectoryTestCase {
    private let specs: [(name: String, dtype: DType, shape: [Int])] = [
        ("embed", .bf16, [7, 5]),
        ("empty", .f32, [3, 0]),
        ("scalar", .f64, []),
        ("ids", .i64, [3]),
        ("flags", .bool, [5]),
        ("big", .f32, [64, 100]),
    ]

    private func payloads(_ specs: [(name: String, dtype: DType, shape: [Int])]) -> [[UInt8]] {
        specs.enumerated().map { i, spec in
            testBytes(spec.shape.reduce(1, *) * spec.dtype.byteSize, seed: UInt64(i + 1))
        }
    }

    func testRoundTripWithChunkedWrites() throws {
        let url = tmp.appendingPathComponent("out.safetensors")
        let data = payloads(specs)
        // A small buffer so both the buffered path and the direct path for large chunks run.
        let writer = try SafeTensorsWriter(url: url, tensors: specs, metadata: ["format": "pt", "note": "line\nbreak \"q\" é"],
                                           bufferSize: 4096)
        XCTAssertEqual(writer.headerByteCount % 8, 0, "data must start at a multiple of 8")
        for (spec, bytes) in zip(specs, data) where !bytes.isEmpty {
            // Uneven chunk sizes: 1, 2, 3, ..., then the rest; a 6000-byte chunk bypasses the buffer.
            var offset = 0
            var chunk = 1
            while offset < bytes.count {
                let end = min(bytes.count, offset + (chunk > 6 ? 6000 : chunk))
                try bytes[offset..<end].withUnsafeBytes { try writer.write(spec.name, bytes: $0) }
                offset = end
                chunk += 1
            }
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: url.path), "nothing at the target before finish")
        XCTAssertEqual(try listing().count, 1, "one temporary file while writing")
        XCTAssertTrue(try listing()[0].hasPrefix(".out.safetensors.tmp-"))
        try writer.finish()
        XCTAssertEqual(try listing(), ["out.safetensors"], "temporary file renamed away")

        let file = try SafeTensorsFile(url: url)
        XCTAssertEqual(file.fileSize, writer.fileSize)
        XCTAssertEqual(file.header.dataStart, writer.headerByteCount)
        XCTAssertEqual(file.metadata, ["format": "pt", "note": "line\nbreak \"q\" é"])
        XCTAssertEqual(file.tensors.map(\.name), specs.map(\.name), "offsets follow declaration order")
        XCTAssertEqual(file.tensors, writer.tensors)
        for (spec, bytes) in zip(specs, data) {
            let info = try XCTUnwrap(file.info(named: spec.name))
            XCTAssertEqual(info.dtype, spec.dtype)
            XCTAssertEqual(info.shape, spec.shape)
            XCTAssertEqual(Array(file.rawBuffer(of: spec.name)), bytes, spec.name)
        }
    }

    func testStaticWriteAndEmptyFile() throws {
        let url = tmp.appendingPathComponent("small.safetensors")
        try SafeTensorsWriter.write(url: url, tensors: [("a", .u8, [3], [1, 2, 3]), ("b", .i16, [1], [0xFF, 0x7F])])
        let file = try SafeTensorsFile(url: url)
        XCTAssertEqual(Array(file.rawBuffer(of: "b")), [0xFF, 0x7F])
        XCTAssertEqual(file.metadata, [:])

        let empty = tmp.appendingPathComponent("empty.safetensors")
        try SafeTensorsWriter.write(url: empty, tensors: [])
        XCTAssertEqual([UInt8](try Data(contentsOf: empty)), rawFile("{}      "))
        XCTAssertEqual(try SafeTensorsFile(url: empty).tensors, [])
    }

    func testAbortLeavesNoFile() throws {
        let url = tmp.appendingPathComponent("aborted.safetensors")
        let writer = try SafeTensorsWriter(url: url, tensors: specs)
        try writer.write("embed", bytes: [UInt8](repeating: 1, count: 10))
        writer.abort()
        XCTAssertEqual(try listing(), [])
        XCTAssertThrowsError(try writer.write("embed", bytes: [1])) {
            assertError($0, "writerClosed", path: url.path, ["writer is already finished, aborted or failed"])
        }
        writer.abort()  // idempotent
    }

    func testDeallocationWithoutFinishLeavesNoFile() throws {
        let url = tmp.appendingPathComponent("dropped.safetensors")
        do {
            let writer = try SafeTensorsWriter(url: url, tensors: specs)
            try writer.write("embed", bytes: [1, 2])
            XCTAssertEqual(try listing().count, 1)
        }
        XCTAssertEqual(try listing(), [])
    }

    func testFinishWithIncompleteTensorThrowsAndLeavesNoFile() throws {
        let url = tmp.appendingPathComponent("short.safetensors")
        let writer = try SafeTensorsWriter(url: url, tensors: [("a", .f32, [2]), ("b", .u8, [0]), ("c", .u8, [1])])
        try writer.write("a", bytes: [UInt8](repeating: 0, count: 8))
        XCTAssertThrowsError(try writer.finish()) {
            assertError($0, "incompleteTensor", path: url.path, ["tensor 'c' is incomplete: 0 of 1 bytes written"])
        }
        XCTAssertEqual(try listing(), [])
    }

    func testFailedWriteKeepsExistingTargetIntact() throws {
        let url = tmp.appendingPathComponent("model.safetensors")
        try SafeTensorsWriter.write(url: url, tensors: [("old", .u8, [1], [42])])
        let before = try Data(contentsOf: url)
        // Thrown error mid-way: the old file must be untouched, no temporary left.
        XCTAssertThrowsError(try SafeTensorsWriter.write(url: url, tensors: [("new", .u8, [2], [1, 2, 3])])) {
            assertError($0, "tooManyBytes", path: url.path, ["tensor 'new' given 3 bytes but its dtype and shape need 2"])
        }
        XCTAssertEqual(try Data(contentsOf: url), before)
        XCTAssertEqual(try listing(), ["model.safetensors"])
        // A successful write replaces it.
        try SafeTensorsWriter.write(url: url, tensors: [("new", .u8, [2], [1, 2])])
        XCTAssertEqual(try SafeTensorsFile(url: url).tensors.map(\.name), ["new"])
    }

    func testMisuseIsReportedWithoutSideEffects() throws {
        let url = tmp.appendingPathComponent("misuse.safetensors")
        let writer = try SafeTensorsWriter(url: url, tensors: [("a", .u8, [2]), ("z", .u8, [0]), ("b", .u8, [2])])
        XCTAssertThrowsError(try writer.write("c", bytes: [1])) {
            assertError($0, "undeclaredTensor", path: url.path, ["tensor 'c' was not declared"])
        }
        try writer.write("a", bytes: [1])
        XCTAssertThrowsError(try writer.write("b", bytes: [1])) {
            assertError($0, "incompleteTensor", path: url.path, ["tensor 'a' is incomplete: 1 of 2 bytes written"])
        }
        XCTAssertThrowsError(try writer.write("a", bytes: [2, 3])) {
            assertError($0, "tooManyBytes", path: url.path, ["tensor 'a' given 3 bytes but its dtype and shape need 2"])
        }
        try writer.write("a", bytes: [2])
        try writer.write("b", bytes: [3])  // skips the zero-byte "z"
        XCTAssertThrowsError(try writer.write("a", bytes: [])) {
            assertError($0, "tensorOutOfOrder", path: url.path, ["tensor 'a' written out of order", "next is 'b'"])
        }
        try writer.write("b", bytes: [4])
        try writer.finish()
        XCTAssertThrowsError(try writer.write("b", bytes: [])) { assertError($0, "writerClosed", path: url.path, []) }
        XCTAssertThrowsError(try writer.finish()) { assertError($0, "writerClosed", path: url.path, []) }
        let file = try SafeTensorsFile(url: url)
        XCTAssertEqual(Array(file.rawBuffer(of: "a")) + Array(file.rawBuffer(of: "b")), [1, 2, 3, 4])
    }

    func testInvalidDeclarationsAreRejectedBeforeCreatingAFile() throws {
        let url = tmp.appendingPathComponent("decl.safetensors")
        XCTAssertThrowsError(try SafeTensorsWriter(url: url, tensors: [("a", .u8, [1]), ("a", .u8, [1])])) {
            assertError($0, "duplicateTensor", path: url.path, ["duplicate tensor name 'a'"])
        }
        XCTAssertThrowsError(try SafeTensorsWriter(url: url, tensors: [("__metadata__", .u8, [1])])) {
            assertError($0, "reservedTensorName", path: url.path, ["tensor name '__metadata__' is reserved"])
        }
        XCTAssertThrowsError(try SafeTensorsWriter(url: url, tensors: [("a", .u8, [2, -1])])) {
            assertError($0, "invalidShape", path: url.path, ["tensor 'a' shape [2, -1] has a negative dimension"])
        }
        XCTAssertThrowsError(try SafeTensorsWriter(url: url, tensors: [("a", .u64, [1 << 31, 1 << 31])])) {
            assertError($0, "shapeTooLarge", path: url.path, ["tensor 'a' shape [2147483648, 2147483648] byte count overflows"])
        }
        let missingDirectory = tmp.appendingPathComponent("no/such/dir/x.safetensors")
        XCTAssertThrowsError(try SafeTensorsWriter(url: missingDirectory, tensors: [])) {
            assertError($0, "io", path: missingDirectory.path, ["create temporary file", "No such file or directory"])
        }
        XCTAssertEqual(try listing(), [])
    }
}

/// A header the reader would refuse (over `SafeTensorsHeader.maxHeaderLength`) is refused by
/// the writers before any file or directory exists (issue 13: 200,000 tiny tensors).
final class WriterHeaderLimitTests: XCTestCase {
    func testHeaderAboveTheReadersLimitIsNotWritten() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qlora-header-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let padding = String(repeating: "x", count: 480)
        let tensors = (0..<200_000).map { (name: "model.layers.\($0).\(padding).weight", dtype: DType.u8, shape: [1]) }
        let url = dir.appendingPathComponent("model.safetensors")
        XCTAssertThrowsError(try SafeTensorsWriter(url: url, tensors: tensors)) { e in
            guard case SafeTensorsError.headerTooLarge(_, let length, let limit)? = e as? SafeTensorsError else { return XCTFail("\(e)") }
            XCTAssertEqual(limit, SafeTensorsHeader.maxHeaderLength)
            XCTAssertGreaterThan(length, limit)
        }
        XCTAssertThrowsError(try ShardedWriter(directory: dir, tensors: tensors, maxShardSize: 1 << 30))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.path))
    }
}
