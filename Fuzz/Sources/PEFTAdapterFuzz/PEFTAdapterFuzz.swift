// libFuzzer entry point for PEFT adapters (PEFTAdapter.load(directory:)).
//
// Input: 3 choice bytes, then adapter_config.json. The harness writes the config and an
// adapter_model.safetensors beside it with 1 to 4 modules: each module's path comes from a
// fixed list or from the config's rank_pattern keys, and its lora_A / lora_B follow the
// config's rank (rank_pattern applied) unless the choices give a rank off by one, a 1-D tensor,
// a missing half, a name outside PEFT's layout or a dtype that is not a float.
//
// For every input it checks that `load` either throws a CheckpointError or SafeTensorsError
// whose description is one line naming one of the two files, or returns an adapter whose
// modules have rank × in and out × rank values at the rank the config gives them, and whose
// adapter_config.json, as `configJSON` writes it, parses back to the same r, lora_alpha,
// target_modules and patterns.

import CheckpointFormats
import Foundation
import FuzzSupport
import QLoRA
import SafeTensors

/// Largest rank the harness writes tensors for; a config asking for more gets tensors of rank 2.
let maxRank = 64
let prefix = "base_model.model."

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var choices = Choices(UnsafeRawBufferPointer(start: data, count: size), count: 3)
    let dir = scratchPath("adapter")
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    let configPath = dir + "/" + PEFTAdapter.configFile, weightsPath = dir + "/" + PEFTAdapter.weightsFile
    writeFile(choices.rest, to: configPath)
    writeFile(safetensorsImage(tensors(config: choices.rest, choices: &choices)), to: weightsPath)

    let adapter: PEFTAdapter
    do {
        adapter = try PEFTAdapter.load(directory: dir)
    } catch {
        checkError(error, files: [configPath, weightsPath], types: [CheckpointError.self, SafeTensorsError.self])
        return 0
    }
    check(adapter)
    return 0
}

/// The module paths the harness adapts: ordinary ones, an empty one, and rank_pattern's keys.
let fixedPaths = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj", "q_proj", "", "lora_A.weight"]

func tensors(config: [UInt8], choices: inout Choices) -> [TensorSpec] {
    let obj = (try? JSONSerialization.jsonObject(with: Data(config))) as? [String: Any] ?? [:]
    let r = obj["r"] as? Int ?? 8
    let patternKeys = ((obj["rank_pattern"] as? [String: Any]) ?? [:]).keys.sorted()
    let patterns = (obj["rank_pattern"] as? [String: Int]) ?? [:]
    let c0 = choices.next(), c1 = choices.next(), c2 = choices.next()
    let dtypes: [DType] = [.f32, .f32, .bf16, .f16, .f32, .u8, .i32, .f64]
    let dtype = dtypes[Int(c0 >> 5)]
    var out: [TensorSpec] = []
    for m in 0...(Int(c0) & 3) {
        let pick = (Int(c1) >> (2 * (m & 3))) & 3
        let path: String
        if pick == 3, !patternKeys.isEmpty {
            path = patternKeys[(Int(c2) + m) % patternKeys.count]
        } else {
            path = fixedPaths[(pick + m + Int(c2 >> 5)) % fixedPaths.count]
        }
        // The rank PEFT would use for this path (rank_pattern: the key equals the path or ends it).
        var rank = patterns.first { path == $0.key || path.hasSuffix("." + $0.key) }?.value ?? r
        if rank <= 0 || rank > maxRank { rank = 2 }
        let inF = 1 + (Int(c2) + m) % 5, outF = 1 + (Int(c2 >> 2) + m) % 7
        var shapeA = [rank, inF], shapeB = [outF, rank]
        switch (Int(c0 >> 2) & 7, m) {
        case (5, 0): shapeA[0] += 1
        case (6, 0): shapeB[1] = max(rank - 1, 0)
        case (7, 0): shapeA = [rank * inF]
        default: break
        }
        let name = prefix + path
        var specs = [TensorSpec(name: name + ".lora_A.weight", dtype: dtype, shape: shapeA,
                                bytes: filler(shapeA.reduce(1, *) * dtype.byteSize, seed: c1 &+ UInt8(m))),
                     TensorSpec(name: name + ".lora_B.weight", dtype: dtype, shape: shapeB,
                                bytes: filler(shapeB.reduce(1, *) * dtype.byteSize, seed: c2 &+ UInt8(m)))]
        switch (c2 & 3, m) {
        case (1, 1): specs.removeLast()                                 // lora_B missing
        case (2, 1): specs[0].name = path + ".lora_A.weight"             // no base_model.model. prefix
        case (3, 1): specs[1].name = name + ".lora_B.bias"               // not a LoRA weight
        default: break
        }
        out += specs
    }
    // safetensors refuses repeated names; keep the first of each (the harness's paths may collide).
    var seen: Set<String> = []
    return out.filter { seen.insert($0.name).inserted }
}

func check(_ a: PEFTAdapter) {
    require(a.rank > 0 && !a.modules.isEmpty)
    for (path, m) in a.modules {
        require(m.path == path)
        require(m.rank == a.config(for: path).rank, "\(path): rank \(m.rank), config \(a.config(for: path).rank)")
        require(m.loraA.count == m.rank * m.inFeatures, "\(path): lora_A has \(m.loraA.count) values")
        require(m.loraB.count == m.outFeatures * m.rank, "\(path): lora_B has \(m.loraB.count) values")
        fuzzSink &+= UInt8(truncatingIfNeeded: (m.loraA.last ?? 0).bitPattern ^ (m.loraB.last ?? 0).bitPattern)
    }
    // What `qlora` writes for this adapter (a merge's or a training run's adapter_config.json).
    let written = ConfigJSON.peftFile(a.configJSON)
    guard let obj = (try? JSONSerialization.jsonObject(with: written)) as? [String: Any] else {
        fatalError("configJSON is not a JSON object: \(String(decoding: written, as: UTF8.self))")
    }
    require(obj["r"] as? Int == a.rank, "r written as \(obj["r"] ?? "nil")")
    // Numbers through the project's exact parser: Foundation's JSONSerialization rounds some
    // large doubles (2.2000000000788015e+21) to a neighbour, Python's json does not.
    func number(_ key: String) -> Double? {
        guard case .object(let members)? = try? JSONValue.parse(document: [UInt8](written)),
              case .number(let text)? = members.first(where: { $0.key == key })?.value else { return nil }
        return Double(text)
    }
    require(number("lora_alpha") == a.loraAlpha, "lora_alpha \(a.loraAlpha) written as \(obj["lora_alpha"] ?? "nil")")
    require(number("lora_dropout") == a.loraDropout, "lora_dropout \(a.loraDropout) written as \(obj["lora_dropout"] ?? "nil")")
    require(obj["target_modules"] as? [String] == a.targetModules, "target_modules written differently")
    require(obj["rank_pattern"] as? [String: Int] == a.rankPattern, "rank_pattern written differently")
    var alphas: [String: Double] = [:]
    if case .object(let members)? = try? JSONValue.parse(document: [UInt8](written)),
       case .object(let pattern)? = members.first(where: { $0.key == "alpha_pattern" })?.value {
        for m in pattern { if case .number(let text) = m.value { alphas[m.key] = Double(text) } }
    }
    require(alphas == a.alphaPattern, "alpha_pattern written differently")
}
