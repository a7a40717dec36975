import ArgumentParser
import Memory

/// The stack a memory answer is for (`Stack`): `qlora memory` and `qlora fit` take the same options.
struct StackOptions: ParsableArguments {
    @Option(help: "Whose step: peft (get_peft_model), peft-kbit (prepare_model_for_kbit_training first, as the PEFT docs and the QLoRA paper call it), or unsloth (from Unsloth's source, not measured).")
    var recipe: Stack.Recipe = .peft
    @Option(help: "cpu (live tensor bytes) or cuda (the same step through PyTorch's caching allocator, with cuBLAS workspaces, AdamW's foreach temporaries and the CUDA context).")
    var runtime: Stack.Runtime = .cpu
    @Flag(help: "With --runtime cuda: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.") var expandableSegments = false
    @Option(help: ArgumentHelp("With --runtime cuda: the CUDA context's size (default 400MiB, PyTorch's maintainers' figure for CUDA >= 11.7 with lazy loading).", valueName: "size"))
    var cudaContext: String?
    @Option(help: "With --runtime cuda: the GPU generation, for cuBLAS's workspace: ampere (and earlier, 8.125 MiB) or hopper (32 MiB).")
    var gpuArch: GPUArch = .ampere

    enum GPUArch: String, ExpressibleByArgument, CaseIterable { case ampere, hopper }

    func validate() throws {
        if runtime == .cpu && (expandableSegments || cudaContext != nil || gpuArch != .ampere) {
            throw ValidationError("--expandable-segments, --cuda-context and --gpu-arch describe --runtime cuda")
        }
    }

    func stack() throws -> Stack {
        var cuda = CUDASettings(cublasWorkspaceBytes: gpuArch == .hopper ? CUDASettings.workspaceHopper : CUDASettings.workspaceBeforeHopper,
                                expandableSegments: expandableSegments)
        if let c = cudaContext {
            do { cuda.contextBytes = try parseByteSize(c) } catch { throw ValidationError("--cuda-context: \(error)") }
        }
        return Stack(recipe: recipe, runtime: runtime, cuda: cuda)
    }
}

extension Stack.Recipe: ExpressibleByArgument {}
extension Stack.Runtime: ExpressibleByArgument {}
