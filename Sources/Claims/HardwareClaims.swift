import Foundation
import QLoRA
import Memory

/// M23–M30 of ../shared/claims.md: what fits where. The articles state no sequence length or
/// batch, so a fit is the largest sequence length at batch 1 that fits (r=16 on all linear
/// layers, gradient checkpointing) as `qlora fit` finds it, and a model "fits" when that is at
/// least `fitSeqLen`. Several GPUs shard weights, gradients and states as FSDP's full shard.
extension Claims {
    /// LLaMA "30B" (32,528,943,616 parameters), not a preset: huggyllama/llama-30b config.json,
    /// hidden_size 6656, intermediate_size 17920, num_hidden_layers 60, num_attention_heads 52,
    /// vocab_size 32000.
    static let llama30b = ModelArchitecture(name: "llama-30b", hiddenSize: 6656, intermediateSize: 17920, layers: 60, attentionHeads: 52, vocabSize: 32000)
    /// Code Llama 34B (33,743,970,304 parameters), not a preset: codellama/CodeLlama-34b-hf
    /// config.json, hidden_size 8192, intermediate_size 22016, num_hidden_layers 48,
    /// num_attention_heads 64, num_key_value_heads 8, vocab_size 32000.
    static let codeLlama34b = ModelArchitecture(name: "codellama-34b", hiddenSize: 8192, intermediateSize: 22016, layers: 48, attentionHeads: 64,
                                                keyValueHeads: 8, vocabSize: 32000)

    static func preset(_ name: String) -> ModelArchitecture { ModelArchitecture.preset(name)! }

    /// Said wherever a shape that is not a preset is used.
    static let llama30bNote = "llama-30b: LLaMA-30B's published config (32.5B parameters), not a preset"
    static let codeLlama34bNote = "codellama-34b: Code Llama 34B's published config (33.7B parameters), not a preset"

    static let hardwareClaims: [Claim] = [
        Claim("M23", "nvidia-smi shows a misleadingly low VRAM figure until the first backward pass; activation and optimizer-state allocations spike 3-4 GB mid-training step (7B QLoRA)", "B") { c in
            // The spike: the step's peak above what is held before it (weights and adapters), as
            // transformers + PEFT + bitsandbytes reach it (StepTimeline).
            func options(_ seq: Int) -> MemoryOptions { MemoryOptions(method: .qlora, seqLen: seq, gradientCheckpointing: true) }
            func spike(_ t: StepTimeline) -> Int { t.peakBytes - t.points[0].bytes }
            let at2048 = try StepTimeline(model: c.l7, options: options(2048), firstStep: true)
            let to3 = try Memory.Fit.largest(upTo: longestSeqLen) { Double(spike(try StepTimeline(model: c.l7, options: options($0), firstStep: true))) <= 3 * gb }
            let to4 = try Memory.Fit.largest(upTo: longestSeqLen) { Double(spike(try StepTimeline(model: c.l7, options: options($0), firstStep: true))) <= 4 * gb }
            let held = at2048.points[0].bytes
            return Finding("llama-2-7b QLoRA r=16 all linear, checkpointing: \(gigabytes(held)) held before the first step (weights, constants, adapters); the step's peak is \(gigabytes(at2048.peakBytes)) at 2048 tokens × 1 (\(at2048.peak.phase)), a spike of \(gigabytes(spike(at2048))) above it; the spike is 3 GB at \(to3?.formatted() ?? "no") tokens and 4 GB at \(to4?.formatted() ?? "no") tokens × batch 1",
                           .holds, "holds for runs of about \(to3?.formatted() ?? "?")–\(to4?.formatted() ?? "?") tokens × batch 1 (the length decides it; at 2048 tokens the spike is \(gigabytes(spike(at2048)))); what nvidia-smi shows also holds CUDA's context and the caching allocator's reserve")
        },
        Claim("M24", "Even QLoRA needs ~2x the inference VRAM for a 7B model; full fine-tuning needs 10-20x", "B") { c in
            let bf16 = Double(c.fp16Size), fourBit = Double(bytes(c.q7, "base_weights", "quant_constants", "unquantized_weights"))
            let q = Double(c.q7.totalEstimatedBytes), f = Double(c.full.totalEstimatedBytes)
            let twice = try Memory.Fit.largestSeqLen(c.l7, fitOptions(.qlora), memory: Int(2 * fourBit))
            let qlora = within(q / fourBit, 2)
            let fullHolds = inRange(f / bf16, 10, 20) || inRange(f / fourBit, 10, 20)
            return Finding(String(format: "llama-2-7b, 2048 tokens × 1, checkpointing, against inference weights alone (4-bit %.2f GB, bf16 %.2f GB; no KV cache): QLoRA %.2fx the 4-bit and %.2fx the bf16; full fine-tune (mixed precision) %.1fx the bf16 and %.1fx the 4-bit. QLoRA reaches 2x the 4-bit weights at %@ tokens × batch 1",
                                  fourBit / gb, bf16 / gb, q / fourBit, q / bf16, f / bf16, f / fourBit, twice?.formatted() ?? "no"),
                           qlora.0 == .holds && fullHolds ? .holds : .off,
                           "QLoRA ~2x of 4-bit inference " + qlora.1 + " at 2048 tokens (the length decides it); full 10-20x "
                               + (fullHolds ? "holds" : String(format: "is off: %.1fx against bf16 inference, %.0fx against 4-bit", f / bf16, f / fourBit)))
        },
        Claim("M25", "A 70B QLoRA run writes roughly 60 GB per checkpoint (5 checkpoints)", "A") { _ in
            // A Trainer checkpoint of a PEFT model: the fp32 adapter (4 B) and AdamW's exp_avg and
            // exp_avg_sq (8 B) per trainable parameter; the frozen base is not saved unless asked.
            let e = try estimate("llama-3.1-70b", .qlora)
            let adapter = 12 * e.params.trainable
            let fourBit = adapter + bytes(e, "base_weights", "quant_constants", "unquantized_weights")
            let merged = adapter + 2 * e.params.total
            let rankFor60 = 60e9 / 5 / Double(adapter) * 16
            let judged = [adapter, fourBit, merged].map { within(Double($0) / gb, 60) }
            let holds = judged.contains { $0.0 == .holds }
            return Finding("llama-3.1-70b r=16 all linear, per checkpoint: adapter (fp32) + AdamW states \(gigabytes(adapter)) (×5: \(gigabytes(5 * adapter))); with the 4-bit base \(gigabytes(fourBit)); with a merged 16-bit model \(gigabytes(merged)) (×5: \(gigabytes(5 * merged)))",
                           holds ? .holds : .off,
                           (holds ? "holds" : "off") + ": 60 GB against adapter + states \(judged[0].1), with the 4-bit base \(judged[1].1), with a merged 16-bit model \(judged[2].1) (what is saved decides it); "
                               + String(format: "60 GB for all 5 checkpoints together is adapter + states at r≈%.0f", rankFor60))
        },
        Claim("M26", "QLoRA hardware fit: 7B on a 24 GB RTX 3090; 13B on a 16 GB RTX 4080 (tight); 30B on a 24 GB RTX 4090; 70B on 128 GB (DGX Spark / Mac M5 Max); 120B (gpt-oss) on 128-192 GB", "A") { _ in
            // gpt-oss-120b ships its experts in MXFP4 (per 32 values 16 B of e2m1 pairs and one
            // e8m0 scale); transformers refuses a BitsAndBytesConfig on that checkpoint and
            // Mxfp4Config(dequantize=True) loads them as bf16 (moe.json), as does a bf16 copy
            // loaded in 4-bit: the experts a QLoRA run holds are bf16 unless bitsandbytes'
            // parametrize route quantizes them after loading.
            let oss = preset("gpt-oss-120b")
            let expertValues = oss.tensorGroups.filter { $0.kind == .expert }.reduce(0) { $0 + $1.elements }
            var nf4 = fitOptions(.qlora)
            nf4.experts = .nf4
            let asHeld = try fit("120B", oss, .qlora, in: "192 GB", 192)
            let routed = try fit("120B", oss, .qlora, in: "128 GB", 128, options: nf4)
            let f = fits([
                try fit("7B", preset("llama-2-7b"), .qlora, in: "24 GB", 24),
                try fit("13B", preset("llama-2-13b"), .qlora, in: "16 GB", 16),
                try fit("30B", llama30b, .qlora, in: "24 GB", 24),
                try fit("70B", preset("llama-3.1-70b"), .qlora, in: "128 GB", 128),
                asHeld,
            ], setting: fitSetting("QLoRA r=16 all linear (on gpt-oss PEFT's all-linear is the attention)") + "; " + llama30bNote)
            return Finding(f.figure + "; with its experts through bitsandbytes' parametrize route (--experts nf4): " + routed.text,
                           f.verdict,
                           f.detail + "; 120B (gpt-oss) as transformers 5 + bitsandbytes hold it: its \(gigabytes(expertValues / 32 * 17)) of MXFP4 experts load as \(gigabytes(2 * expertValues)) of bf16 (only nn.Linear is quantized), "
                               + (asHeld.fits ? "and it fits 192 GB" : "so it does not fit 192 GB") + "; it fits 128 GB only with the experts quantized after loading (\(routed.fits ? "fits" : "does not fit"), the route decides it)")
        },
        Claim("M27", "LoRA fit: 7B and 13B on a 24 GB RTX 4090; 30B on 2x24 GB or 48 GB; 70B on 128 GB or 2x H100. Full FT fit: 7B on 2x24 GB or one 48 GB; 13B on 2x A100 40 GB or one H100 80 GB; 30B on 4x A100 80 GB; 70B on 8x H100 80 GB", "A") { _ in
            let lora = [
                try fit("7B", preset("llama-2-7b"), .lora, in: "24 GB", 24),
                try fit("13B", preset("llama-2-13b"), .lora, in: "24 GB", 24),
                try fit("30B", llama30b, .lora, in: "48 GB", 48),
                try fit("70B", preset("llama-3.1-70b"), .lora, in: "128 GB", 128),
                try fit("70B", preset("llama-3.1-70b"), .lora, in: "2×80 GB", 80, gpus: 2),
            ]
            let fullSizes: [(String, ModelArchitecture, String, Double, Int)] = [
                ("7B", preset("llama-2-7b"), "48 GB", 48, 1), ("13B", preset("llama-2-13b"), "80 GB", 80, 1),
                ("30B", llama30b, "4×80 GB", 80, 4), ("70B", preset("llama-3.1-70b"), "8×80 GB", 80, 8),
            ]
            let adam = try fullSizes.map { try fit($0.0, $0.1, .full, in: $0.2, $0.3, gpus: $0.4) }
            let adam8 = try fullSizes.map { try fit($0.0, $0.1, .full8BitAdam, in: $0.2, $0.3, gpus: $0.4) }
            let counts = [lora, adam, adam8].map { rows in rows.filter(\.fits).count }
            let holds = counts[0] == lora.count && (counts[1] == adam.count || counts[2] == adam8.count)
            return Finding("LoRA (bf16 base): " + lora.map(\.text).joined(separator: "; ") + ". Full, mixed-precision AdamW: " + adam.map(\.text).joined(separator: "; ")
                               + ". Full, 8-bit AdamW: " + adam8.map(\.text).joined(separator: "; ") + " (" + fitSetting("LoRA r=16 all linear; all runs") + "; several GPUs sharded as FSDP; " + llama30bNote + ")",
                           holds ? .holds : .off,
                           (holds ? "holds: " : "off: ") + "LoRA \(counts[0]) of \(lora.count) fit; full fine-tune \(counts[1]) of \(adam.count) with mixed-precision AdamW, \(counts[2]) of \(adam8.count) with 8-bit AdamW (the optimizer decides it), at \(fitSeqLen) tokens × batch 1 or more")
        },
        Claim("M28", "QLoRA enables 7B models on an RTX 4070 (12 GB), 13B on an RTX 4090 (24 GB), 34B on dual RTX 4090 (48 GB)", "B") { _ in
            fits([
                try fit("7B", preset("llama-2-7b"), .qlora, in: "12 GB", 12),
                try fit("13B", preset("llama-2-13b"), .qlora, in: "24 GB", 24),
                try fit("34B", codeLlama34b, .qlora, in: "2×24 GB", 24, gpus: 2),
            ], setting: fitSetting("QLoRA r=16 all linear") + "; " + codeLlama34bNote)
        },
        Claim("M29", "7B with QLoRA needs 8 to 12 GB of VRAM (an RTX 3060 12 GB is enough); 13B QLoRA trains on a 24 GB GPU", "E") { c in
            let eight = try fit("7B", c.l7, .qlora, in: "8 GB", 8), twelve = try fit("7B", c.l7, .qlora, in: "12 GB", 12)
            let f = fits([twelve, try fit("13B", preset("llama-2-13b"), .qlora, in: "24 GB", 24)], setting: fitSetting("QLoRA r=16 all linear"))
            let range = [eight, twelve].map { $0.tokens.map { $0.formatted() } ?? "no" }
            return Finding("\(eight.text); " + f.figure, f.verdict,
                           f.detail + "; 7B passes 8 GB after \(range[0]) tokens and 12 GB after \(range[1]) tokens × batch 1 (the length decides it; \(gigabytes(withoutActivations(c.q7))) before activations)")
        },
        Claim("M30", "Plan 32 GB of system RAM for a 7B fine-tune, 64 GB for 13B+", "E") { c in
            let b13 = 2 * preset("llama-2-13b").totalParameters
            return Finding(String(format: "bf16 checkpoints: 7B llama-2-7b %@, 13B llama-2-13b %@; 32 GB and 64 GB are %.1fx and %.1fx of them",
                                  gigabytes(c.fp16Size), gigabytes(b13), 32 * gb / Double(c.fp16Size), 64 * gb / Double(b13)),
                           .notCheckable, "not checkable here: system RAM depends on the loader (reading the whole checkpoint into memory, or mapping safetensors and quantizing tensor by tensor), the data pipeline and the OS; the plan leaves room for one bf16 copy of the model")
        },
    ]
}
