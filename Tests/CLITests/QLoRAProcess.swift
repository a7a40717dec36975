import Foundation
import XCTest

/// The `qlora` executable: `swift test` builds every product, and the test runner sits beside it.
let qloraBinary: URL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent().appendingPathComponent("qlora")

/// Runs `qlora` with `args` as a user would. Its output is read while it runs (so a large output
/// cannot block it); one still running after `timeout` seconds is killed and reported as a hang.
func runQLoRA(_ args: [String], environment: [String: String]? = nil, timeout: Double = 900,
              file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, stdout: String, stderr: String) {
    XCTAssertTrue(FileManager.default.isExecutableFile(atPath: qloraBinary.path), "qlora binary not built at \(qloraBinary.path)", file: file, line: line)
    let p = Process()
    p.executableURL = qloraBinary
    p.arguments = args
    if let environment { p.environment = environment }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    nonisolated(unsafe) var o = Data(), e = Data()
    let group = DispatchGroup()
    DispatchQueue.global().async(group: group) { o = out.fileHandleForReading.readDataToEndOfFile() }
    DispatchQueue.global().async(group: group) { e = err.fileHandleForReading.readDataToEndOfFile() }
    if group.wait(timeout: .now() + timeout) == .timedOut {
        p.terminate()
        XCTFail("qlora \(args.joined(separator: " ")) still running after \(timeout) s: a hang", file: file, line: line)
        group.wait()
    }
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

/// Every regular file under `path` (or the file itself) with its bytes, by path: the inputs'
/// checksum before and after a run.
func fileContents(_ path: String) -> [String: Data] {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { return [:] }
    guard isDir.boolValue else { return [path: FileManager.default.contents(atPath: path) ?? Data()] }
    var out: [String: Data] = [:]
    for case let f as String in FileManager.default.enumerator(atPath: path) ?? FileManager.DirectoryEnumerator() {
        let full = path + "/" + f
        var d: ObjCBool = false
        if FileManager.default.fileExists(atPath: full, isDirectory: &d), !d.boolValue { out[full] = FileManager.default.contents(atPath: full) }
    }
    return out
}
