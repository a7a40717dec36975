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

    public var recipe: Recipe = .peft
    public var runtime: Runtime = .cpu
    public var cuda = CUDASettings()

    public init(recipe: Recipe = .peft, runtime: Runtime = .cpu, cuda: CUDASettings = CUDASettings()) {
        (self.recipe, self.runtime, self.cuda) = (recipe, runtime, cuda)
    }

    /// What `qlora fit`, `qlora memory` and the claims answer for unless told otherwise.
    public static let `default` = Stack()

    /// The stack in words, for every answer's heading.
    public var description: String {
        let r: String
        switch recipe {
        case .peft: r = "recipe peft: transformers 5.x + PEFT get_peft_model + bitsandbytes, SDPA attention"
        case .peftKbit: r = "recipe peft-kbit: transformers 5.x + PEFT prepare_model_for_kbit_training + get_peft_model + bitsandbytes, SDPA attention"
        case .unsloth: r = "recipe unsloth: Unsloth's step from its source (not measured)"
        }
        switch runtime {
        case .cpu: return r + "; runtime cpu: live tensor bytes"
        case .cuda: return r + "; runtime cuda: " + cuda.description
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
