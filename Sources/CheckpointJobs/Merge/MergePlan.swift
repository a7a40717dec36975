import CheckpointFormats
import FileOutput
import Foundation
import QLoRA
import SafeTensors

/// One adapter's contribution to a weight.
struct MergeStep {
    var module: PEFTAdapter.Module
    /// The adapter's scaling for this module times the adapter's weight.
    var scaling: Double
    var fanInFanOut: Bool
}

/// An adapted weight: its logical [out, in] shape, storage, and steps.
struct WeightPlan {
    var out: Int
    var `in`: Int
    var fanInFanOut: Bool
    /// The base's 4-bit format, for a bnb-4bit weight; re-quantized, it keeps the base's storage
    /// (PEFT's merge builds the new `Params4bit` from the old one's attributes, `quant_storage` included).
    var quantized: (type: QuantType, blocksize: Int, doubleQuant: Bool, storage: DType)?
    /// The stored tensors of a bnb-4bit weight.
    var group: BnB4BitFormat.Group? = nil
    var steps: [MergeStep] = []
}

/// Every adapted weight of a merge and the steps that apply to it, in adapter order; made and
/// checked against the base before anything is written.
struct MergePlan {
    let reader: CheckpointReader
    /// Adapted weights by tensor name.
    var weights: [String: WeightPlan] = [:]
    /// The base's 4-bit weights by name.
    let groups: [String: BnB4BitFormat.Group]
    /// Constant tensors of a 4-bit weight, by name, to that weight's name.
    private var companionOf: [String: String] = [:]

    /// Loads the adapters and matches every module to a base weight of the right shape.
    init(reader: CheckpointReader, base: String, adapters specs: [MergeAdapter]) throws {
        self.reader = reader
        let adapters = try specs.map { try PEFTAdapter.load(directory: $0.directory) }
        groups = Dictionary(uniqueKeysWithValues: try BnB4BitFormat.groups(of: reader).map { ($0.name, $0) })
        for g in groups.values { for m in g.members where m != g.name { companionOf[m] = g.name } }
        for (a, adapter) in adapters.enumerated() {
            var shapes: [String: (out: Int, in: Int)] = [:]
            for path in adapter.modules.keys {
                let name = path + ".weight"
                if let g = groups[name] {
                    let state = try BnB4BitFormat.state(of: g, from: reader)
                    for m in g.members { reader.releasePages(of: m) }  // read again, one at a time, when written
                    guard state.shape.count == 2 else { continue }
                    if adapter.fanInFanOut {
                        throw CheckpointError.invalidPath(path: specs[a].directory, problem: "a fan_in_fan_out adapter cannot target the 4-bit weight \(name) (bitsandbytes layers are [out, in])")
                    }
                    shapes[path] = (state.shape[0], state.shape[1])
                    if weights[name] == nil {
                        weights[name] = WeightPlan(out: state.shape[0], in: state.shape[1], fanInFanOut: false,
                                                   quantized: (state.quantType, state.blocksize, state.isDoubleQuantized,
                                                               BnB4BitFormat.quantStorage(of: g, from: reader)), group: g)
                    }
                } else if let info = reader.info(named: name), info.shape.count == 2 {
                    let (o, i) = adapter.fanInFanOut ? (info.shape[1], info.shape[0]) : (info.shape[0], info.shape[1])
                    shapes[path] = (o, i)
                    if let p = weights[name], p.fanInFanOut != adapter.fanInFanOut {
                        throw CheckpointError.invalidPath(path: specs[a].directory, problem: "fan_in_fan_out disagrees with an earlier adapter on \(name)")
                    }
                    if weights[name] == nil { weights[name] = WeightPlan(out: o, in: i, fanInFanOut: adapter.fanInFanOut, quantized: nil) }
                }
            }
            try adapter.validate(againstBase: shapes, baseName: base)
            for (path, m) in adapter.modules {
                weights[path + ".weight"]!.steps.append(MergeStep(module: m, scaling: adapter.config(for: path).scaling * specs[a].weight,
                                                                  fanInFanOut: adapter.fanInFanOut))
            }
        }
    }

    /// Whether tensor `name` is a constant of an adapted 4-bit weight (regenerated or dropped with it).
    func isRegenerated(_ name: String) -> Bool { companionOf[name].map { weights[$0] != nil } ?? false }

    /// Opens `path` as the original 16-bit base of a 4-bit base and checks it has every adapted weight.
    func original(_ path: String, base: String) throws -> CheckpointReader {
        let original = try CheckpointReader(path: path)
        for (name, p) in weights.sorted(by: { $0.key < $1.key }) {
            guard p.quantized != nil else {
                throw CheckpointError.invalidTensor(file: base, tensor: name, problem: "--compare-original needs a 4-bit base; this weight is dense")
            }
            guard let info = original.info(named: name), ElementType(info.dtype) != nil, info.shape == [p.out, p.in] else {
                throw CheckpointError.invalidTensor(file: path, tensor: name, problem: "the original base needs this weight as a float [\(p.out), \(p.in)] tensor")
            }
        }
        return original
    }

    /// The output's `quantization_config`: the 4-bit format when re-quantizing or when 4-bit
    /// weights stay unmerged; none when every 4-bit weight is written dense.
    func outputQuantization(requantize: Bool) throws -> BnBQuantizationConfig? {
        let merged4Bit = weights.filter { $0.value.quantized != nil }.sorted { $0.key < $1.key }
        guard requantize || merged4Bit.count < groups.count else { return nil }
        var config: BnBQuantizationConfig
        if let q = merged4Bit.first?.value.quantized {
            config = BnBQuantizationConfig(quantType: q.type, doubleQuant: q.doubleQuant, quantStorage: q.storage)
        } else {
            guard let g = groups.values.sorted(by: { $0.name < $1.name }).first, let state = try? BnB4BitFormat.state(of: g, from: reader) else { return nil }
            config = BnBQuantizationConfig(state)
            config.quantStorage = BnB4BitFormat.quantStorage(of: g, from: reader)
        }
        // The base's compute dtype is a loading choice the merge keeps.
        if let data = try? InputFile.read(reader.directory + "/config.json"),
           let dtype = BnBQuantizationConfig.computeDtype(inConfig: data) { config.computeDtype = dtype }
        return config
    }
}
