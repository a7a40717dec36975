import Foundation
import Memory

/// A step's memory over time as an SVG: one stacked bar per moment of the step, by component,
/// the peak marked.
public enum TimelineChart {
    static let colours: [String: String] = [
        "weights": "#4e79a7", "adapters": "#b6992d", "activations": "#bab0ac", "transient": "#e15759",
        "gradients": "#f28e2b", "optimizer_states": "#76b7b2",
    ]

    public static func svg(_ t: StepTimeline, title: String, subtitle: String) -> String {
        let left = 70.0, top = 70.0, plotH = 300.0, barGap = 4.0
        let barW = max(8.0, min(28.0, 900.0 / Double(max(t.points.count, 1)) - barGap))
        let plotW = Double(t.points.count) * (barW + barGap)
        let labelsH = 230.0, legendH = 30.0
        let width = left + plotW + 170, height = top + plotH + labelsH + legendH
        let maxGB = Double(t.peakBytes) / 1e9
        let step = MemoryReport.niceStep(maxGB / 5)
        let topGB = max((maxGB / step).rounded(.up) * step, step)
        func y(_ gb: Double) -> Double { top + plotH - gb / topGB * plotH }
        func f(_ v: Double) -> String { String(format: "%.1f", v) }
        func esc(_ s: String) -> String { s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;") }
        var s = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="Helvetica, Arial, sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(left)" y="24" font-size="16" font-weight="bold">\(esc(title))</text>
            <text x="\(left)" y="44" fill="#555">\(esc(subtitle))</text>

            """
        var g = 0.0
        while g <= topGB + 1e-9 {
            s += "<line x1=\"\(f(left))\" x2=\"\(f(left + plotW))\" y1=\"\(f(y(g)))\" y2=\"\(f(y(g)))\" stroke=\"#ddd\"/>"
            s += "<text x=\"\(f(left - 6))\" y=\"\(f(y(g) + 4))\" text-anchor=\"end\" fill=\"#555\">\(step < 1 ? String(format: "%.1f", g) : String(Int(g))) GB</text>\n"
            g += step
        }
        for (i, p) in t.points.enumerated() {
            let x = left + Double(i) * (barW + barGap)
            var acc = 0.0
            for name in StepTimeline.componentOrder {
                let gb = Double(p.components[name] ?? 0) / 1e9
                guard gb > 0 else { continue }
                s += "<rect x=\"\(f(x))\" y=\"\(f(y(acc + gb)))\" width=\"\(f(barW))\" height=\"\(f(gb / topGB * plotH))\" fill=\"\(colours[name]!)\"><title>\(esc(p.phase)) \(name): \(String(format: "%.3f", gb)) GB</title></rect>\n"
                acc += gb
            }
            // With many layers, every layer's label would overlap: label the other phases, and
            // layers 0, 8, 16, ... (every bar keeps its tooltip).
            let isLayer = p.phase.contains("layer ")
            let layerNumber = Int(p.phase.split(separator: " ").first { Int($0) != nil } ?? "") ?? 0
            guard t.points.count <= 40 || !isLayer || layerNumber % 8 == 0 || i == t.peakIndex else { continue }
            let lx = x + barW / 2, ly = top + plotH + 8
            s += "<text x=\"\(f(lx))\" y=\"\(f(ly))\" transform=\"rotate(55 \(f(lx)) \(f(ly)))\" font-size=\"10\" fill=\"\(i == t.peakIndex ? "#c00" : "#333")\">\(esc(p.phase))</text>\n"
        }
        let px = left + Double(t.peakIndex) * (barW + barGap) + barW / 2
        s += "<line x1=\"\(f(px))\" x2=\"\(f(px))\" y1=\"\(f(top - 6))\" y2=\"\(f(y(maxGB)))\" stroke=\"#c00\" stroke-dasharray=\"4 3\"/>"
        s += "<text x=\"\(f(px))\" y=\"\(f(top - 10))\" text-anchor=\"middle\" fill=\"#c00\" font-weight=\"bold\">peak \(String(format: "%.2f", maxGB)) GB</text>\n"
        s += "<line x1=\"\(f(left))\" x2=\"\(f(left + plotW))\" y1=\"\(f(top + plotH))\" y2=\"\(f(top + plotH))\" stroke=\"#333\"/>\n"
        let ly = height - 14
        for (k, name) in StepTimeline.componentOrder.enumerated() {
            let lx = left + Double(k) * 140
            s += "<rect x=\"\(f(lx))\" y=\"\(f(ly - 10))\" width=\"12\" height=\"12\" fill=\"\(colours[name]!)\"/><text x=\"\(f(lx + 18))\" y=\"\(f(ly))\">\(name)</text>\n"
        }
        return s + "</svg>\n"
    }
}

extension MemoryReport {
    /// The report's section on the step's peak: the phase, the bytes at it and the chart.
    public static func timelineSection(_ t: StepTimeline, model: String, options o: MemoryOptions, chartFile: String) -> String {
        let gb = { gigabytes($0) }
        var s = "## The step's peak, not only what is kept\n\n"
        s += "\(model), \(o.method.rawValue), \(o.seqLen) tokens × \(o.batch)\(o.gradientCheckpointing ? ", gradient checkpointing" : ""): "
        s += "the step peaks at **\(gb(t.peakBytes))** during \(t.peak.phase), \(gb(t.peakBytes - t.points[0].bytes)) above the \(gb(t.points[0].bytes)) held before it "
        s += "(stack: \(t.stack.description); held to the real stack's measured peaks within 3% by the tests).\n\n"
        s += "![the step's memory over time](\(chartFile))\n\n"
        return s
    }
}
