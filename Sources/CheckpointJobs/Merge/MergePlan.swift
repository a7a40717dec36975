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

/// A base tensor an adapter replaces whole (`modules_to_save`, a saved embedding layer) or
/// writes rows into (trainable tokens), in adapter order.
struct ReplacementPlan {
    /// The last whole tensor an adapter gives (nil: the base's), and what it replaced.
    var whole: PEFTAdapter.SavedTensor?
    /// Token rows written into it after, in order (PEFT's `index_copy` of the rows, cast to the
    /// tensor's dtype).
    var rows: [PEFTAdapter.TokenRows] = []
    /// How the merge changed it, in words, for the summary.
    var how: [String] = []

    /// The tensor's bytes after the merge: the whole tensor (or `base()`, the base's bytes), with
    /// the token rows written in order (PEFT's TrainableTokensLayer.merge: `index_copy` of the
    /// rows cast to the tensor's dtype).
    func bytes(dtype: DType, base: () throws -> [UInt8]) rethrows -> [UInt8] {
        var bytes = try whole?.bytes ?? base()
        let type = ElementType(dtype)!
        for rows in rows {
            let row = rows.columns * type.byteSize
            for (k, index) in rows.indices.enumerated() {
                let encoded = encode(Array(rows.values[(k * rows.columns)..<((k + 1) * rows.columns)]), as: type)
                bytes.replaceSubrange((index * row)..<((index + 1) * row), with: encoded)
            }
        }
        return bytes
    }
}

/// Every adapted weight of a merge and the steps that apply to it, in adapter order; made and
/// checked against the base before anything is written.
struct MergePlan {
    let reader: CheckpointReader
    /// Adapted weights by tensor name.
    var weights: [String: WeightPlan] = [:]
    /// Tensors replaced whole or given token rows, by tensor name.
    var replacements: [String: ReplacementPlan] = [:]
    /// config.json keys the merge changes: `vocab_size` when the adapters resize the embedding.
    var configEdits: [(key: String, value: JSONValue)] = []
    /// Tokenizer files taken from the adapter directories (the last that has each), by name.
    var tokenizerFiles: [String: String] = [:]
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
            if adapter.useDora && adapter.fanInFanOut {
                throw CheckpointError.invalidPath(path: specs[a].directory, problem: "a DoRA adapter with fan_in_fan_out (GPT-2's Conv1D layout) is not supported")
            }
            for (path, m) in adapter.modules {
                weights[path + ".weight"]!.steps.append(MergeStep(module: m, scaling: adapter.config(for: path).scaling * specs[a].weight,
                                                                  fanInFanOut: adapter.fanInFanOut))
            }
            for (key, p) in adapter.parameterAdapters.sorted(by: { $0.key < $1.key }) {
                let scaling = adapter.config(forParameter: key).scaling * specs[a].weight
                for (name, module) in try expertModules(p, adapter: specs[a].directory, base: base) {
                    let info = reader.info(named: name)!
                    if weights[name] == nil { weights[name] = WeightPlan(out: info.shape[0], in: info.shape[1], fanInFanOut: false, quantized: nil) }
                    weights[name]!.steps.append(MergeStep(module: module, scaling: scaling, fanInFanOut: false))
                }
            }
        }
        try planReplacements(adapters, specs: specs, base: base)
        // PEFT merges a DoRA adapter after others by unmerging them to take the base's norm, and
        // merging them again (`_unmerged_base_weight`): a round trip through the weight's dtype
        // that no golden here covers.
        for (name, w) in weights.sorted(by: { $0.key < $1.key }) where w.steps.count > 1 && w.steps.contains(where: { $0.module.magnitude != nil }) {
            throw CheckpointError.invalidTensor(file: base, tensor: name, problem: "a DoRA adapter and another adapter both change this weight; merge them one at a time")
        }
    }

    /// A fused expert parameter's adapter as LoRA on the base's per-expert weights, which is how
    /// transformers' `save_pretrained` writes Qwen3-MoE's (`mlp.experts.E.gate_proj` / `up_proj` /
    /// `down_proj`) and Mixtral's (`block_sparse_moe.experts.E.w1` / `w3` / `w2`): gate_up_proj's
    /// [experts, 2·i, h] delta gives each expert's gate (its first i rows) and up; down_proj's
    /// [experts, h, i] its down; a router's, its weight. PEFT casts the delta to the weight's dtype before adding it
    /// (`ParamWrapper.get_delta_weight`), which a 16-bit `storedType` reproduces.
    func expertModules(_ p: PEFTAdapter.ParameterAdapter, adapter: String, base: String) throws -> [(String, PEFTAdapter.Module)] {
        // Expert e's rows `rows` of the parameter as LoRA on the base's float weight `name`.
        func module(_ name: String, expert e: Int, rows: Range<Int>) throws -> (String, PEFTAdapter.Module) {
            guard let info = reader.info(named: name), groups[name] == nil, info.shape == [rows.count, p.inFeatures], let type = ElementType(info.dtype) else {
                throw CheckpointError.invalidTensor(file: base, tensor: name, problem: "LoRA on \(p.module).\(p.parameter) expects a float weight [\(rows.count), \(p.inFeatures)] here")
            }
            let (a, b) = p.expert(e, rows: rows)
            var m = PEFTAdapter.Module(path: String(name.dropLast(".weight".count)), rank: p.rank, inFeatures: p.inFeatures, outFeatures: rows.count, loraA: a, loraB: b)
            m.storedType = type
            return (name, m)
        }
        if p.parameter == "weight" {
            // A router: one [experts, hidden] weight (Mixtral's file calls its block block_sparse_moe).
            let names = [p.module, p.module.replacingOccurrences(of: ".mlp.", with: ".block_sparse_moe.")].map { $0 + ".weight" }
            guard p.experts == 1, let name = names.first(where: { reader.info(named: $0) != nil }) else {
                throw CheckpointError.invalidPath(path: adapter, problem: "LoRA on \(p.module).weight: the base \(base) has no float weight [\(p.outFeatures), \(p.inFeatures)] for it")
            }
            return [try module(name, expert: 0, rows: 0..<p.outFeatures)]
        }
        let layer = p.module.dropLast(".experts".count)
        let layouts: [(prefix: String, gate: String, up: String, down: String)] = [
            (p.module, "gate_proj", "up_proj", "down_proj"),
            (layer.replacingOccurrences(of: ".mlp", with: ".block_sparse_moe") + ".experts", "w1", "w3", "w2"),
        ]
        guard let l = layouts.first(where: { reader.info(named: "\($0.prefix).0.\($0.down).weight") != nil }) else {
            throw CheckpointError.invalidPath(path: adapter, problem: "LoRA on \(p.module).\(p.parameter): the base \(base) does not hold that layer's experts one by one "
                                              + "(Qwen3-MoE's and Mixtral's layout); merging into fused expert tensors (gpt-oss) is not supported")
        }
        let parts: [(String, Range<Int>)] = p.parameter == "gate_up_proj"
            ? [(l.gate, 0..<(p.outFeatures / 2)), (l.up, (p.outFeatures / 2)..<p.outFeatures)] : [(l.down, 0..<p.outFeatures)]
        return try (0..<p.experts).flatMap { e in try parts.map { proj, rows in try module("\(l.prefix).\(e).\(proj).weight", expert: e, rows: rows) } }
    }

    /// Tokenizer files PEFT users save beside an adapter (`tokenizer.save_pretrained`), which a
    /// merged model takes in place of the base's: they hold the added tokens.
    static let tokenizerFileNames = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                                     "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"]

    /// The whole tensors and token rows of every adapter, checked against the base: a whole
    /// tensor has the base's shape, or (an embedding layer) more rows of the same width; rows
    /// name rows the tensor has; nothing both replaced and LoRA-adapted. A resized embedding sets
    /// config.json's `vocab_size`, and lm_head must follow it.
    mutating func planReplacements(_ adapters: [PEFTAdapter], specs: [MergeAdapter], base: String) throws {
        for (a, adapter) in adapters.enumerated() {
            let dir = specs[a].directory
            func refuse(_ name: String, _ problem: String) -> CheckpointError { .invalidTensor(file: base, tensor: name, problem: problem) }
            for (name, t) in adapter.savedTensors.sorted(by: { $0.key < $1.key }) {
                guard let info = reader.info(named: name), groups[name] == nil, ElementType(info.dtype) != nil else {
                    throw refuse(name, "the adapter \(dir) holds this tensor whole, but the base has no such float tensor")
                }
                guard weights[name] == nil else { throw refuse(name, "the adapter \(dir) replaces this tensor whole, and a LoRA adapter also targets it") }
                let embedding = PEFTAdapter.embeddingLayerNames.contains { name.hasSuffix($0 + ".weight") }
                let fits = t.shape == info.shape || (embedding && t.shape.count == 2 && info.shape.count == 2 && t.shape[1] == info.shape[1] && t.shape[0] >= info.shape[0])
                guard fits else { throw refuse(name, "the adapter \(dir) holds it as \(t.shape), the base as \(info.shape)") }
                var r = replacements[name] ?? ReplacementPlan()
                r.whole = t
                r.rows = []
                r.how.append(t.shape == info.shape ? "replaced by \(dir)'s" : "resized from \(info.shape[0]) to \(t.shape[0]) rows, replaced by \(dir)'s")
                replacements[name] = r
            }
            for (name, rows) in adapter.tokenRows.sorted(by: { $0.key < $1.key }) {
                guard let info = reader.info(named: name), groups[name] == nil, ElementType(info.dtype) != nil, info.shape.count == 2 else {
                    throw refuse(name, "the adapter \(dir) trains rows of this tensor, but the base has no such 2-D float tensor")
                }
                guard weights[name] == nil else { throw refuse(name, "the adapter \(dir) trains rows of this tensor, and a LoRA adapter also targets it") }
                var r = replacements[name] ?? ReplacementPlan()
                let shape = r.whole?.shape ?? info.shape
                guard rows.columns == shape[1] else { throw refuse(name, "the adapter \(dir)'s token rows are \(rows.columns) wide, the tensor \(shape[1])") }
                if let bad = rows.indices.first(where: { $0 >= shape[0] }) {
                    throw refuse(name, "the adapter \(dir) trains token \(bad), but the tensor has \(shape[0]) rows")
                }
                r.rows.append(rows)
                r.how.append("\(rows.indices.count) trainable token rows written from \(dir)")
                replacements[name] = r
            }
            for file in Self.tokenizerFileNames where FileManager.default.fileExists(atPath: dir + "/" + file) {
                tokenizerFiles[file] = dir + "/" + file
            }
        }
        // A resized vocabulary: the embedding's rows are config.json's vocab_size, and an untied
        // lm_head has as many.
        let resized = replacements.compactMap { (name, r) -> (String, Int)? in
            guard let w = r.whole, let info = reader.info(named: name), w.shape[0] != info.shape[0] else { return nil }
            return (name, w.shape[0])
        }.sorted { $0.0 < $1.0 }
        guard let (first, rows) = resized.first else { return }
        let heads = reader.entries.map(\.name).filter { n in PEFTAdapter.embeddingLayerNames.contains { n.hasSuffix($0 + ".weight") } }
        for n in heads {
            let r = replacements[n]?.whole?.shape[0] ?? reader.info(named: n)!.shape[0]
            guard r == rows else {
                throw CheckpointError.invalidTensor(file: base, tensor: n, problem: "has \(r) rows after the merge, but \(first) has \(rows): the adapters resize the vocabulary for one and not the other")
            }
        }
        configEdits = [("vocab_size", ConfigJSON.int(rows))]
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
