import CheckpointFormats
import FileOutput
import Foundation
import QLoRA
import SafeTensors

/// A synthetic checkpoint: an architecture and how its weights are drawn.
public struct SampleCheckpointSpec: Sendable {
    /// The model's shapes. Norm epsilon, rope and the other numerics fields are not written.
    public var architecture = ModelArchitecture(name: "sample", hiddenSize: 1024, intermediateSize: 2816, layers: 2, attentionHeads: 16, vocabSize: 8192)
    /// Standard deviation of the embeddings and lm_head. Real models' rows have norms near 1;
    /// training through a frozen lm_head needs that scale.
    public var embeddingStd: Float = 0.02
    /// Standard deviation of the decoder layers' projections.
    public var weightStd: Float = 0.02
    public var dtype: ElementType = .bfloat16
    public var seed: UInt64 = 0
    /// Shard size in bytes; a directory with an index is written when the model is larger.
    public var maxShardSize = 64 << 20

    public init(architecture: ModelArchitecture? = nil, embeddingStd: Float = 0.02, weightStd: Float = 0.02, dtype: ElementType = .bfloat16,
                seed: UInt64 = 0, maxShardSize: Int = 64 << 20) {
        if let architecture { self.architecture = architecture }
        (self.embeddingStd, self.weightStd, self.dtype, self.seed, self.maxShardSize) = (embeddingStd, weightStd, dtype, seed, maxShardSize)
    }
}

/// Writes a synthetic checkpoint of `spec.architecture` (embeddings, per-layer norms and
/// projections, final norm, lm_head; norms 1, the rest N(0, std²) from a seeded generator) into
/// the new directory `output` (sharded with an index when larger than one shard), with a
/// config.json. Returns the bytes of weights written.
@discardableResult
public func writeSampleCheckpoint(output: String, spec: SampleCheckpointSpec) throws -> Int {
    let a = spec.architecture
    let dtype = DType(spec.dtype)
    var tensors: [(name: String, dtype: DType, shape: [Int])] = [("model.embed_tokens.weight", dtype, [a.vocabSize, a.hiddenSize])]
    for l in 0..<a.layers { tensors += a.layerTensors(l).map { ($0.name, dtype, $0.shape) } }
    tensors.append(("model.norm.weight", dtype, [a.hiddenSize]))
    if !a.tiedEmbeddings { tensors.append(("lm_head.weight", dtype, [a.vocabSize, a.hiddenSize])) }
    let out = try StagedOutput(output, kind: .directory, createParent: true)
    let writer = try ShardedWriter(directory: out.url, tensors: tensors, maxShardSize: spec.maxShardSize, metadata: ["format": "pt"])
    var rng = SplitMix64(seed: spec.seed &+ 0x1234_5678)  // the offset keeps the demo's published data
    var total = 0
    for t in tensors {
        let n = t.shape.reduce(1, *)
        let std: Float = t.name.contains("embed") || t.name.contains("lm_head") ? spec.embeddingStd : spec.weightStd
        let values = (0..<n).map { _ in t.shape.count == 1 ? 1 : rng.normal() * std }
        let bytes = encode(values, as: spec.dtype)
        try writer.write(t.name, bytes: bytes)
        total += bytes.count
    }
    try writer.finish()
    let config = """
        {"architectures": ["LlamaForCausalLM"], "model_type": "\(a.modelType)", "hidden_size": \(a.hiddenSize), "intermediate_size": \(a.intermediateSize), \
        "num_hidden_layers": \(a.layers), "num_attention_heads": \(a.attentionHeads), "num_key_value_heads": \(a.keyValueHeads), \
        "vocab_size": \(a.vocabSize), "torch_dtype": "\(spec.dtype.rawValue)"}
        """
    try Data(config.utf8).write(to: out.url(for: "config.json"))
    try out.commit()
    return total
}

/// A seeded PEFT adapter for a sample checkpoint: rank `rank` (alpha 2·rank) on all seven
/// projections of every layer, A ~ U(±1/√in) as PEFT initializes it and B ~ N(0, 0.01²) (not
/// zero, so the merge changes the weights, as after training).
public func writeSampleAdapter(directory: String, spec: SampleCheckpointSpec, rank: Int) throws {
    var rng = SplitMix64(seed: spec.seed &+ 0xADA9)
    let a = spec.architecture
    var adapter = PEFTAdapter(rank: rank, loraAlpha: Double(2 * rank), targetModules: ModelArchitecture.projectionNames)
    for l in 0..<a.layers {
        for p in a.projections {
            let path = p.modulePath(layer: l)
            let bound = 1 / Double(p.inFeatures).squareRoot()
            let loraA = (0..<(rank * p.inFeatures)).map { _ in Float((rng.unit() * 2 - 1) * bound) }
            let loraB = (0..<(p.outFeatures * rank)).map { _ in rng.normal() * 0.01 }
            adapter.modules[path] = .init(path: path, rank: rank, inFeatures: p.inFeatures, outFeatures: p.outFeatures, loraA: loraA, loraB: loraB)
        }
    }
    try adapter.save(directory: directory)
}
