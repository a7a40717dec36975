import Foundation
import QLoRA

/// One training step of transformers + PEFT + bitsandbytes, its live tensor bytes over time,
/// phase by phase: the weights, the forward layer by layer, the head (bf16 logits, their fp32
/// upcast and log-softmax, the logits' gradient), the backward layer by layer (with gradient
/// checkpointing, each layer's recompute and the dequantized bf16 weight of its 4-bit matmuls),
/// the optimizer step (torch AdamW's states and foreach temporaries) and the end of the step.
///
/// Every term is a measured fact of the real stack (`Vectors/memory/peaks.json`, made by
/// `Vectors/generate_peaks.py` on CPU with a live-tensor tracker; tests hold the peak of every
/// configuration there within 3% and the head's kept bytes within 1%), per token unless said:
/// - a decoder layer keeps `A = (4h+4) + Σ adapted (4·in + 4r) + (4q + 4kv) + 4·heads + (4h+4) + 6i`
///   (SDPA attention; PEFT copies each adapted module's input to fp32; the first layer's input
///   norm keeps nothing, its input being the frozen embedding's output); rope's cos and sin keep
///   4·head_dim once;
/// - the head keeps `4h + 4 + 4V + 8` (the final norm's fp32 input and 1/rms, the fp32
///   log-softmax, the shifted int64 labels); during its backward the fp32 gradient of the
///   log-softmax adds `8V - 8`: the step's peak without checkpointing;
/// - with checkpointing a layer keeps only its bf16 input (2h); recomputing a layer in backward
///   holds its activations again with the gradients in flight through it (A + 6h, the 6h fitted
///   to the measured grid), the dequantized bf16 weight of the largest 4-bit matmul and the LoRA
///   gradients: the peak at wide layers and short sequences;
/// - AdamW holds two moments per trainable parameter (fp32 for LoRA, the parameter's bf16 for a
///   bf16 full fine-tune) and 4 B of step per tensor; its foreach step adds temporaries of two of
///   the largest tensors.
///
/// The step is built as its allocations and frees in order (`StepTrace`); the points read it.
/// On the CPU runtime that is all; `onCUDA` replays the same trace through PyTorch's caching
/// allocator (with the CUDA runtime's cuBLAS workspaces and AdamW's foreach temporaries in the
/// trace, and the CUDA context beside it). Scratch inside kernels is not here.
public struct StepTimeline: Sendable {
    public typealias Recipe = Stack.Recipe

    /// One moment of the step: the live bytes, by component.
    public struct Point: Sendable, Codable {
        public var phase: String
        /// Bytes by component: weights, adapters, activations, transient, gradients, optimizer_states.
        public var components: [String: Int]
        public var bytes: Int { components.values.reduce(0, +) }
    }

    public static let componentOrder = ["weights", "adapters", "activations", "transient", "gradients", "optimizer_states"]

    public var recipe: Recipe { stack.recipe }
    public var points: [Point]
    public var peakIndex: Int
    public var peak: Point { points[peakIndex] }

    /// What autograd keeps per token at the end of the forward (the head included), and the head's part.
    public var keptBytesPerToken: Int
    public var headKeptBytesPerToken: Int
    /// Bytes the step keeps in host (CPU) memory rather than on the device: Unsloth's offloaded
    /// checkpoints.
    public var hostBytes = 0

    /// The allocations and frees of the step, in order (`StepTrace`): what the points read, and
    /// what `onCUDA` replays through PyTorch's caching allocator.
    public var trace: StepTrace
    /// The stack the step runs on.
    public var stack: Stack

    /// - Parameter firstStep: the first step of a run, before AdamW has states (what
    ///   peaks.json measures); otherwise a later step, which holds the states from the start
    ///   (what a run needs).
    public init(model a: ModelArchitecture, options o: MemoryOptions, firstStep: Bool = false, recipe: Recipe) throws {
        try self.init(model: a, options: o, firstStep: firstStep, stack: Stack(recipe: recipe))
    }

    public init(model a: ModelArchitecture, options o: MemoryOptions, firstStep: Bool = false, stack: Stack = .default) throws {
        try stack.validate()
        if stack.recipe == .unsloth && a.experts != nil {
            self = try StepTimeline(unslothExperts: a, options: o, firstStep: firstStep, stack: stack)
            return
        }
        if let problem = Self.unmeasuredExpertStep(a, o, stack: stack) { throw MemoryError.badOption("\(a.name): \(problem)") }
        if stack.recipe == .unsloth {
            self = try StepTimeline(unsloth: a, options: o, firstStep: firstStep, stack: stack)
            return
        }
        let kbit = stack.recipe == .peftKbit, trl = stack.recipe == .trl
        if (kbit || trl) && o.method != .qlora {
            throw MemoryError.badOption(kbit ? "the peft-kbit recipe prepares a 4-bit model (prepare_model_for_kbit_training): use --method qlora"
                                             : "the trl recipe models TRL's SFTTrainer on a 4-bit model: use --method qlora")
        }
        if o.dora && (stack.recipe != .peft || !o.isLoRA) {
            throw MemoryError.badOption("DoRA is modelled on the peft recipe's LoRA and QLoRA steps (measured: peaks.json's -dora rows)")
        }
        if !o.modulesToSave.isEmpty && (stack.recipe != .peft || !o.isLoRA) {
            throw MemoryError.badOption("modules_to_save is modelled on the peft recipe's LoRA and QLoRA steps (measured: peaks.json's -save rows)")
        }
        let trainsHead = o.modulesToSave.contains("lm_head"), trainsEmbedding = o.modulesToSave.contains("embed_tokens")
        if stack.loss == .liger {
            // Liger's MoE models run their own lce_forward (router aux loss); a trained lm_head takes
            // its grad_weight path (a [V, H] gradient and per-chunk fp32 copies), not modelled.
            if a.experts != nil { throw MemoryError.badOption("\(a.name): --loss liger is modelled for dense models, not Liger's mixture-of-experts forward") }
            if trainsHead { throw MemoryError.badOption("--loss liger is modelled with a frozen lm_head: drop lm_head from --modules-to-save") }
        }
        self.stack = stack
        let held = try Held(a, o, stack: stack)
        let t = o.tokens
        let h = a.hiddenSize, v = a.vocabSize
        let gc = o.gradientCheckpointing
        let cuda = stack.runtime == .cuda
        var s = StepTrace()
        // The stream's element size: bf16, or fp32 once prepare_model_for_kbit_training has cast
        // the embedding (and so the residual stream) to fp32.
        let e = kbit ? 4 : 2
        held.begin(&s, firstStep: firstStep)
        let start = s.liveBytes
        // Rope's cos and sin (bf16, fp32 with the kbit stream), kept by every layer's q and k:
        // one row per position, shared by the batch ([1, seq, head_dim]).
        let rope = s.alloc(o.seqLen * e * 2 * a.headDim, .activations)
        // With checkpointing: the position ids (int64, per position) and each layer's input, the
        // stream's dtype.
        let positions = gc ? s.alloc(8 * o.seqLen, .activations) : nil
        // Eager attention adds an explicit causal mask, [batch, 1, seq, seq] in the stream's dtype;
        // checkpointing keeps it as every layer's input (measured: the `-gc-eager` row; without
        // checkpointing it is gone by the end of the forward).
        // gpt-oss (attention sinks) has no SDPA path in transformers: it runs eager attention.
        let mask = gc && (stack.attention == .eager || a.attentionSinks) ? s.alloc(o.batch * o.seqLen * o.seqLen * e, .activations) : nil
        var layerKept: [[StepTrace.Tensor]] = []
        // A sparse layer's copies of its fused expert weights, kept for the backward.
        var expertCopies: [(gateUp: StepTrace.Tensor?, down: StepTrace.Tensor?)] = []
        for l in 0..<a.layers {
            // A trained embedding's output needs a gradient: the first layer keeps its input norm's.
            layerKept.append(gc ? [s.alloc(t * e * h, .activations)]
                             : s.alloc(Self.layerTerms(a, o, stack: stack, layer: l, first: l == 0 && !trainsEmbedding).map { t * $0 }, .activations))
            let experts = held.expertsForward(into: &s, layer: l, keep: !gc)
            layerKept[l] += experts.others
            expertCopies.append((experts.gateUp, experts.down))
            if o.dora {
                if !gc { layerKept[l].append(s.alloc(Self.doraKeptVectorBytes(a, o, first: l == 0), .activations)) }
                held.doraForward(into: &s, grad: !gc, mark: "forward layer \(l)")
            } else {
                held.dequantizeEach(into: &s, layer: l, mark: "forward layer \(l)")
            }
        }
        let kept: Int
        var headKept: [StepTrace.Tensor] = []
        var wholeGradients: [StepTrace.Tensor] = []
        // What transformers' final norm keeps for its backward: kbit, the last layer's fp32 output
        // is its input (kept here with checkpointing) and its fp32 1/rms; otherwise an fp32 copy
        // of its input and 1/rms.
        func keepFinalNorm() {
            if kbit {
                if gc { headKept.append(s.alloc(t * 4 * h, .activations)) }
                headKept.append(s.alloc(t * 4, .activations))                        // 1/rms
            } else {
                headKept += s.alloc([t * 4 * h, t * 4], .activations)              // fp32 input, 1/rms
            }
        }
        if trl {
            // TRL's fused LM head (trl/trainer/utils.py `add_fused_lm_head`, trl/kernels/
            // chunked_logprob.py `ChunkedLogProbFunction`): the final norm keeps its fp32 input and
            // 1/rms; the head saves its bf16 input (the normed hidden states without the last
            // position: a view at batch 1, a copy otherwise; on CUDA the rows with a label,
            // `hidden_states[mask]`) and per token a few scalars; no logits are kept. The
            // projection runs in tiles of n = min(tokens, 4,096) × c = min(V, 32,768) into one
            // bf16 buffer of n × 32,768.
            let shifted = t - o.batch
            let n = min(shifted, Self.trlTokenTile), c = min(v, Self.trlVocabularyTile)
            headKept += s.alloc([t * 4 * h, t * 4, shifted * 2 * h, t * Self.trlHeadScalarBytesPerToken, t * Self.routerAuxLossBytesPerToken(a)], .activations)
            let buffer = s.alloc(2 * n * Self.trlVocabularyTile, .transient)
            // Folding a tile into the running log-sum-exp (entropy and top-1 requested by
            // SFTTrainer): torch's fallback holds three fp32 tiles; Triton's kernel none.
            let fold = cuda ? nil : s.alloc(3 * 4 * n * c, .transient)
            s.mark("head forward (TRL's fused LM head: tiles of \(n) tokens × \(c) vocabulary entries, no logits kept)")
            if let fold { s.free(fold) }
            s.free(buffer)
            s.mark("end of forward (loss)")
            kept = s.liveBytes - start
            held.cublasWorkspace(&s)   // the autograd thread's
            // Backward: the fp32 gradient of the hidden states, the tile buffer again; per tile
            // (torch's fallback, `_backward_tile`) seven fp32 copies and a bool mask of the tile,
            // then `_addmm_fp32`'s fp32 copies of the tile and of the lm_head's rows of it; Triton
            // turns the tile into its gradient in place and cuBLAS accumulates in fp32
            // (`out_dtype`, torch >= 2.8).
            let gradHidden = s.alloc(shifted * 4 * h, .transient)
            let buffer2 = s.alloc(2 * n * Self.trlVocabularyTile, .transient)
            if cuda {
                s.mark("head backward (TRL's Triton kernel: the tile's gradient in place)")
            } else {
                let tile = s.alloc(29 * n * c, .transient)
                s.mark("head backward (a tile's fp32 log-probabilities and gradient)")
                s.free(tile)
                let addmm = s.alloc([4 * n * c, 4 * c * h], .transient)
                s.mark("head backward (fp32 copies of a tile and of its lm_head rows)")
                s.free(addmm)
            }
            s.free(buffer2)
            let bf16Gradient = s.alloc(shifted * 2 * h, .transient)
            s.free(gradHidden)
            s.free(bf16Gradient)
            s.free(headKept)
        } else if stack.loss == .liger {
            // Liger's fused linear cross-entropy (Liger-Kernel ead96b61; file:line below in
            // src/liger_kernel/): lce_forward passes the final norm's output whole (no shifted copy,
            // transformers/model/llama.py:95-98) and pads then shifts the int64 labels
            // (transformers/model/loss_utils.py:85-88). The forward (ops/fused_linear_cross_entropy.py)
            // allocates grad_input [T, H] in the input's dtype (:72), kept for backward (:429-435);
            // loss_1d fp32 and a bool mask per token (:86, :92); per chunk of C rows the logits
            // [C, V] in the input's dtype (:114), which the kernel turns into their gradient in
            // place (ops/cross_entropy.py:252), the previous chunk still referenced until :234 (two
            // chunks from the second on), and grad_logits·W [C, H] (:231). No fp32 logits, no
            // log-softmax. The backward scales grad_input in place (element_mul_kernel).
            let se = kbit ? 4 : 2, c = min(t, Self.ligerChunkRows(tokens: t, vocab: v, hidden: h))
            keepFinalNorm()
            let normed = s.alloc(t * se * h, .transient)
            let padded = s.alloc(8 * (o.seqLen + 1) * o.batch, .transient)
            let shiftedLabels = s.alloc(8 * t, .transient)
            s.free(padded)
            headKept.append(s.alloc(t * se * h, .activations))                      // grad_input
            let rows = s.alloc([4 * t, t], .transient)                              // loss_1d, target mask
            let chunks = s.alloc([se * c * v, t > c ? se * c * v : 0, se * c * h], .transient)
            s.mark("head forward (Liger's fused linear cross-entropy: chunks of \(c) tokens, the input's gradient computed in the forward)")
            s.free(chunks + rows + [shiftedLabels, normed])
            s.mark("end of forward (loss)")
            kept = s.liveBytes - start
            held.cublasWorkspace(&s)   // the autograd thread's
            s.free(headKept)
        } else {
            // The head. kbit: the last layer's fp32 output is the final norm's input (with
            // checkpointing it is kept here); the fp32 lm_head gives fp32 logits, no upcast. peft:
            // the final norm keeps an fp32 copy of its input; bf16 logits, their fp32 upcast.
            keepFinalNorm()
            // A trained lm_head's weight gradient needs its input: the final norm's bf16 output.
            if trainsHead { headKept.append(s.alloc(t * 2 * h, .activations)) }
            let normed = s.alloc(t * (kbit ? 4 : 2) * h, .transient)
            let logits = s.alloc(t * (kbit ? 4 : 2) * v, .transient)
            let upcast = kbit ? nil : s.alloc(t * 4 * v, .transient)
            // transformers 4.46's ForCausalLMLoss: shift_logits = logits[..., :-1, :].contiguous(),
            // a copy when batch > 1 (a view of a batch of one is already contiguous).
            let shiftCopy = stack.transformers == .v4_46 && o.batch > 1 ? s.alloc((t - o.batch) * 4 * v, .transient) : nil
            // 5.x pads and shifts the int64 labels (a new tensor); 4.46 slices them (a view).
            let labels = stack.transformers == .v4_46 ? nil : s.alloc(8 * (o.seqLen + 1) * o.batch, .activations)
            let logSoftmax = s.alloc((stack.transformers == .v4_46 ? t - o.batch : t) * 4 * v, .activations)
            s.mark("head forward (logits\(kbit ? ", fp32 from the fp32 lm_head" : ", fp32 upcast")\(shiftCopy == nil ? "" : ", shifted copy"), log-softmax)")
            if let shiftCopy { s.free(shiftCopy) }
            if let upcast { s.free(upcast) }
            s.free([normed, logits])
            s.mark("end of forward (loss)")
            kept = s.liveBytes - start
            held.cublasWorkspace(&s)   // the autograd thread's
            let rows = stack.transformers == .v4_46 ? t - o.batch : t
            let nllGradient = s.alloc(rows * 4 * v, .transient)
            if let labels { s.free(labels) }
            let logSoftmaxGradient = s.alloc(rows * 4 * v, .transient)
            s.mark("head backward (the log-softmax's fp32 gradient)")
            s.free([nllGradient, logSoftmax])
            // 4.46 at batch > 1: the slice's backward scatters the gradient into zeros of the
            // unshifted logits' shape.
            let unshifted = shiftCopy == nil ? nil : s.alloc(t * 4 * v, .transient)
            if unshifted != nil { s.mark("head backward (the shifted slice's gradient into fp32 zeros)") }
            s.free(logSoftmaxGradient)
            let logitsGradient = kbit ? nil : s.alloc(t * 2 * v, .transient)          // cast back to the bf16 logits
            if trainsHead {
                // lm_head's bf16 weight gradient (dlogitsᵀ · normed), kept as .grad until zero_grad.
                wholeGradients.append(s.alloc(2 * v * h, .gradients))
                s.mark("head backward (lm_head's weight gradient)")
            }
            if let unshifted { s.free(unshifted) }
            if let logitsGradient { s.free(logitsGradient) }
            s.free(headKept)
        }
        var gradients: [StepTrace.Tensor] = wholeGradients
        for l in (0..<a.layers).reversed() {
            // A sparse layer's gradients come after its experts' backward (measured); a dense
            // layer's are counted from its start.
            let sparse = a.isSparse(layer: l)
            if !sparse { gradients += s.alloc(held.layerGradientSizes(layer: l), .gradients) }
            // flash-attn's backward on CUDA (SDPA's flash kernel is the same code): an fp32
            // accumulator for dq, [batch, seq rounded up to 128, heads, head_dim rounded up to 32
            // (to 8 below 32)], and with grouped-query attention dk and dv for every query head.
            let attentionScratch = cuda && stack.attention != .eager ? Self.flashBackwardScratchBytes(a, o) : 0
            if gc {
                // Recomputing the layer: its activations again, the gradients in flight through it
                // (fitted to the measured grid, see `recomputeInFlightBytesPerToken`), the
                // dequantized weight, the LoRA gradients.
                let again = s.alloc(Self.layerTerms(a, o, stack: stack, layer: l, first: false).map { t * $0 }
                                    + [t * Self.recomputeInFlightBytesPerToken(a, kbit: kbit)], .transient)
                let experts = held.expertsForward(into: &s, layer: l, keep: true)
                held.expertsBackward(into: &s, layer: l, copies: (experts.gateUp, experts.down), mark: "backward layer \(l) (recompute)")
                if sparse { gradients += s.alloc(held.layerGradientSizes(layer: l), .gradients) }
                let scratch = attentionScratch > 0 ? s.alloc(attentionScratch, .transient) : nil
                if o.dora {
                    let vectors = s.alloc(Self.doraKeptVectorBytes(a, o, first: false), .transient)
                    held.doraForward(into: &s, grad: true, mark: "backward layer \(l) (recompute)")
                    s.free(vectors)
                } else {
                    held.dequantizeEach(into: &s, layer: l, mark: "backward layer \(l) (recompute)")
                }
                if let scratch { s.free(scratch) }
                s.free(experts.others)
                s.free(again)
            } else {
                let scratch = attentionScratch > 0 ? s.alloc(attentionScratch, .transient) : nil
                held.expertsBackward(into: &s, layer: l, copies: expertCopies[l], mark: "backward layer \(l)")
                if sparse { gradients += s.alloc(held.layerGradientSizes(layer: l), .gradients) }
                // DoRA's backward through a module: the fp32 and bf16 gradients of its two
                // results and their products, 18 B per output feature and token, measured.
                let dora = o.dora ? s.alloc(t * Self.doraBackwardBytesPerToken(a, o), .transient) : nil
                held.dequantizeEach(into: &s, layer: l, mark: "backward layer \(l)")
                if let dora { s.free(dora) }
                if let scratch { s.free(scratch) }
            }
            s.free(layerKept[l])
            s.mark("after backward layer \(l)")
        }
        if trainsEmbedding {
            // The embedding's dense bf16 gradient (embedding_dense_backward), the backward's last op.
            gradients.append(s.alloc(2 * v * h, .gradients))
            s.mark("embedding backward (its weight gradient)")
        }
        s.free(rope)
        if let positions { s.free(positions) }
        if let mask { s.free(mask) }
        held.optimizerStep(&s, firstStep: firstStep, gradients: gradients)
        trace = s
        points = s.points
        peakIndex = Self.peakIndex(points)
        keptBytesPerToken = t > 0 ? kept / t : 0
        switch stack.recipe {
        case _ where stack.loss == .liger: headKeptBytesPerToken = (kbit ? (gc ? 4 * h : 0) + 4 + 4 * h : 4 * h + 4 + 2 * h)
        case .peftKbit: headKeptBytesPerToken = 4 * v + 4 + 8
        case .trl: headKeptBytesPerToken = 6 * h + Self.trlHeadScalarBytesPerToken + Self.routerAuxLossBytesPerToken(a)
        default: headKeptBytesPerToken = MemoryEstimate.headActivationBytesPerToken(a, o) + (trainsHead ? 2 * h : 0)
        }
    }

    /// Why a mixture of experts' step on this stack is not modelled, or nil. Measured: transformers
    /// 5 + PEFT with and without prepare_model_for_kbit_training, and TRL's SFTTrainer
    /// (peaks.json's qwen3moe, mixtral, gptoss and llama4 rows; TRL fails on Llama 4). Not:
    /// Unsloth's MoE path, DoRA, transformers 4, flash-attn.
    static func unmeasuredExpertStep(_ a: ModelArchitecture, _ o: MemoryOptions, stack: Stack) -> String? {
        guard let x = a.experts else { return nil }
        if x.family == .llama4 && stack.recipe == .trl {
            // Measured: trl/trainer/utils.py's _fused_forward calls `model.base_model`, which on
            // Llama4ForCausalLM (base_model_prefix "language_model", no such attribute) is the
            // model itself; its MoeCausalLMOutputWithPast has no last_hidden_state.
            return "TRL 1.16's fused LM head fails on Llama4ForCausalLM (its base_model is the model itself: AttributeError, no last_hidden_state)"
        }
        let unmeasured = ![.peft, .peftKbit, .trl].contains(stack.recipe) ? "the \(stack.recipe.rawValue) recipe"
            : o.dora ? "DoRA" : stack.transformers != .v5 ? "transformers \(stack.transformers.rawValue)"
            : stack.attention == .flashAttention2 ? "flash_attention_2" : nil
        return unmeasured.map {
            "a mixture of experts' step is modelled for the peft, peft-kbit and trl recipes on transformers 5 with sdpa or eager attention, without DoRA (measured); \($0) is not"
        }
    }

    /// DoRA's fp32 vectors a layer keeps per adapted module (peft/tuners/lora/dora.py forward):
    /// the weight norm, m / ‖W‖ and m / ‖W‖ − 1, 12·out; the first layer's q, k and v keep no
    /// m / ‖W‖ − 1 (their input needs no gradient). Measured in the `-dora` rows.
    public static func doraKeptVectorBytes(_ a: ModelArchitecture, _ o: MemoryOptions, first: Bool) -> Int {
        a.adaptedModules(o.targets).reduce(0) { t, p in
            let out = a.projectionShape(p).out
            return t + (first && ["q_proj", "k_proj", "v_proj", "qkv_proj"].contains(p) ? 8 : 12) * out
        }
    }

    /// The most a DoRA module's forward holds beyond what the layer keeps (PEFT 0.21.2's
    /// `DoraLinearLayer.forward`, measured op by op in the `-dora` rows): with gradients, the
    /// identity `x_eye` [in, in] and A·x_eye [in, r] in fp32, kept by lora_weight's graph, and the
    /// larger of the weight norm's moment (lora_weight, W in fp32, scaling·lora_weight and their
    /// sum: 16·in·out) and the output's (lora_weight and W: 8·in·out, and per token 12·out of
    /// products, 2·out more with a bias); without (a checkpointed first forward) no identity is
    /// kept. The largest adapted module's.
    public static func doraForwardTransientBytes(_ a: ModelArchitecture, _ o: MemoryOptions, grad: Bool) -> Int {
        a.adaptedModules(o.targets).map { p -> Int in
            let (k, n) = (a.projectionShape(p).in, a.projectionShape(p).out)
            let bias = a.attentionQKVBias && ["q_proj", "k_proj", "v_proj", "qkv_proj"].contains(p) ? 2 : 0
            let output = 8 * k * n + o.tokens * (12 + bias) * n + (grad ? 0 : o.tokens * (4 * n + 4 * o.rank))
            return (grad ? 4 * k * k + 4 * k * o.rank : 0) + max(16 * k * n, output)
        }.max() ?? 0
    }

    /// DoRA's backward through a module beyond plain LoRA's: 18 B per output feature and token,
    /// the largest adapted module's.
    public static func doraBackwardBytesPerToken(_ a: ModelArchitecture, _ o: MemoryOptions) -> Int {
        18 * (a.adaptedModules(o.targets).map { a.projectionShape($0).out }.max() ?? 0)
    }

    /// TRL turns on a mixture of experts' load-balancing loss (trl/trainer/sft_trainer.py: the
    /// config's `router_aux_loss_coef`, non-zero for Qwen3-MoE, Mixtral and gpt-oss, sets
    /// `output_router_logits`): transformers' `load_balancing_loss_func` keeps the bf16 softmax
    /// of every sparse layer's router logits, concatenated (measured: the MoE `-trl` rows).
    public static func routerAuxLossBytesPerToken(_ a: ModelArchitecture) -> Int {
        guard let x = a.experts else { return 0 }
        return 2 * x.count * a.sparseLayers
    }

    /// TRL's fused LM head's tiles (trl/kernels/chunked_logprob.py `TOKEN_CHUNK_SIZE`,
    /// trl/trainer/utils.py `_CHUNKED_LOGPROB_CHUNK_SIZE`).
    /// Liger's chunk of rows (ops/fused_linear_cross_entropy.py:66-70): inc_factor = ceil(V / H),
    /// chunk_size = next_power_of_2(ceil(BT / inc_factor)).
    public static func ligerChunkRows(tokens t: Int, vocab v: Int, hidden h: Int) -> Int {
        let inc = (v + h - 1) / max(h, 1), rows = (t + inc - 1) / max(inc, 1)
        var c = 1
        while c < rows { c <<= 1 }
        return c
    }

    public static let trlTokenTile = 4096, trlVocabularyTile = 32768
    /// What TRL's fused head keeps per token besides the hidden states, measured in peaks.json's
    /// `-trl` rows (6h + 31.9 to 32.0 B per token): the clamped int64 labels (8), the fp32
    /// log-sum-exp (4), the log-probabilities and their two masked copies (12), and the bool
    /// label masks.
    public static let trlHeadScalarBytesPerToken = 32

    /// flash-attn's backward scratch for one layer (csrc/flash_attn/flash_api.cpp `mha_bwd`):
    /// `dq_accum`, fp32 [batch, round_up(seq, 128), heads, round_up(head_dim, 32)], and with fewer
    /// key/value heads than query heads `dk_expanded` and `dv_expanded`, bf16 [batch, seq, heads,
    /// head_dim] each.
    public static func flashBackwardScratchBytes(_ a: ModelArchitecture, _ o: MemoryOptions) -> Int {
        let d = a.headDim, roundedSeq = (o.seqLen + 127) / 128 * 128
        let roundedDim = d <= 32 ? (d + 7) / 8 * 8 : (d + 31) / 32 * 32
        let dqAccum = 4 * o.batch * roundedSeq * a.attentionHeads * roundedDim
        let expanded = a.keyValueHeads < a.attentionHeads ? 2 * 2 * o.tokens * a.attentionHeads * d : 0
        return dqAccum + expanded
    }

    /// The tensors a decoder layer keeps for backward, bytes per token each.
    /// - peft (bf16 stream): `MemoryEstimate.activationTermsPerToken` (measured), without the
    ///   input norm's in the first layer;
    /// - peft-kbit (`prepare_model_for_kbit_training`: embedding and norms fp32, so the whole
    ///   stream is fp32; measured in peaks.json's `-peft-kbit` rows): the second norm's input and
    ///   both 1/rms, the normed inputs LoRA keeps (the cast to the adapters' fp32 is a no-op),
    ///   q/k/v, the attention output and log-sum-exp, gate, silu(gate), up and the down
    ///   projection's input when it is adapted, A·x, and the layer's fp32 output (the next
    ///   norm's input);
    /// - trl (bf16 adapters under bf16 autocast; measured in the `-trl` rows): as peft, but each
    ///   adapter's A keeps its bf16 input, once per distinct input tensor (q/k/v share the normed
    ///   input, gate/up theirs, o_proj's is the attention output SDPA keeps anyway, down_proj's is
    ///   silu(gate)·up), and A·x in bf16;
    /// - eager attention (the `-eager` rows) keeps, instead of SDPA's output and log-sum-exp, the
    ///   fp32 softmax of the scores and its cast to the stream's dtype (one tensor in the fp32
    ///   stream), heads × sequence each per token, and k and v repeated to every query head
    ///   (`repeat_kv`) when there are fewer key/value heads.
    public static func layerTerms(_ a: ModelArchitecture, _ o: MemoryOptions, stack: Stack, layer l: Int = 0, first: Bool) -> [Int] {
        let h = a.hiddenSize, q = a.queryDim, kv = a.keyValueDim, i = a.intermediateSize
        let kbit = stack.recipe == .peftKbit, e = kbit ? 4 : 2
        let modules = a.adaptedModules(o.targets, layer: l)
        let adapted = Set(modules)
        func any(_ names: String...) -> Bool { names.contains { adapted.contains($0) } }
        // q, k, v as attention keeps them, and what it keeps besides.
        let attention: [Int]
        if a.attentionSinks {
            // gpt-oss' eager attention with sinks (transformers' gpt_oss `eager_attention_forward`,
            // all in the stream's bf16; measured in the gptoss rows): q after rope, k and v repeated
            // to every query head, the row maxima's indices (int64) and the softmax over the keys
            // and the sink, heads × (sequence + 1) per token.
            let repeated = a.keyValueHeads < a.attentionHeads ? q : kv
            attention = [2 * q, 2 * repeated, 2 * repeated, 8 * a.attentionHeads, 2 * a.attentionHeads * (o.seqLen + 1)]
        } else if stack.attention == .eager {
            let repeated = a.keyValueHeads < a.attentionHeads ? q : kv
            let probabilities = a.attentionHeads * o.seqLen
            attention = [e * q, e * repeated, e * repeated, 4 * probabilities] + (kbit ? [] : [2 * probabilities])
                + (any("o_proj") && stack.recipe == .trl || kbit && any("o_proj") ? [e * q] : [])
        } else {
            // transformers 4.46's SDPA attention classes call repeat_kv before SDPA, so k and v
            // are kept at every query head (measured: the qwen2 `-tf4.46` row); 5.x passes
            // enable_gqa and keeps them as they are. flash-attn takes grouped heads as they are.
            let repeated = stack.transformers == .v4_46 && stack.attention == .sdpa && a.keyValueHeads < a.attentionHeads ? q : kv
            if stack.attention == .flashAttention2 && kbit {
                // flash-attn computes in bf16 only: transformers casts the fp32 stream's q, k, v to
                // the pre-quantization dtype (`_pre_quantization_dtype`), so the kernel keeps bf16
                // copies and a bf16 output, which o_proj's fp32 adapter copies again.
                attention = [2 * q, 2 * kv, 2 * kv, 2 * q, 4 * a.attentionHeads] + (any("o_proj") ? [4 * q] : [])
            } else {
                attention = [e * q, e * repeated, e * repeated, e * q, 4 * a.attentionHeads]
            }
        }
        switch stack.recipe {
        case .peftKbit:
            let qkNorm = a.qkNorm ? [4 * (q + kv), 4 * (a.attentionHeads + a.keyValueHeads)] : []
            let ax = modules.map { _ in 4 * o.rank }
            let dropout = o.loraDropout > 0 ? modules.map { 4 * a.projectionShape($0).in } : []
            return (first ? [] : [4])
                + (any("q_proj", "k_proj", "v_proj", "qkv_proj") ? [4 * h] : [])
                + attention + qkNorm
                + [4 * h, 4] + (any("gate_proj", "up_proj", "gate_up_proj") ? [4 * h] : [])
                + (a.isSparse(layer: l) ? MemoryEstimate.expertTermsPerToken(a, o, elementSize: o.experts == .nf4 ? 2 : 4) : [4 * i, 4 * i, 4 * i])
                + (any("down_proj") ? [4 * i] : [])
                + [4 * h] + ax + dropout
        case .trl:
            // Per-head q/k norms keep their fp32 input under autocast too (measured: the qwen3moe
            // `-trl` rows).
            let qkNorm = a.qkNorm ? [4 * (q + kv), 4 * (a.attentionHeads + a.keyValueHeads)] : []
            // One bf16 input per group of adapters fed the same tensor; o_proj's is kept above.
            let inputs = a.sharedInputGroups.filter { !adapted.isDisjoint(with: $0) && !$0.contains("o_proj") }
                .map { g in 2 * a.projectionShape(g.first { adapted.contains($0) }!, layer: l).in }
            let dropout = o.loraDropout > 0 ? modules.map { 2 * a.projectionShape($0, layer: l).in } : []
            let mlp = a.isSparse(layer: l) ? MemoryEstimate.expertTermsPerToken(a, o) : [2 * i, 2 * i, 2 * i]
            return (first ? [] : [4 * h, 4]) + attention + qkNorm + [4 * h, 4] + mlp
                + inputs + modules.map { _ in 2 * o.rank } + dropout
        default:
            // activationTermsPerToken: [norm input, 1/rms,] q, k, v, output, log-sum-exp, ...
            var terms = Array(MemoryEstimate.activationTermsPerToken(a, o, layer: l).dropFirst(first ? 2 : 0))
            let at = first ? 0 : 2
            terms.replaceSubrange(at..<(at + 5), with: attention)
            return terms
        }
    }

    /// Recomputing a checkpointed layer in backward holds, beside its activations again, the
    /// gradients in flight through it: three hidden-sized tensors per token in the stream's
    /// dtype, 6h bytes in bf16, fitted to the measured grid (peaks.json's `-gc` rows at
    /// llama-2-7b's and qwen2.5-7b's layer shapes, within 2.5%); 12h in the kbit recipe's fp32
    /// stream (its `-gc-peft-kbit` rows at llama-2-7b's shapes, within 2.5%).
    public static func recomputeInFlightBytesPerToken(_ a: ModelArchitecture, kbit: Bool) -> Int {
        3 * a.hiddenSize * (kbit ? 4 : 2)
    }

    /// What a step holds whatever keeps its activations: weights, adapters, their gradients and
    /// the optimizer's states, the dequantized weight of a 4-bit matmul; as tensors, in the order
    /// the stack allocates them.
    struct Held {
        let a: ModelArchitecture, o: MemoryOptions, stack: Stack
        var gradientBytes, stateBytes, largestParameter: Int
        let fourBit: Bool
        /// Bytes per element of the parameters that are not 4-bit (bf16; fp32 after
        /// prepare_model_for_kbit_training).
        let unquantized: Int
        /// Bytes per element of the adapters, their gradients and AdamW's moments: fp32, or bf16
        /// in TRL's recipe (SFTTrainer casts a quantized model's adapters to bf16; torch's AdamW
        /// keeps its moments in the parameter's dtype).
        let adapterElement: Int
        /// TRL's Trainer defaults to torch's fused AdamW: one kernel per step, no temporaries.
        let fusedAdamW: Bool
        /// Elements of one module trained whole (vocab × hidden), and how many there are.
        let wholeElements: Int, wholeModules: Int

        init(_ a: ModelArchitecture, _ o: MemoryOptions, stack: Stack) throws {
            let e = try MemoryEstimate(model: a, options: o)
            (self.a, self.o, self.stack) = (a, o, stack)
            fourBit = o.method == .qlora
            unquantized = stack.recipe == .peftKbit ? 4 : 2
            adapterElement = stack.recipe == .trl ? 2 : 4
            fusedAdamW = stack.recipe == .trl && o.optimizer == .adamw
            wholeModules = o.isLoRA ? o.modulesToSave.count : 0
            wholeElements = a.vocabSize * a.hiddenSize
            let trainable = e.params.trainable - wholeModules * wholeElements
            // Gradients and optimizer states as the real step holds them.
            gradientBytes = o.isLoRA ? adapterElement * trainable : 2 * trainable
            let tensors = o.isLoRA ? MemoryEstimate.adapterTensorElements(a, o).reduce(0) { $0 + $1.count } : a.tensorGroups.reduce(0) { $0 + $1.count }
            switch o.method {
            case .qlora, .lora:
                stateBytes = o.optimizer != .adamw ? e.component("optimizer_states")!.estimatedBytes
                    : fusedAdamW ? 2 * adapterElement * trainable + 4 * tensors : 8 * trainable + 4 * tensors + 4
            case .full: stateBytes = 4 * trainable + 4 * tensors + 4   // torch keeps AdamW moments in the bf16 parameters' dtype
            case .full8BitAdam: stateBytes = e.component("optimizer_states")!.estimatedBytes
            }
            largestParameter = o.isLoRA
                ? max(4 * (MemoryEstimate.adapterTensorElements(a, o).map(\.elements).max() ?? 0),
                      o.modulesToSave.isEmpty ? 0 : 2 * a.vocabSize * a.hiddenSize)
                : 2 * (a.tensorGroups.map { $0.shape.reduce(1, *) }.max() ?? 0)
        }

        /// Layer `l`'s adapters: A and B (and DoRA's magnitude; target_parameters' on the
        /// experts and router), elements each.
        func adapterElements(layer l: Int) -> [Int] { MemoryEstimate.layerAdapterElements(a, o, layer: l) }

        /// What a sparse layer's experts make in the forward and keep for backward beyond the
        /// per-token terms (measured op by op in peaks.json's MoE rows), bytes each: the expert
        /// offsets (int32 per expert) and the others; then the copies of the fused weights that
        /// grouped_mm keeps for the backward, gate_up's and down's: with LoRA on the experts,
        /// PEFT's ParamWrapper merges each, W + B·A in bf16 [experts, out, in] (`baddbmm`, with bf16
        /// casts of A and B among the others); bitsandbytes' parametrization dequantizes each
        /// whole to bf16; with the router adapted, its merged weight is among the others.
        struct ExpertForward { var others: [Int] = [], gateUp = 0, down = 0 }

        func expertForwardSizes(layer l: Int) -> ExpertForward {
            guard let x = a.experts, a.isSparse(layer: l) else { return ExpertForward() }
            let (h, e, i, r) = (a.hiddenSize, x.count, x.intermediateSize, o.rank)
            // The experts' element size: bf16, fp32 after prepare_model_for_kbit_training. PEFT casts
            // A and B to the weight's dtype: nothing to copy when they have it already (fp32 experts,
            // or TRL's bf16 adapters).
            let s = expertElement
            var f = ExpertForward(others: [4 * e])
            if trainsExperts && s == 2 && adapterElement == 4 {
                f.others += [2 * r * o.expertGateUpRankFactor * e * (h + 2 * i), 2 * r * e * (i + h)]
            }
            if trainsExperts || fourBit && o.experts == .nf4 { (f.gateUp, f.down) = (s * e * 2 * i * h, s * e * i * h) }
            if o.isLoRA && o.targets.contains("router") { f.others.append(s * e * h) }
            return f
        }

        var trainsExperts: Bool { o.isLoRA && o.targets.contains("experts") }

        /// Bytes per element the experts compute in: the unquantized parameters', but bf16 when
        /// bitsandbytes' parametrization dequantizes them (its quant state's dtype, which
        /// prepare_model_for_kbit_training does not cast: measured in the `-peft-kbit-experts-nf4` row).
        var expertElement: Int { fourBit && o.experts == .nf4 ? 2 : unquantized }

        /// A sparse layer's forward: what it keeps (nothing after a checkpointed forward, which
        /// frees what it made at once) and, the weight copies held, the moment of grouped_mm's down projection
        /// with its input (2ik per token; kept anyway when the experts train).
        func expertsForward(into s: inout StepTrace, layer l: Int, keep: Bool) -> (others: [StepTrace.Tensor], gateUp: StepTrace.Tensor?, down: StepTrace.Tensor?) {
            guard let x = a.experts, a.isSparse(layer: l) else { return ([], nil, nil) }
            let f = expertForwardSizes(layer: l)
            let kind: StepTrace.Component = keep ? .activations : .transient
            let others = s.alloc(f.others, kind)
            let gateUp = f.gateUp > 0 ? s.alloc(f.gateUp, kind) : nil, down = f.down > 0 ? s.alloc(f.down, kind) : nil
            if !trainsExperts {
                let input = s.alloc(o.tokens * expertElement * x.intermediateSize * x.rowsPerToken, .transient)
                s.free(input)
            }
            guard keep else {
                s.free(others + [gateUp, down].compactMap { $0 })
                return ([], nil, nil)
            }
            return (others, gateUp, down)
        }

        /// A sparse layer's backward through its experts, in the order autograd runs it (measured
        /// op by op): combining the rows back into tokens (with bf16 routing weights the gradient,
        /// its zeros and the scattered rows, 6hk per token; Mixtral's fp32 weights, 14hk); with LoRA
        /// on the experts the down projection's weight gradient [experts, hidden, intermediate] and
        /// the rows in flight; the down copy freed; the activation's gradients (three per row, 6ik
        /// + 4k); gate_up's weight gradient when the experts train (the activations its backward
        /// has used up already freed); its copy freed.
        func expertsBackward(into s: inout StepTrace, layer l: Int, copies: (gateUp: StepTrace.Tensor?, down: StepTrace.Tensor?), mark phase: String) {
            guard let x = a.experts, a.isSparse(layer: l) else { return }
            let (h, e, i, k, t, s2) = (a.hiddenSize, x.count, x.intermediateSize, x.rowsPerToken, o.tokens, expertElement)
            func moment(_ bytes: Int, _ what: String) {
                let b = s.alloc(bytes, .transient)
                s.mark(phase + " (" + what + ")")
                s.free(b)
            }
            moment(t * (x.family == .mixtral || s2 == 4 ? 14 : 6) * h * k * s2 / 2, "the experts' rows back into tokens")
            if trainsExperts { moment(s2 * e * h * i + t * s2 * (h * k + i * k), "down_proj's expert weight gradient") }
            if let d = copies.down { s.free(d) }
            moment(t * (3 * s2 * i * k + 4 * k), "the experts' activation gradients")
            if trainsExperts {
                // By now the activation's backward has freed gate_up's output, the activation
                // and the down projection's input (kept per token; counted here as freed).
                let freed = t * k * s2 * (2 * i + (x.family == .gptOSS ? 4 : 1) * i + i)
                moment(max(0, s2 * e * 2 * i * h + t * s2 * (h * k + 2 * i * k) - freed), "gate_up_proj's expert weight gradient")
            }
            if let g = copies.gateUp { s.free(g) }
        }

        /// A DoRA layer's forward: its largest module's transients (`doraForwardTransientBytes`),
        /// or the largest dequantized weight of a module without DoRA if larger.
        func doraForward(into s: inout StepTrace, grad: Bool, mark phase: String) {
            let dequantized = fourBit ? 2 * (a.projections.map { $0.outFeatures * $0.inFeatures }.max() ?? 0) : 0
            let w = s.alloc(max(StepTimeline.doraForwardTransientBytes(a, o, grad: grad), dequantized), .transient)
            s.mark(phase + " (DoRA's weight norm)")
            s.free(w)
        }

        /// One layer's gradients: fp32 LoRA A and B, or (full fine-tuning) its share of the bf16
        /// gradients.
        func layerGradientSizes(layer l: Int) -> [Int] { o.isLoRA ? adapterElements(layer: l).map { adapterElement * $0 } : [a.layers > 0 ? gradientBytes / a.layers : 0] }

        /// Loads the model as transformers + bitsandbytes do: each 4-bit weight comes to the
        /// device in bf16 and is quantized there (Params4bit's `_quantize`: the bf16 copy freed
        /// once the packed weight and its constants exist); the rest in bf16; the kbit recipe then
        /// casts every parameter that is not 4-bit to fp32 (`param.data = param.data.to(fp32)`)
        /// and empties the cache; PEFT adds the fp32 adapters; a later step holds AdamW's states.
        func load(into s: inout StepTrace, firstStep: Bool) {
            var cast: [(StepTrace.Tensor, Int)] = []
            func plain(_ n: Int) { cast.append((s.alloc(2 * n, .weights), n)) }
            plain(a.vocabSize * a.hiddenSize)
            for l in 0..<a.layers {
                for t in a.layerTensors(l) {
                    let n = t.shape.reduce(1, *)
                    if t.kind == .expert && fourBit && o.experts == .nf4 {
                        s.alloc(MemoryEstimate.parametrizedNF4Bytes(n), .weights)
                    } else if t.kind == .projection {
                        if fourBit {
                            let bf16 = s.alloc(2 * n, .transient)
                            let b = MemoryEstimate.fourBitBytes(elements: n, blocksize: o.blocksize, doubleQuant: o.doubleQuant)
                            _ = s.alloc([b.data, b.constants], .weights)  // held from here on
                            s.free(bf16)
                        } else {
                            s.alloc(2 * n, .weights)
                        }
                    } else {
                        plain(n)
                    }
                }
            }
            plain(a.hiddenSize)
            if !a.tiedEmbeddings { plain(a.vocabSize * a.hiddenSize) }
            if unquantized == 4 {
                for (bf16, n) in cast {
                    s.alloc(4 * n, .weights)
                    s.free(bf16)
                }
                s.emptyCache()
            }
            // modules_to_save: PEFT's bf16 copy of each (ModulesToSaveWrapper.update deep-copies it).
            for _ in 0..<wholeModules { s.alloc(2 * wholeElements, .adapters) }
            for l in 0..<a.layers {
                let fp32 = s.alloc(adapterElements(layer: l).map { 4 * $0 }, .adapters)
                if adapterElement == 2 {
                    // TRL: `param.data = param.data.to(torch.bfloat16)`, adapter by adapter.
                    _ = s.alloc(adapterElements(layer: l).map { 2 * $0 }, .adapters)  // held from here on
                    s.free(fp32)
                }
            }
            if !firstStep { _ = allocStates(into: &s) }
        }

        /// The step's start: the model loaded, its first point, and on CUDA the forward thread's
        /// cuBLAS workspace.
        func begin(_ s: inout StepTrace, firstStep: Bool) {
            load(into: &s, firstStep: firstStep)
            s.mark(firstStep ? "weights loaded" : "step begins (AdamW states held from earlier steps)")
            cublasWorkspace(&s)
        }

        /// On CUDA, a thread's cuBLAS workspace, allocated at its first matmul and kept.
        func cublasWorkspace(_ s: inout StepTrace) {
            if stack.runtime == .cuda { s.alloc(stack.cuda.cublasWorkspaceBytes, .transient) }
        }

        /// The optimizer step (a first step allocates the states) and zero_grad, which frees the
        /// gradients.
        func optimizerStep(_ s: inout StepTrace, firstStep: Bool, gradients: [StepTrace.Tensor]) {
            if firstStep { _ = allocStates(into: &s) }
            let temporaries = s.alloc(fusedAdamW ? [] : stack.runtime == .cuda ? foreachTemporarySizes : singleTensorTemporarySizes, .transient)
            let eightBit = o.isLoRA ? o.optimizer != .adamw : o.method == .full8BitAdam
            s.mark(eightBit ? "optimizer step (\(o.isLoRA ? o.optimizer.rawValue : "adamw-8bit"))"
                   : fusedAdamW ? "optimizer step (AdamW, fused)"
                   : stack.runtime == .cuda ? "optimizer step (AdamW, foreach: a temporary per parameter)" : "optimizer step (AdamW, tensor by tensor)")
            s.free(temporaries)
            s.free(gradients)
            s.mark("end of step (zero_grad)")
        }

        /// AdamW's states: two moments per trainable tensor and the step counts. On CUDA a paged
        /// optimizer's states are bitsandbytes' `cudaMallocManaged` buffers (`get_paged`), outside
        /// torch's allocator and movable to host memory: none on the device here.
        func allocStates(into s: inout StepTrace) -> [StepTrace.Tensor] {
            if stack.runtime == .cuda && o.isLoRA && o.optimizer == .pagedAdamw8bit { return [] }
            let moments: [Int]
            switch (o.isLoRA, o.optimizer, o.method) {
            case (true, .adamw, _): moments = (0..<a.layers).flatMap { l in adapterElements(layer: l).flatMap { [adapterElement * $0, adapterElement * $0] } }
            case (true, _, _): moments = (0..<a.layers).flatMap { l in adapterElements(layer: l).map { o.optimizer.stateBytes($0) } }
            default: moments = []
            }
            let counted = moments.reduce(0, +)
            // A whole module's moments are bf16, as its parameter (and a 4 B step).
            let whole = (0..<wholeModules).flatMap { _ in [2 * wholeElements, 2 * wholeElements, 4] }
            return s.alloc(moments + [stateBytes - counted] + whole, .optimizerStates)
        }

        /// The optimizer step's temporaries. On CUDA torch's AdamW takes its foreach path
        /// (torch/optim/adam.py `_multi_tensor_adam`: `exp_avg_sq_sqrt =
        /// torch._foreach_sqrt(device_exp_avg_sqs)`, one tensor per parameter at once);
        /// bitsandbytes' 8-bit optimizers update in their kernels.
        var foreachTemporarySizes: [Int] {
            switch (o.isLoRA, o.optimizer, o.method) {
            case (true, .adamw, _): return (0..<a.layers).flatMap { l in adapterElements(layer: l).map { 4 * $0 } } + (0..<wholeModules).map { _ in 2 * wholeElements }
            case (false, _, .full): return a.tensorGroups.flatMap { g in [Int](repeating: 2 * g.shape.reduce(1, *), count: g.count) }
            default: return []
            }
        }

        /// On CPU (no foreach kernels) AdamW runs tensor by tensor: temporaries of two of the
        /// largest tensors (measured).
        var singleTensorTemporarySizes: [Int] { [largestParameter, largestParameter] }

        /// bitsandbytes dequantizes a 4-bit weight to bf16 for each matmul, forward and backward,
        /// and frees it after: the layer's projections in turn, the moment read at the largest.
        func dequantizeEach(into s: inout StepTrace, layer l: Int, mark phase: String) {
            guard fourBit else { return s.mark(phase) }
            let sizes = a.projections(layer: l).map { 2 * $0.outFeatures * $0.inFeatures }
            let largest = sizes.firstIndex(of: sizes.max()!)!
            for (k, n) in sizes.enumerated() {
                let w = s.alloc(n, .transient)
                if k == largest { s.mark(phase) }
                s.free(w)
            }
        }

    }

    /// The first moment with the most bytes.
    static func peakIndex(_ points: [Point]) -> Int { points.indices.max { points[$0].bytes < points[$1].bytes }! }

    /// Bytes at the step's peak.
    public var peakBytes: Int { peak.bytes }
}

/// A step on CUDA: its allocation trace replayed through PyTorch's caching allocator.
public struct CUDAStep: Sendable {
    /// `torch.cuda.max_memory_allocated()`: the blocks handed out, rounded.
    public var allocatedPeak: Int
    /// `torch.cuda.max_memory_reserved()`: the segments the allocator holds.
    public var reservedPeak: Int
    /// Reserved and allocated at each point of the timeline.
    public var reservedAtPoints: [Int]
    public var allocatedAtPoints: [Int]
    /// The CUDA context, outside the allocator.
    public var contextBytes: Int
    /// cudaMalloc retries after freeing cached segments.
    public var retries: Int
    /// What the device holds at the peak: reserved and the context.
    public var deviceBytes: Int { reservedPeak + contextBytes }
}

extension StepTimeline {
    /// The step on CUDA: its trace through the caching allocator of `stack.cuda` (the trace has
    /// the cuBLAS workspaces and AdamW's foreach temporaries when the step was built for
    /// `--runtime cuda`). With `memory`, the device's total: the allocator may have what the
    /// context leaves, and a step that runs out throws `CUDACachingAllocator.OutOfMemory`.
    public func onCUDA(memory: Int? = nil) throws -> CUDAStep {
        let settings = CUDACachingAllocator.Settings(expandableSegments: stack.cuda.expandableSegments,
                                                     capacity: memory.map { max($0 - stack.cuda.contextBytes, 0) })
        let r = try trace.replay(settings)
        return CUDAStep(allocatedPeak: r.allocator.peakAllocated, reservedPeak: r.allocator.peakReserved, reservedAtPoints: r.reservedAtPoints,
                        allocatedAtPoints: r.allocatedAtPoints, contextBytes: stack.cuda.contextBytes, retries: r.allocator.retries)
    }
}
