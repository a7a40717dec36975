import Foundation

/// One tokenized training example: `labels` -100 where no loss is taken.
public struct TrainingExample: Sendable, Equatable {
    public var inputIds: [Int]
    public var labels: [Int]
    public init(inputIds: [Int], labels: [Int]) {
        self.inputIds = inputIds
        self.labels = labels
    }
}

/// QLoRA training of a `LlamaModel`'s adapters: batches of fixed-length sequences, gradient
/// accumulation (the loss of each micro-batch divided by their count, as HF's Trainer does),
/// AdamW on every lora_A and lora_B (and DoRA's magnitudes, and whole modules trained).
public final class LlamaTrainer {
    public let model: LlamaModel
    public var optimizer: AdamWConfig
    /// AdamW state per adapter tensor, named `<module path>.lora_A.weight` / `.lora_B.weight`.
    public var states: [String: AdamWState]
    public var checkpointing: Bool
    /// Tokens the head and loss run at a time (`HeadLoss`; the same result for any value).
    public var headChunkRows: Int

    public init(model: LlamaModel, optimizer: AdamWConfig, checkpointing: Bool = false, states: [String: AdamWState] = [:]) {
        self.model = model
        self.optimizer = optimizer
        self.checkpointing = checkpointing
        headChunkRows = HeadLoss.defaultChunkRows(vocab: model.config.vocabSize)
        var s = states
        for (path, l) in model.adapters {
            if s[path + ".lora_A.weight"] == nil { s[path + ".lora_A.weight"] = AdamWState(count: l.loraA.count) }
            if s[path + ".lora_B.weight"] == nil { s[path + ".lora_B.weight"] = AdamWState(count: l.loraB.count) }
            if let m = l.magnitude, s[path + ".lora_magnitude_vector.weight"] == nil { s[path + ".lora_magnitude_vector.weight"] = AdamWState(count: m.count) }
        }
        for w in model.trainedModules where s[w.tensorName] == nil {
            s[w.tensorName] = AdamWState(count: w == .lmHead ? model.lmHead.count : model.embedTokens.count)
        }
        self.states = s
    }

    /// Pads with token 0 / label -100 or truncates to `seq`.
    public static func batch(_ examples: [TrainingExample], seq: Int) -> (ids: [Int], labels: [Int]) {
        var ids: [Int] = [], labels: [Int] = []
        for e in examples {
            let n = min(seq, e.inputIds.count)
            ids += e.inputIds[0..<n] + Array(repeating: 0, count: seq - n)
            labels += e.labels[0..<min(n, e.labels.count)] + Array(repeating: -100, count: seq - min(n, e.labels.count))
        }
        return (ids, labels)
    }

    /// One optimizer step over `microBatches` (each [batch] examples of length `seq`); returns
    /// the mean loss and the bytes the largest forward kept for backward.
    public func step(_ microBatches: [[TrainingExample]], seq: Int) throws -> (loss: Float, activationBytes: Int) {
        model.zeroGrad()
        var total: Float = 0, counted = 0, peak = 0
        for mb in microBatches {
            let (ids, labels) = Self.batch(mb, seq: seq)
            let (loss, _, acts) = try model.forward(ids: ids, labels: labels, batch: mb.count, seq: seq, checkpointing: checkpointing,
                                                     headChunkRows: headChunkRows)
            peak = max(peak, acts.byteCount)
            guard loss.isFinite else { continue }  // a micro-batch with no counted labels
            try model.backward(acts)
            total += loss
            counted += 1
        }
        guard counted > 0 else { return (.nan, peak) }
        let scale = 1 / Float(counted)
        for (path, l) in model.adapters {
            if counted > 1 {
                for i in l.gradA.indices { l.gradA[i] *= scale }
                for i in l.gradB.indices { l.gradB[i] *= scale }
                for i in l.gradMagnitude.indices { l.gradMagnitude[i] *= scale }
            }
            AdamW.step(param: &l.loraA, grad: l.gradA, state: &states[path + ".lora_A.weight"]!, config: optimizer)
            AdamW.step(param: &l.loraB, grad: l.gradB, state: &states[path + ".lora_B.weight"]!, config: optimizer)
            if l.magnitude != nil {
                AdamW.step(param: &l.magnitude!, grad: l.gradMagnitude, state: &states[path + ".lora_magnitude_vector.weight"]!, config: optimizer)
            }
        }
        // Whole modules (modules_to_save): bf16 parameters, gradients and moments.
        for w in model.trainedModules {
            let head = w == .lmHead
            var grad = head ? model.gradLMHead : model.gradEmbedTokens
            if counted > 1 { for i in grad.indices { grad[i] = HalfPrecision.roundedToBFloat16(grad[i] * scale) } }
            if head {
                AdamW.stepBF16(param: &model.lmHead, grad: grad, state: &states[w.tensorName]!, config: optimizer)
            } else {
                AdamW.stepBF16(param: &model.embedTokens, grad: grad, state: &states[w.tensorName]!, config: optimizer)
            }
        }
        return (total / Float(counted), peak)
    }
}

