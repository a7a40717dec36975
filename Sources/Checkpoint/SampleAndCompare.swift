import Foundation
import QLoRA
import SafeTensors

/// The shape of a synthetic Llama-style checkpoint.
public struct SampleCheckpointSpec: Sendable {
    public var layers = 2
    public var hidden = 1024
    public var intermediate = 2816
    public var vocab = 8192
    /// Attention heads (head dim = hidden / heads).
    public var heads = 16
    /// Key/value heads (grouped-query attention when fewer than `heads`); nil = `heads`.
    public var kvHeads: Int? = nil
    /// Standard deviation of the embeddings and lm_head. Real models' rows have norms near 1;
    /// training through a frozen lm_head needs that scale.
    public var embeddingStd: Float = 0.02
    /// Standard deviation of the decoder layers' projections.
    public var weightStd: Float = 0.02
    public var dtype: ElementType = .bfloat16
    public var seed: UInt64 = 0
    /// Shard size in bytes; a directory with an index is written when the model is larger.
    public var maxShardSize = 64 << 20
    public init() {}
}

/// Writes a synthetic Llama-style checkpoint (embeddings, per-layer attention and MLP
/// projections, norms, lm_head) with N(0, 0.02²) weights from a seeded generator, into
/// directory `output` (sharded with an index when larger than one shard), plus a config.json.
public func writeSampleCheckpoint(output: String, spec: SampleCheckpointSpec) throws -> Int {
    let h = spec.hidden, i = spec.intermediate, kv = spec.kvDim
    var tensors: [(name: String, dtype: DType, shape: [Int])] = [("model.embed_tokens.weight", dt(spec.dtype), [spec.vocab, h])]
    for l in 0..<spec.layers {
        let p = "model.layers.\(l)."
        tensors += [
            (p + "input_layernorm.weight", dt(spec.dtype), [h]),
            (p + "self_attn.q_proj.weight", dt(spec.dtype), [h, h]),
            (p + "self_attn.k_proj.weight", dt(spec.dtype), [kv, h]),
            (p + "self_attn.v_proj.weight", dt(spec.dtype), [kv, h]),
            (p + "self_attn.o_proj.weight", dt(spec.dtype), [h, h]),
            (p + "post_attention_layernorm.weight", dt(spec.dtype), [h]),
            (p + "mlp.gate_proj.weight", dt(spec.dtype), [i, h]),
            (p + "mlp.up_proj.weight", dt(spec.dtype), [i, h]),
            (p + "mlp.down_proj.weight", dt(spec.dtype), [h, i]),
        ]
    }
    tensors += [("model.norm.weight", dt(spec.dtype), [h]), ("lm_head.weight", dt(spec.dtype), [spec.vocab, h])]
    let out = URL(fileURLWithPath: output)
    if FileManager.default.fileExists(atPath: output) {
        throw CheckpointError.invalidPath(path: output, problem: "already exists; remove it or choose a new directory")
    }
    try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
    let writer = try ShardedWriter(directory: out, tensors: tensors, maxShardSize: spec.maxShardSize, metadata: ["format": "pt"])
    var rng = SplitMix64(seed: spec.seed &+ 0x1234_5678)  // the offset keeps the demo's published data
    var total = 0
    for t in tensors {
        let n = t.shape.reduce(1, *)
        let isNorm = t.shape.count == 1
        var bytes = [UInt8](repeating: 0, count: n * spec.dtype.byteSize)
        bytes.withUnsafeMutableBytes { raw in
            let std: Float = t.name.contains("embed") || t.name.contains("lm_head") ? spec.embeddingStd : spec.weightStd
            let values = (0..<n).map { _ in isNorm ? 1 : rng.normal() * std }
            switch spec.dtype {
            case .float32: for k in 0..<n { raw.storeBytes(of: values[k], toByteOffset: k * 4, as: Float.self) }
            case .bfloat16: for k in 0..<n { raw.storeBytes(of: HalfPrecision.bfloat16Bits(values[k]), toByteOffset: k * 2, as: UInt16.self) }
            case .float16: for k in 0..<n { raw.storeBytes(of: HalfPrecision.float16Bits(values[k]), toByteOffset: k * 2, as: UInt16.self) }
            }
        }
        try writer.write(t.name, bytes: bytes)
        total += bytes.count
    }
    try writer.finish()
    let config = """
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": \(h), "intermediate_size": \(i), \
        "num_hidden_layers": \(spec.layers), "num_attention_heads": \(spec.heads), "num_key_value_heads": \(spec.kvHeads ?? spec.heads), \
        "vocab_size": \(spec.vocab), "torch_dtype": "\(spec.dtype.rawValue)"}
        """
    try Data(config.utf8).write(to: out.appendingPathComponent("config.json"))
    return total
}

extension SampleCheckpointSpec {
    /// Rows of k_proj and v_proj: key/value heads × head dim.
    var kvDim: Int { kvHeads.map { $0 * (hidden / heads) } ?? hidden }
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
    try Data((lines.joined(separator: "\n") + "\n").utf8).write(to: URL(fileURLWithPath: path), options: .atomic)
}

func dt(_ t: ElementType) -> DType { t == .float32 ? .f32 : t == .bfloat16 ? .bf16 : .f16 }

/// A seeded PEFT adapter for a sample checkpoint: rank `rank` (alpha 2·rank) on all seven
/// projections of every layer, A ~ U(±1/√in) as PEFT initializes it and B ~ N(0, 0.01²) (not
/// zero, so the merge changes the weights, as after training).
public func writeSampleAdapter(directory: String, spec: SampleCheckpointSpec, rank: Int) throws {
    var rng = SplitMix64(seed: spec.seed &+ 0xADA9)
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    var adapter = PEFTAdapter(rank: rank, loraAlpha: Double(2 * rank), targetModules: targets)
    let h = spec.hidden, i = spec.intermediate, kv = spec.kvDim
    for l in 0..<spec.layers {
        for t in targets {
            let path = "model.layers.\(l).\(t.hasSuffix("_proj") && ["q", "k", "v", "o"].contains(String(t.prefix(1))) ? "self_attn" : "mlp").\(t)"
            let (out, inF) = t == "gate_proj" || t == "up_proj" ? (i, h) : t == "down_proj" ? (h, i) : t == "k_proj" || t == "v_proj" ? (kv, h) : (h, h)
            let bound = 1 / Double(inF).squareRoot()
            let a = (0..<(rank * inF)).map { _ in Float((rng.unit() * 2 - 1) * bound) }
            let b = (0..<(out * rank)).map { _ in rng.normal() * 0.01 }
            adapter.modules[path] = .init(path: path, rank: rank, inFeatures: inF, outFeatures: out, loraA: a, loraB: b)
        }
    }
    try adapter.save(directory: directory)
}

/// One tensor's error statistics.
public struct TensorComparison: Codable, Sendable {
    public var name: String
    public var statistics: ErrorStatistics
}

/// Per-tensor error between two dense checkpoints with the same tensor names and shapes.
/// Non-float tensors (same dtype on both sides) are skipped.
public func compareCheckpoints(reference: String, actual: String) throws -> [TensorComparison] {
    let a = try CheckpointReader(path: reference), b = try CheckpointReader(path: actual)
    var out: [TensorComparison] = []
    for e in a.entries {
        guard let other = b.info(named: e.name) else {
            throw CheckpointError.invalidTensor(file: actual, tensor: e.name, problem: "missing (present in \(reference))")
        }
        guard other.shape == e.info.shape else {
            throw CheckpointError.invalidTensor(file: actual, tensor: e.name, problem: "shape \(other.shape) differs from \(e.info.shape)")
        }
        if elementType(e.info.dtype) == nil && other.dtype == e.info.dtype { continue }  // not numeric: skipped
        guard let ta = elementType(e.info.dtype), let tb = elementType(other.dtype) else {
            throw CheckpointError.invalidTensor(file: actual, tensor: e.name, problem: "not a float tensor (\(e.info.dtype.rawValue) vs \(other.dtype.rawValue))")
        }
        let stats = a.withBytes(of: e.name) { ua in
            b.withBytes(of: e.name) { ub in
                withAlignedBytes(ua, alignment: ta.byteSize) { ra in
                    withAlignedBytes(ub, alignment: tb.byteSize) { rb in
                        ErrorStatistics(reference: .view(ra, as: ta), actual: .view(rb, as: tb))
                    }
                }
            }
        }
        out.append(TensorComparison(name: e.name, statistics: stats))
    }
    return out
}

func elementType(_ d: DType) -> ElementType? {
    switch d {
    case .f32: return .float32
    case .bf16: return .bfloat16
    case .f16: return .float16
    default: return nil
    }
}
