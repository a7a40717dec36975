// libFuzzer entry point for config.json (ModelArchitecture(configFile:)) and what a user's
// config flows into: the tensor list and counts, the training checks and MemoryEstimate.
//
// Input: the whole config.json.
//
// For every input it checks that the reader either throws a CheckpointError whose description
// is one line naming the file, or returns an architecture whose head layout divides
// (heads % kv heads, head_dim > 0), whose tensor groups, projections and parameter counts can
// be computed, and whose MemoryEstimate can be made for every training method (or is refused
// with a one-line MemoryError).

import CheckpointFormats
import Foundation
import FuzzSupport
import Memory
import QLoRA

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let path = scratchPath("config.json")
    writeFile(Array(UnsafeRawBufferPointer(start: data, count: size)), to: path)
    let a: ModelArchitecture
    do {
        a = try ModelArchitecture(configFile: path)
    } catch {
        checkError(error, files: [path], types: [CheckpointError.self])
        return 0
    }
    check(a)
    return 0
}

func check(_ a: ModelArchitecture) {
    require(a.hiddenSize > 0 && a.intermediateSize > 0 && a.layers > 0 && a.vocabSize > 0)
    require(a.attentionHeads > 0 && a.keyValueHeads > 0 && a.headDim > 0, "heads \(a.attentionHeads)/\(a.keyValueHeads), head_dim \(a.headDim)")
    require(a.attentionHeads % a.keyValueHeads == 0)
    // The tensors a checkpoint of this architecture holds, and their counts.
    let groups = a.tensorGroups
    require(groups.allSatisfy { $0.shape.allSatisfy { $0 > 0 } && $0.count > 0 }, "a tensor with an empty dimension")
    require(a.projections.count == a.moduleNames.count)
    require(a.layerTensors(0).count == groups.count - (a.tiedEmbeddings ? 2 : 3))
    let total = a.totalParameters
    require(total > 0)
    fuzzSink &+= UInt8(truncatingIfNeeded: total)
    _ = a.unsupportedForTraining
    _ = a.slidingWindowProblem(seqLen: 2048)
    _ = a.adaptedModules(ModelArchitecture.projectionNames)
    // The memory estimate, as `qlora memory --config` makes it, for every method.
    for method in TrainingMethod.allCases {
        do {
            let e = try MemoryEstimate(model: a, options: MemoryOptions(method: method))
            fuzzSink &+= UInt8(truncatingIfNeeded: e.totalEstimatedBytes)
            _ = e.activationSummary
        } catch let error as MemoryError {
            let text = "\(error)"
            require(!text.isEmpty && !text.contains("\n") && !text.contains("\r"), "description is not one line: \(text)")
        } catch {
            fatalError("unexpected error type \(type(of: error)): \(error)")
        }
    }
}
