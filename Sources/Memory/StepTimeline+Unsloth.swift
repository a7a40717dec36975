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
