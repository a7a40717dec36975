import ArgumentParser
import Training
import Dispatch
import FileOutput
import Foundation
import Memory
import QLoRA

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "QLoRA fine-tuning of a Llama checkpoint (dense or bnb-4bit) on pre-tokenized JSONL data.",
        discussion: """
            The seven projections of every layer are NF4 (double quant, bf16 compute) with LoRA adapters on all of them \
            (a mixture of experts': the attention's; its router and experts stay frozen in bf16); embeddings, norms and lm_head \
            stay frozen in bf16. DATA has one {"input_ids": [...], "labels": [...]} per line \
            (labels -100 are not trained on). A resumable checkpoint (adapter + AdamW state) goes to OUT/checkpoint-N every \
            --save-every steps and on Ctrl-C; the final adapter (PEFT format) to OUT.
            """)

    @Option(help: "A Llama checkpoint directory (config.json + safetensors).") var model: String
    @Option(help: "Pre-tokenized JSONL.") var data: String
    // Numbers parse `.unconditional`ly, so `--lr -1` reaches `validate()` (and its message)
    // instead of ArgumentParser reading -1 as a flag and reporting a missing value.
    @Option(parsing: .unconditional, help: "LoRA rank.") var rank = 16
    @Option(parsing: .unconditional, help: "LoRA alpha.") var alpha = 32.0
    @Option(parsing: .unconditional, help: "AdamW learning rate.") var lr = 2e-4
    @Option(parsing: .unconditional, help: "Optimizer steps.") var steps = 100
    @Option(parsing: .unconditional, help: "Sequences per micro-batch.") var batch = 1
    @Option(parsing: .unconditional, help: "Micro-batches per optimizer step.") var gradAccum = 1
    @Option(parsing: .unconditional, help: "Tokens per sequence (longer examples are cut, shorter padded).") var seqLen = 512
    @Flag(help: "Recompute each layer in backward instead of keeping its activations.") var gradCheckpointing = false
    @Option(parsing: .unconditional, help: "Save a resumable checkpoint every N steps (0: only on Ctrl-C).") var saveEvery = 50
    @Option(help: "Continue from OUT/checkpoint-N.") var resume: String?
    @Option(help: "Start from this PEFT adapter (its rank and alpha; new optimizer state).") var adapter: String?
    @Option(help: "Seed of the new adapters' initialization.") var seed: UInt64 = 0
    @Flag(help: "DoRA (PEFT's use_dora): new adapters also train a magnitude per output feature, PEFT's DoRA forward and backward.") var dora = false
    @Option(help: ArgumentHelp("Train these modules whole as well (PEFT's modules_to_save): lm_head, embed_tokens or both, comma-separated; bf16 copies with bf16 AdamW states, as PEFT trains them.", valueName: "modules"))
    var modulesToSave: String?
    @Option(help: ArgumentHelp("The head and loss: chunked (a block of tokens at a time, the [tokens × vocab] logits never held at once) or full (all tokens at once); the same losses and gradients to the bit.", valueName: "chunked|full"))
    var loss = "chunked"
    @Option(help: "Output directory for the adapter and checkpoints (new or empty, unless --overwrite or --resume from inside it).") var out = "qlora-adapter"
    @Flag(help: "Write into an existing --out that holds other files, replacing an adapter there.") var overwrite = false

    /// --modules-to-save as modules.
    func wholeModules() throws -> [LlamaModel.WholeModule] {
        guard let modulesToSave else { return [] }
        return try modulesToSave.split(separator: ",").map { name in
            let n = name.trimmingCharacters(in: .whitespaces)
            guard let w = LlamaModel.WholeModule(rawValue: n) else {
                throw ValidationError("--modules-to-save: '\(n)' is not lm_head or embed_tokens, the modules qlora trains whole")
            }
            return w
        }
    }

    func validate() throws {
        guard lr.isFinite, lr > 0 else { throw ValidationError("--lr must be a positive finite number, got \(lr)") }
        guard alpha.isFinite, alpha != 0 else { throw ValidationError("--alpha must be a finite non-zero number, got \(alpha)") }
        for (name, value) in [("--rank", rank), ("--steps", steps), ("--batch", batch), ("--grad-accum", gradAccum)] where value <= 0 {
            throw ValidationError("\(name) must be a positive integer, got \(value)")
        }
        guard seqLen > 1 else { throw ValidationError("--seq-len must be at least 2, got \(seqLen)") }
        guard saveEvery >= 0 else { throw ValidationError("--save-every must be 0 or more, got \(saveEvery)") }
        guard resume == nil || adapter == nil else { throw ValidationError("give --resume or --adapter, not both") }
        guard !dora || (resume == nil && adapter == nil) else { throw ValidationError("--dora makes new adapters; an adapter given with --adapter or --resume keeps its own kind") }
        guard modulesToSave == nil || (resume == nil && adapter == nil) else {
            throw ValidationError("--modules-to-save makes new adapters; an adapter given with --adapter or --resume keeps its own modules")
        }
        _ = try wholeModules()
        guard ["chunked", "full"].contains(loss) else { throw ValidationError("--loss must be chunked or full, got '\(loss)'") }
    }

    func run() {
        runReportingErrors {
            var o = TrainOptions(rank: rank, alpha: alpha, lr: lr, steps: steps, batch: batch, gradAccum: gradAccum, seqLen: seqLen,
                                 gradientCheckpointing: gradCheckpointing, saveEvery: saveEvery, seed: seed)
            o.dora = dora
            o.modulesToSave = try wholeModules()
            o.chunkedLoss = loss == "chunked"
            let job = try TrainingRun(model: model, data: data, out: out, options: o, resume: resume, adapter: adapter, overwrite: overwrite)
            HeapReuse.keepFreedMemory()  // every step reuses the last one's buffers (see HeapReuse)
            // SIGTERM, SIGHUP: remove what is being staged; Ctrl-C saves a checkpoint (below).
            StagedOutput.installSignalCleanup([SIGTERM, SIGHUP])

            // Ctrl-C: finish the step at hand, save a checkpoint, exit 130.
            signal(SIGINT, SIG_IGN)
            let interrupted = StopFlag()
            let source = DispatchSource.makeSignalSource(signal: SIGINT, queue: DispatchQueue.global())
            source.setEventHandler { interrupted.set() }
            source.resume()

            let tty = isatty(2) != 0
            let start = Date()
            try job.run(progress: { step, loss, tps in
                let line = String(format: "step %d/%d  loss %.4f  %.0f tokens/s  peak RSS %@", step, steps, loss, tps, formatBytes(MemoryProbe.resident().peak))
                if tty { FileHandle.standardError.write(Data(("\r\u{1B}[K" + line).utf8)) } else { FileHandle.standardError.write(Data((line + "\n").utf8)) }
            }, shouldStop: { interrupted.isSet })
            if tty { FileHandle.standardError.write(Data("\n".utf8)) }
            if interrupted.isSet {
                let dir = try job.saveCheckpoint()
                FileHandle.standardError.write(Data("interrupted: saved \(dir); continue with --resume \(dir)\n".utf8))
                throw ExitCode(130)
            }
            try job.saveAdapter()
            let losses = job.state.losses
            print(String(format: "trained %d steps in %.1f s: loss %.4f -> %.4f; adapter in %@", losses.count, Date().timeIntervalSince(start),
                         losses.first ?? .nan, losses.last ?? .nan, out))
        }
    }
}

/// A flag set from a signal handler's queue and read by the training loop.
final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.lock(); value = true; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
}
