// libFuzzer entry point for `qlora train`'s data reader (loadTrainingData(path:vocabSize:)).
//
// Input: 1 choice byte (the vocabulary size: 1, 26, 256, 32000, 128256, Int.max, ...), then
// the JSONL file.
//
// For every input it checks that the reader either throws a CheckpointError whose description
// is one line naming the file (and the line), or returns examples whose input_ids are all
// in the vocabulary, with one label per token, each -100 or in the vocabulary.

import CheckpointFormats
import Foundation
import FuzzSupport
import QLoRA
import Training

let vocabularies = [1, 26, 256, 32000, 128256, Int.max, 2, 1 << 40]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var choices = Choices(UnsafeRawBufferPointer(start: data, count: size), count: 1)
    let vocab = vocabularies[choices.next(vocabularies.count)]
    let path = scratchPath("train.jsonl")
    writeFile(choices.rest, to: path)
    let examples: [TrainingExample]
    do {
        examples = try loadTrainingData(path: path, vocabSize: vocab)
    } catch {
        checkError(error, files: [path], types: [CheckpointError.self])
        return 0
    }
    require(!examples.isEmpty)
    for e in examples {
        require(!e.inputIds.isEmpty && e.labels.count == e.inputIds.count)
        require(e.inputIds.allSatisfy { $0 >= 0 && $0 < vocab })
        require(e.labels.allSatisfy { $0 == -100 || ($0 >= 0 && $0 < vocab) })
        fuzzSink &+= UInt8(truncatingIfNeeded: e.inputIds.last!)
    }
    return 0
}
