import CheckpointFormats
import FileOutput
import Foundation
import GGUF
import QLoRA
import SafeTensors

public struct LoRAExportSummary: Sendable, Codable {
    public var modules = 0
    public var bytesWritten = 0
    /// What the file leaves out that the converter would write (one line each).
    public var warnings: [String] = []
}

/// Writes a PEFT LoRA adapter as llama.cpp's LoRA GGUF (what `llama-cli --lora` loads), the bytes
/// convert_lora_to_gguf.py writes for `--base BASE --outtype type`:
/// - metadata: general.architecture (the base's), general.type "adapter", adapter.type "lora",
///   general.name (from the adapter directory's name), adapter.lora.alpha, the quantization version;
/// - per adapted weight, in the adapter's name order: `<gguf name>.lora_a` (A, ne [in, r]) and
///   `.lora_b` (B, ne [r, out]); for the Llama architecture B's rows of q_proj and k_proj are
///   permuted as the weight's are (A is not);
/// - each as the converter's type rule for `type` (Q8_0 where a row is whole 32-value blocks, else F16).
/// Only the base's config.json is read, not its weights.
///
/// llama.cpp scales an adapter by alpha / rank. An adapter whose PEFT scaling is not that (rsLoRA,
/// rank or alpha patterns) is refused: the converter would write it, and llama.cpp would apply
/// it at the wrong strength. `qlora export BASE --adapter DIR` merges such an adapter correctly.
@discardableResult
public func exportLoRAGGUF(adapter directory: String, base: String, output: String, type outType: GGUFOutType,
                           overwrite: Bool = false) throws -> LoRAExportSummary {
    let configPath = base + "/config.json"
    guard StagedOutput.isDirectory(base) else {
        throw CheckpointError.invalidPath(path: base, problem: "--base must be the base checkpoint's directory (its config.json is read)")
    }
    let (_, family, arch) = try GGUFArchitecture.load(config: configPath)
    let adapter = try PEFTAdapter.load(directory: directory)
    guard !adapter.useRSLoRA, adapter.rankPattern.isEmpty, adapter.alphaPattern.isEmpty else {
        throw CheckpointError.invalidPath(path: directory, problem: "llama.cpp scales a LoRA GGUF by lora_alpha / r; this adapter's rsLoRA or rank/alpha patterns scale otherwise (merge it instead: qlora export BASE OUT --adapter DIR)")
    }
    // convert_lora_to_gguf.py takes only lora_A / lora_B (and skips `.base_layer.weight`): a
    // magnitude vector, a whole module or trainable-token rows stop it ("Not a lora_A or lora_B
    // tensor").
    guard adapter.isPlainLoRA else {
        throw CheckpointError.invalidPath(path: directory, problem: "holds \(adapter.extraKinds.joined(separator: " and ")), which a LoRA GGUF cannot carry "
                                          + "(llama.cpp's convert_lora_to_gguf.py refuses them too); merge it instead: qlora export BASE OUT --adapter DIR")
    }
    guard !adapter.fanInFanOut else {
        throw CheckpointError.invalidPath(path: directory, problem: "a fan_in_fan_out adapter has no LoRA GGUF layout")
    }
    var tensors: [GGUFTensor] = []
    for path in adapter.modules.keys.sorted(by: { $0.unicodeScalars.lexicographicallyPrecedes($1.unicodeScalars) }) {
        let m = adapter.modules[path]!
        guard let name = GGUFExport.ggufName(path + ".weight", family) else {
            throw CheckpointError.invalidTensor(file: directory + "/" + PEFTAdapter.weightsFile, tensor: path, problem: "llama.cpp's \(family.rawValue) architecture has no weight of this name")
        }
        var b = m.loraB
        if family.permutesQK, path.hasSuffix("q_proj") || path.hasSuffix("k_proj") {
            let heads = path.hasSuffix("q_proj") ? arch.attentionHeads : arch.keyValueHeads
            guard heads > 0, m.outFeatures % (2 * heads) == 0 else {
                throw CheckpointError.invalidTensor(file: directory, tensor: path, problem: "\(m.outFeatures) rows do not split into \(heads) heads of rotary pairs")
            }
            b = GGUFExport.permuteRows(b, rows: m.outFeatures, cols: m.rank, heads: heads)
        }
        for (suffix, values, ne) in [(".lora_a", m.loraA, [m.inFeatures, m.rank]), (".lora_b", b, [m.rank, m.outFeatures])] {
            let (type, bytes) = GGUFExport.encode(values, ne: ne, name: name + suffix, outType: outType)
            tensors.append(GGUFTensor(name: name + suffix, ne: ne, type: type, bytes: bytes))
        }
    }
    // gguf-py's Metadata for the adapter's directory, with the parameter count negated as gguf-py
    // counts a LoRA (each adapted weight's out × in): no size label unless the name has one.
    let adapted = adapter.modules.values.reduce(0) { $0 + $1.outFeatures * $1.inFeatures }
    var adapterConfig = JSONValue.object([])
    if let data = try? InputFile.read(directory + "/config.json"), let c = try? JSONValue.parse(document: [UInt8](data)) { adapterConfig = c }
    let general = GGUFNames.generalKeys(directory: directory, config: adapterConfig, parameters: -adapted) { _ in "" }
    let metadata: [(key: String, value: GGUFValue)] = [("general.architecture", .string(family.rawValue)), ("general.type", .string("adapter")),
                                                        ("adapter.type", .string("lora"))]
        + general + [("adapter.lora.alpha", .float32(Float(adapter.loraAlpha))), ("general.quantization_version", .uint32(2))]
    let bytes = try GGUFExport.fileBytes(metadata: GGUFExport.withoutEmptyStrings(metadata), tensors: tensors)
    try StagedOutput.write(Data(bytes), to: output, overwrite: overwrite, inputs: [directory, base])
    return LoRAExportSummary(modules: adapter.modules.count, bytesWritten: bytes.count, warnings: [GGUFNames.cardWarning(directory: directory)].compactMap { $0 })
}
