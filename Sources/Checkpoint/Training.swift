import Foundation
import QLoRA
import SafeTensors

/// Pre-tokenized training data: one JSON object per line, `{"input_ids": [...], "labels": [...]}`
/// (labels optional: then equal to input_ids; -100 marks positions without loss).
public func loadTrainingData(path: String, vocabSize: Int) throws -> [TrainingExample] {
    guard let data = FileManager.default.contents(atPath: path) else { throw CheckpointError.invalidPath(path: path, problem: "cannot be read") }
    var examples: [TrainingExample] = []
    for (n, line) in String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
        let text = line.trimmingCharacters(in: .whitespaces)
        if text.isEmpty { continue }
        func bad(_ p: String) -> CheckpointError { .invalidPath(path: "\(path):\(n + 1)", problem: p) }
        guard let obj = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { throw bad("not a JSON object") }
        guard let ids = obj["input_ids"] as? [Int], !ids.isEmpty else { throw bad("input_ids missing, empty, or not integers") }
        if let bad1 = ids.first(where: { $0 < 0 || $0 >= vocabSize }) { throw bad("token id \(bad1) outside the vocabulary (\(vocabSize))") }
        let labels = (obj["labels"] as? [Int]) ?? ids
        guard labels.count == ids.count else { throw bad("labels has \(labels.count) entries, input_ids \(ids.count)") }
        if let b = labels.first(where: { $0 != -100 && ($0 < 0 || $0 >= vocabSize) }) { throw bad("label \(b) is neither -100 nor a token id") }
        examples.append(TrainingExample(inputIds: ids, labels: labels))
    }
    guard !examples.isEmpty else { throw CheckpointError.invalidPath(path: path, problem: "holds no examples") }
    return examples
}

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
    public init() {}
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

    /// `resume`: a `checkpoint-N` directory of an earlier run, continued bit-identically.
    /// `adapter`: a PEFT adapter to start from (its rank and alpha), with fresh optimizer state.
    public init(model dir: String, data path: String, out: String, options o: TrainOptions, resume: String? = nil, adapter start: String? = nil) throws {
        var adapter: PEFTAdapter? = try start.map { try PEFTAdapter.load(directory: $0) }
        var states: [String: AdamWState] = [:]
        var state = TrainingState(step: 0, nextExample: 0, losses: [])
        if let r = resume {
            adapter = try PEFTAdapter.load(directory: r)
            states = try OptimizerCheckpoint.load(path: r + "/optimizer.safetensors").states
            guard let d = FileManager.default.contents(atPath: r + "/trainer_state.json"), let s = try? JSONDecoder().decode(TrainingState.self, from: d) else {
                throw CheckpointError.invalidPath(path: r + "/trainer_state.json", problem: "missing or not a qlora trainer state")
            }
            state = s
        }
        let cfg = try LlamaCheckpoint.config(directory: dir)
        model = try LlamaCheckpoint.load(directory: dir, adapter: adapter, rank: o.rank, alpha: o.alpha, seed: o.seed)
        data = try loadTrainingData(path: path, vocabSize: cfg.vocabSize)
        var adam = AdamWConfig()
        adam.lr = o.lr
        adam.weightDecay = o.weightDecay
        trainer = LlamaTrainer(model: model, optimizer: adam, checkpointing: o.gradientCheckpointing, states: states)
        options = o
        self.out = out
        self.state = state
        modelDirectory = dir
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

    /// `out/checkpoint-<step>/`, staged and renamed into place.
    @discardableResult
    public func saveCheckpoint() throws -> String {
        let dir = out + "/checkpoint-\(state.step)"
        let fm = FileManager.default
        try fm.createDirectory(atPath: out, withIntermediateDirectories: true)
        let staging = out + "/.checkpoint-\(state.step).tmp-\(getpid())"
        try? fm.removeItem(atPath: staging)
        try LlamaCheckpoint.adapter(of: model, baseModel: modelDirectory).save(directory: staging)
        try OptimizerCheckpoint(config: trainer.optimizer, states: trainer.states).save(to: staging + "/optimizer.safetensors")
        try JSONEncoder().encode(state).write(to: URL(fileURLWithPath: staging + "/trainer_state.json"))
        if fm.fileExists(atPath: dir) { try fm.removeItem(atPath: dir) }
        guard rename(staging, dir) == 0 else { throw CheckpointError.invalidPath(path: dir, problem: "cannot rename into place") }
        return dir
    }

    /// The final adapter in `out` (PEFT format: adapter_config.json + adapter_model.safetensors).
    public func saveAdapter() throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: out, withIntermediateDirectories: true)
        let staging = out + "/.adapter.tmp-\(getpid())"
        try? fm.removeItem(atPath: staging)
        try LlamaCheckpoint.adapter(of: model, baseModel: modelDirectory).save(directory: staging)
        for f in [PEFTAdapter.configFile, PEFTAdapter.weightsFile] {
            let dst = out + "/" + f
            if fm.fileExists(atPath: dst) { try fm.removeItem(atPath: dst) }
            guard rename(staging + "/" + f, dst) == 0 else { throw CheckpointError.invalidPath(path: dst, problem: "cannot rename into place") }
        }
        try? fm.removeItem(atPath: staging)
    }
}
