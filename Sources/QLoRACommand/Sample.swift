import ArgumentParser
import CheckpointJobs
import Foundation
import QLoRA
import Training

struct Sample: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a synthetic Llama-style checkpoint (seeded N(0, 0.02²) weights) for demos and tests.")

    @Argument(help: "New directory to create.") var output: String
    @Option(help: "Decoder layers.") var layers = 2
    @Option(help: "Hidden size.") var hidden = 1024
    @Option(help: "MLP intermediate size.") var intermediate = 2816
    @Option(help: "Vocabulary size.") var vocab = 8192
    @Option(help: "Attention heads.") var heads = 16
    @Option(help: "Key/value heads (grouped-query attention when fewer than --heads; default: --heads).") var kvHeads: Int?
    @Option(help: "Seed.") var seed: UInt64 = 0
    @Option(help: "Largest shard, MiB.") var maxShardMib = 64
    @Option(help: "Also write a PEFT LoRA adapter of this rank (all seven projections) to DIR-adapter.") var adapterRank: Int?
    @Option(help: "Standard deviation of the embeddings and lm_head.") var embeddingStd: Float = 0.02
    @Option(help: "Standard deviation of the decoder layers' projections.") var weightStd: Float = 0.02
    @Option(help: "Also write N examples of a copy task for qlora train to DIR-copy.jsonl.") var copyTask: Int?

    func run() {
        runReportingErrors {
            guard heads > 0, hidden % heads == 0, (kvHeads ?? heads) > 0, heads % (kvHeads ?? heads) == 0 else {
                throw ValidationError("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")
            }
            let architecture = ModelArchitecture(name: "sample", hiddenSize: hidden, intermediateSize: intermediate, layers: layers,
                                                 attentionHeads: heads, keyValueHeads: kvHeads, vocabSize: vocab)
            let s = SampleCheckpointSpec(architecture: architecture, embeddingStd: embeddingStd, weightStd: weightStd, seed: seed, maxShardSize: maxShardMib << 20)
            let bytes = try writeSampleCheckpoint(output: output, spec: s)
            print("wrote a \(layers)-layer sample checkpoint (hidden \(hidden), \(bytes) bytes of bf16 weights) to \(output)")
            if let n = copyTask {
                try writeCopyTaskData(path: output + "-copy.jsonl", count: n)
                print("wrote \(n) copy-task examples to \(output)-copy.jsonl")
            }
            if let r = adapterRank {
                try writeSampleAdapter(directory: output + "-adapter", spec: s, rank: r)
                print("wrote a rank-\(r) PEFT adapter for it to \(output)-adapter")
            }
        }
    }
}
