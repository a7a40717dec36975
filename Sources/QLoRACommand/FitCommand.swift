import ArgumentParser
import CheckpointFormats
import Foundation
import Memory
import QLoRA

struct FitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fit",
        abstract: "Will it fit: the largest sequence length and batch that fit a GPU's memory, or a table of models × methods × GPU sizes.",
        discussion: """
            Memory per device is the step's peak (`qlora memory --timeline`), spread over --gpus with \
            --parallelism (the ZeRO paper's accounting: zero1 shards optimizer states, zero2 also \
            gradients, zero3 and fsdp also weights, plus one gathered layer). Not counted: \
            \(MemoryEstimate.notModelledText)
            """)

    @Option(help: ArgumentHelp("Memory per GPU, e.g. 24GB, 80GB, 16GiB.", valueName: "size")) var memory: String?
    @Option(help: "GPUs.") var gpus = 1
    @Option(help: "How the run is spread over the GPUs: ddp, zero1, zero2, zero3 or fsdp.") var parallelism: Parallelism = .ddp
    @Option(help: "A built-in model preset.") var model: String?
    @Option(help: "A Hugging Face config.json instead of a preset.") var config: String?
    @Option(help: "full, full-8bit-adam, lora or qlora.") var method: TrainingMethod = .qlora
    @Option(help: "LoRA rank.") var rank = 16
    @Option(help: "Adapted projections: all, attention, mlp, all-linear (PEFT's resolution), or a list such as q,v or attention,experts.") var targets = "all"
    @Option(help: "A mixture of experts' experts: bf16 (as transformers 5 + bitsandbytes load them; the default) or nf4 (bitsandbytes' replace_parameter_4bit after loading; Unsloth's own NF4 stacks, the default with --recipe unsloth).")
    var experts: ExpertRoute?
    @Option(help: "The sequence length the batch answer is for (and the matrix's).") var seqLen = 2048
    @Option(help: "The LoRA methods' optimizer: adamw, adamw-8bit or paged-adamw-8bit (paged states count nothing on the GPU).") var optimizer: Optimizer = .adamw
    @Flag(help: "DoRA (PEFT's use_dora): a magnitude per output feature, and each module's weight norm in the forward.") var dora = false
    @Option(help: ArgumentHelp("Modules trained whole (PEFT's modules_to_save): lm_head, embed_tokens or both, comma-separated.", valueName: "modules"))
    var modulesToSave: String?
    @Flag(help: "A table of every preset × method × common GPU size (12-128 GB) at --seq-len × batch 1 with checkpointing.") var matrix = false
    @OptionGroup var stackOptions: StackOptions
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        guard gpus > 0 else { throw ValidationError("--gpus must be positive") }
        guard rank > 0, seqLen > 0 else { throw ValidationError("--rank and --seq-len must be positive") }
        if !matrix && memory == nil { throw ValidationError("give --memory SIZE (e.g. 24GB), or --matrix") }
        if dora && !matrix && method != .qlora && method != .lora { throw ValidationError("--dora trains LoRA adapters: use --method qlora or lora") }
        if experts == .nf4 && !matrix && method != .qlora { throw ValidationError("--experts nf4 quantizes a 4-bit model's experts: use --method qlora") }
    }

    func run() {
        runReportingErrors {
            let stack = try stackOptions.stack()
            if matrix { return try printMatrix(stack: stack) }
            let bytes = try parseByteSize(memory!)
            let arch = try architecture(model: model, config: config)
            var o = MemoryOptions(method: method, rank: rank, seqLen: seqLen, optimizer: optimizer, dora: dora)
            try o.setTargets(targets, for: arch)
            o.experts = experts ?? (stackOptions.recipe == .unsloth ? .nf4 : .bf16)
            o.quantizedExpertLoRA = stackOptions.recipe == .unsloth
            o.modulesToSave = modulesToSave.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } } ?? []
            let answers = try Fit.answer(arch, o, memory: bytes, gpus: gpus, parallelism: parallelism, stack: stack)
            if json {
                struct Output: Encodable { var model: String; var method: String; var memoryBytes: Int; var gpus: Int; var parallelism: String; var seqLen: Int; var stack: String; var answers: [Fit.Answer] }
                return try printJSON(Output(model: arch.name, method: method.rawValue, memoryBytes: bytes, gpus: gpus, parallelism: parallelism.rawValue,
                                            seqLen: seqLen, stack: stack.description, answers: answers))
            }
            print("\(arch.name), \(method.rawValue)" + (o.isLoRA ? ", r=\(rank) on \(adaptedDescription(arch, o))" : "")
                  + ": \(formatBytes(bytes)) per GPU × \(gpus)" + (gpus > 1 ? " (\(parallelism.rawValue))" : ""))
            print("")
            let header = ["", "largest seq-len (batch 1)", "largest batch at \(seqLen.formatted()) tokens", "at \(seqLen.formatted()) × 1", "headroom"]
            var rows = [header]
            for a in answers {
                rows.append([a.gradientCheckpointing ? "with checkpointing" : "without checkpointing",
                             a.largestSeqLen.map { $0 == Fit.longestSeqLen ? "over \($0.formatted())" : $0.formatted() } ?? "none",
                             a.largestBatch.map { $0.formatted() } ?? "none", formatBytes(a.bytesAtSeqLen),
                             a.bytesAtSeqLen <= bytes ? formatBytes(bytes - a.bytesAtSeqLen) : "short by \(formatBytes(a.bytesAtSeqLen - bytes))"])
            }
            print(table(rows))
            print("\nStack: \(stack.description).")
            print(stack.runtime == .cuda
                  ? "A length or batch fits when the step's allocations run through PyTorch's caching allocator without running out of memory (cached segments freed and retried first), after the CUDA context; bytes are reserved + context at the peak."
                  : "Per device at the step's peak (`qlora memory --timeline`); not counted: the CUDA context, cuBLAS workspaces and the caching allocator's reserve (--runtime cuda counts them).")
        }
    }

    func printMatrix(stack: Stack) throws {
        struct Cell: Encodable { var model: String; var method: String; var gpuGB: Int; var bytes: Int; var fits: Bool; var headroomBytes: Int }
        var cells: [Cell] = []
        var unmodelled: [String: String] = [:]
        for a in ModelArchitecture.presets {
            // A mixture of experts' QLoRA rows: its experts as transformers 5 + bitsandbytes hold
            // them (bf16), and through bitsandbytes' parametrize route (nf4).
            // Unsloth quantizes the experts as it loads them: its one route.
            let routes: [ExpertRoute] = a.experts == nil ? [.bf16] : stack.recipe == .unsloth ? [.nf4] : ExpertRoute.allCases
            for m in TrainingMethod.allCases {
                if m != .qlora && stack.recipe != .peft { continue }   // peft-kbit, trl and unsloth are QLoRA recipes
                for route in m == .qlora ? routes : [.bf16] {
                    var o = MemoryOptions(method: m, rank: rank, seqLen: seqLen, gradientCheckpointing: true, dora: dora && (m == .qlora || m == .lora))
                    try o.setTargets(targets, for: a)
                    o.experts = route
                    o.quantizedExpertLoRA = stack.recipe == .unsloth
                    if route == .nf4 && stack.recipe != .unsloth { o.targets.removeAll { ModelArchitecture.parameterTargets.contains($0) } }
                    let label = a.experts == nil || m != .qlora ? m.rawValue : "\(m.rawValue), experts \(route.rawValue)"
                    let b: Int
                    do {
                        b = try Fit.perDeviceBytes(a, o, gpus: 1, parallelism: .ddp, stack: stack)
                    } catch let e as MemoryError where a.experts != nil {
                        // A mixture of experts under a recipe no measurement covers: said, not guessed.
                        unmodelled[a.name] = "\(e)"
                        continue
                    }
                    for g in Fit.commonGPUSizesGB {
                        cells.append(Cell(model: a.name, method: label, gpuGB: g, bytes: b, fits: b <= g * 1_000_000_000, headroomBytes: g * 1_000_000_000 - b))
                    }
                }
            }
        }
        if json {
            struct Output: Encodable { var cells: [Cell]; var notModelled: [String: String] }
            return unmodelled.isEmpty ? try printJSON(cells) : try printJSON(Output(cells: cells, notModelled: unmodelled))
        }
        print("Per-GPU memory of one training step at \(seqLen.formatted()) tokens × batch 1, gradient checkpointing, r=\(rank) (LoRA methods), one GPU;")
        print("each cell: the headroom in GB if it fits, × if not (GB = 10⁹ B). Stack: \(stack.description)"
              + (stack.runtime == .cuda ? ".\n" : "; the CUDA context and allocator caching come on top.\n"))
        var rows = [["model", "method", "needs"] + Fit.commonGPUSizesGB.map { "\($0) GB" }]
        for chunk in stride(from: 0, to: cells.count, by: Fit.commonGPUSizesGB.count) {
            let row = cells[chunk..<(chunk + Fit.commonGPUSizesGB.count)]
            let first = row.first!
            rows.append([first.model, first.method, gigabytes(first.bytes, decimals: 1)]
                        + row.map { $0.fits ? gigabytes($0.headroomBytes, decimals: 1, unit: false) : "×" })
        }
        print(table(rows))
        if !unmodelled.isEmpty { print("\nnot in the table:\n" + unmodelled.sorted { $0.key < $1.key }.map { "  \($0.value)" }.joined(separator: "\n")) }
    }
}

extension Parallelism: ExpressibleByArgument {}

/// The adapted modules, and a mixture of experts' adapted parameters, for a header line.
func adaptedDescription(_ a: ModelArchitecture, _ o: MemoryOptions) -> String {
    let params = o.targets.filter(ModelArchitecture.parameterTargets.contains)
    let modules = a.layerKinds.flatMap { a.adaptedModules(o.targets, layer: $0.layer) }
    return (modules.reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } } + params).joined(separator: ",")
        + (o.expertGateUpRankFactor != 1 ? " (experts' gate_up_proj at r=\(o.rank * o.expertGateUpRankFactor))" : "")
}

/// Columns padded to their widest cell; the first two left-aligned, the rest right-aligned.
func table(_ rows: [[String]]) -> String {
    let widths = (0..<(rows.map(\.count).max() ?? 0)).map { c in rows.map { c < $0.count ? $0[c].count : 0 }.max() ?? 0 }
    return rows.map { row in
        row.enumerated().map { c, cell in
            let pad = String(repeating: " ", count: max(0, widths[c] - cell.count))
            return c < 2 ? cell + pad : pad + cell
        }.joined(separator: "  ")
    }.joined(separator: "\n")
}
