import ArgumentParser
import Foundation
import Memory

struct ClaimsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "claims",
        abstract: "Check the published fine-tuning memory and precision claims (../shared/claims.md): the project's figure and a verdict for each.")

    @Flag(help: "Print JSON.") var json = false

    func run() {
        runReportingErrors {
            let checks = try Claims.check(precision: try PrecisionFigures.measure(realWeights: try PrecisionFigures.loadRealWeights()))
            if json {
                try printJSON(checks)
            } else {
                print(claimsTable(checks))
            }
        }
    }
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
