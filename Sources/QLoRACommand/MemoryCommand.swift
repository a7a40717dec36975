import ArgumentParser
import Foundation
import Memory

struct MemoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "memory",
        abstract: "Fine-tuning memory per component: estimated from exact parameter counts, and measured with --measure.",
        discussion: """
            Models: \(ModelArchitecture.presets.map(\.name).joined(separator: ", ")), or --config config.json. \
            Not modelled: \(MemoryEstimate.notModelledText)
            """)

    @Option(help: "A built-in model preset.") var model: String?
    @Option(help: "A Hugging Face config.json instead of a preset.") var config: String?
    @Option(help: "full, full-8bit-adam, lora or qlora.") var method: TrainingMethod = .qlora
    @Option(help: "LoRA rank.") var rank = 16
    @Option(help: "LoRA alpha (recorded; it does not change memory).") var alpha = 32.0
    @Option(help: "Adapted projections: all, attention, mlp, or a list such as q,v or q_proj,v_proj.") var targets = "all"
    @Option(help: "Tokens per sequence.") var seqLen = 2048
    @Option(help: "Sequences per step.") var batch = 1
    @Flag(help: "Gradient checkpointing per decoder layer.") var gradCheckpointing = false
    @Flag(inversion: .prefixedNo, help: "Double quantization of the 4-bit constants.") var doubleQuant = true
    @Flag(help: "Build the components in this process and measure them (allocator and RSS).") var measure = false
    @Flag(help: "Print JSON.") var json = false

    func run() {
        runReportingErrors {
            let arch = try architecture(model: model, config: config)
            var o = MemoryOptions()
            o.method = method
            o.rank = rank
            o.alpha = alpha
            o.targets = try parseTargets(targets)
            o.seqLen = seqLen
            o.batch = batch
            o.gradientCheckpointing = gradCheckpointing
            o.doubleQuant = doubleQuant
            var m = try MemoryEstimate(model: arch, options: o)
            var scope: String? = nil
            if measure { scope = try measureWithProgress(&m, model: arch) }
            if json {
                print(String(decoding: try JSONSerialization.data(withJSONObject: memoryJSON(m, scope: scope), options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]), as: UTF8.self))
            } else {
                print(memoryTable(m, scope: scope))
            }
        }
    }
}

extension TrainingMethod: ExpressibleByArgument {}

/// `MemoryMeasurement.measure` with a progress line; returns the measurement's scope line(s).
func measureWithProgress(_ m: inout MemoryEstimate, model arch: ModelArchitecture) throws -> String {
    let line = ProgressLine("measure")
    let r = try MemoryMeasurement.measure(&m, model: arch) { line.note($0) }
    line.finish()
    var scope = r.scope + "; peak RSS \(formatBytes(r.peakRSSBytes))"
    if let st = r.layerStep {
        scope += String(format: "\ndecoder layer step (forward + backward, %d tokens): %.0f tokens/s (%.2f s); kept for backward %@; peak RSS growth over the step %@",
                        m.options.tokens, st.tokensPerSecond, st.seconds, formatBytes(st.keptAllocated), formatBytes(st.stepPeakRSS))
    }
    return scope
}

func architecture(model: String?, config: String?) throws -> ModelArchitecture {
    switch (model, config) {
    case (nil, nil): return ModelArchitecture.preset("llama-2-7b")!
    case (let m?, nil):
        guard let a = ModelArchitecture.preset(m) else {
            throw ValidationError("unknown model '\(m)'; presets: \(ModelArchitecture.presets.map(\.name).joined(separator: ", "))")
        }
        return a
    case (nil, let c?): return try ModelArchitecture(configFile: c)
    default: throw ValidationError("give --model or --config, not both")
    }
}

func parseTargets(_ text: String) throws -> [String] {
    switch text.lowercased() {
    case "all": return ModelArchitecture.projections
    case "attention": return ["q_proj", "k_proj", "v_proj", "o_proj"]
    case "mlp": return ["gate_proj", "up_proj", "down_proj"]
    default:
        let names = try text.split(separator: ",").map { part -> String in
            let t = part.trimmingCharacters(in: .whitespaces).lowercased()
            let name = t.hasSuffix("_proj") ? t : t + "_proj"
            guard ModelArchitecture.projections.contains(name) else {
                throw ValidationError("unknown target '\(part)'; use all, attention, mlp or names from \(ModelArchitecture.projections.joined(separator: ", "))")
            }
            return name
        }
        guard !names.isEmpty else { throw ValidationError("--targets is empty") }
        return ModelArchitecture.projections.filter(names.contains)
    }
}

func formatBytes(_ b: Int) -> String {
    let v = Double(b)
    if abs(v) >= 1e9 { return String(format: "%.2f GB", v / 1e9) }
    if abs(v) >= 1e6 { return String(format: "%.1f MB", v / 1e6) }
    if abs(v) >= 1e3 { return String(format: "%.1f kB", v / 1e3) }
    return "\(b) B"
}

/// The `--json` object of issue 6: model, method, params, components, totals.
func memoryJSON(_ m: MemoryEstimate, scope: String?) -> [String: Any] {
    [
        "model": m.model, "method": m.method.rawValue,
        "params": ["total": m.params.total, "quantized": m.params.quantized, "trainable": m.params.trainable],
        "options": ["rank": m.options.rank, "alpha": m.options.alpha, "targets": m.options.targets, "seq_len": m.options.seqLen,
                    "batch": m.options.batch, "gradient_checkpointing": m.options.gradientCheckpointing, "double_quant": m.options.doubleQuant],
        "components": m.components.map { c -> [String: Any] in
            var d: [String: Any] = ["name": c.name, "estimated_bytes": c.estimatedBytes, "measured_bytes": c.measuredBytes.map { $0 as Any } ?? NSNull(),
                                    "basis": c.basis, "counted_in_total": !c.name.hasPrefix("(")]
            if let how = c.measuredBy { d["measured_by"] = how }
            if let rss = c.measuredRSSBytes { d["measured_rss_bytes"] = rss }
            return d
        },
        "activations": m.activationSummary,
        "total_estimated_bytes": m.totalEstimatedBytes,
        "total_measured_bytes": m.totalMeasuredBytes.map { $0 as Any } ?? NSNull(),
        "measurement_scope": scope.map { $0 as Any } ?? NSNull(),
        "not_modelled": MemoryEstimate.notModelledText,
    ]
}

func memoryTable(_ m: MemoryEstimate, scope: String?) -> String {
    let o = m.options
    var lines = ["\(m.model), \(m.method.rawValue)" + (o.isLoRA ? ", r=\(o.rank) on \(o.targets.joined(separator: ","))" : "")
                 + ", seq \(o.seqLen) × batch \(o.batch)" + (o.gradientCheckpointing ? ", gradient checkpointing" : "")
                 + (o.method == .qlora ? (o.doubleQuant ? ", double quant" : ", no double quant") : ""),
                 "parameters: \(m.params.total.formatted()) total, \(m.params.quantized.formatted()) quantized, \(m.params.trainable.formatted()) trainable"
                 + String(format: " (%.3f%%)", 100 * Double(m.params.trainable) / Double(m.params.total)), ""]
    let width = max(10, m.components.map(\.name.count).max() ?? 0)
    func pad(_ s: String, _ w: Int) -> String { s.padding(toLength: w, withPad: " ", startingAt: 0) }
    func lpad(_ s: String, _ w: Int) -> String { String(repeating: " ", count: max(0, w - s.count)) + s }
    lines.append(pad("component", width) + lpad("estimated", 12) + lpad("measured", 12) + "  basis")
    for c in m.components {
        lines.append(pad(c.name, width) + lpad(formatBytes(c.estimatedBytes), 12) + lpad(c.measuredBytes.map(formatBytes) ?? "-", 12) + "  " + c.basis)
    }
    lines.append(pad("total", width) + lpad(formatBytes(m.totalEstimatedBytes), 12) + lpad(m.totalMeasuredBytes.map(formatBytes) ?? "-", 12)
                 + "  rows in parentheses are parts of another row")
    if let scope { lines += ["", "measured: " + scope] }
    lines += ["", "Not modelled: " + MemoryEstimate.notModelledText]
    return lines.joined(separator: "\n")
}
