import CheckpointFormats
import FileOutput
import Foundation
import QLoRA
import SafeTensors

/// What a checkpoint directory's config.json says the model is, for the jobs whose answer depends
/// on it (which tensors `quantize` turns into 4-bit, what `merge` folds in): nil without a
/// config.json (a bare .safetensors file is read as tensors only). A model_type qlora does not
/// describe, or a mixture of experts it cannot, is refused by name rather than treated as a Llama.
/// (`inspect`, `dequantize` and `compare` read tensors as stored, whatever the family: they do
/// not ask.)
func describedModel(checkpoint path: String) throws -> (config: JSONValue, path: String, model: ModelArchitecture?)? {
    var isDirectory: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue else { return nil }
    let config = (path as NSString).appendingPathComponent("config.json")
    guard FileManager.default.fileExists(atPath: config) else { return nil }
    // One read: the JSON for what the caller asks of it, the same bytes for the shape. Only a
    // mixture of experts needs its shape read here; a dense model's config.json is not asked for
    // more than its model_type (a checkpoint's config may carry only what its loader needs).
    let data = try InputFile.read(config)
    let json: JSONValue
    do { json = try JSONValue.parse(document: [UInt8](data)) } catch {
        throw CheckpointError.invalidPath(path: config, problem: "is not valid JSON (\(error))")
    }
    guard case .string(let type)? = json["model_type"] else { return (json, config, nil) }
    if let problem = ModelArchitecture.undescribedTypeProblem(type) { throw CheckpointError.invalidPath(path: config, problem: problem) }
    let moe = ModelArchitecture.Experts.Family(rawValue: type) != nil
        || ["num_experts", "num_local_experts", "n_routed_experts"].contains { json[$0] != nil && json[$0] != .null }
    guard moe else { return (json, config, nil) }
    let a = try ModelArchitecture(configData: data, path: config)
    if let problem = a.undescribed.first { throw CheckpointError.invalidPath(path: config, problem: problem) }
    return (json, config, a)
}

extension ModelArchitecture {
    /// Name fragments of a mixture of experts' tensors that transformers 5 + bitsandbytes leave
    /// in 16 bits: the experts (fused `mlp.experts.gate_up_proj`, or one by one as
    /// `save_pretrained` writes Qwen3-MoE's and Mixtral's, `mlp.experts.N.*_proj`; Mixtral's
    /// published `block_sparse_moe.experts.N.w1/w2/w3`) and the router (`mlp.gate`,
    /// `block_sparse_moe.gate`, gpt-oss' `mlp.router`): none is an `nn.Linear`, the only module
    /// its bitsandbytes integration replaces (moe.json).
    public var sixteenBitFragments: [String] {
        experts == nil ? [] : [".mlp.experts.", ".mlp.gate.", ".mlp.router.", ".block_sparse_moe."]
    }
}
