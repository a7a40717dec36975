import Foundation

/// The software a training step runs on, as far as it decides the step's memory: whose recipe
/// wraps the model (which tensors exist, in which dtype, when) and whose runtime holds them (live
/// tensor bytes, or CUDA with its context, cuBLAS workspaces and caching allocator). Every answer
/// of `qlora memory`, `qlora fit`, `qlora claims` and `qlora report` names the stack it is for.
public struct Stack: Sendable, Codable, Equatable {
    /// Whose step: the recipe decides what is kept, where and when.
    public enum Recipe: String, Sendable, Codable, CaseIterable {
        /// transformers + PEFT's `get_peft_model` + bitsandbytes: measured
        /// (Vectors/memory/peaks.json).
        case peft
        /// The PEFT docs' and the QLoRA paper's recipe: `prepare_model_for_kbit_training` (every
        /// parameter that is not 4-bit cast to fp32, so the embedding's output and the whole
        /// residual stream are fp32; checkpointing on with torch's default, reentrant), then
        /// `get_peft_model`: measured (peaks.json's `-peft-kbit` rows).
        case peftKbit = "peft-kbit"
        /// TRL 1.16's `SFTTrainer` (trl/trainer/sft_trainer.py): `get_peft_model`, the adapters
        /// cast to bf16 on a quantized model, bf16 autocast, the Trainer's fused AdamW (states in
        /// the adapters' bf16), and TRL's fused LM head (`add_fused_lm_head`,
        /// trl/kernels/chunked_logprob.py): no logits kept, the vocabulary projected in tiles of
        /// 4,096 tokens × 32,768 entries; on CUDA its Triton kernels work on the tile in place,
        /// elsewhere seven fp32 copies of a tile: measured on CPU (peaks.json's `-trl` rows).
        case trl
        /// Unsloth's QLoRA step as its source lays it out (`StepTimeline+Unsloth.swift`): not
        /// measured, Unsloth runs only on CUDA with Triton.
        case unsloth
    }

    /// Where the tensors live.
    public enum Runtime: String, Sendable, Codable, CaseIterable {
        /// Live tensor bytes, as the CPU stack holds them (what peaks.json measures).
        case cpu
        /// CUDA: the same step's allocations through PyTorch's caching allocator
        /// (`CUDACachingAllocator`), its cuBLAS workspaces, AdamW's foreach path, and the CUDA
        /// context outside the allocator (`CUDASettings`).
        case cuda
    }

    /// transformers' attention implementation (`attn_implementation`).
    public enum Attention: String, Sendable, Codable, CaseIterable {
        /// torch's scaled_dot_product_attention: keeps q, k, v, the output and an fp32
        /// log-sum-exp per head (measured: every peaks.json row without a suffix).
        case sdpa
        /// transformers' `eager_attention_forward`: keeps the fp32 softmax of the scores and its
        /// cast to the stream's dtype, heads × sequence per token (measured: the `-eager` rows).
        case eager
        /// flash-attn 2 (`flash_attention_2`, CUDA only): keeps what SDPA's flash kernel keeps;
        /// its backward allocates an fp32 dq accumulator and, for grouped-query attention, dk and
        /// dv expanded to every query head (flash-attn's csrc/flash_attn/flash_api.cpp `mha_bwd`).
        case flashAttention2 = "flash_attention_2"
    }

    /// The transformers release whose head and loss the step follows.
    public enum Transformers: String, Sendable, Codable, CaseIterable {
        /// 4.46 to 4.48: `ForCausalLMLoss` upcasts the logits to fp32 and copies
        /// `shift_logits = logits[..., :-1, :].contiguous()`, a copy only when batch > 1 (4.49
        /// pads the labels instead, as 5.x does); SDPA gets k and v repeated to every query head
        /// (measured: peaks.json's `-tf4.46` rows, transformers 4.46.3).
        case v4_46 = "4.46"
        /// 5.x: the labels are padded and shifted instead, the logits are not copied (measured:
        /// every other row, transformers 5.23).
        case v5 = "5"

        /// The modelled behaviour of a release number: "4.46" to "4.48.x" are 4.46's (read from
        /// each release's transformers/loss/loss_utils.py); "5", "5.x" or any 5.y.z are 5's.
        /// Other releases are not modelled: nil (4.49 to 4.57 pad the labels as 5.x does but still
        /// repeat k and v for SDPA, a mixture no measurement here covers).
        public init?(release text: String) {
            if let exact = Transformers(rawValue: text) { self = exact; return }
            let parts = text.split(separator: ".", omittingEmptySubsequences: false)
            guard let major = parts.first.flatMap({ Int($0) }) else { return nil }
            if major == 5 && (parts.count == 1 || parts[1] == "x" || Int(parts[1]) != nil) { self = .v5; return }
            guard major == 4, parts.count >= 2, let minor = Int(parts[1]), (46...48).contains(minor) else { return nil }
            self = .v4_46
        }
    }

    /// The head and loss the step runs.
    public enum Loss: String, Sendable, Codable, CaseIterable {
        /// transformers' lm_head and `ForCausalLMLoss`: [tokens × vocab] logits, their fp32 upcast
        /// and log-softmax (measured, every peaks.json row).
        case transformers
        /// Liger's fused linear cross-entropy (`apply_liger_kernel_to_llama(fused_linear_cross_entropy=True,
        /// rms_norm=False, swiglu=False, rope=False)`: the head and loss only), from its source
        /// (linkedin/Liger-Kernel ead96b61, src/liger_kernel/ops/fused_linear_cross_entropy.py),
        /// not measured: its Triton kernels run on CUDA. `StepTimeline.ligerChunkRows`.
        case liger
    }

    public var recipe: Recipe = .peft
    public var runtime: Runtime = .cpu
    public var cuda = CUDASettings()
    public var attention: Attention = .sdpa
    public var transformers: Transformers = .v5
    public var loss: Loss = .transformers

    public init(recipe: Recipe = .peft, runtime: Runtime = .cpu, cuda: CUDASettings = CUDASettings(),
                attention: Attention = .sdpa, transformers: Transformers = .v5, loss: Loss = .transformers) {
        (self.recipe, self.runtime, self.cuda, self.attention, self.transformers) = (recipe, runtime, cuda, attention, transformers)
        self.loss = loss
    }

    /// A stack that does not exist: one line naming the options.
    public func validate() throws {
        if attention == .flashAttention2 && runtime != .cuda {
            throw MemoryError.badOption("--attention flash_attention_2 runs only on CUDA: add --runtime cuda")
        }
        if recipe == .trl && transformers == .v4_46 {
            throw MemoryError.badOption("--recipe trl models TRL 1.16, which needs transformers 4.56 or later: drop --transformers 4.46")
        }
        if loss == .liger {
            guard recipe == .peft || recipe == .peftKbit else {
                throw MemoryError.badOption("--loss liger models Liger's loss in the Hugging Face recipes peft and peft-kbit; --recipe \(recipe.rawValue) brings its own loss")
            }
            guard runtime == .cuda else { throw MemoryError.badOption("--loss liger runs Triton kernels on a GPU: add --runtime cuda") }
            guard transformers == .v5 else { throw MemoryError.badOption("--loss liger is modelled with transformers 5's label shift: drop --transformers 4.46") }
        }
        if recipe == .unsloth && (attention != .sdpa || transformers != .v5) {
            throw MemoryError.badOption("--recipe unsloth brings its own attention and loss: --attention and --transformers describe the Hugging Face recipes")
        }
    }

    /// What `qlora fit`, `qlora memory` and the claims answer for unless told otherwise.
    public static let `default` = Stack()

    /// The stack in words, for every answer's heading.
    public var description: String {
        let tf = transformers == .v5 ? "transformers 5.x" : "transformers 4.46–4.48"
        let attn = ", " + [Attention.sdpa: "SDPA", .eager: "eager", .flashAttention2: "FlashAttention-2"][attention]! + " attention"
        let r: String
        switch recipe {
        case .peft: r = "recipe peft: \(tf) + PEFT get_peft_model + bitsandbytes" + attn
        case .peftKbit: r = "recipe peft-kbit: \(tf) + PEFT prepare_model_for_kbit_training + get_peft_model + bitsandbytes" + attn
        case .trl: r = "recipe trl: TRL 1.16 SFTTrainer (bf16 adapters and autocast, fused AdamW, fused LM head) + \(tf) + PEFT + bitsandbytes" + attn
        case .unsloth: r = "recipe unsloth: Unsloth's step from its source (not measured)"
        }
        let head = loss == .liger ? ", Liger's fused linear cross-entropy (from its source, not measured)" : ""
        switch runtime {
        case .cpu: return r + head + "; runtime cpu: live tensor bytes"
        case .cuda: return r + head + "; runtime cuda: " + cuda.description
        }
    }
}

/// What CUDA adds to a step's tensors.
public struct CUDASettings: Sendable, Codable, Equatable {
    /// The CUDA context, outside the caching allocator: "around 400MB if CUDA >= 11.7 is used and
    /// lazy module loading enabled (default in PyTorch)" (PyTorch's maintainer ptrblck,
    /// pytorch/pytorch#109888; torch sets CUDA_MODULE_LOADING=LAZY in `CUDAHooks::initCUDA`).
    /// Not measured here: `Vectors/generate_peaks_cuda.py` records it where a GPU is at hand.
    public var contextBytes = 400 << 20
    /// One cuBLAS workspace (aten/src/ATen/cuda/CublasHandlePool.cpp, `getChosenWorkspaceSize`:
    /// ":4096:2:16:8 default, 32MiB for Hopper"), allocated through the caching allocator on a
    /// thread's first matmul and kept: one for the forward's thread and one for the autograd
    /// engine's device thread.
    public var cublasWorkspaceBytes = CUDASettings.workspaceBeforeHopper
    /// `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`.
    public var expandableSegments = false

    /// 4096 KiB × 2 + 16 KiB × 8, before Hopper.
    public static let workspaceBeforeHopper = 4096 * 1024 * 2 + 16 * 1024 * 8
    /// 4096 KiB × 8 on Hopper (sm90).
    public static let workspaceHopper = 4096 * 8 * 1024

    public init(contextBytes: Int = 400 << 20, cublasWorkspaceBytes: Int = CUDASettings.workspaceBeforeHopper, expandableSegments: Bool = false) {
        (self.contextBytes, self.cublasWorkspaceBytes, self.expandableSegments) = (contextBytes, cublasWorkspaceBytes, expandableSegments)
    }

    public var description: String {
        String(format: "PyTorch's caching allocator%@, %.0f MiB CUDA context, %.3f MiB cuBLAS workspaces (×2)",
               expandableSegments ? " with expandable segments" : "", Double(contextBytes) / 1048576, Double(cublasWorkspaceBytes) / 1048576)
    }
}
