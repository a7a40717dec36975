import Foundation
import SafeTensors
import TestSupport
import XCTest

/// Files written by the reference Python/Rust library (`Vectors/generate_safetensors.py`),
/// checked against the values recorded next to them in `expected.json`.
final class PythonVectorTests: TemporaryDirectoryTestCase {
    /// Checks every tensor of `file` against its `expected.json` record: dtype, shape,
    /// offsets, file order, bytes and decoded values.
    private func check(_ file: SafeTensorsFile, against record: [String: Any],
                       line: UInt = #line) throws {
        XCTAssertEqual(file.fileSize, record["file_size"] as? Int, line: line)
        XCTAssertEqual(file.header.dataStart, record["data_start"] as? Int, line: line)
        XCTAssertEqual(file.header.dataStart % 8, 0, "Rust pads the header to 8 bytes", line: line)
        XCTAssertEqual(file.metadata, record["metadata"] as? [String: String], line: line)
        XCTAssertEqual(file.tensors.map(\.name), record["order"] as? [String], line: line)
        let tensors = try XCTUnwrap(record["tensors"] as? [String: [String: Any]])
        XCTAssertEqual(file.tensors.count, tensors.count, line: line)
        for (name, expected) in tensors {
            let info = try XCTUnwrap(file.info(named: name), name, line: line)
            XCTAssertEqual(info.dtype.rawValue, expected["dtype"] as? String, name, line: line)
            XCTAssertEqual(info.shape, expected["shape"] as? [Int], name, line: line)
            let offsets = try XCTUnwrap(expected["data_offsets"] as? [Int])
            XCTAssertEqual(info.dataOffsets, offsets[0]..<offsets[1], name, line: line)
            XCTAssertEqual(info.byteCount, info.elementCount * info.dtype.byteSize, name, line: line)
            file.withBytes(of: name) { bytes in
                XCTAssertEqual(hexString(bytes), expected["hex"] as? String, name, line: line)
            }
            try checkValues(file.rawBuffer(of: name), info, expected["values"] as? [Any] ?? [], line: line)
        }
    }

    /// Decodes little-endian elements and compares them with the recorded values (integers
    /// recorded as decimal strings, floats as exactly representable numbers).
    private func checkValues(_ bytes: UnsafeRawBufferPointer, _ info: TensorInfo, _ expected: [Any],
                             line: UInt) throws {
        XCTAssertEqual(expected.count, info.elementCount, info.name, line: line)
        func load<T: FixedWidthInteger>(_: T.Type, _ i: Int) -> T {
            T(littleEndian: bytes.loadUnaligned(fromByteOffset: i * MemoryLayout<T>.size, as: T.self))
        }
        for i in 0..<info.elementCount {
            let integer: String?
            var real: Double? = nil
            switch info.dtype {
            case .bool: integer = nil; XCTAssertEqual(bytes[i] != 0, expected[i] as? Bool, line: line)
            case .u8: integer = String(load(UInt8.self, i))
            case .i8: integer = String(load(Int8.self, i))
            case .i16: integer = String(load(Int16.self, i))
            case .u16: integer = String(load(UInt16.self, i))
            case .i32: integer = String(load(Int32.self, i))
            case .u32: integer = String(load(UInt32.self, i))
            case .i64: integer = String(load(Int64.self, i))
            case .u64: integer = String(load(UInt64.self, i))
            case .f32: integer = nil; real = Double(Float(bitPattern: load(UInt32.self, i)))
            case .f64: integer = nil; real = Double(bitPattern: load(UInt64.self, i))
            case .bf16: integer = nil; real = Double(Float(bitPattern: UInt32(load(UInt16.self, i)) << 16))
            case .f16: integer = nil; real = halfToDouble(load(UInt16.self, i))
            case .f8e4m3, .f8e5m2: integer = nil  // bytes are compared as hex
            }
            if let integer { XCTAssertEqual(integer, expected[i] as? String, "\(info.name)[\(i)]", line: line) }
            if let real {
                let want = try XCTUnwrap((expected[i] as? NSNumber)?.doubleValue, line: line)
                XCTAssertEqual(real.bitPattern, want.bitPattern, "\(info.name)[\(i)] \(real) vs \(want)", line: line)
            }
        }
    }

    /// IEEE binary16 -> Double by hand (Swift's Float16 is unavailable on Intel macOS).
    private func halfToDouble(_ bits: UInt16) -> Double {
        let sign: Double = bits & 0x8000 != 0 ? -1 : 1
        let exponent = Int(bits >> 10 & 0x1F)
        let mantissa = Double(bits & 0x3FF)
        switch exponent {
        case 0: return sign * mantissa * 0x1p-24
        case 31: return mantissa == 0 ? sign * .infinity : .nan
        default: return sign * (1 + mantissa / 1024) * Double(sign: .plus, exponent: exponent - 15, significand: 1)
        }
    }

    func testReadsEveryDTypeWrittenByPython() throws {
        let expected = try Vectors.expected()
        let url = Vectors.directory.appendingPathComponent("dtypes.safetensors")
        let file = try SafeTensorsFile(url: url)
        try check(file, against: try XCTUnwrap(expected["dtypes.safetensors"] as? [String: Any]))
        XCTAssertEqual(Set(file.tensors.map(\.dtype)), Set(DType.allCases), "the vector covers every dtype")
        XCTAssertEqual(file.metadata, ["format": "pt"])
        let scalar = try XCTUnwrap(file.info(named: "scalar"))
        XCTAssertEqual(scalar.shape, [])
        XCTAssertEqual(scalar.elementCount, 1)
        let empty = try XCTUnwrap(file.info(named: "empty"))
        XCTAssertEqual(empty.shape, [0, 4])
        XCTAssertEqual(empty.elementCount, 0)
        XCTAssertEqual(file.rawBuffer(of: "empty").count, 0)

        // The same image parsed from memory gives the same header.
        let copy = try SafeTensorsFile(bytes: [UInt8](try Data(contentsOf: url)))
        XCTAssertEqual(copy.header, file.header)
        XCTAssertEqual(copy.path, "<memory>")
    }

    func testWriterReproducesPythonFileByteForByte() throws {
        // Same tensors, same (file) order, same metadata: the Rust library's header layout
        // (compact JSON, __metadata__ first, space padding to 8 bytes) must come out identical.
        let url = Vectors.directory.appendingPathComponent("dtypes.safetensors")
        let python = try SafeTensorsFile(url: url)
        let copyURL = tmp.appendingPathComponent("copy.safetensors")
        try SafeTensorsWriter.write(url: copyURL, tensors: python.tensors.map {
            ($0.name, $0.dtype, $0.shape, [UInt8](python.rawBuffer(of: $0.name)))
        }, metadata: python.metadata)
        XCTAssertEqual(try Data(contentsOf: copyURL), try Data(contentsOf: url))
    }

    func testReadsShardedCheckpointWrittenByPython() throws {
        let expected = try Vectors.expected()
        let directory = Vectors.directory.appendingPathComponent("sharded")
        let reader = try CheckpointReader(url: directory)
        XCTAssertEqual(reader.shardFileNames, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
        let indexRecord = try XCTUnwrap(expected["sharded/model.safetensors.index.json"] as? [String: Any])
        XCTAssertEqual(reader.index?.weightMap, indexRecord["weight_map"] as? [String: String])
        XCTAssertEqual(reader.index?.totalSize, (indexRecord["metadata"] as? [String: Any])?["total_size"] as? Int)
        XCTAssertEqual(reader.index?.totalSize, reader.entries.map(\.info.byteCount).reduce(0, +))
        XCTAssertEqual(reader.entries.count, 5)

        for (s, shard) in reader.shardFileNames.enumerated() {
            XCTAssertEqual(reader.metadata(ofShard: shard), ["format": "pt"])
            try check(reader.shards[s], against: try XCTUnwrap(expected["sharded/" + shard] as? [String: Any]))
            let tensors = try XCTUnwrap((expected["sharded/" + shard] as? [String: Any])?["tensors"] as? [String: [String: Any]])
            for (name, record) in tensors {
                XCTAssertEqual(reader.entry(named: name)?.shard, shard)
                reader.withBytes(of: name) { XCTAssertEqual(hexString($0), record["hex"] as? String, name) }
            }
        }
    }

    func testIndexEncodingMatchesTransformersByteForByte() throws {
        let url = Vectors.directory.appendingPathComponent("sharded/model.safetensors.index.json")
        let original = [UInt8](try Data(contentsOf: url))
        let index = try ShardIndex(contentsOf: url)
        XCTAssertEqual(index.encoded(), original)
        XCTAssertEqual(try ShardIndex(json: index.encoded()), index)
    }
}
