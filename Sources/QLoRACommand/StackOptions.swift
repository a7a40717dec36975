import ArgumentParser
import Memory

/// The stack a memory answer is for (`Stack`): `qlora memory` and `qlora fit` take the same options.
struct StackOptions: ParsableArguments {
    @Option(help: "Whose step: peft (get_peft_model), peft-kbit (prepare_model_for_kbit_training first, as the PEFT docs and the QLoRA paper call it), trl (TRL 1.16's SFTTrainer: bf16 adapters, fused AdamW, its fused LM head), or unsloth (from Unsloth's source, not measured).")
    var recipe: Stack.Recipe = .peft
    @Option(help: "transformers' attention: sdpa, eager (keeps the attention probabilities), or flash_attention_2 (CUDA only).")
    var attention: Stack.Attention = .sdpa
    @Option(help: ArgumentHelp("The transformers release whose head and loss are modelled: 5 (any 5.x) or 4.46 to 4.48 (copies the shifted logits when batch > 1, repeats k and v before SDPA); 4.49 to 4.57 are not modelled.", valueName: "version"))
    var transformers: String = "5"
    @Option(help: "The head and loss: transformers (the logits and their fp32 log-softmax) or liger (Liger's fused linear cross-entropy from its source, not measured; needs --runtime cuda and the peft or peft-kbit recipe).")
    var loss: Stack.Loss = .transformers
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
        guard let release = Stack.Transformers(release: transformers) else {
            throw ValidationError("--transformers \(transformers) is not modelled: 4.46 to 4.48 (the shifted-logits copy) and 5.x are; "
                                  + "4.49 to 4.57 pad the labels as 5.x does but still repeat k and v for SDPA, which no measurement here covers")
        }
        let stack = Stack(recipe: recipe, runtime: runtime, cuda: cuda, attention: attention, transformers: release, loss: loss)
        do { try stack.validate() } catch { throw ValidationError("\(error)") }
        return stack
    }
}

extension Stack.Recipe: ExpressibleByArgument {}
extension Stack.Runtime: ExpressibleByArgument {}
extension Stack.Attention: ExpressibleByArgument {}
extension Stack.Loss: ExpressibleByArgument {}

