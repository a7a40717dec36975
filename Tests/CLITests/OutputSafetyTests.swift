import Foundation
import XCTest
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The output rules and the regular-file rule, as a hostile but realistic user meets them: no
/// hang, nothing overwritten, nothing left behind. Each test checks the one-line error, the exit
/// code, that no input changed (every byte) and that nothing is left beside the output.
final class OutputSafetyTests: TemporaryDirectoryTestCase {
    /// Runs qlora; a run still going after `timeout` seconds is killed and fails the test (a hang).
    @discardableResult
    func qlora(_ args: [String], timeout: Double = 60, file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, stdout: String, stderr: String) {
        try runQLoRA(args, timeout: timeout, file: file, line: line)
    }

    func snapshot(_ path: String) -> [String: Data] { fileContents(path) }

    /// Hidden staging or other leftovers in `directory`.
    func leftovers(_ directory: URL) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasPrefix(".") }
    }

    /// A failure: non-zero exit, one line on stderr naming each of `mentions`.
    func expectOneLineFailure(_ r: (status: Int32, stdout: String, stderr: String), _ mentions: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertNotEqual(r.status, 0, file: file, line: line)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "one line: \(r.stderr)", file: file, line: line)
        for m in mentions { XCTAssertTrue(r.stderr.contains(m), "stderr should mention '\(m)': \(r.stderr)", file: file, line: line) }
    }

    func sample(_ name: String, layers: Int = 1, hidden: Int = 64, adapter: Bool = false) throws -> String {
        let dir = tmp.appendingPathComponent(name).path
        let r = try qlora(["sample", dir, "--layers", "\(layers)", "--hidden", "\(hidden)", "--intermediate", "\(2 * hidden)", "--vocab", "256", "--heads", "4"]
                          + (adapter ? ["--adapter-rank", "4"] : []))
        XCTAssertEqual(r.status, 0, r.stderr)
        return dir
    }

    // MARK: Hangs

    /// A FIFO as a checkpoint, as a sidecar, and a link to /dev/zero: refused at once.
    func testFIFOsAndDevicesAreRefusedNotWaitedOn() throws {
        let fifo = tmp.appendingPathComponent("model.safetensors").path
        XCTAssertEqual(mkfifo(fifo, 0o644), 0)
        expectOneLineFailure(try qlora(["inspect", fifo], timeout: 20), [fifo, "not a regular file (a FIFO)"])
        let out = tmp.appendingPathComponent("q.safetensors").path
        expectOneLineFailure(try qlora(["quantize", fifo, out], timeout: 20), [fifo, "FIFO"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))

        let zero = tmp.appendingPathComponent("zero.safetensors").path
        try FileManager.default.createSymbolicLink(atPath: zero, withDestinationPath: "/dev/zero")
        expectOneLineFailure(try qlora(["inspect", zero], timeout: 20), [zero, "not a regular file (a character device)"])

        let model = try sample("m")
        XCTAssertEqual(mkfifo(model + "/tokenizer.json", 0o644), 0)
        let before = snapshot(model + "/model.safetensors")
        let q = tmp.appendingPathComponent("m-nf4").path
        expectOneLineFailure(try qlora(["quantize", model, q], timeout: 20), ["tokenizer.json", "FIFO"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: q))
        XCTAssertEqual(snapshot(model + "/model.safetensors"), before)
        XCTAssertEqual(try leftovers(tmp), [])
    }

    // MARK: Data loss

    /// An existing OUTPUT is refused unless --overwrite; an input never, even with it.
    func testExistingOutputNeedsOverwriteAndInputsNever() throws {
        let model = try sample("m", adapter: true)
        let adapter = model + "-adapter"
        let inputs = [model, adapter].map(snapshot)
        // An existing file.
        let out = tmp.appendingPathComponent("out.safetensors").path
        try Data("mine".utf8).write(to: URL(fileURLWithPath: out))
        let single = model + "/model.safetensors"
        expectOneLineFailure(try qlora(["quantize", single, out]), [out, "already exists", "--overwrite"])
        XCTAssertEqual(FileManager.default.contents(atPath: out), Data("mine".utf8))
        var r = try qlora(["quantize", single, out, "--overwrite"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertNotEqual(FileManager.default.contents(atPath: out), Data("mine".utf8))
        // A non-empty directory.
        let dir = tmp.appendingPathComponent("outdir")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Data("keep".utf8).write(to: dir.appendingPathComponent("notes.txt"))
        expectOneLineFailure(try qlora(["quantize", model, dir.path]), [dir.path, "not empty"])
        XCTAssertEqual(FileManager.default.contents(atPath: dir.path + "/notes.txt"), Data("keep".utf8))
        // merge into the adapter's own file, and --compare-original into the original.
        let q = tmp.appendingPathComponent("q").path
        r = try qlora(["quantize", model, q])
        XCTAssertEqual(r.status, 0, r.stderr)
        for args in [["merge", single, adapter, adapter + "/adapter_model.safetensors"],
                     ["merge", single, adapter, adapter + "/adapter_model.safetensors", "--overwrite"],
                     ["merge", q, adapter, model, "--compare-original", model, "--overwrite"],
                     ["merge", q, adapter, adapter, "--overwrite"]] {
            expectOneLineFailure(try qlora(args), ["INPUT"])
        }
        XCTAssertEqual([model, adapter].map(snapshot), inputs)
        XCTAssertEqual(try leftovers(tmp), [])
    }

    /// train --out: never the model directory or an existing file, never over an adapter without
    /// --overwrite; all checked before a step is taken.
    func testTrainOutIsCheckedBeforeTraining() throws {
        let model = try sample("m")
        let data = tmp.appendingPathComponent("d.jsonl").path
        try Data("{\"input_ids\": [1, 2, 3, 4], \"labels\": [-100, 2, 3, 4]}\n".utf8).write(to: URL(fileURLWithPath: data))
        let before = snapshot(model)
        let args = ["train", "--model", model, "--data", data, "--steps", "2", "--seq-len", "4", "--save-every", "0"]
        for (out, mention) in [(model, "INPUT"), (model + "/adapter", "inside the INPUT directory"), (data, "INPUT")] {
            let r = try qlora(args + ["--out", out])
            expectOneLineFailure(r, [mention])
            XCTAssertFalse(r.stderr.contains("step"), "no step may be taken: \(r.stderr)")
        }
        let file = tmp.appendingPathComponent("file").path
        try Data("x".utf8).write(to: URL(fileURLWithPath: file))
        expectOneLineFailure(try qlora(args + ["--out", file]), [file, "not a directory"])
        let out = tmp.appendingPathComponent("adapter").path
        var r = try qlora(args + ["--out", out])
        XCTAssertEqual(r.status, 0, r.stderr)
        let trained = snapshot(out)
        expectOneLineFailure(try qlora(args + ["--out", out]), [out, "not empty"])
        XCTAssertEqual(snapshot(out), trained)
        r = try qlora(args + ["--out", out, "--overwrite"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(snapshot(model), before)
        XCTAssertEqual(try leftovers(tmp), [])
        XCTAssertEqual(try leftovers(URL(fileURLWithPath: out)), [])
    }

    // MARK: Left behind

    /// SIGTERM, SIGINT or SIGHUP during quantize removes the staged output; staging a SIGKILLed
    /// run left is removed by the next run into the same place.
    func testSignalsLeaveNothingAndStaleStagingIsRemoved() throws {
        let model = try sample("big", layers: 8, hidden: 512)
        var interrupted = 0
        for sig in [SIGTERM, SIGINT, SIGHUP] {
            let out = tmp.appendingPathComponent("q-\(sig)").path
            let p = Process()
            p.executableURL = qloraBinary
            p.arguments = ["quantize", model, out]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            // Wait until it stages, then signal it.
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline, try leftovers(tmp).isEmpty, p.isRunning { usleep(2_000) }
            kill(p.processIdentifier, sig)
            p.waitUntilExit()
            if p.terminationReason == .exit && p.terminationStatus == 0 { continue }  // it finished first: nothing to check
            XCTAssertEqual(p.terminationReason, .uncaughtSignal, "signal \(sig)")
            interrupted += 1
            XCTAssertEqual(try leftovers(tmp), [], "signal \(sig)")
            XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        }
        XCTAssertGreaterThan(interrupted, 0, "no run was caught while staging")
        // A dead run's staging: PID 2^22 + 1 is above Linux's pid_max default, so no process has it.
        let stale = tmp.appendingPathComponent(".q.tmp-4194305-1234")
        try FileManager.default.createDirectory(at: stale, withIntermediateDirectories: true)
        try Data(count: 1000).write(to: stale.appendingPathComponent("model.safetensors"))
        let r = try qlora(["quantize", model, tmp.appendingPathComponent("q").path])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try leftovers(tmp), [])
    }
}
