import Claims
import Foundation
import Memory
import QLoRA

/// The project's main report: the default component table (estimated and measured), the claims
/// table and a chart of memory per method per model size, as Markdown and SVG text.
public enum MemoryReport {
    /// The components in stacking order, with their chart colours.
    static let palette: [(name: String, colour: String)] = [
        ("base_weights", "#4e79a7"), ("quant_constants", "#a0cbe8"), ("unquantized_weights", "#59a14f"),
        ("master_weights", "#8cd17d"), ("gradients", "#f28e2b"), ("lora_params", "#b6992d"), ("lora_grads", "#f1ce63"),
        ("optimizer_states", "#e15759"), ("activations", "#bab0ac"),
    ]

    public static let chartModels = ["llama-2-7b", "llama-2-13b", "llama-2-70b"]

    /// Estimates for the chart: every method for each model, r=16 on all linear layers, 2048
    /// tokens × 1, gradient checkpointing.
    public static func chartEstimates() throws -> [(model: String, estimates: [MemoryEstimate])] {
        try chartModels.map { name in
            (name, try TrainingMethod.allCases.map { m in
                var o = MemoryOptions()
                o.method = m
                o.gradientCheckpointing = true
                return try MemoryEstimate(model: ModelArchitecture.preset(name)!, options: o)
            })
        }
    }

    /// Stacked bars, one panel per model size (each with its own GB scale).
    public static func svg(_ panels: [(model: String, estimates: [MemoryEstimate])]) -> String {
        let panelW = 300.0, panelH = 320.0, top = 80.0, left = 60.0, gap = 40.0, legendH = 40.0
        let width = left + Double(panels.count) * (panelW + gap), height = top + panelH + 70 + legendH
        var s = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="Helvetica, Arial, sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(left)" y="24" font-size="16" font-weight="bold">Fine-tuning memory per component (estimated from exact parameter counts)</text>
            <text x="\(left)" y="42" fill="#555">r=16 on all linear layers, 2048 tokens × batch 1, gradient checkpointing; GB = 10⁹ bytes; each panel has its own scale</text>

            """
        for (p, panel) in panels.enumerated() {
            let x0 = left + Double(p) * (panelW + gap)
            let maxBytes = Double(panel.estimates.map(\.totalEstimatedBytes).max() ?? 1)
            let step = niceStep(maxBytes / 1e9 / 5)
            let top2 = (maxBytes / 1e9 / step).rounded(.up) * step
            func y(_ gb: Double) -> Double { top + panelH - gb / top2 * panelH }
            s += "<text x=\"\(x0 + panelW / 2)\" y=\"\(top - 6)\" text-anchor=\"middle\" font-weight=\"bold\">\(panel.model)</text>\n"
            var g = 0.0
            while g <= top2 + 1e-9 {
                s += "<line x1=\"\(x0)\" x2=\"\(x0 + panelW)\" y1=\"\(f(y(g)))\" y2=\"\(f(y(g)))\" stroke=\"#ddd\"/>"
                s += "<text x=\"\(x0 - 4)\" y=\"\(f(y(g) + 4))\" text-anchor=\"end\" fill=\"#555\">\(g < 10 && step < 1 ? String(format: "%.1f", g) : String(Int(g)))</text>\n"
                g += step
            }
            let barW = panelW / Double(panel.estimates.count) * 0.6
            for (i, e) in panel.estimates.enumerated() {
                let bx = x0 + (Double(i) + 0.2) * panelW / Double(panel.estimates.count)
                var acc = 0.0
                for (name, colour) in palette {
                    guard let c = e.component(name), c.estimatedBytes > 0 else { continue }
                    let gb = Double(c.estimatedBytes) / 1e9
                    s += "<rect x=\"\(f(bx))\" y=\"\(f(y(acc + gb)))\" width=\"\(f(barW))\" height=\"\(f(gb / top2 * panelH))\" fill=\"\(colour)\"><title>\(e.method.rawValue) \(name): \(String(format: "%.2f", gb)) GB</title></rect>\n"
                    acc += gb
                }
                s += "<text x=\"\(f(bx + barW / 2))\" y=\"\(f(y(acc) - 4))\" text-anchor=\"middle\" font-size=\"11\">\(String(format: acc < 10 ? "%.1f" : "%.0f", acc))</text>\n"
                s += "<text x=\"\(f(bx + barW / 2))\" y=\"\(f(top + panelH + 16))\" text-anchor=\"middle\" font-size=\"11\">\(e.method.rawValue.replacingOccurrences(of: "full-8bit-adam", with: "full 8-bit"))</text>\n"
            }
            s += "<line x1=\"\(x0)\" x2=\"\(x0 + panelW)\" y1=\"\(f(top + panelH))\" y2=\"\(f(top + panelH))\" stroke=\"#333\"/>\n"
        }
        let ly = top + panelH + 44
        for (i, (name, colour)) in palette.enumerated() {
            let lx = left + Double(i % 5) * 190, row = ly + Double(i / 5) * 20
            s += "<rect x=\"\(f(lx))\" y=\"\(f(row - 10))\" width=\"12\" height=\"12\" fill=\"\(colour)\"/><text x=\"\(f(lx + 18))\" y=\"\(f(row))\">\(name)</text>\n"
        }
        return s + "</svg>\n"
    }

    static func f(_ v: Double) -> String { String(format: "%.1f", v) }

    public static func niceStep(_ raw: Double) -> Double {
        let e = pow(10, floor(log10(max(raw, 1e-9))))
        for m in [1.0, 2, 5, 10] where m * e >= raw { return m * e }
        return 10 * e
    }

    /// The Markdown report.
    public static func markdown(defaultEstimate m: MemoryEstimate, measurementScope: String?, claims: [ClaimCheck],
                                chartFile: String, panels: [(model: String, estimates: [MemoryEstimate])]) -> String {
        func gb(_ b: Int?) -> String { b.map { gigabytes($0, decimals: 3, unit: false) } ?? "–" }
        var s = "# qlora memory report\n\n"
        s += "## \(m.model), \(m.method.rawValue), r=\(m.options.rank) on all linear layers, \(m.options.seqLen) tokens × batch \(m.options.batch)\n\n"
        s += "Parameters: \(m.params.total.formatted()) total, \(m.params.quantized.formatted()) quantized (NF4, double quant), \(m.params.trainable.formatted()) trainable.\n\n"
        s += "| component | estimated GB | measured GB | estimate's basis | how measured |\n|---|---:|---:|---|---|\n"
        for c in m.components {
            s += "| \(c.name) | \(gb(c.estimatedBytes)) | \(gb(c.measuredBytes)) | \(c.basis) | \(c.measuredBy ?? "–") |\n"
        }
        s += "| **total** | **\(gb(m.totalEstimatedBytes))** | \(gb(m.totalMeasuredBytes)) | rows in parentheses are parts of another row | |\n\n"
        if let measurementScope { s += "Measured in this process: \(measurementScope).\n\n" }
        s += "Not modelled: \(MemoryEstimate.notModelledText)\n\n"
        s += "## Memory per method and model size\n\n![memory per method](\(chartFile))\n\n"
        s += "| model | method | total GB | weights GB | trainable-state GB | activations GB |\n|---|---|---:|---:|---:|---:|\n"
        for p in panels {
            for e in p.estimates {
                let weights = ["base_weights", "quant_constants", "unquantized_weights"].compactMap { e.component($0)?.estimatedBytes }.reduce(0, +)
                let states = ["master_weights", "gradients", "lora_params", "lora_grads", "optimizer_states"].compactMap { e.component($0)?.estimatedBytes }.reduce(0, +)
                s += "| \(p.model) | \(e.method.rawValue) | \(gb(e.totalEstimatedBytes)) | \(gb(weights)) | \(gb(states)) | \(gb(e.component("activations")?.estimatedBytes)) |\n"
            }
        }
        s += "\n## Published claims (../shared/claims.md)\n\n| id | claim | source | ours | verdict |\n|---|---|---|---|---|\n"
        for c in claims {
            s += "| \(c.id) | \(c.claim.replacingOccurrences(of: "|", with: "/")) | \(c.source) | \(c.figure.replacingOccurrences(of: "|", with: "/")) | **\(c.verdict.rawValue)**: \(c.detail.replacingOccurrences(of: "|", with: "/")) |\n"
        }
        return s
    }
}
