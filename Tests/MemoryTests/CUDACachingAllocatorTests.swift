import Memory
import QLoRA
import XCTest

/// The caching allocator's replay against sequences worked out by hand from PyTorch's rules
/// (c10/cuda/CUDACachingAllocator.cpp; see `CUDACachingAllocator`).
final class CUDACachingAllocatorTests: XCTestCase {
    let KiB = 1 << 10, MiB = 1 << 20

    /// Small requests: rounded to 512 B, carved from one 2 MiB segment, reused by best fit.
    func testSmallPool() throws {
        var a = CUDACachingAllocator()
        let x = try a.malloc(100)                  // 512 B from a new 2 MiB segment
        XCTAssertEqual([a.allocated, a.reserved], [512, 2 * MiB])
        _ = try a.malloc(1000)                     // 1,024 B from the same segment's free rest
        XCTAssertEqual([a.allocated, a.reserved], [1536, 2 * MiB])
        a.free(x)
        _ = try a.malloc(512)                      // best fit: the freed 512 B block, not the large rest
        XCTAssertEqual([a.allocated, a.reserved], [1536, 2 * MiB])
        _ = try a.malloc(MiB)                      // exactly 1 MiB is still small: the same segment
        XCTAssertEqual(a.reserved, 2 * MiB)
        _ = try a.malloc(MiB)                      // the segment has 1 MiB − 1.5 KiB left: a second one
        XCTAssertEqual(a.reserved, 4 * MiB)
        XCTAssertEqual(a.allocated, 1536 + 2 * MiB)
    }

    /// 1–10 MiB requests share 20 MiB segments; a rest of 1 MiB or less is not split off, so the
    /// whole block counts as allocated; 10 MiB and more get their own segment rounded to 2 MiB.
    func testLargePoolSegmentsAndSplitting() throws {
        var a = CUDACachingAllocator()
        _ = try a.malloc(5 * MiB)                  // 20 MiB segment; 15 MiB split off
        XCTAssertEqual([a.allocated, a.reserved], [5 * MiB, 20 * MiB])
        _ = try a.malloc(14 * MiB + 512 * KiB)     // the 15 MiB block: 0.5 MiB left is not split
        XCTAssertEqual([a.allocated, a.reserved], [20 * MiB, 20 * MiB])
        var b = CUDACachingAllocator()
        _ = try b.malloc(11 * MiB + 1)             // rounds to 11 MiB + 512 B: a 12 MiB segment, whole
        XCTAssertEqual([b.allocated, b.reserved], [12 * MiB, 12 * MiB])
        XCTAssertEqual(CUDACachingAllocator.segmentSize(10 * MiB), 10 * MiB)
        XCTAssertEqual(CUDACachingAllocator.segmentSize(10 * MiB - 512), 20 * MiB)
        XCTAssertEqual(CUDACachingAllocator.segmentSize(MiB), 2 * MiB)
        XCTAssertEqual(CUDACachingAllocator.segmentSize(MiB + 512), 20 * MiB)
    }

    /// Freed neighbours merge inside a segment, and a wholly free segment goes back on
    /// empty_cache; a partly used one stays.
    func testMergeAndEmptyCache() throws {
        var a = CUDACachingAllocator()
        let x = try a.malloc(4 * MiB), y = try a.malloc(4 * MiB)   // one 20 MiB segment
        let z = try a.malloc(13 * MiB)             // the 12 MiB rest cannot hold it: a 14 MiB segment,
        XCTAssertEqual([a.allocated, a.reserved], [22 * MiB, 34 * MiB])   // whole (1 MiB left is not split)
        a.free(x)
        a.emptyCache()                              // the 20 MiB segment still holds y
        XCTAssertEqual(a.reserved, 34 * MiB)
        a.free(y)                                   // merges with x and the free rest: one free block
        a.emptyCache()
        XCTAssertEqual([a.allocated, a.reserved], [14 * MiB, 14 * MiB])
        a.free(z)
        a.emptyCache()
        XCTAssertEqual([a.allocated, a.reserved, a.peakReserved, a.peakAllocated], [0, 0, 34 * MiB, 22 * MiB])
    }

    /// A freed block too small for the next request stays reserved: reserved runs ahead of
    /// allocated. When cudaMalloc fails, wholly free segments are released and it is tried once
    /// more; only then is it out of memory.
    func testFragmentationRetryAndOutOfMemory() throws {
        func run(capacity: Int?) throws -> CUDACachingAllocator {
            var a = CUDACachingAllocator(.init(capacity: capacity))
            let x = try a.malloc(100 * MiB)
            _ = try a.malloc(100 * MiB)
            a.free(x)
            _ = try a.malloc(150 * MiB)             // x's 100 MiB cannot hold it
            return a
        }
        let free = try run(capacity: nil)
        XCTAssertEqual([free.allocated, free.reserved, free.retries], [250 * MiB, 350 * MiB, 0])
        let tight = try run(capacity: 300 * MiB)    // 350 > 300: x's segment released, then 250 fits
        XCTAssertEqual([tight.allocated, tight.reserved, tight.peakReserved, tight.retries], [250 * MiB, 250 * MiB, 250 * MiB, 1])
        XCTAssertThrowsError(try run(capacity: 240 * MiB)) { error in   // 100 held + 150 > 240
            XCTAssertEqual((error as? CUDACachingAllocator.OutOfMemory)?.requested, 150 * MiB)
            XCTAssertEqual((error as? CUDACachingAllocator.OutOfMemory)?.reserved, 100 * MiB)
        }
    }

    /// A large block is split only when more than 1 MiB is left: a 2 MiB-rounded segment for a
    /// request that is not a multiple of 2 MiB keeps the slack inside the allocation.
    func testLargeRestOfOneMiBOrLessStaysInTheBlock() throws {
        var a = CUDACachingAllocator()
        let x = try a.malloc(21 * MiB)             // segment 22 MiB; 1 MiB left is not split
        XCTAssertEqual(a.allocated, 22 * MiB)
        a.free(x)
        _ = try a.malloc(20 * MiB + 512 * KiB)     // reuses it: 1.5 MiB left is split off
        XCTAssertEqual([a.allocated, a.reserved], [20 * MiB + 512 * KiB, 22 * MiB])
    }

    /// Expandable segments: one segment per pool mapped in 20 MiB pages (large pool), so blocks
    /// of different sizes pack into it; on failure the pages wholly inside free blocks are
    /// unmapped and the mapping tried again.
    func testExpandableSegments() throws {
        var a = CUDACachingAllocator(.init(expandableSegments: true))
        _ = try a.malloc(5 * MiB)                  // page 0 mapped
        XCTAssertEqual([a.allocated, a.reserved], [5 * MiB, 20 * MiB])
        _ = try a.malloc(30 * MiB)                 // [5, 35) MiB: page 1 mapped as well
        XCTAssertEqual([a.allocated, a.reserved], [35 * MiB, 40 * MiB])
        var b = CUDACachingAllocator()             // the same without: a 20 MiB and a 30 MiB segment
        _ = try b.malloc(5 * MiB)
        _ = try b.malloc(30 * MiB)
        XCTAssertEqual(b.reserved, 50 * MiB)

        var c = CUDACachingAllocator(.init(expandableSegments: true, capacity: 300 * MiB))
        let x = try c.malloc(100 * MiB)            // pages 0–4
        _ = try c.malloc(100 * MiB)                // pages 5–9
        c.free(x)
        _ = try c.malloc(150 * MiB)                // [200, 350) needs pages 10–17 (160 MiB): 360 > 300,
        XCTAssertEqual(c.retries, 1)               // so x's pages 0–4 are unmapped first
        XCTAssertEqual([c.allocated, c.reserved, c.peakReserved], [250 * MiB, 260 * MiB, 260 * MiB])
        _ = try c.malloc(512)                      // the small pool has its own 2 MiB pages
        XCTAssertEqual(c.reserved, 262 * MiB)
    }
}

/// The step on CUDA: its trace through the caching allocator.
final class CUDAStepTests: XCTestCase {
    let a = ModelArchitecture.preset("llama-3.1-8b")!
    let o = MemoryOptions(method: .qlora, rank: 32, seqLen: 2048, gradientCheckpointing: true)

    /// The trace is the timeline: at every point the allocator has handed out at least the live
    /// bytes (blocks are rounded up) and reserved at least that; the cuBLAS workspaces (one per
    /// thread) and AdamW's foreach temporaries are on the device only on CUDA.
    func testTheTraceIsTheTimeline() throws {
        let cpu = try StepTimeline(model: a, options: o)
        let gpu = try StepTimeline(model: a, options: o, stack: Stack(runtime: .cuda))
        let r = try gpu.onCUDA()
        XCTAssertEqual(r.allocatedAtPoints.count, gpu.points.count)
        for (i, p) in gpu.points.enumerated() {
            XCTAssertGreaterThanOrEqual(r.allocatedAtPoints[i], p.bytes, p.phase)
            XCTAssertGreaterThanOrEqual(r.reservedAtPoints[i], r.allocatedAtPoints[i], p.phase)
        }
        XCTAssertGreaterThanOrEqual(r.reservedPeak, r.allocatedPeak)
        XCTAssertEqual(r.deviceBytes, r.reservedPeak + 400 << 20)
        // After the forward both workspaces are held: 2 × 8.125 MiB more than the CPU step.
        let end = gpu.points.count - 1
        XCTAssertEqual(gpu.points[end].bytes - cpu.points[end].bytes, 2 * CUDASettings.workspaceBeforeHopper)
        // foreach: a temporary per LoRA tensor at once (its fp32 size), against two of the largest on CPU.
        let step = { (t: StepTimeline) in t.points.first { $0.phase.hasPrefix("optimizer step") }!.components["transient"]! }
        let trainable = try MemoryEstimate(model: a, options: o).params.trainable
        XCTAssertEqual(step(gpu) - 2 * CUDASettings.workspaceBeforeHopper, 4 * trainable)
        XCTAssertLessThan(step(cpu), 4 * trainable)
    }

    /// Fitting on CUDA asks the allocator: a length fits when the replay does not run out of
    /// memory, and one token more does; the answer is below the CPU stack's live-bytes answer.
    func testFitOnCUDAIsTheAllocatorsAnswer() throws {
        let stack = Stack(recipe: .peftKbit, runtime: .cuda)
        let memory = 12_000_000_000
        let n = try XCTUnwrap(try Fit.largestSeqLen(a, o, memory: memory, stack: stack))
        func at(_ seq: Int) throws -> StepTimeline { var q = o; q.seqLen = seq; return try StepTimeline(model: a, options: q, stack: stack) }
        XCTAssertNoThrow(try at(n).onCUDA(memory: memory))
        XCTAssertThrowsError(try at(n + 1).onCUDA(memory: memory)) { XCTAssertTrue($0 is CUDACachingAllocator.OutOfMemory) }
        XCTAssertLessThan(n, try XCTUnwrap(try Fit.largestSeqLen(a, o, memory: memory, stack: Stack(recipe: .peftKbit))))
        // Out of memory at 8 GB: the kbit recipe's fp32 embedding and lm_head (4.2 GB) and the
        // 4-bit layers leave too little.
        XCTAssertNil(try Fit.largestSeqLen(a, o, memory: 8_000_000_000, stack: stack))
        XCTAssertThrowsError(try Fit.largestSeqLen(a, o, memory: memory, gpus: 2, parallelism: .fsdp, stack: stack))
    }

    /// bitsandbytes' paged optimizer states are cudaMallocManaged buffers: nothing in the
    /// allocator's reserve.
    func testPagedStatesAreOutsideTheAllocator() throws {
        var paged = o, eight = o
        paged.optimizer = .pagedAdamw8bit
        eight.optimizer = .adamw8bit
        let p = try StepTimeline(model: a, options: paged, stack: Stack(runtime: .cuda)), e = try StepTimeline(model: a, options: eight, stack: Stack(runtime: .cuda))
        XCTAssertEqual(p.points[0].components["optimizer_states"], 0)
        XCTAssertGreaterThan(e.points[0].components["optimizer_states"]!, 0)
        XCTAssertLessThan(try p.onCUDA().allocatedPeak, try e.onCUDA().allocatedPeak)
    }
}

/// The stack's other options, where no CPU measurement reaches: TRL's head on CUDA, flash-attn's
/// backward scratch, and the combinations that do not exist.
final class StackOptionTests: XCTestCase {
    let a = ModelArchitecture.preset("llama-3.1-8b")!
    let o = MemoryOptions(method: .qlora, rank: 32, seqLen: 4096, gradientCheckpointing: true)

    /// TRL's Triton kernels work on the bf16 tile in place: the head's backward on CUDA holds the
    /// tile buffer (4,096 × 32,768 bf16) and the hidden states' fp32 gradient, nothing of the
    /// vocabulary per token; torch's fallback on CPU holds seven fp32 copies and a mask of a tile.
    func testTRLHeadOnCUDAKeepsNoVocabularyPerToken() throws {
        let gpu = try StepTimeline(model: a, options: o, stack: Stack(recipe: .trl, runtime: .cuda))
        let cpu = try StepTimeline(model: a, options: o, stack: Stack(recipe: .trl))
        func head(_ t: StepTimeline) -> Int { t.points.filter { $0.phase.hasPrefix("head backward") }.map { $0.components["transient"]! }.max()! }
        // The labels are shifted: 4,095 rows, one tile of them.
        let shifted = o.tokens - 1, tile = shifted * 32768
        XCTAssertEqual(head(gpu), 2 * CUDASettings.workspaceBeforeHopper + shifted * 4 * 4096 + 2 * tile)
        XCTAssertEqual(head(cpu), shifted * 4 * 4096 + 2 * tile + 29 * tile)
        // Adapters, their gradients and AdamW's moments in bf16; no foreach temporaries (fused).
        let trainable = try MemoryEstimate(model: a, options: o).params.trainable
        XCTAssertEqual(gpu.points[0].components["adapters"], 2 * trainable)
        let step = gpu.points.first { $0.phase.hasPrefix("optimizer step") }!
        XCTAssertEqual(step.phase, "optimizer step (AdamW, fused)")
        XCTAssertEqual(step.components["gradients"], 2 * trainable)
        XCTAssertEqual(step.components["transient"], 2 * CUDASettings.workspaceBeforeHopper)
    }

    /// Liger's fused linear cross-entropy (`--loss liger`, from its source): no [tokens × vocab]
    /// fp32 logits or log-softmax; the head forward holds grad_input [T, H] and two bf16 logits
    /// chunks of C rows (C from ops/fused_linear_cross_entropy.py:66-70: llama-3.1-8b at 4,096
    /// tokens, ceil(128,256 / 4,096) = 32, next_power_of_2(128) = 128), and keeps grad_input.
    func testLigerLossHoldsTwoChunksAndTheInputGradient() throws {
        let t = o.tokens, h = a.hiddenSize, v = a.vocabSize
        XCTAssertEqual(StepTimeline.ligerChunkRows(tokens: t, vocab: v, hidden: h), 128)
        XCTAssertEqual(StepTimeline.ligerChunkRows(tokens: 8192, vocab: 128256, hidden: 2048), 256, "the spec's llama-3.2-1b example")
        let liger = try StepTimeline(model: a, options: o, stack: Stack(runtime: .cuda, loss: .liger))
        let full = try StepTimeline(model: a, options: o, stack: Stack(runtime: .cuda))
        let forward = liger.points.first { $0.phase.hasPrefix("head forward (Liger") }!
        let end = liger.points.first { $0.phase == "end of forward (loss)" }!
        // Transient at the head: the normed states, the shifted labels, loss_1d and the mask, two
        // logits chunks and one grad_logits·W chunk, beside the forward's cuBLAS workspace.
        let c = 128
        XCTAssertEqual(forward.components["transient"]! - end.components["transient"]!, 2 * t * h + 8 * t + 5 * t + 2 * 2 * c * v + 2 * c * h)
        // Kept from forward to backward: the final norm's fp32 input and 1/rms, grad_input.
        XCTAssertEqual(forward.components["activations"]! - liger.points.first { $0.phase.hasPrefix("head forward") == false && $0.phase.hasPrefix("forward layer 31") }!.components["activations"]!,
                       t * (4 * h + 4 + 2 * h))
        XCTAssertEqual(liger.headKeptBytesPerToken, 6 * h + 4)
        XCTAssertLessThan(liger.peakBytes + 4 * t * v, full.peakBytes, "at least the fp32 logits fewer")
        // Where it is not modelled, one line each.
        for (stack, words) in [(Stack(loss: .liger), "--runtime cuda"), (Stack(recipe: .trl, runtime: .cuda, loss: .liger), "brings its own loss"),
                               (Stack(recipe: .unsloth, runtime: .cuda, loss: .liger), "brings its own loss")] {
            XCTAssertThrowsError(try stack.validate()) { XCTAssertTrue("\($0)".contains(words), "\($0)") }
        }
        var trainsHead = o
        trainsHead.modulesToSave = ["lm_head"]
        XCTAssertThrowsError(try StepTimeline(model: a, options: trainsHead, stack: Stack(runtime: .cuda, loss: .liger))) { XCTAssertTrue("\($0)".contains("frozen lm_head")) }
        let moe = ModelArchitecture.preset("qwen3-30b-a3b")!
        XCTAssertThrowsError(try StepTimeline(model: moe, options: o, stack: Stack(runtime: .cuda, loss: .liger))) { XCTAssertTrue("\($0)".contains("dense models")) }
    }

    /// flash-attn's mha_bwd: dq_accum fp32 [b, round_up(s, 128), heads, round_up(d, 32)], and dk,
    /// dv expanded to the query heads under grouped-query attention (llama-3.1-8b: 32 heads, 8
    /// key/value heads, head_dim 128).
    func testFlashAttentionBackwardScratch() throws {
        var q = o
        q.seqLen = 1000
        XCTAssertEqual(StepTimeline.flashBackwardScratchBytes(a, q), 4 * 1024 * 32 * 128 + 2 * 2 * 1000 * 32 * 128)
        let mha = ModelArchitecture.preset("llama-2-7b")!
        XCTAssertEqual(StepTimeline.flashBackwardScratchBytes(mha, q), 4 * 1024 * 32 * 128)
        let sdpa = try StepTimeline(model: a, options: o, stack: Stack(recipe: .peftKbit, runtime: .cuda))
        let fa2 = try StepTimeline(model: a, options: o, stack: Stack(recipe: .peftKbit, runtime: .cuda, attention: .flashAttention2))
        XCTAssertEqual(sdpa.peakBytes, fa2.peakBytes, "SDPA's flash kernel on CUDA is flash-attn 2's code")
        // The scratch is there while a layer is recomputed, on CUDA only.
        let cpu = try StepTimeline(model: a, options: o, stack: Stack(recipe: .peftKbit))
        func recompute(_ t: StepTimeline) -> Int { t.points.first { $0.phase.hasPrefix("backward layer 31") }!.components["transient"]! }
        XCTAssertEqual(recompute(sdpa) - recompute(cpu), 2 * CUDASettings.workspaceBeforeHopper + StepTimeline.flashBackwardScratchBytes(a, o))
        // In the kbit recipe flash-attn gets bf16 copies of the fp32 q, k, v and gives a bf16
        // output, which o_proj's fp32 adapter copies: 4·kv per token less than SDPA's fp32 set.
        let kbitSDPA = StepTimeline.layerTerms(a, o, stack: Stack(recipe: .peftKbit), first: false).reduce(0, +)
        let kbitFA2 = StepTimeline.layerTerms(a, o, stack: Stack(recipe: .peftKbit, runtime: .cuda, attention: .flashAttention2), first: false).reduce(0, +)
        XCTAssertEqual(kbitSDPA - kbitFA2, 4 * 1024)
    }

    /// Eager attention keeps the probabilities: heads × seq per token more than SDPA, 6 B each in
    /// the bf16 stream (fp32 softmax and its bf16 cast), 4 B in the kbit recipe's fp32 stream.
    func testEagerKeepsTheProbabilities() throws {
        var q = o
        q.gradientCheckpointing = false
        q.seqLen = 512
        let sdpa = StepTimeline.layerTerms(a, q, stack: Stack(), first: false).reduce(0, +)
        let eager = StepTimeline.layerTerms(a, q, stack: Stack(attention: .eager), first: false).reduce(0, +)
        // k and v repeated to 32 heads (2·4096 each instead of 2·1024), no output or log-sum-exp kept.
        XCTAssertEqual(eager - sdpa, 6 * 32 * 512 + 2 * 2 * (4096 - 1024) - 2 * 4096 - 4 * 32)
    }

    func testStacksThatDoNotExist() {
        XCTAssertThrowsError(try StepTimeline(model: a, options: o, stack: Stack(attention: .flashAttention2)))
        XCTAssertThrowsError(try StepTimeline(model: a, options: o, stack: Stack(recipe: .trl, transformers: .v4_46)))
        XCTAssertThrowsError(try StepTimeline(model: a, options: MemoryOptions(method: .lora), stack: Stack(recipe: .trl)))
        XCTAssertThrowsError(try StepTimeline(model: a, options: o, stack: Stack(recipe: .unsloth, attention: .eager)))
    }
}
