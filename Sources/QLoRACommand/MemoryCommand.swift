import ArgumentParser
import CheckpointFormats
import FileOutput
import Foundation
import Memory
import QLoRA
import Report

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
    // Numbers parse `.unconditional`ly: a negative one reaches the estimate's own check.
    @Option(parsing: .unconditional, help: "LoRA rank.") var rank = 16
    @Option(parsing: .unconditional, help: "LoRA alpha (recorded; it does not change memory).") var alpha = 32.0
    @Option(help: "Adapted projections: all, attention, mlp, all-linear (PEFT's resolution), or a list such as q,v, q_proj,v_proj or attention,experts (a mixture of experts' experts and router through PEFT's target_parameters).")
    var targets = "all"
    @Option(help: "A mixture of experts' experts: bf16 (as transformers 5 + bitsandbytes load them; the default) or nf4 (bitsandbytes' replace_parameter_4bit after loading; Unsloth's own NF4 stacks, the default with --recipe unsloth).")
    var experts: ExpertRoute?
    @Option(parsing: .unconditional, help: "Tokens per sequence.") var seqLen = 2048
    @Option(parsing: .unconditional, help: "Sequences per step.") var batch = 1
    @Flag(help: "Gradient checkpointing per decoder layer.") var gradCheckpointing = false
    @Option(help: "The LoRA methods' optimizer: adamw, adamw-8bit or paged-adamw-8bit (paged states count nothing on the GPU).") var optimizer: Optimizer = .adamw
    @Flag(help: "DoRA (PEFT's use_dora): a magnitude per output feature, and each module's weight norm in the forward.") var dora = false
    @Option(help: ArgumentHelp("Modules trained whole (PEFT's modules_to_save): lm_head, embed_tokens or both, comma-separated.", valueName: "modules"))
    var modulesToSave: String?
    @Flag(inversion: .prefixedNo, help: "Double quantization of the 4-bit constants.") var doubleQuant = true
    @Flag(help: "Build the components in this process and measure them (allocator and RSS).") var measure = false
    @Option(help: ArgumentHelp("Model the whole step's memory over time (transformers + PEFT + bitsandbytes) and draw it as an SVG at PATH; prints the peak's phase.", valueName: "path"))
    var timeline: String?
    @OptionGroup var stackOptions: StackOptions
    @Flag(help: "With --timeline: replace an existing SVG.") var overwrite = false
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        if dora && method != .qlora && method != .lora { throw ValidationError("--dora trains LoRA adapters: use --method qlora or lora") }
        if experts == .nf4 && method != .qlora { throw ValidationError("--experts nf4 quantizes a 4-bit model's experts: use --method qlora") }
        let o = stackOptions
        if (o.recipe != .peft || o.runtime != .cpu || o.attention != .sdpa || Stack.Transformers(release: o.transformers) != .v5 || o.loss != .transformers)
            && timeline == nil {
            throw ValidationError("--recipe, --runtime, --attention, --transformers and --loss choose whose step --timeline draws; give --timeline PATH.svg")
        }
    }

    func run() {
        runReportingErrors {
            let arch = try architecture(model: model, config: config)
            var o = MemoryOptions(method: method, rank: rank, alpha: alpha, seqLen: seqLen,
                                  batch: batch, gradientCheckpointing: gradCheckpointing, doubleQuant: doubleQuant, optimizer: optimizer, dora: dora)
            try o.setTargets(targets, for: arch)
            o.experts = experts ?? (stackOptions.recipe == .unsloth ? .nf4 : .bf16)
            o.quantizedExpertLoRA = stackOptions.recipe == .unsloth
            o.modulesToSave = modulesToSave.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } } ?? []
            var m = try MemoryEstimate(model: arch, options: o)
            var scope: String? = nil
            if measure { scope = try measureWithProgress(&m, model: arch) }
            let stack = try stackOptions.stack()
            let recipe = stack.recipe
            let step = try timeline.map { _ in try StepTimeline(model: arch, options: o, stack: stack) }
            let cuda = try step.flatMap { $0.stack.runtime == .cuda ? try $0.onCUDA() : nil }
            if let step, let path = timeline {
                let title = "One training step's memory over time: \(arch.name), \(method.rawValue)"
                let subtitle = "r=\(rank) on \(adaptedDescription(arch, o)), \(seqLen) tokens × \(batch)"
                    + (gradCheckpointing || recipe == .unsloth ? ", gradient checkpointing" : "")
                    + "; \(stack.description) (GB = 10⁹ B)"
                try StagedOutput.write(Data(TimelineChart.svg(step, title: title, subtitle: subtitle).utf8), to: path, overwrite: overwrite)
            }
            if json {
                var doc = MemoryEstimateJSON(m, measurementScope: scope)
                doc.timeline = step
                try printJSON(doc, snakeCase: false)
            } else {
                print(memoryTable(m, scope: scope))
                if let step, let path = timeline { print("\n" + timelineTable(step, cuda: cuda) + "\n\nwrote \(path)") }
            }
        }
    }
}

extension TrainingMethod: ExpressibleByArgument {}
extension ExpertRoute: ExpressibleByArgument {}

extension MemoryOptions {
    /// `--targets` for `arch`: PEFT's "all-linear" as PEFT resolves it on this model, or a list.
    mutating func setTargets(_ text: String, for arch: ModelArchitecture) throws {
        if text.lowercased() == "all-linear" {
            (targets, expertGateUpRankFactor) = arch.peftAllLinear
        } else {
            targets = try ModelArchitecture.targetProjections(text)
        }
    }
}
extension Optimizer: ExpressibleByArgument {}

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
    case (nil, let c?):
        let a = try ModelArchitecture(configFile: c)
        // Never a Llama's answer for a model that is not one.
        if let problem = a.undescribed.first { throw CheckpointError.invalidPath(path: c, problem: problem) }
        return a
    default: throw ValidationError("give --model or --config, not both")
    }
}

func formatBytes(_ b: Int) -> String {
    let v = Double(b)
    if abs(v) >= 1e9 { return gigabytes(b) }
    if abs(v) >= 1e6 { return String(format: "%.1f MB", v / 1e6) }
    if abs(v) >= 1e3 { return String(format: "%.1f kB", v / 1e3) }
    return "\(b) B"
}

func memoryTable(_ m: MemoryEstimate, scope: String?) -> String {
    let o = m.options
    var lines = ["\(m.model), \(m.method.rawValue)" + (o.isLoRA ? ", r=\(o.rank) on \(adaptedDescription(m.architecture, o))" : "")
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

/// The step's phases with their live bytes by component, the peak marked; on CUDA also what
/// the caching allocator has allocated and reserved at each.
func timelineTable(_ t: StepTimeline, cuda: CUDAStep? = nil) -> String {
    let names = StepTimeline.componentOrder
    var rows = [["phase", "total"] + names + (cuda == nil ? [] : ["allocated", "reserved"])]
    for (i, p) in t.points.enumerated() {
        rows.append([(i == t.peakIndex ? "▶ " : "  ") + p.phase, formatBytes(p.bytes)] + names.map { formatBytes(p.components[$0] ?? 0) }
                    + (cuda.map { [formatBytes($0.allocatedAtPoints[i]), formatBytes($0.reservedAtPoints[i])] } ?? []))
    }
    var text = "The step over time (\(t.stack.description)):\n" + table(rows)
        + "\n\npeak: \(formatBytes(t.peakBytes)) live at \(t.peak.phase)"
        + (t.hostBytes > 0 ? "; checkpoints offloaded to host memory: \(formatBytes(t.hostBytes))" : "")
    if let cuda {
        text += "\nCUDA: max_memory_allocated \(formatBytes(cuda.allocatedPeak)), max_memory_reserved \(formatBytes(cuda.reservedPeak)), "
            + "with the context \(formatBytes(cuda.deviceBytes)) on the device."
    } else {
        text += "; not counted: the CUDA context, cuBLAS workspaces, the caching allocator's reserve (--runtime cuda counts them)."
    }
    return text
}
