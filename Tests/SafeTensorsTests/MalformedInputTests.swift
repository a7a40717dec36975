import Foundation
import SafeTensors
import TestSupport
import XCTest

/// One test per class of bad input the header parser must reject, each checking the error case
/// and that its one-line description names the file and the problem. Plus the edge cases that
/// must be accepted.
final class MalformedInputTests: TemporaryDirectoryTestCase {
    private let w = #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#  // entry prefix, no closing brace

    func testFileShorterThanLengthPrefix() throws {
        try assertRejected([], "fileTooShort", ["file is 0 bytes, shorter than the 8-byte header length prefix"])
        try assertRejected([1, 2, 3], "fileTooShort", ["file is 3 bytes"])
    }

    func testHeaderLengthBeyondFile() throws {
        try assertRejected(rawFile("{}", declaredLength: 1000), "headerLengthBeyondFile",
                           ["header length 1000 bytes extends beyond the file (10 bytes in all)"])
        try assertRejected(rawFile("{}", declaredLength: .max), "headerLengthBeyondFile",
                           ["header length 18446744073709551615 bytes"])
    }

    func testHeaderNotUTF8() throws {
        var header = Array(#"{"w\#u{e9}":1}"#.utf8)
        header[3] = 0xFF  // first byte of "é" replaced: invalid lead byte at header offset 3
        try assertRejected(rawFile(header), "headerNotUTF8", ["header is not valid UTF-8", "file offset 11"])
        // Overlong encoding of "/" and a UTF-8-encoded surrogate are invalid too.
        try assertRejected(rawFile([0x7B, 0x22, 0xC0, 0xAF, 0x22, 0x7D]), "headerNotUTF8", ["offset 10"])
        try assertRejected(rawFile([0x7B, 0x22, 0xED, 0xA0, 0x80, 0x22, 0x7D]), "headerNotUTF8", ["offset 10"])
    }

    func testMalformedJSON() throws {
        let cases: [(String, String)] = [
            ("", "unexpected end of input"),
            (#"{"w":"#, "unexpected end of input"),
            (#"{"w" 1}"#, "expected ':'"),
            ("{,}", "expected a string key"),
            (#"{"a":[1,2}"#, "expected ',' or ']'"),
            (#"{"a":1,}"#, "expected a string key"),
            ("{} x", "unexpected data after the top-level value"),
            (#"{"a":tru}"#, "invalid literal"),
            (#"{"a":01}"#, "expected ',' or '}'"),
            (#"{"a":1.}"#, "digit expected after '.'"),
            (#"{"a":"\x"}"#, "invalid escape"),
            (#"{"a":"\ud800"}"#, "lone leading surrogate"),
            (#"{"a":"\udc00"}"#, "lone trailing surrogate"),
            ("{\"a\":\"\u{1}\"}", "unescaped control character"),
            (#"{"a":"abc}"#, "unterminated string"),
            (String(repeating: "[", count: 100_000), "nesting deeper than 64 levels"),
            ("{\"a\":" + String(repeating: "{\"a\":", count: 70), "nesting deeper than 64 levels"),
        ]
        for (header, reason) in cases {
            try assertRejected(rawFile(header), "malformedHeader", ["malformed JSON header at file offset", reason])
        }
        // The reported offset is a file offset (8-byte prefix included).
        try assertRejected(rawFile(#"{"w" 1}"#), "malformedHeader", ["file offset 13: expected ':'"])
    }

    func testHeaderNotAnObject() throws {
        try assertRejected(rawFile("[1, 2]"), "headerNotObject", ["JSON header is an array, expected an object"])
        try assertRejected(rawFile(#""x""#), "headerNotObject", ["JSON header is a string"])
    }

    func testTensorEntryMissingField() throws {
        for field in ["dtype", "shape", "data_offsets"] {
            var entry = ["dtype": #""F32""#, "shape": "[2]", "data_offsets": "[0, 8]"]
            entry[field] = nil
            let json = "{\"w\":{" + entry.map { "\"\($0.key)\":\($0.value)" }.joined(separator: ",") + "}}"
            try assertRejected(rawFile(json, dataCount: 8), "missingField", ["tensor 'w' is missing field '\(field)'"])
        }
    }

    func testTensorEntryWrongTypes() throws {
        try assertRejected(rawFile(#"{"w":"F32"}"#), "wrongType", ["tensor 'w' entry is a string, expected an object"])
        try assertRejected(rawFile(#"{"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}}"#, dataCount: 8),
                           "wrongType", ["tensor 'w' field 'dtype' is a number, expected a string"])
        try assertRejected(rawFile(#"{"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}"#, dataCount: 8),
                           "wrongType", ["field 'shape' is a string, expected an array of integers"])
        try assertRejected(rawFile(#"{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,8]}}"#, dataCount: 8),
                           "wrongType", ["field 'shape' is an array containing a boolean"])
        try assertRejected(rawFile(#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}}"#, dataCount: 8),
                           "wrongType", ["field 'data_offsets' is an array of 3 elements, expected an array of 2 integers"])
        try assertRejected(rawFile(#"{"w":{"dtype":"F32","shape":[2],"data_offsets":null}}"#, dataCount: 8),
                           "wrongType", ["field 'data_offsets' is null"])
    }

    func testUnknownDType() throws {
        try assertRejected(rawFile(#"{"w":{"dtype":"F128","shape":[2],"data_offsets":[0,32]}}"#, dataCount: 32),
                           "unknownDType", ["tensor 'w' has unknown dtype 'F128'"])
        // Case matters, as in the Rust enum.
        try assertRejected(rawFile(#"{"w":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}"#, dataCount: 8),
                           "unknownDType", ["unknown dtype 'f32'"])
    }

    func testNegativeOrNonIntegerShapeOrOffsets() throws {
        let cases: [(shape: String, offsets: String, field: String, value: String, reason: String)] = [
            ("[-2]", "[0,8]", "shape", "-2", "is negative"),
            ("[2.0]", "[0,8]", "shape", "2.0", "is not an integer"),
            ("[2e0]", "[0,8]", "shape", "2e0", "is not an integer"),
            ("[99999999999999999999]", "[0,8]", "shape", "99999999999999999999", "is too large"),
            ("[2]", "[-1,7]", "data_offsets", "-1", "is negative"),
            ("[2]", "[0,8.5]", "data_offsets", "8.5", "is not an integer"),
            ("[2]", "[0,18446744073709551624]", "data_offsets", "18446744073709551624", "is too large"),
        ]
        for c in cases {
            let json = #"{"w":{"dtype":"F32","shape":\#(c.shape),"data_offsets":\#(c.offsets)}}"#
            try assertRejected(rawFile(json, dataCount: 8), "invalidInteger",
                               ["tensor 'w' \(c.field) value \(c.value) \(c.reason); expected a non-negative integer"])
        }
    }

    func testBeginAfterEnd() throws {
        try assertRejected(rawFile(#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#, dataCount: 8),
                           "beginAfterEnd", ["tensor 'w' data_offsets [8, 4] begin is after end"])
    }

    func testEndBeyondDataBuffer() throws {
        let bytes = rawFile(#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#, dataCount: 8)
        try assertRejected(bytes, name: "model.safetensors", "endBeyondBuffer",
                           ["tensor 'w' data_offsets [0, 12] end beyond data buffer of 8 bytes"])
        // The exact one-line message for a relative path.
        XCTAssertThrowsError(try SafeTensorsHeader.parse(bytes, source: "model.safetensors")) {
            XCTAssertEqual("\($0)", "model.safetensors: tensor 'w' data_offsets [0, 12] end beyond data buffer of 8 bytes")
        }
    }

    func testOverlappingTensors() throws {
        let json = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#
        try assertRejected(rawFile(json, dataCount: 12), "overlappingTensors",
                           ["tensor 'b' data_offsets [4, 12] overlaps tensor 'a' data_offsets [0, 8]"])
        // Containment is caught even when a small tensor sits between (furthest end is tracked).
        let nested = #"{"big":{"dtype":"U8","shape":[16],"data_offsets":[0,16]},"x":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"# +
            #""y":{"dtype":"U8","shape":[2],"data_offsets":[8,10]}}"#
        try assertRejected(rawFile(nested, dataCount: 16), "overlappingTensors", ["tensor 'x'", "overlaps tensor 'big'"])
    }

    func testByteCountDoesNotMatchDTypeAndShape() throws {
        try assertRejected(rawFile(#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#, dataCount: 24),
                           "byteCountMismatch", ["tensor 'w' dtype F32 shape [2, 3] needs 24 bytes but data_offsets span 20 bytes"])
        // A shape whose byte count overflows 64 bits is its own error, not a wrapped product.
        try assertRejected(rawFile(#"{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#),
                           "shapeTooLarge", ["tensor 'w' shape [4294967296, 4294967296] byte count overflows"])
    }

    func testDuplicateTensorNames() throws {
        try assertRejected(rawFile(w + #","w":{"dtype":"U8","shape":[1],"data_offsets":[8,9]}}"#, dataCount: 9),
                           "duplicateTensor", ["duplicate tensor name 'w'"])
        // Duplicate keys elsewhere are rejected too, naming where.
        try assertRejected(rawFile(#"{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, dataCount: 8),
                           "duplicateKey", ["duplicate key 'dtype' in header object at 'w'"])
        try assertRejected(rawFile(#"{"__metadata__":{"k":"a","k":"b"}}"#), "duplicateKey",
                           ["duplicate key 'k' in header object at '__metadata__'"])
        try assertRejected(rawFile(#"{"__metadata__":{},"__metadata__":{}}"#), "duplicateKey",
                           ["duplicate key '__metadata__' in the header object"])
    }

    func testMetadataValuesMustBeStrings() throws {
        try assertRejected(rawFile(#"{"__metadata__":{"format":"pt","step":3}}"#), "metadataValueNotString",
                           ["__metadata__ value for key 'step' is a number, expected a string"])
        try assertRejected(rawFile(#"{"__metadata__":["pt"]}"#), "metadataNotObject",
                           ["__metadata__ is an array, expected an object of strings"])
    }

    func testHostileNamesStayOnOneLine() throws {
        try assertRejected(rawFile(#"{"a\nb\u0000":{"dtype":"X","shape":[],"data_offsets":[0,0]}}"#), "unknownDType",
                           [#"tensor 'a\nb\u{0}' has unknown dtype 'X'"#])
    }

    // MARK: Accepted edge cases

    func testAcceptedEdgeCases() throws {
        // Empty header, metadata null, trailing padding, unknown entry fields, zero-element
        // tensors (including at the very end of the buffer), gaps and trailing bytes.
        XCTAssertEqual(try SafeTensorsHeader.parse(rawFile("{}")).tensors, [])
        XCTAssertEqual(try SafeTensorsHeader.parse(rawFile(#"{"__metadata__":null}    "#)).metadata, [:])
        let json = #" {"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8],"extra":[{"x":1}]},"# +
            #""z":{"dtype":"F32","shape":[0,3],"data_offsets":[10,10]},"# +
            #""a":{"dtype":"I16","shape":[],"data_offsets":[0,2]},"e":{"dtype":"F32","shape":[0],"data_offsets":[12,12]}}  "#
        let file = try SafeTensorsFile(bytes: rawFile(json, dataCount: 12), name: "ok.safetensors")
        XCTAssertEqual(file.tensors.map(\.name), ["a", "b", "z", "e"])
        XCTAssertEqual(file.info(named: "z")?.elementCount, 0)
        XCTAssertEqual(file.info(named: "a")?.elementCount, 1)
        XCTAssertEqual(Array(file.rawBuffer(of: "b")), [6, 7])  // data bytes are 0, 1, 2, ...
        XCTAssertEqual(file.rawBuffer(of: "e").count, 0)
        XCTAssertEqual(file.header.dataByteCount, 12)
    }

    func testUnicodeNamesAndEscapes() throws {
        let json = #"{"caf\u00e9.\ud83d\ude00\"q\"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"#
            + #""naïve":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#
        let header = try SafeTensorsHeader.parse(rawFile(json, dataCount: 2))
        XCTAssertEqual(header.tensors.map(\.name), ["café.😀\"q\"", "naïve"])
    }

    func testMissingFileAndDirectoryAreIOErrors() throws {
        let missing = tmp.appendingPathComponent("nope.safetensors")
        XCTAssertThrowsError(try SafeTensorsFile(url: missing)) {
            assertError($0, "io", path: missing.path, ["open failed", "No such file or directory"])
        }
        XCTAssertThrowsError(try SafeTensorsFile(url: tmp)) {
            assertError($0, "io", path: tmp.path, ["Is a directory"])
        }
    }
}
