import QLoRA

/// Unsloth's QLoRA step, as its source lays it out (unslothai/unsloth, unsloth/kernels and
/// unsloth/models/llama.py; unslothai/unsloth-zoo for the offloaded checkpointer), not measured:
/// Unsloth runs only on CUDA (Triton kernels, bitsandbytes' CUDA dequantize), so no step of it
/// runs here. Per token unless said, Llama's layer layout:
/// - `use_gradient_checkpointing="unsloth"` copies each decoder layer's bf16 input (2h) to host
///   memory in the forward and back in the backward: the device keeps no checkpoints, the host
///   keeps 2h per layer;
/// - recomputing a layer keeps what its autograd functions save: fast_rms_layernorm's input and
///   fp32 1/rms twice (2h + 4 each), LoRA_QKV's input (2h), the attention's q, k, v, output and
///   fp32 log-sum-exp (4q + 4kv + 4·heads), o_proj's LoRA_W input (the attention output, shared),
///   LoRA_MLP's input, gate and up outputs (2h + 4i): `8h + 4q + 4kv + 4i + 4·heads + 8`; with
///   the gradients in flight (dY and dX, 4h; the down projection's input gradient, 2i, which the
///   backward overwrites in place into e and g) and fast_dequantize's bf16 weight;
/// - the head (Fast_CrossEntropyLoss, unsloth/kernels/cross_entropy_loss.py) keeps the bf16 logits
///   (2V) and an fp32 log-sum-exp per row, with the final norm's input and 1/rms and lm_head's
///   bf16 input (4h + 4) and the int64 labels (8); its backward writes the logits' gradient into
///   the logits in place: no fp32 logits, no fp32 gradient;
/// - the forward runs each layer without keeping anything (checkpointed), its largest moment the
///   MLP's gate, up and activation (6i) beside its input and output (4h).
/// Later Unsloth (unsloth-zoo's fused_losses) computes the loss in chunks whose fp32 logits are
/// capped at min(half the free GPU memory, 4 GiB): its head then depends on the GPU, not only on
/// the step; this recipe is the Fast_CrossEntropyLoss one. CUDA's context and allocator are
/// outside it, as for every recipe.
extension StepTimeline {
    /// Bytes per token a recomputed Unsloth layer keeps (the list above).
    public static func unslothLayerBytesPerToken(_ a: ModelArchitecture) -> Int {
        8 * a.hiddenSize + 4 * a.queryDim + 4 * a.keyValueDim + 4 * a.intermediateSize + 4 * a.attentionHeads + 8
    }

    /// Bytes per token Unsloth's head keeps from its forward to its backward.
    public static func unslothHeadBytesPerToken(_ a: ModelArchitecture) -> Int { 2 * a.vocabSize + 4 + 4 * a.hiddenSize + 4 + 8 }

    init(unsloth a: ModelArchitecture, options o: MemoryOptions, firstStep: Bool, stack: Stack) throws {
        guard o.isLoRA else { throw MemoryError.badOption("the unsloth recipe models LoRA and QLoRA steps, not full fine-tuning") }
        let held = try Held(a, o, stack: stack)
        let t = o.tokens, h = a.hiddenSize, i = a.intermediateSize
        let layer = Self.unslothLayerBytesPerToken(a), head = Self.unslothHeadBytesPerToken(a)
        var s = StepTrace()
        held.begin(&s, firstStep: firstStep)
        let rope = s.alloc(4 * a.headDim * t, .activations)
        for l in 0..<a.layers {
            // Nothing stays: the layer's input goes to host memory; its MLP is its largest moment.
            let mlp = s.alloc(t * (4 * h + 6 * i), .transient)
            held.dequantizeEach(into: &s, layer: l, mark: "forward layer \(l) (input offloaded to host)")
            s.free(mlp)
        }
        let headKept = s.alloc(t * head, .activations)
        s.mark("head forward (bf16 logits, log-sum-exp)")
        held.cublasWorkspace(&s)   // the autograd thread's
        let dx = s.alloc(t * 2 * h, .transient)
        s.mark("head backward (the logits' gradient in place)")
        s.free([dx, headKept])
        var gradients: [StepTrace.Tensor] = []
        for l in (0..<a.layers).reversed() {
            gradients += s.alloc(held.layerGradientSizes(layer: l), .gradients)
            let again = s.alloc(t * (2 * h + layer + 4 * h + 2 * i), .transient)
            held.dequantizeEach(into: &s, layer: l, mark: "backward layer \(l) (input back from host, recompute)")
            s.free(again)
        }
        s.free(rope)
        held.optimizerStep(&s, firstStep: firstStep, gradients: gradients)
        self.stack = stack
        trace = s
        points = s.points
        peakIndex = Self.peakIndex(points)
        keptBytesPerToken = 4 * a.headDim + head
        headKeptBytesPerToken = head
        hostBytes = a.layers * t * 2 * h
    }
}

/// Unsloth on a mixture of experts (Qwen3-MoE, Mixtral; unslothai/unsloth 015bdef,
/// unslothai/unsloth-zoo ce232d6), as its source lays it out, not measured: its MoE path needs
/// CUDA (torch's grouped_mm, the offloaded checkpointer's pinned buffers). Run on CPU with its
/// device checks stubbed it takes another path (a dequantize-then-loop backend), which confirmed
/// what the weights hold and the head's tensors below but not the CUDA step. Per token unless said:
/// - FastLanguageModel sends these models to FastBaseModel (unsloth/models/loader.py), so the
///   attention, norms and LoRA run as transformers' and PEFT's modules (unsloth-zoo's compiled
///   `lora_forward` saves what PEFT's does): the peft recipe's measured attention terms;
/// - the experts are quantized at load, each projection's stack one NF4 Params4bit with double
///   quant (moe_utils_bnb4bit.py `Bnb4bitQuantize.convert`): the bytes `--experts nf4` holds (seen
///   on CPU to the byte); the router stays bf16. (Unsloth maps Mixtral-8x7B to its prequantized
///   repo, whose stacked absmax is fp32 without double quant, about 0.05 B more per expert
///   weight: not counted, this is the on-the-fly quantization of the bf16 checkpoint.)
/// - grouped_mm with the expert weights recomputed in backward (moe_utils.py
///   `_GroupedMMRecompute` keeps only the offsets): a projection's whole stack dequantized to
///   bf16 in the forward and again in the backward, one at a time, gate_up's [experts, 2i, h]
///   the largest;
/// - targets as Unsloth resolves them: the MLP's names (`--targets all`) adapt the experts too;
/// - per routed row kept for backward (`forward_native_grouped_mm`): gate_up's output (4i),
///   silu(gate) (2i), the down projection's input (2i), the routing weight and the int64 sorted
///   and token indices (20); with LoRA on the experts (PEFT's target_parameters, which Unsloth adds
///   when the targets name the MLP) also the gathered input (2h) and both LoRA intermediates
///   (4r), and per layer bf16 casts of A and B; the router as transformers' keeps it;
/// - `use_gradient_checkpointing="unsloth"` offloads each layer's input to host memory (2h per
///   layer); the device keeps none;
/// - the loss: unsloth_fused_ce_loss (unsloth_zoo/fused_losses, installed into the model's forward
///   at import) computes the head's gradient in the forward, chunk by chunk: a chunk's bf16
///   logits, their fp32 copy, log-softmax and its gradient (14 B per row and vocabulary entry,
///   eager; torch.compile may fuse some away), chunks from `get_chunk_size` at its cap of 4 GiB of
///   fp32 logits (half the free GPU memory when less is free), the hidden states' gradient and
///   the final norm's input kept to the backward (6h + 4, seen on CPU).
extension StepTimeline {
    /// Why Unsloth's step on this mixture of experts is not modelled, or nil.
    static func unslothExpertProblem(_ x: ModelArchitecture.Experts) -> String? {
        switch x.family {
        case .qwen3MoE, .mixtral: return nil
        // Read from source (unsloth 015bdef, unsloth-zoo ce232d6): mapper.py sends gpt-oss-20b to
        // unsloth/gpt-oss-20b-unsloth-bnb-4bit, vision.py passes no BitsAndBytesConfig for it, so
        // double quant, blocksize and the modules left 16-bit come from that repo's config.json;
        // and its expert forward returns fp32 into the residual stream (gpt_oss.py), which no
        // transformers cast undoes, so every later layer's activations are fp32.
        case .gptOSS: return "Unsloth loads gpt-oss from its prequantized unsloth/gpt-oss-20b-unsloth-bnb-4bit into per-expert Linear4bit modules "
            + "(unsloth-zoo's GptOssExpertsBnb4bit) with that repo's own quantization config (double quant, blocksize, modules left 16-bit), "
            + "which no source read here holds, and an expert forward that turns the residual stream fp32: not modelled"
        case .llama4: return "Unsloth has no Llama 4 mixture-of-experts path (no Llama4TextExperts patch in unsloth or unsloth-zoo): its 4-bit load leaves torch.bmm on quantized experts"
        }
    }

    /// Bytes one chunk of unsloth_fused_ce_loss holds at once: rows = tokens / chunks, chunks the
    /// smallest multiple of 4 keeping a chunk's fp32 logits within 4 GiB (one chunk when all fit).
    public static func unslothFusedLossChunkBytes(tokens t: Int, vocab v: Int) -> Int {
        let cap = 4 << 30, logits = 4 * t * v
        let chunks = logits <= cap ? 1 : (logits + 4 * cap - 1) / (4 * cap) * 4
        return 14 * ((t + chunks - 1) / chunks) * v
    }

    init(unslothExperts a: ModelArchitecture, options given: MemoryOptions, firstStep: Bool, stack: Stack) throws {
        guard given.method == .qlora else { throw MemoryError.badOption("the unsloth recipe on a mixture of experts models its QLoRA step (--method qlora)") }
        guard let x = a.experts else { preconditionFailure("a mixture of experts") }
        if let problem = Self.unslothExpertProblem(x) { throw MemoryError.badOption("\(a.name): \(problem)") }
        guard given.experts == .nf4 else {
            throw MemoryError.badOption("Unsloth quantizes a mixture of experts' experts as it loads them: --experts nf4 (the default with --recipe unsloth)")
        }
        if given.targets.contains("router") {
            throw MemoryError.badOption("Unsloth adapts no router (unsloth/models/_utils.py `get_moe_target_modules`): --targets attention,experts")
        }
        guard !given.dora && given.modulesToSave.isEmpty else { throw MemoryError.badOption("the unsloth recipe on a mixture of experts is modelled without DoRA and modules_to_save") }
        var o = given
        o.quantizedExpertLoRA = true
        // Unsloth's get_moe_target_parameters (unsloth/models/_utils.py): the MLP's names in the
        // targets put the experts' fused parameters in PEFT's target_parameters (gate_proj or
        // up_proj the gate_up_proj, down_proj the down_proj), so `--targets all` trains them.
        let mlpNames = Set(o.targets).intersection(ModelArchitecture.mlpProjections)
        if !mlpNames.isEmpty && !o.targets.contains("experts") {
            guard mlpNames.contains("down_proj") && mlpNames.count >= 2 else {
                throw MemoryError.badOption("Unsloth would adapt only the experts' \(mlpNames.contains("down_proj") ? "down_proj" : "gate_up_proj") for these targets: "
                                            + "modelled are both (gate_proj, up_proj and down_proj, or experts) or neither (--targets attention)")
            }
            o.targets.append("experts")
        }
        let held = try Held(a, o, stack: stack)
        let t = o.tokens, h = a.hiddenSize, r = o.rank, (e, k, i) = (x.count, x.perToken, x.intermediateSize)
        let peft = Stack(recipe: .peft)
        let trainsExperts = o.targets.contains("experts")
        // What a recomputed layer keeps per token: the peft recipe's terms with its experts' swapped for Unsloth's.
        func layerBytes(_ l: Int) -> Int {
            let all = Self.layerTerms(a, o, stack: peft, layer: l, first: l == 0).reduce(0, +)
            guard a.isSparse(layer: l) else { return all }
            let transformers = MemoryEstimate.expertTermsPerToken(a, o).reduce(0, +)
            let router = 4 * e + 8 * k + (x.normalizesTopK ? 4 + 4 * k : 0)
            return all - transformers + router + k * (8 * i + 20) + (trainsExperts ? k * (2 * h + 4 * r) : 0)
        }
        let gateUpStack = 2 * e * 2 * i * h
        let loraCasts = trainsExperts ? 2 * e * r * (h + 2 * i) + 2 * e * r * (i + h) : 0
        var s = StepTrace()
        held.begin(&s, firstStep: firstStep)
        let rope = s.alloc(4 * a.headDim * t, .activations)
        for l in 0..<a.layers {
            // Nothing stays: the layer's input goes to host memory.
            let sparse = a.isSparse(layer: l)
            let moment = s.alloc(t * 4 * h + (sparse ? t * k * (2 * h + 6 * i) + gateUpStack : 6 * a.intermediateSize * t), .transient)
            held.dequantizeEach(into: &s, layer: l, mark: "forward layer \(l) (input offloaded to host\(sparse ? "; gate_up's experts dequantized to bf16" : ""))")
            s.free(moment)
        }
        let headKept = s.alloc(t * (6 * h + 4), .activations)
        let chunk = s.alloc(Self.unslothFusedLossChunkBytes(tokens: t, vocab: a.vocabSize), .transient)
        s.mark("head forward (fused loss: a chunk's logits and their gradient)")
        s.free(chunk)
        held.cublasWorkspace(&s)   // the autograd thread's
        var gradients: [StepTrace.Tensor] = []
        for l in (0..<a.layers).reversed() {
            gradients += s.alloc(held.layerGradientSizes(layer: l), .gradients)
            let sparse = a.isSparse(layer: l)
            let again = s.alloc(t * (2 * h + layerBytes(l) + 4 * h) + (sparse ? loraCasts : 0), .transient)
            if sparse {
                let w = s.alloc(gateUpStack, .transient)
                s.mark("backward layer \(l) (input back from host, recompute; gate_up's experts dequantized to bf16)")
                s.free(w)
            }
            held.dequantizeEach(into: &s, layer: l, mark: "backward layer \(l) (input back from host, recompute)")
            s.free(again)
        }
        s.free([rope, headKept])
        held.optimizerStep(&s, firstStep: firstStep, gradients: gradients)
        self.stack = stack
        trace = s
        points = s.points
        peakIndex = Self.peakIndex(points)
        keptBytesPerToken = 4 * a.headDim + 6 * h + 4
        headKeptBytesPerToken = 6 * h + 4
        hostBytes = a.layers * t * 2 * h
    }
}
