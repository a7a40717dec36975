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

/// Whether a run fits: its per-device memory at the step's peak (`StepTimeline`), not only what
/// it keeps.
public enum Fit {
    /// Bytes per device at the step's peak (`StepTimeline`) spread over `gpus` devices with
    /// `parallelism`: every moment of the step is sharded and the largest is the answer (under
    /// ZeRO the peak can move, e.g. off the optimizer step).
    /// A paged optimizer's states (`pagedResident` false) count nothing on the device: the
    /// driver can move them all to CPU memory.
    public static func perDeviceBytes(_ t: StepTimeline, layers: Int, gpus: Int, parallelism: Parallelism, pagedStates: Bool = false) -> Int {
        t.points.map { p in
            var q = p
            if pagedStates { q.components["optimizer_states"] = 0 }
            return perDeviceBytes(q, layers: layers, gpus: gpus, parallelism: parallelism)
        }.max() ?? 0
    }

    /// One moment of the step, per device.
    static func perDeviceBytes(_ p: StepTimeline.Point, layers: Int, gpus: Int, parallelism: Parallelism) -> Int {
        func c(_ name: String) -> Int { p.components[name] ?? 0 }
        let weights = c("weights"), trainable = c("adapters"), grads = c("gradients"), states = c("optimizer_states")
        let perDevice = c("activations") + c("transient")
        let n = max(gpus, 1)
        func shard(_ b: Int) -> Int { (b + n - 1) / n }
        switch parallelism {
        case _ where n == 1, .ddp: return weights + trainable + grads + states + perDevice
        case .zero1: return weights + trainable + grads + shard(states) + perDevice
        case .zero2: return weights + trainable + shard(grads + states) + perDevice
        case .zero3, .fsdp:
            // One layer's weights are gathered whole while it runs.
            return shard(weights + trainable + grads + states) + (layers > 0 ? weights / layers : 0) + perDevice
        }
    }

    /// Per-device peak bytes of a run: on the CPU runtime the step's live peak; on CUDA what the
    /// device holds at it (`CUDAStep.deviceBytes`: reserved and the context).
    public static func perDeviceBytes(_ a: ModelArchitecture, _ o: MemoryOptions, gpus: Int, parallelism: Parallelism, stack: Stack = .default) throws -> Int {
        let step = try StepTimeline(model: a, options: o, stack: stack)
        if stack.runtime == .cuda {
            try singleGPU(gpus)
            return try step.onCUDA().deviceBytes
        }
        return perDeviceBytes(step, layers: a.layers, gpus: gpus, parallelism: parallelism, pagedStates: o.isLoRA && o.optimizer == .pagedAdamw8bit)
    }

    /// Whether a run fits `memory` bytes per device. On CUDA: whether its trace runs through the
    /// caching allocator without running out (which frees cached segments and retries before it
    /// gives up), with the context taken from the device first.
    public static func fits(_ a: ModelArchitecture, _ o: MemoryOptions, memory: Int, gpus: Int, parallelism: Parallelism, stack: Stack = .default) throws -> Bool {
        guard stack.runtime == .cuda else { return try perDeviceBytes(a, o, gpus: gpus, parallelism: parallelism, stack: stack) <= memory }
        try singleGPU(gpus)
        do {
            _ = try StepTimeline(model: a, options: o, stack: stack).onCUDA(memory: memory)
            return true
        } catch is CUDACachingAllocator.OutOfMemory {
            return false
        }
    }

    static func singleGPU(_ gpus: Int) throws {
        guard gpus == 1 else { throw MemoryError.badOption("--runtime cuda models one GPU; several GPUs are answered with --runtime cpu (the ZeRO paper's accounting of live bytes)") }
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
                                     parallelism: Parallelism = .ddp, stack: Stack = .default) throws -> Int? {
        try largest(upTo: longestSeqLen) { seq in
            var q = o
            (q.seqLen, q.batch) = (seq, batch)
            return try fits(a, q, memory: memory, gpus: gpus, parallelism: parallelism, stack: stack)
        }
    }

    /// The largest batch (per device) at `o.seqLen` whose per-device memory is at most `memory`.
    public static func largestBatch(_ a: ModelArchitecture, _ o: MemoryOptions, memory: Int, gpus: Int = 1,
                                    parallelism: Parallelism = .ddp, stack: Stack = .default) throws -> Int? {
        try largest(upTo: 4096) { b in
            var q = o
            q.batch = b
            return try fits(a, q, memory: memory, gpus: gpus, parallelism: parallelism, stack: stack)
        }
    }

    /// One answer of `qlora fit`: for a memory size, with and without checkpointing.
    public struct Answer: Sendable, Codable {
        public var gradientCheckpointing: Bool
        /// Largest sequence length at batch 1 (nil: not even one token).
        public var largestSeqLen: Int?
        /// Largest per-device batch at the asked length (nil: not even one sequence).
        public var largestBatch: Int?
        /// Per-device bytes at batch 1 and the asked length (CUDA: reserved and the context).
        public var bytesAtSeqLen: Int
        /// CUDA only: max_memory_allocated and max_memory_reserved at batch 1 and the asked length.
        public var allocatedPeakAtSeqLen: Int?
        public var reservedPeakAtSeqLen: Int?
    }

    /// `qlora fit` for one model, method and memory: with and without gradient checkpointing.
    public static func answer(_ a: ModelArchitecture, _ o: MemoryOptions, memory: Int, gpus: Int, parallelism: Parallelism, stack: Stack = .default) throws -> [Answer] {
        try [false, true].map { gc in
            var q = o
            q.gradientCheckpointing = gc
            var one = q
            one.batch = 1
            let cuda = stack.runtime == .cuda ? try StepTimeline(model: a, options: one, stack: stack).onCUDA() : nil
            return Answer(gradientCheckpointing: gc,
                          largestSeqLen: try largestSeqLen(a, q, memory: memory, gpus: gpus, parallelism: parallelism, stack: stack),
                          largestBatch: try largestBatch(a, q, memory: memory, gpus: gpus, parallelism: parallelism, stack: stack),
                          bytesAtSeqLen: try cuda?.deviceBytes ?? perDeviceBytes(a, one, gpus: gpus, parallelism: parallelism, stack: stack),
                          allocatedPeakAtSeqLen: cuda?.allocatedPeak, reservedPeakAtSeqLen: cuda?.reservedPeak)
        }
    }

    /// The GPU sizes `qlora fit --matrix` shows, in GB (10⁹ B).
    public static let commonGPUSizesGB = [12, 16, 24, 48, 80, 128]
}
