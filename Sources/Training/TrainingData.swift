import CheckpointFormats
import FileOutput
import Foundation
import QLoRA

/// Pre-tokenized training data: one JSON object per line, `{"input_ids": [...], "labels": [...]}`
/// (labels optional: then equal to input_ids; -100 marks positions without loss).
public func loadTrainingData(path: String, vocabSize: Int) throws -> [TrainingExample] {
    let data = try InputFile.read(path)
    var examples: [TrainingExample] = []
    // Lines split on the scalar "\n": Swift reads "\r\n" as one Character, so a file with CRLF
    // line ends would otherwise be one line.
    for (n, line) in String(decoding: data, as: UTF8.self).unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
        let text = String(String.UnicodeScalarView(line)).trimmingCharacters(in: .whitespacesAndNewlines)
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

/// Whether `e` has a label the loss counts at `seqLen` tokens: the loss at position t predicts
/// labels[t + 1], so a label counts when it is not -100 at positions 1 ..< min(seqLen, count).
func hasTrainableLabel(_ e: TrainingExample, seqLen: Int) -> Bool {
    let n = min(seqLen, e.labels.count)
    return n > 1 && e.labels[1..<n].contains { $0 != -100 }
}

/// Refuses data on which a run would train on no label (its loss NaN): none of the examples the
/// run will see (from example `start`, `perStep` per optimizer step for `steps` steps, cycling),
/// or some step that sees only examples without one. `path` is named in the error.
func checkTrainableLabels(_ data: [TrainingExample], path: String, from start: Int, steps: Int, perStep: Int, seqLen: Int) throws {
    guard steps > 0 else { return }
    let n = data.count
    let trainable = data.map { hasTrainableLabel($0, seqLen: seqLen) }
    let why = "every label after the first position within --seq-len \(seqLen) is -100, so the loss would be NaN"
    guard trainable.contains(true) else {
        throw CheckpointError.invalidPath(path: path, problem: "no example has a label to train on: \(why)")
    }
    // Prefix counts over the data, so each step's window (cycling) is counted in O(1); the
    // steps repeat after n / gcd(n, perStep) of them.
    var prefix = [0]
    for t in trainable { prefix.append(prefix.last! + (t ? 1 : 0)) }
    func count(_ from: Int, _ length: Int) -> Int {
        if length >= n { return prefix[n] }
        let end = from + length
        return end <= n ? prefix[end] - prefix[from] : prefix[n] - prefix[from] + prefix[end - n]
    }
    func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }
    let period = n / gcd(n, perStep % n == 0 ? n : perStep % n)
    for k in 0..<min(steps, period) {
        let from = (start + (k * (perStep % n)) % n) % n
        if count(from, perStep) == 0 {
            let last = (from + min(perStep, n) - 1) % n
            throw CheckpointError.invalidPath(path: path, problem: "step \(k + 1) of this run sees examples \(from + 1)…\(last + 1) (lines counted without blank ones), "
                                              + "none of which has a label to train on: \(why)")
        }
    }
}
