import ArgumentParser
import Claims
import FileOutput
import Foundation
import Memory
import QLoRA
import Report

struct ReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "The main report: llama-2-7b QLoRA (r=16, all linear, 2048 tokens) memory estimated and measured, the claims table, and a chart; written to DIR as report.md and memory.svg.")

    @Option(help: "Directory to write report.md and memory.svg into (created if missing).") var out = "qlora-report"
    @Flag(help: "Skip the measurement (faster; measured columns stay empty).") var noMeasure = false
    @Flag(help: "Replace report.md, memory.svg and timeline.svg if DIR already has them.") var overwrite = false

    func run() {
        runReportingErrors {
            StagedOutput.installSignalCleanup()
            let arch = ModelArchitecture.preset("llama-2-7b")!
            var m = try MemoryEstimate(model: arch, options: MemoryOptions())
            let fm = FileManager.default
            var isDir: ObjCBool = false
            if fm.fileExists(atPath: out, isDirectory: &isDir), !isDir.boolValue {
                throw ValidationError("\(out): exists and is not a directory")
            }
            let scope = noMeasure ? nil : try measureWithProgress(&m, model: arch)
            let claims = try Claims.check(precision: try measurePrecisionFigures())
            let panels = try MemoryReport.chartEstimates()
            let staged = try StagedOutput(out, kind: .filesInDirectory, overwrite: overwrite, createParent: true)
            try Data(MemoryReport.svg(panels).utf8).write(to: staged.url(for: "memory.svg"))
            let step = try StepTimeline(model: arch, options: m.options)
            try Data(TimelineChart.svg(step, title: "One training step's memory over time: \(arch.name), \(m.method.rawValue)",
                                       subtitle: "r=\(m.options.rank) on all linear layers, \(m.options.seqLen) tokens × \(m.options.batch); \(step.stack.description)").utf8)
                .write(to: staged.url(for: "timeline.svg"))
            try Data((MemoryReport.markdown(defaultEstimate: m, measurementScope: scope, claims: claims, chartFile: "memory.svg", panels: panels)
                      + MemoryReport.timelineSection(step, model: arch.name, options: m.options, chartFile: "timeline.svg")).utf8)
                .write(to: staged.url(for: "report.md"))
            try staged.commit()
            print(memoryTable(m, scope: scope))
            print("")
            print(claimsTable(claims))
            print("\nstep peak: \(formatBytes(step.peakBytes)) at \(step.peak.phase) (\(step.stack.description))\nwrote \(out)/report.md, \(out)/memory.svg and \(out)/timeline.svg")
        }
    }
}
