import ArgumentParser
import CheckpointJobs
import Foundation
import SafeTensors

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per-tensor error of a dense checkpoint against a reference (e.g. after a 4-bit round trip).")

    @Argument(help: "The reference checkpoint.") var reference: String
    @Argument(help: "The checkpoint to measure.") var actual: String
    @Flag(help: "Print JSON.") var json = false

    func run() {
        runReportingErrors {
            let rows = try compareCheckpoints(reference: reference, actual: actual)
            if json {
                try printJSON(rows, snakeCase: false)
                return
            }
            let width = max(6, rows.map { escapingControlCharacters($0.name).count }.max() ?? 0)
            print("tensor".padding(toLength: width, withPad: " ", startingAt: 0), "  relative L2     RMS error   max |error|")
            var num = 0.0, den = 0.0
            for r in rows {
                let s = r.statistics
                print(escapingControlCharacters(r.name).padding(toLength: width, withPad: " ", startingAt: 0), String(format: "  %11.3e  %11.3e  %11.3e", s.relativeError, s.rmsError, s.maxAbsError))
                num += s.rmsError * s.rmsError * Double(s.count)
                if s.relativeError > 0 { den += pow(s.rmsError / s.relativeError, 2) * Double(s.count) }
            }
            let changed = rows.filter { $0.statistics.maxAbsError > 0 }.count
            print(String(format: "total: %d tensors, %d changed; relative L2 error of the changed tensors %.4f", rows.count, changed, den > 0 ? (num / den).squareRoot() : 0))
        }
    }
}
