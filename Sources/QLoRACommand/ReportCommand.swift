import ArgumentParser
import Foundation
import Memory

struct ReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "The main report: llama-2-7b QLoRA (r=16, all linear, 2048 tokens) memory estimated and measured, the claims table, and a chart; written to DIR as report.md and memory.svg.")

    @Option(help: "Directory to write report.md and memory.svg into (created if missing).") var out = "qlora-report"
    @Flag(help: "Skip the measurement (faster; measured columns stay empty).") var noMeasure = false

    func run() {
        runReportingErrors {
            let arch = ModelArchitecture.preset("llama-2-7b")!
            var m = try MemoryEstimate(model: arch, options: MemoryOptions())
            let fm = FileManager.default
            var isDir: ObjCBool = false
            if fm.fileExists(atPath: out, isDirectory: &isDir), !isDir.boolValue {
                throw ValidationError("\(out): exists and is not a directory")
            }
            let scope = noMeasure ? nil : try measureWithProgress(&m, model: arch)
            let claims = try Claims.check(precision: try PrecisionFigures.measure(realWeights: try PrecisionFigures.loadRealWeights()))
            let panels = try MemoryReport.chartEstimates()
            try fm.createDirectory(atPath: out, withIntermediateDirectories: true)
            try writeAtomically(MemoryReport.svg(panels), to: out + "/memory.svg")
            try writeAtomically(MemoryReport.markdown(defaultEstimate: m, measurementScope: scope, claims: claims, chartFile: "memory.svg", panels: panels),
                                to: out + "/report.md")
            print(memoryTable(m, scope: scope))
            print("")
            print(claimsTable(claims))
            print("\nwrote \(out)/report.md and \(out)/memory.svg")
        }
    }
}

/// Writes `text` to a temporary file beside `path` and renames it into place.
func writeAtomically(_ text: String, to path: String) throws {
    let tmp = path + ".tmp-\(getpid())"
    do {
        try Data(text.utf8).write(to: URL(fileURLWithPath: tmp))
        guard rename(tmp, path) == 0 else { throw ValidationError("\(path): cannot rename into place: \(String(cString: strerror(errno)))") }
    } catch {
        try? FileManager.default.removeItem(atPath: tmp)
        throw error
    }
}
