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
/// Not here: the CUDA context, cuBLAS workspaces and the caching allocator's rounding and
/// fragmentation ("reserved" versus "allocated"), and scratch inside kernels.
public struct StepTimeline: Sendable, Codable {
    public typealias Recipe = Stack.Recipe

    /// One moment of the step: the live bytes, by component.
    public struct Point: Sendable, Codable {
        public var phase: String
        /// Bytes by component: weights, adapters, activations, transient, gradients, optimizer_states.
        public var components: [String: Int]
        public var bytes: Int { components.values.reduce(0, +) }
    }

    public static let componentOrder = ["weights", "adapters", "activations", "transient", "gradients", "optimizer_states"]

    public var recipe: Recipe
    public var points: [Point]
    public var peakIndex: Int
    public var peak: Point { points[peakIndex] }

    /// What autograd keeps per token at the end of the forward (the head included), and the head's part.
    public var keptBytesPerToken: Int
    public var headKeptBytesPerToken: Int
    /// Bytes the step keeps in host (CPU) memory rather than on the device: Unsloth's offloaded
    /// checkpoints.
    public var hostBytes = 0

    /// - Parameter firstStep: the first step of a run, before AdamW has states (what
    ///   peaks.json measures); otherwise a later step, which holds the states from the start
    ///   (what a run needs).
    public init(model a: ModelArchitecture, options o: MemoryOptions, firstStep: Bool = false, recipe: Recipe = .peft) throws {
        if recipe == .unsloth {
            self = try StepTimeline(unsloth: a, options: o, firstStep: firstStep)
            return
        }
        self.recipe = recipe
        let held = try Held(a, o)
        let (gradientBytes, stateBytes) = (held.gradientBytes, held.stateBytes)
        let (largestParameter, dequantized, perLayerGradients) = (held.largestParameter, held.dequantized, held.perLayerGradients)
        let t = o.tokens
        let h = a.hiddenSize, v = a.vocabSize
        // Per token, SDPA attention (transformers' default): the same layer and head terms as the
        // estimate's activations.
        let layerKept = MemoryEstimate.activationBytesPerToken(a, o)
        let rope = 4 * a.headDim
        let head = MemoryEstimate.headActivationBytesPerToken(a, o)

        var points: [Point] = []
        func add(_ phase: String, activations: Int, transient: Int = 0, gradients: Int = 0, states: Int? = nil) {
            points.append(held.point(phase, firstStep: firstStep, activations: activations, transient: transient, gradients: gradients, states: states))
        }
        add(firstStep ? "weights loaded" : "step begins (AdamW states held from earlier steps)", activations: 0)
        let gc = o.gradientCheckpointing
        var kept = rope * t
        for l in 0..<a.layers {
            kept += t * (gc ? 2 * h : (l == 0 ? layerKept - (4 * h + 4) : layerKept))
            add("forward layer \(l)", activations: kept, transient: dequantized)
        }
        if gc { kept += 8 * t }
        let layersKept = kept
        // The head's forward: bf16 logits (2V) and their fp32 upcast (4V) live while the
        // log-softmax (4V) is computed.
        add("head forward (logits, fp32 upcast, log-softmax)", activations: layersKept, transient: t * (4 * h + 4 + 10 * v))
        kept += t * head
        add("end of forward (loss)", activations: kept)
        add("head backward (the log-softmax's fp32 gradient)", activations: kept, transient: t * (8 * v - 8))
        var gradients = 0
        var activations = layersKept
        for l in (0..<a.layers).reversed() {
            if gc {
                // Recomputing the layer: its activations again, the gradients in flight through it
                // (6h, fitted to the measured grid), the dequantized weight, the LoRA gradients.
                add("backward layer \(l) (recompute)", activations: activations, transient: t * (layerKept + 6 * h) + dequantized,
                    gradients: gradients + perLayerGradients)
            } else {
                add("backward layer \(l)", activations: activations, transient: dequantized, gradients: gradients + perLayerGradients)
            }
            activations -= t * (gc ? 2 * h : (l == 0 ? layerKept - (4 * h + 4) : layerKept))
            gradients += perLayerGradients
            add("after backward layer \(l)", activations: max(activations, 0), gradients: gradients)
        }
        gradients = gradientBytes
        add("optimizer step (AdamW, foreach)", activations: 0, transient: 2 * largestParameter, gradients: gradients, states: stateBytes)
        add("end of step (zero_grad)", activations: 0, states: stateBytes)
        self.points = points
        peakIndex = Self.peakIndex(points)
        keptBytesPerToken = t > 0 ? kept / t : 0
        headKeptBytesPerToken = head
    }

    /// What a step holds whatever keeps its activations: weights, adapters, their gradients and
    /// the optimizer's states, the dequantized weight of a 4-bit matmul.
    struct Held {
        var weights, adapters, gradientBytes, stateBytes, largestParameter, dequantized, perLayerGradients: Int

        init(_ a: ModelArchitecture, _ o: MemoryOptions) throws {
            let e = try MemoryEstimate(model: a, options: o)
            let modules = o.isLoRA ? a.adaptedModules(o.targets) : []
            func bytes(_ names: String...) -> Int { names.reduce(0) { $0 + (e.component($1)?.estimatedBytes ?? 0) } }
            weights = o.isLoRA ? bytes("base_weights", "quant_constants", "unquantized_weights") : bytes("base_weights")
            adapters = bytes("lora_params")
            let trainable = e.params.trainable
            // Gradients and optimizer states as the real step holds them.
            gradientBytes = o.isLoRA ? 4 * trainable : 2 * trainable
            let tensors = o.isLoRA ? 2 * modules.count * a.layers : a.tensorGroups.reduce(0) { $0 + $1.count }
            switch o.method {
            case .qlora, .lora: stateBytes = o.optimizer == .adamw ? 8 * trainable + 4 * tensors + 4 : bytes("optimizer_states")
            case .full: stateBytes = 4 * trainable + 4 * tensors + 4   // torch keeps AdamW moments in the bf16 parameters' dtype
            case .full8BitAdam: stateBytes = bytes("optimizer_states")
            }
            largestParameter = o.isLoRA
                ? 4 * (modules.map { max(o.rank * a.projectionShape($0).in, a.projectionShape($0).out * o.rank) }.max() ?? 0)
                : 2 * (a.tensorGroups.map { $0.shape.reduce(1, *) }.max() ?? 0)
            // bitsandbytes dequantizes a 4-bit weight to bf16 for each matmul, forward and backward.
            dequantized = o.method == .qlora ? 2 * (a.projections.map { $0.outFeatures * $0.inFeatures }.max() ?? 0) : 0
            perLayerGradients = a.layers > 0 ? gradientBytes / a.layers : 0
        }

        /// A moment of the step; the optimizer's states are held from the start except in a run's
        /// first step, unless `states` says otherwise.
        func point(_ phase: String, firstStep: Bool, activations: Int, transient: Int, gradients: Int, states: Int?) -> Point {
            Point(phase: phase, components: ["weights": weights, "adapters": adapters, "activations": activations, "transient": transient,
                                             "gradients": gradients, "optimizer_states": states ?? (firstStep ? 0 : stateBytes)])
        }
    }

    /// The first moment with the most bytes.
    static func peakIndex(_ points: [Point]) -> Int { points.indices.max { points[$0].bytes < points[$1].bytes }! }

    /// Bytes at the step's peak.
    public var peakBytes: Int { peak.bytes }
}
