import CheckpointFormats
import FileOutput
import Foundation
import QLoRA

/// Pre-tokenized training data: one JSON object per line, `{"input_ids": [...], "labels": [...]}`
/// (labels optional: then equal to input_ids; -100 marks positions without loss).
public func loadTrainingData(path: String, vocabSize: Int) throws -> [TrainingExample] {
    let data = try InputFile.read(path)
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

/// A copy task for `qlora train`: `count` lines of [1, a₁…a₅, 2, a₁…a₅] over tokens 10–25, with
/// the loss on the copy only (labels -100 elsewhere), as JSONL.
public func writeCopyTaskData(path: String, count: Int, seed: UInt64 = 11) throws {
    var rng = SplitMix64(seed: seed)
    var lines: [String] = []
    for _ in 0..<count {
        let a = (0..<5).map { _ in 10 + Int(rng.next() % 16) }
        let ids = [1] + a + [2] + a, labels = Array(repeating: -100, count: 7) + a
        lines.append("{\"input_ids\": \(ids), \"labels\": \(labels)}")
    }
    try StagedOutput.write(Data((lines.joined(separator: "\n") + "\n").utf8), to: path)
}
