import Foundation
import SafeTensors
import TestSupport
import XCTest

/// Paths of the committed vectors, found from this source file (symlinks resolved, so the
/// tests also work from a package that links this directory in).
enum Vectors {
    static let packageRoot = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath()
        .deletingLastPathComponent()  // SafeTensorsTests
        .deletingLastPathComponent()  // Tests
        .deletingLastPathComponent()
    static let directory = packageRoot.appendingPathComponent("Vectors/safetensors")

    /// `Vectors/safetensors/expected.json`, written by `Vectors/generate_safetensors.py`.
    static func expected() throws -> [String: Any] {
        let data = try Data(contentsOf: directory.appendingPathComponent("expected.json"))
        return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
    }
}

extension TemporaryDirectoryTestCase {
    /// Writes raw bytes to `tmp/name` and returns its URL.
    @discardableResult
    func writeRaw(_ bytes: [UInt8], name: String) throws -> URL {
        let url = tmp.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url
    }

    /// Opens `bytes` as a file called `name`, expects a `SafeTensorsError` of case `expectedCase`
    /// whose one-line description starts with the path and contains every fragment. The same
    /// bytes parsed in memory must fail the same way, naming `<memory>`.
    func assertRejected(_ bytes: [UInt8], name: String = "bad.safetensors", _ expectedCase: String,
                        _ fragments: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let url = try writeRaw(bytes, name: name)
        do {
            _ = try SafeTensorsFile(url: url)
            XCTFail("\(name) was accepted", file: file, line: line)
        } catch let error as SafeTensorsError {
            assertError(error, expectedCase, path: url.path, fragments, file: file, line: line)
        }
        do {
            _ = try SafeTensorsHeader.parse(bytes)
            XCTFail("in-memory parse accepted it", file: file, line: line)
        } catch let error as SafeTensorsError {
            assertError(error, expectedCase, path: "<memory>", fragments, file: file, line: line)
        }
    }
}


/// The enum case name of an error (`fileTooShort`, ...).
func caseName(_ error: SafeTensorsError) -> String {
    Mirror(reflecting: error).children.first?.label ?? "\(error)"
}

func assertError(_ error: Error, _ expectedCase: String, path: String, _ fragments: [String],
                 file: StaticString = #filePath, line: UInt = #line) {
    guard let error = error as? SafeTensorsError else {
        XCTFail("not a SafeTensorsError: \(error)", file: file, line: line)
        return
    }
    XCTAssertEqual(caseName(error), expectedCase, "\(error)", file: file, line: line)
    XCTAssertEqual(error.file, path, file: file, line: line)
    let text = error.description
    XCTAssertTrue(text.hasPrefix(path + ": "), "description does not name the file: \(text)", file: file, line: line)
    XCTAssertFalse(text.contains("\n"), "description is not one line: \(text)", file: file, line: line)
    for fragment in fragments {
        XCTAssertTrue(text.contains(fragment), "'\(text)' lacks '\(fragment)'", file: file, line: line)
    }
}

/// A file image: 8-byte little-endian length, `header` (UTF-8), then `dataCount` bytes 0, 1, 2...
func rawFile(_ header: String, dataCount: Int = 0, declaredLength: UInt64? = nil) -> [UInt8] {
    rawFile(Array(header.utf8), dataCount: dataCount, declaredLength: declaredLength)
}

func rawFile(_ header: [UInt8], dataCount: Int = 0, declaredLength: UInt64? = nil) -> [UInt8] {
    var out: [UInt8] = []
    withUnsafeBytes(of: (declaredLength ?? UInt64(header.count)).littleEndian) { out.append(contentsOf: $0) }
    out.append(contentsOf: header)
    out.append(contentsOf: (0..<dataCount).map { UInt8(truncatingIfNeeded: $0) })
    return out
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
func testBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed | 1
    return (0..<count).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

func hexString(_ bytes: UnsafeRawBufferPointer) -> String {
    bytes.map { String(format: "%02x", $0) }.joined()
}
