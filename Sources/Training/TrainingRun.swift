import CheckpointFormats
import FileOutput
import Foundation
import QLoRA
import SafeTensors

public struct TrainOptions: Sendable {
    public var rank = 16
    public var alpha = 32.0
    public var lr = 2e-4
    public var weightDecay = 0.01
    public var steps = 100
    public var batch = 1
    public var gradAccum = 1
    public var seqLen = 512
    public var gradientCheckpointing = false
    /// Save a resumable checkpoint (adapter + optimizer state) every this many steps (0: never).
    public var saveEvery = 50
    public var seed: UInt64 = 0
    /// DoRA (PEFT's `use_dora`) on new adapters.
    public var dora = false
    /// Modules trained whole (PEFT's `modules_to_save`) on new adapters.
    public var modulesToSave: [LlamaModel.WholeModule] = []
    /// The head and loss a block of tokens at a time (`HeadLoss`), or all tokens at once: the
    /// same losses and gradients to the bit, the [tokens × vocab] buffers only in the latter.
    public var chunkedLoss = true

    public init(rank: Int = 16, alpha: Double = 32, lr: Double = 2e-4, weightDecay: Double = 0.01, steps: Int = 100, batch: Int = 1,
                gradAccum: Int = 1, seqLen: Int = 512, gradientCheckpointing: Bool = false, saveEvery: Int = 50, seed: UInt64 = 0) {
        (self.rank, self.alpha, self.lr, self.weightDecay, self.steps, self.batch) = (rank, alpha, lr, weightDecay, steps, batch)
        (self.gradAccum, self.seqLen, self.gradientCheckpointing, self.saveEvery, self.seed) = (gradAccum, seqLen, gradientCheckpointing, saveEvery, seed)
    }
}

/// The state of a run on disk: `DIR/checkpoint-N/` holds the adapter (PEFT format), the AdamW
/// state (`optimizer.safetensors`) and `trainer_state.json` (step, data position, options).
public struct TrainingState: Codable, Sendable {
    public var step: Int
    public var nextExample: Int
    public var losses: [Float]
}

/// A `qlora train` run: loads the model and data, trains, saves.
public final class TrainingRun {
    public let model: LlamaModel
    public let trainer: LlamaTrainer
    public let data: [TrainingExample]
    public let options: TrainOptions
    public let out: String
    public var state: TrainingState
    let modelDirectory: String
    /// What the run reads; nothing it writes may be one of them.
    let inputs: [String]
    /// The final adapter may replace one in `out`: with `--overwrite`, or when continuing a run there.
    let replacesAdapter: Bool

    /// `resume`: a `checkpoint-N` directory of an earlier run, continued bit-identically.
    /// `adapter`: a PEFT adapter to start from (its rank and alpha), with fresh optimizer state.
    ///
    /// Everything that can be checked before the model is loaded is: the resumed state against
    /// the data and the options, that the examples the run will see have labels to train on,
    /// and that the run fits in the memory available (`TrainingMemory`).
    /// `out` is checked before anything is loaded: it may not be, or be inside, the model
    /// directory or any other input, nor an existing file; an existing directory with anything in
    /// it needs `overwrite`, unless `resume` continues a checkpoint inside it.
    /// An adapter to continue: LoRA on linear layers, what `qlora train` trains.
    static func plainLoRA(_ directory: String) throws -> PEFTAdapter {
        let a = try PEFTAdapter.load(directory: directory)
        // LoRA and DoRA, and lm_head / embed_tokens trained whole; not token rows or other modules.
        var other = a
        other.useDora = false
        for w in LlamaModel.WholeModule.allCases { other.savedTensors[w.tensorName] = nil }
        guard other.isPlainLoRA else {
            throw CheckpointError.invalidPath(path: directory, problem: "holds \(other.extraKinds.joined(separator: " and ")); qlora train continues LoRA and DoRA adapters "
                                              + "and lm_head / embed_tokens trained whole")
        }
        return a
    }

    public init(model dir: String, data path: String, out: String, options o: TrainOptions, resume: String? = nil, adapter start: String? = nil,
                overwrite: Bool = false) throws {
        let inputs = [dir, path] + [start].compactMap { $0 }
        try Self.checkOut(out, inputs: inputs, resume: resume, overwrite: overwrite)
        var adapter: PEFTAdapter? = try start.map { try Self.plainLoRA($0) }
        var states: [String: AdamWState] = [:]
        var state = TrainingState(step: 0, nextExample: 0, losses: [])
        if let r = resume {
            adapter = try Self.plainLoRA(r)
            states = try OptimizerCheckpoint.load(path: r + "/optimizer.safetensors").states
            guard let d = try? InputFile.read(r + "/trainer_state.json"), let s = try? JSONDecoder().decode(TrainingState.self, from: d) else {
                throw CheckpointError.invalidPath(path: r + "/trainer_state.json", problem: "missing or not a qlora trainer state")
            }
            state = s
        }
        let cfg = try LlamaCheckpoint.config(directory: dir)
        if let problem = cfg.slidingWindowProblem(seqLen: o.seqLen) {
            throw CheckpointError.invalidPath(path: dir + "/config.json", problem: problem)
        }
        let data = try loadTrainingData(path: path, vocabSize: cfg.vocabSize)
        if let r = resume {
            let file = r + "/trainer_state.json"
            guard state.step >= 0, state.step <= o.steps else {
                throw CheckpointError.invalidPath(path: file, problem: "step \(state.step) is beyond --steps \(o.steps); give --steps \(max(state.step, 0)) or more")
            }
            guard state.nextExample >= 0, state.nextExample < data.count else {
                throw CheckpointError.invalidPath(path: file, problem: "data position \(state.nextExample) is beyond \(path), which holds \(data.count) examples; resume with the data the run was started on")
            }
        }
        try checkTrainableLabels(data, path: path, from: state.nextExample, steps: o.steps - state.step, perStep: CheckedSize.product(o.batch, o.gradAccum) ?? .max, seqLen: o.seqLen)
        do {
            try TrainingMemory.check(cfg, rank: adapter?.rank ?? o.rank, batch: o.batch, seqLen: o.seqLen, checkpointing: o.gradientCheckpointing,
                                     chunkedLoss: o.chunkedLoss)
        } catch let e as TrainingError {
            throw CheckpointError.invalidPath(path: dir, problem: e.description)
        }
        model = try LlamaCheckpoint.load(directory: dir, adapter: adapter, rank: o.rank, alpha: o.alpha, seed: o.seed, dora: o.dora,
                                         modulesToSave: adapter == nil ? o.modulesToSave : [])
        self.data = data
        let adam = AdamWConfig(lr: o.lr, weightDecay: o.weightDecay)
        trainer = LlamaTrainer(model: model, optimizer: adam, checkpointing: o.gradientCheckpointing, states: states)
        trainer.headChunkRows = TrainingMemory.headRows(cfg, tokens: o.batch * o.seqLen, chunked: o.chunkedLoss)
        options = o
        self.out = out
        self.state = state
        modelDirectory = dir
        self.inputs = inputs
        replacesAdapter = overwrite || resume != nil
    }

    /// The output rules for `out`, before training starts.
    static func checkOut(_ out: String, inputs: [String], resume: String?, overwrite: Bool) throws {
        try StagedOutput.checkNotInput(URL(fileURLWithPath: out).standardizedFileURL, kind: .directory, path: out, inputs: inputs)
        let fm = FileManager.default
        guard fm.fileExists(atPath: out) else { return }
        guard StagedOutput.isDirectory(out) else { throw FileError(path: out, problem: "exists and is not a directory; --out names the directory for the adapter and checkpoints") }
        let outURL = URL(fileURLWithPath: out).standardizedFileURL.resolvingSymlinksInPath()
        let continuing = resume.map { URL(fileURLWithPath: $0).standardizedFileURL.resolvingSymlinksInPath().path.hasPrefix(outURL.path + "/") } ?? false
        let empty = (try? fm.contentsOfDirectory(atPath: out))?.filter { !$0.hasPrefix(".") }.isEmpty ?? false
        if !empty && !continuing && !overwrite {
            throw FileError(path: out, problem: "already exists and is not empty; choose a new --out, give --overwrite, or --resume a checkpoint inside it")
        }
    }

    /// The next optimizer step's micro-batches (the data cycles).
    func nextMicroBatches() -> [[TrainingExample]] {
        (0..<options.gradAccum).map { _ in
            (0..<options.batch).map { _ in
                defer { state.nextExample = (state.nextExample + 1) % data.count }
                return data[state.nextExample]
            }
        }
    }

    /// Runs until `options.steps` or `shouldStop()`; `progress(step, loss, tokensPerSecond)`.
    public func run(progress: (Int, Float, Double) -> Void, shouldStop: () -> Bool) throws {
        while state.step < options.steps && !shouldStop() {
            let mbs = nextMicroBatches()
            let start = Date()
            let (loss, _) = try trainer.step(mbs, seq: options.seqLen)
            let tokens = mbs.reduce(0) { $0 + $1.count } * options.seqLen
            state.step += 1
            state.losses.append(loss)
            progress(state.step, loss, Double(tokens) / max(Date().timeIntervalSince(start), 1e-9))
            if options.saveEvery > 0 && state.step % options.saveEvery == 0 && state.step < options.steps { try saveCheckpoint() }
        }
    }

    /// `out/checkpoint-<step>/` (an existing one replaced), staged and renamed into place.
    @discardableResult
    public func saveCheckpoint() throws -> String {
        let dir = out + "/checkpoint-\(state.step)"
        // A checkpoint of this run's step replaces one of the same step (a resumed run's own).
        let staged = try StagedOutput(dir, kind: .directory, overwrite: true, inputs: inputs, createParent: true)
        try LlamaCheckpoint.adapter(of: model, baseModel: modelDirectory).write(into: staged.url)
        try OptimizerCheckpoint(config: trainer.optimizer, states: trainer.states).save(to: staged.url(for: "optimizer.safetensors").path)
        try JSONEncoder().encode(state).write(to: staged.url(for: "trainer_state.json"))
        try staged.commit()
        return dir
    }

    /// The final adapter in `out` (PEFT format: adapter_config.json + adapter_model.safetensors,
    /// replacing earlier ones), beside the checkpoints.
    public func saveAdapter() throws {
        let staged = try StagedOutput(out, kind: .filesInDirectory, overwrite: replacesAdapter, inputs: inputs, createParent: true)
        try LlamaCheckpoint.adapter(of: model, baseModel: modelDirectory).write(into: staged.url)
        try staged.commit()
    }
}
