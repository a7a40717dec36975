import Foundation
import QLoRA

/// How a run is spread over several GPUs, for per-device memory.
///
/// The accounting is the ZeRO paper's (Rajbhandari et al., "ZeRO: Memory Optimizations Toward
/// Training Trillion Parameter Models", 2020, §5.1): with N data-parallel devices, ZeRO stage 1
/// shards the optimizer states (and fp32 master weights), stage 2 also the gradients, stage 3 also
/// the parameters; FSDP's full shard is stage 3 (QLoRA under FSDP stores the 4-bit weights as bf16
/// `quant_storage`, the same bytes, so they shard too). Activations stay per device: each device
/// runs its own micro-batch. Stage 3 and FSDP gather one layer's full weights at a time; that
/// layer is counted on every device.
public enum Parallelism: String, Sendable, CaseIterable, Codable {
    /// Every device holds everything (plain data parallel, or one GPU).
    case ddp
    case zero1, zero2, zero3
    /// FSDP FULL_SHARD: sharded as ZeRO-3.
    case fsdp
}

/// What is resident per device for a run, and whether it fits.
public enum Fit {
    /// Bytes per device of `e` spread over `gpus` devices with `parallelism`.
    public static func perDeviceBytes(_ e: MemoryEstimate, gpus: Int, parallelism: Parallelism) -> Int {
        func bytes(_ names: String...) -> Int { names.reduce(0) { $0 + (e.component($1)?.estimatedBytes ?? 0) } }
        let weights = bytes("base_weights", "quant_constants", "unquantized_weights"), trainable = bytes("lora_params")
        let grads = bytes("gradients", "lora_grads"), states = bytes("optimizer_states", "master_weights")
        let activations = bytes("activations")
        let n = max(gpus, 1)
        func shard(_ b: Int) -> Int { (b + n - 1) / n }
        switch parallelism {
        case _ where n == 1, .ddp: return weights + trainable + grads + states + activations
        case .zero1: return weights + trainable + grads + shard(states) + activations
        case .zero2: return weights + trainable + shard(grads + states) + activations
        case .zero3, .fsdp:
            // One layer's weights are gathered whole while it runs.
            let layer = e.architecture.layers > 0 ? weights / e.architecture.layers : 0
            return shard(weights + trainable + grads + states) + layer + activations
        }
    }

    /// The longest sequence searched for, in tokens.
    public static let longestSeqLen = 1 << 20

    /// The largest value in 1...`upTo` for which `fits` holds, by bisection (memory grows with it);
    /// nil when not even 1 does.
    public static func largest(upTo limit: Int, _ fits: (Int) throws -> Bool) rethrows -> Int? {
        guard try fits(1) else { return nil }
        if try fits(limit) { return limit }
        var (lo, hi) = (1, limit)
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2
            if try fits(mid) { lo = mid } else { hi = mid }
        }
        return lo
    }

    /// The largest sequence length at `batch` whose per-device memory is at most `memory` bytes.
    public static func largestSeqLen(_ a: ModelArchitecture, _ o: MemoryOptions, batch: Int = 1, memory: Int, gpus: Int = 1,
                                     parallelism: Parallelism = .ddp) throws -> Int? {
        try largest(upTo: longestSeqLen) { seq in
            var q = o
            (q.seqLen, q.batch) = (seq, batch)
            return perDeviceBytes(try MemoryEstimate(model: a, options: q), gpus: gpus, parallelism: parallelism) <= memory
        }
    }

    /// The largest batch (per device) at `o.seqLen` whose per-device memory is at most `memory`.
    public static func largestBatch(_ a: ModelArchitecture, _ o: MemoryOptions, memory: Int, gpus: Int = 1,
                                    parallelism: Parallelism = .ddp) throws -> Int? {
        try largest(upTo: 4096) { b in
            var q = o
            q.batch = b
            return perDeviceBytes(try MemoryEstimate(model: a, options: q), gpus: gpus, parallelism: parallelism) <= memory
        }
    }

    /// One answer of `qlora fit`: for a memory size, with and without checkpointing.
    public struct Answer: Sendable, Codable {
        public var gradientCheckpointing: Bool
        /// Largest sequence length at batch 1 (nil: not even one token).
        public var largestSeqLen: Int?
        /// Largest per-device batch at the asked length (nil: not even one sequence).
        public var largestBatch: Int?
        /// Per-device bytes at batch 1 and the asked length.
        public var bytesAtSeqLen: Int
    }

    /// `qlora fit` for one model, method and memory: with and without gradient checkpointing.
    public static func answer(_ a: ModelArchitecture, _ o: MemoryOptions, memory: Int, gpus: Int, parallelism: Parallelism) throws -> [Answer] {
        try [false, true].map { gc in
            var q = o
            q.gradientCheckpointing = gc
            var one = q
            one.batch = 1
            return Answer(gradientCheckpointing: gc,
                          largestSeqLen: try largestSeqLen(a, q, memory: memory, gpus: gpus, parallelism: parallelism),
                          largestBatch: try largestBatch(a, q, memory: memory, gpus: gpus, parallelism: parallelism),
                          bytesAtSeqLen: perDeviceBytes(try MemoryEstimate(model: a, options: one), gpus: gpus, parallelism: parallelism))
        }
    }

    /// The GPU sizes `qlora fit --matrix` shows, in GB (10⁹ B).
    public static let commonGPUSizesGB = [12, 16, 24, 48, 80, 128]
}
