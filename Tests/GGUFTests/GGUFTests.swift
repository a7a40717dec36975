import Foundation
import GGUF
import QLoRA
import TestSupport
import XCTest

/// The GGUF container and ggml's encodings against llama.cpp's own gguf-py
/// (Vectors/gguf/golden.gguf, made by Vectors/generate_gguf.py).
final class GGUFGoldenTests: XCTestCase {
    func golden() throws -> (GGUFFile, Data) {
        let url = repositoryRoot.appendingPathComponent("Vectors/gguf/golden.gguf")
        let data = try Data(contentsOf: url)
        return (try GGUFFile(bytes: data, file: url.path), data)
    }

    /// Every metadata type reads back as gguf-py wrote it, and the header qlora encodes from
    /// the parsed metadata and tensors is byte for byte gguf-py's.
    func testHeaderRoundTripsByteForByte() throws {
        let (f, data) = try golden()
        XCTAssertEqual(f.version, 3)
        XCTAssertEqual(f.value("general.architecture"), .string("llama"))
        XCTAssertEqual(f.value("test.uint8"), .uint8(200))
        XCTAssertEqual(f.value("test.int8"), .int8(-100))
        XCTAssertEqual(f.value("test.uint16"), .uint16(60000))
        XCTAssertEqual(f.value("test.int16"), .int16(-30000))
        XCTAssertEqual(f.value("test.uint32"), .uint32(4_000_000_000))
        XCTAssertEqual(f.value("test.int32"), .int32(-2_000_000_000))
        XCTAssertEqual(f.value("test.float32"), .float32(1e-5))
        XCTAssertEqual(f.value("test.bool"), .bool(true))
        XCTAssertEqual(f.value("test.string"), .string("naïve — 日本語"))
        XCTAssertEqual(f.value("test.uint64"), .uint64(1 << 63 + 5))
        XCTAssertEqual(f.value("test.int64"), .int64(-(1 << 62)))
        XCTAssertEqual(f.value("test.float64"), .float64(0.1))
        XCTAssertEqual(f.value("test.strings"), .strings(["<s>", "</s>", "▁the", ""]))
        XCTAssertEqual(f.value("test.floats"), .float32s([0.5, -1.25]))
        guard case .array(_, let ints)? = f.value("test.ints") else { return XCTFail("test.ints") }
        XCTAssertEqual(ints.compactMap(\.integer), [1, -2, 3])

        let rebuilt = try GGUFHeader(metadata: f.metadata, tensors: f.header.tensors.map { ($0.name, $0.ne, $0.type) })
        XCTAssertEqual(rebuilt.tensors, f.header.tensors, "offsets laid out as gguf-py lays them out")
        let header = rebuilt.encoded()
        XCTAssertEqual(header.count, f.dataOffset)
        XCTAssertEqual(header, [UInt8](data.prefix(f.dataOffset)), "the header's bytes")
        XCTAssertEqual(f.dataOffset + rebuilt.dataByteCount, data.count, "every tensor padded to the alignment, the last one too")
    }

    /// convert_hf_to_gguf.py's --vocab-only file (no tensors, no padding after the header):
    /// parsed and re-encoded, the same bytes.
    func testVocabularyOnlyFileRoundTrips() throws {
        let url = repositoryRoot.appendingPathComponent("Vectors/gguf/llama-tiny/vocab.gguf")
        let data = try Data(contentsOf: url)
        let f = try GGUFFile(bytes: data, file: url.path)
        XCTAssertTrue(f.header.tensors.isEmpty)
        XCTAssertEqual(f.metadata.count, 24)
        XCTAssertEqual(try GGUFHeader(metadata: f.metadata, tensors: []).encoded(), [UInt8](data))
    }

    /// F16, BF16, Q8_0 and Q4_0 of every source: qlora's bytes are gguf-py's (= ggml's reference).
    func testEncodingsAreBitExact() throws {
        let (f, _) = try golden()
        var checked = 0
        for source in f.header.tensors where source.type == .f32 {
            let x = f.data(of: source).withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            for (suffix, type) in [("f16", GGMLType.f16), ("bf16", .bf16), ("q8_0", .q8_0), ("q4_0", .q4_0)] {
                let t = try XCTUnwrap(f.tensor("\(source.name).\(suffix)"))
                XCTAssertEqual(t.type, type)
                XCTAssertEqual(t.ne, source.ne)
                let encoding: GGMLQuants.Encoding = type == .f16 ? .f16 : type == .bf16 ? .bf16 : type == .q8_0 ? .q8_0 : .q4_0
                let ours = x.withUnsafeBufferPointer { GGMLQuants.bytes($0, as: encoding) }
                XCTAssertEqual(ours.count, t.byteCount, "\(t.name): size")
                let theirs = [UInt8](f.data(of: t))
                if ours != theirs {
                    let i = ours.indices.first { ours[$0] != theirs[$0] } ?? 0
                    XCTFail("\(t.name): first differing byte \(i): \(ours[i]) vs \(theirs[i]) (\(regenerateHint))")
                }
                checked += 1
            }
        }
        XCTAssertEqual(checked, 16)
    }

    /// ggml's bf16 rounding quiets a NaN and keeps its sign; infinities and the largest finite
    /// values round as the bits say (no saturation).
    func testBF16SpecialValues() {
        XCTAssertEqual(GGMLQuants.bf16Bits(.nan), 0x7FC0)
        XCTAssertEqual(GGMLQuants.bf16Bits(Float(bitPattern: 0xFF80_0001)), 0xFFC0)  // signalling, negative
        XCTAssertEqual(GGMLQuants.bf16Bits(.infinity), 0x7F80)
        XCTAssertEqual(GGMLQuants.bf16Bits(.greatestFiniteMagnitude), 0x7F80)  // rounds up to infinity
        XCTAssertEqual(GGMLQuants.bf16Bits(-0.0), 0x8000)
    }
}

/// Hostile GGUF bytes: one clear error naming the file, never a crash or a huge allocation.
final class GGUFHostileInputTests: XCTestCase {
    func header(_ body: [UInt8], tensors: UInt64 = 0, kvs: UInt64 = 0) -> Data {
        var b = GGUF.magic
        GGUFHeader.append(UInt32(3), to: &b)
        GGUFHeader.append(tensors, to: &b)
        GGUFHeader.append(kvs, to: &b)
        b += body
        // With tensors, pad to the alignment so the data section starts where it should.
        if tensors > 0 { b += [UInt8](repeating: 0, count: (32 - b.count % 32) % 32) }
        return Data(b)
    }

    func refuses(_ data: Data, _ fragment: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try GGUFFile(bytes: data, file: "bad.gguf"), file: file, line: line) { e in
            let text = "\(e)"
            XCTAssertTrue(text.hasPrefix("bad.gguf: ") && text.contains(fragment), "got: \(text)", file: file, line: line)
        }
    }

    func testTruncatedAndLyingHeadersAreRefused() throws {
        refuses(Data("GGUL".utf8), "no GGUF magic")
        refuses(Data([0x47, 0x47, 0x55, 0x46, 1, 0, 0, 0]), "version 1")
        refuses(header([], tensors: 1 << 60), "claims")
        refuses(header([], kvs: 1), "ends")
        // A string length beyond the file.
        var s: [UInt8] = []
        GGUFHeader.append(UInt64.max, to: &s)
        refuses(header(s, kvs: 1), "runs past the end")
        // An unknown value type, a bool that is neither 0 nor 1, deep nesting.
        var k: [UInt8] = []
        GGUFHeader.append(UInt64(1), to: &k); k += Array("k".utf8)
        refuses(header(k + [13, 0, 0, 0], kvs: 1), "value type 13")
        refuses(header(k + [7, 0, 0, 0, 2], kvs: 1), "bool of value 2")
        var deep = k + [9, 0, 0, 0]
        for _ in 0..<6 { GGUFHeader.append(UInt32(9), to: &deep); GGUFHeader.append(UInt64(1), to: &deep) }
        refuses(header(deep, kvs: 1), "nested deeper")
    }

    func testTensorsOutsideTheFileAreRefused() throws {
        // One F32 tensor of 1 × 8 claiming data past the end.
        var t: [UInt8] = []
        GGUFHeader.append(UInt64(1), to: &t); t += Array("w".utf8)
        GGUFHeader.append(UInt32(1), to: &t)
        GGUFHeader.append(UInt64(8), to: &t)
        GGUFHeader.append(UInt32(0), to: &t)
        GGUFHeader.append(UInt64(0), to: &t)
        refuses(header(t, tensors: 1), "runs past the end of the file")
        // A Q8_0 tensor whose rows are not whole blocks; an unknown ggml type; a misaligned offset,
        // and an aligned one with a gap before it (ggml reads tensors packed, each after the last).
        var q = t
        q.replaceSubrange((q.count - 12)..<(q.count - 8), with: [8, 0, 0, 0])
        refuses(header(q, tensors: 1), "do not fit Q8_0")
        var u = t
        u.replaceSubrange((u.count - 12)..<(u.count - 8), with: [99, 0, 0, 0])
        refuses(header(u, tensors: 1), "ggml type 99")
        var m = t
        m.replaceSubrange((m.count - 8)..<m.count, with: [3, 0, 0, 0, 0, 0, 0, 0])
        refuses(header(m + [UInt8](repeating: 0, count: 64), tensors: 1), "starts at data offset 3, not 0")
        var g = t
        g.replaceSubrange((g.count - 8)..<g.count, with: [32, 0, 0, 0, 0, 0, 0, 0])
        refuses(header(g + [UInt8](repeating: 0, count: 64), tensors: 1), "starts at data offset 32, not 0")
        // A key or a tensor name twice: the reader refuses it, and the writer never writes it.
        XCTAssertThrowsError(try GGUFHeader(metadata: [("a", .uint8(1)), ("a", .uint8(2))], tensors: [])) { XCTAssertTrue("\($0)".contains("metadata key a appears twice")) }
        XCTAssertThrowsError(try GGUFHeader(metadata: [], tensors: [("w", [32], .f32), ("w", [32], .f32)])) { XCTAssertTrue("\($0)".contains("tensor w appears twice")) }
    }

    /// A Data slice (indices not from 0) reads the same tensors as a fresh Data of its bytes.
    func testASliceReadsAsItsBytes() throws {
        let url = repositoryRoot.appendingPathComponent("Vectors/gguf/golden.gguf")
        let bytes = try Data(contentsOf: url)
        let padded = Data([1, 2, 3, 4, 5, 6, 7]) + bytes
        let whole = try GGUFFile(bytes: bytes, file: "golden.gguf"), slice = try GGUFFile(bytes: padded[7...], file: "golden.gguf")
        XCTAssertFalse(whole.header.tensors.isEmpty)
        for t in whole.header.tensors { XCTAssertEqual(slice.data(of: t), whole.data(of: t), t.name) }
    }
}
