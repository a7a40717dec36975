import ArgumentParser
import Claims
import Foundation

struct ClaimsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "claims",
        abstract: "Check the published fine-tuning memory and precision claims (../shared/claims.md): the project's figure and a verdict for each.")

    @Flag(help: "Print JSON.") var json = false

    func run() {
        runReportingErrors {
            let checks = try Claims.check(precision: try measurePrecisionFigures())
            if json {
                try printJSON(checks)
            } else {
                print(claimsTable(checks))
            }
        }
    }
}

/// The precision figures, with the committed slice of real weights when it can be found.
func measurePrecisionFigures() throws -> PrecisionFigures {
    try PrecisionFigures.measure(realWeights: try PrecisionFigures.loadRealWeights(path: committedSlicePath()))
}

/// The committed slice of all-MiniLM-L6-v2 (Data/all-MiniLM-L6-v2/slice.safetensors), found
/// under `$QLORA_DATA`, the current directory, or a parent of the executable's directory, in
/// that order; nil when none has it.
func committedSlicePath() -> String? {
    let relative = "all-MiniLM-L6-v2/slice.safetensors"
    var candidates: [String] = []
    if let d = ProcessInfo.processInfo.environment["QLORA_DATA"] { candidates.append(d + "/" + relative) }
    candidates.append(FileManager.default.currentDirectoryPath + "/Data/" + relative)
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
    for _ in 0..<6 {
        candidates.append(dir.appendingPathComponent("Data/" + relative).path)
        dir = dir.deletingLastPathComponent()
    }
    return candidates.first { FileManager.default.fileExists(atPath: $0) }
}

func claimsTable(_ checks: [ClaimCheck]) -> String {
    var lines: [String] = []
    for c in checks {
        lines.append("\(c.id) [\(c.source)] \(c.claim)")
        lines.append("    ours:    \(c.figure)")
        lines.append("    verdict: \(c.detail)")
    }
    let counts = Dictionary(grouping: checks, by: \.verdict).mapValues(\.count)
    lines.append("")
    lines.append("\(checks.count) claims: \(counts[.holds] ?? 0) hold, \(counts[.off] ?? 0) off, \(counts[.notCheckable] ?? 0) not checkable here")
    return lines.joined(separator: "\n")
}
