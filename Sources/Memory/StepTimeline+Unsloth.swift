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

    init(unsloth a: ModelArchitecture, options o: MemoryOptions, firstStep: Bool) throws {
        guard o.isLoRA else { throw MemoryError.badOption("the unsloth recipe models LoRA and QLoRA steps, not full fine-tuning") }
        let held = try Held(a, o)
        let t = o.tokens, h = a.hiddenSize, i = a.intermediateSize
        let layer = Self.unslothLayerBytesPerToken(a), head = Self.unslothHeadBytesPerToken(a)
        let rope = 4 * a.headDim
        var points: [Point] = []
        func add(_ phase: String, activations: Int, transient: Int = 0, gradients: Int = 0, states: Int? = nil) {
            points.append(held.point(phase, firstStep: firstStep, activations: activations, transient: transient, gradients: gradients, states: states))
        }
        add(firstStep ? "weights loaded" : "step begins (AdamW states held from earlier steps)", activations: 0)
        for l in 0..<a.layers {
            add("forward layer \(l) (input offloaded to host)", activations: rope * t, transient: t * (4 * h + 6 * i) + held.dequantized)
        }
        add("head forward (bf16 logits, log-sum-exp)", activations: rope * t + t * head, transient: 0)
        add("head backward (the logits' gradient in place)", activations: rope * t + t * head, transient: t * 2 * h)
        var gradients = 0
        for l in (0..<a.layers).reversed() {
            add("backward layer \(l) (input back from host, recompute)", activations: rope * t,
                transient: t * (2 * h + layer + 4 * h + 2 * i) + held.dequantized, gradients: gradients + held.perLayerGradients)
            gradients += held.perLayerGradients
        }
        add("optimizer step", activations: 0, transient: 2 * held.largestParameter, gradients: held.gradientBytes, states: held.stateBytes)
        add("end of step (zero_grad)", activations: 0, states: held.stateBytes)
        recipe = .unsloth
        self.points = points
        peakIndex = Self.peakIndex(points)
        keptBytesPerToken = rope + head
        headKeptBytesPerToken = head
        hostBytes = a.layers * t * 2 * h
    }
}
