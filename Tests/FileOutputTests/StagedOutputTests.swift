import FileOutput
import Foundation
import TestSupport
import XCTest

/// The exclusive commit: of two runs into one OUTPUT one fails cleanly, and nothing this run did
/// not create is replaced or deleted.
final class StagedOutputTests: TemporaryDirectoryTestCase {
    func hidden() throws -> [String] { try listing().filter { $0.hasPrefix(".") } }

    func testTwoRunsIntoOneOutputOneFailsAndTheFirstStays() throws {
        for kind in [StagedOutput.Kind.directory, .file] {
            let dest = tmp.appendingPathComponent("out-\(kind)").path
            let first = try StagedOutput(dest, kind: kind), second = try StagedOutput(dest, kind: kind)
            for (s, text) in [(first, "first"), (second, "second")] {
                try Data(text.utf8).write(to: kind == .file ? s.url : s.url(for: "f"))
            }
            try first.commit()
            XCTAssertThrowsError(try second.commit()) { XCTAssertTrue("\($0)".contains("appeared while this run was writing"), "\($0)") }
            second.abort()
            XCTAssertEqual(FileManager.default.contents(atPath: kind == .file ? dest : dest + "/f"), Data("first".utf8))
        }
        XCTAssertEqual(try hidden(), [])
    }

    /// A directory created at OUTPUT while the run works, empty or not, is never deleted; an
    /// empty one that was there from the start is replaced only while still empty.
    func testADirectoryMadeMeanwhileIsNeverDeleted() throws {
        let dest = tmp.appendingPathComponent("out")
        let s = try StagedOutput(dest.path, kind: .directory)
        try FileManager.default.createDirectory(at: dest, withIntermediateDirectories: false)
        try Data("theirs".utf8).write(to: dest.appendingPathComponent("theirs"))
        XCTAssertThrowsError(try s.commit())
        s.abort()
        XCTAssertEqual(FileManager.default.contents(atPath: dest.path + "/theirs"), Data("theirs".utf8))

        let empty = tmp.appendingPathComponent("empty")
        try FileManager.default.createDirectory(at: empty, withIntermediateDirectories: false)
        let t = try StagedOutput(empty.path, kind: .directory)
        try Data("theirs".utf8).write(to: empty.appendingPathComponent("theirs"))  // filled meanwhile
        XCTAssertThrowsError(try t.commit())
        t.abort()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: empty.path), ["theirs"])
        XCTAssertEqual(try hidden(), [])
    }

    /// With overwrite, the old output goes only once the new one is in place.
    func testOverwriteReplacesOnlyAtCommit() throws {
        let dest = tmp.appendingPathComponent("out")
        try FileManager.default.createDirectory(at: dest, withIntermediateDirectories: false)
        try Data("old".utf8).write(to: dest.appendingPathComponent("f"))
        XCTAssertThrowsError(try StagedOutput(dest.path, kind: .directory)) { XCTAssertTrue("\($0)".contains("--overwrite"), "\($0)") }
        let s = try StagedOutput(dest.path, kind: .directory, overwrite: true)
        try Data("new".utf8).write(to: s.url(for: "f"))
        XCTAssertEqual(FileManager.default.contents(atPath: dest.path + "/f"), Data("old".utf8))
        try s.commit()
        XCTAssertEqual(FileManager.default.contents(atPath: dest.path + "/f"), Data("new".utf8))
        XCTAssertEqual(try hidden(), [])
    }

    /// Never an input, whatever the spelling: a link to it, or through `..`.
    func testAnInputIsNeverAnOutput() throws {
        let input = tmp.appendingPathComponent("in.safetensors")
        try Data("input".utf8).write(to: input)
        let link = tmp.appendingPathComponent("link.safetensors")
        try FileManager.default.createSymbolicLink(at: link, withDestinationURL: input)
        for path in [input.path, link.path, tmp.appendingPathComponent("sub/../in.safetensors").path] {
            try? FileManager.default.createDirectory(at: tmp.appendingPathComponent("sub"), withIntermediateDirectories: true)
            XCTAssertThrowsError(try StagedOutput(path, kind: .file, overwrite: true, inputs: [input.path])) {
                XCTAssertTrue("\($0)".contains("same as INPUT"), "\($0)")
            }
        }
        XCTAssertEqual(FileManager.default.contents(atPath: input.path), Data("input".utf8))
    }

    /// A run that fails (a full disk, say) leaves neither its staging nor the directories it made.
    func testAbortRemovesWhatTheRunCreated() throws {
        let dest = tmp.appendingPathComponent("a/b/out")
        let s = try StagedOutput(dest.path, kind: .filesInDirectory, createParent: true)
        try Data("half".utf8).write(to: s.url(for: "adapter_model.safetensors"))
        s.abort()
        XCTAssertEqual(try listing(), [])
    }

    /// A FIFO or a device is not read.
    func testOnlyRegularFilesAreRead() throws {
        let fifo = tmp.appendingPathComponent("config.json").path
        XCTAssertEqual(mkfifo(fifo, 0o644), 0)
        XCTAssertThrowsError(try InputFile.read(fifo)) { XCTAssertTrue("\($0)".contains("a FIFO"), "\($0)") }
        XCTAssertThrowsError(try InputFile.read("/dev/zero")) { XCTAssertTrue("\($0)".contains("character device"), "\($0)") }
        XCTAssertThrowsError(try InputFile.read(tmp.path)) { XCTAssertTrue("\($0)".contains("a directory"), "\($0)") }
    }
}
