import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors
import TestSupport
import Training
import XCTest

/// `qlora train` on a mixture of experts against transformers 5.23 + bitsandbytes + PEFT
/// (Vectors/moe/train.safetensors, made by Vectors/generate_moe_train.py): a tiny Qwen3-MoE and
/// Mixtral whose tensors and LoRA adapters are bf16 bits from their names (`smallWeights`), NF4
/// attention with LoRA, the router and experts frozen in bf16; three AdamW steps, each loss held
/// to PEFT's within LlamaTests' loss tolerance (the bf16 roundings of differently ordered sums;
/// the sparse block itself is bit-exact, SparseMoETests).
final class MixtureOfExpertsTrainingTests: XCTestCase {
    /// The tensors transformers 5.23 saves for the family (one tensor per expert).
    static func shapes(_ family: String, _ c: [String: Any]) -> [(String, [Int])] {
        let h = c["hidden_size"] as! Int, heads = c["num_attention_heads"] as! Int
        let hd = c["head_dim"] as? Int ?? h / heads
        let (q, kv, v) = (heads * hd, (c["num_key_value_heads"] as! Int) * hd, c["vocab_size"] as! Int)
        let e = c["num_experts"] as? Int ?? c["num_local_experts"] as! Int
        let i = family == "qwen3_moe" ? c["moe_intermediate_size"] as! Int : c["intermediate_size"] as! Int
        var s: [(String, [Int])] = [("model.embed_tokens.weight", [v, h]), ("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
        for l in 0..<(c["num_hidden_layers"] as! Int) {
            let p = "model.layers.\(l)."
            s += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [q, h]),
                  (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, q])]
            let (block, names) = family == "qwen3_moe" ? ("mlp", ("gate_proj", "up_proj", "down_proj")) : ("block_sparse_moe", ("w1", "w3", "w2"))
            if family == "qwen3_moe" { s += [(p + "self_attn.q_norm.weight", [hd]), (p + "self_attn.k_norm.weight", [hd])] }
            s.append((p + block + ".gate.weight", [e, h]))
            for x in 0..<e {
                s += [(p + "\(block).experts.\(x).\(names.0).weight", [i, h]), (p + "\(block).experts.\(x).\(names.1).weight", [i, h]),
                      (p + "\(block).experts.\(x).\(names.2).weight", [h, i])]
            }
        }
        return s
    }

    /// generate_moe_train.py's `bf16`: `smallWeights` scaled by 2^-3 (the same bits 3 lower in the
    /// exponent field, which small_weights keeps at 118 or more), norms and routers as they are.
    static func weights(_ name: String, _ count: Int) -> [UInt16] {
        let bits = smallWeights(name, count)
        return name.hasSuffix("norm.weight") || name.hasSuffix(".gate.weight") ? bits : bits.map { $0 - (3 << 7) }
    }

    func testStepsFollowPEFT() throws {
        let v = try VectorFile("train", directory: "Vectors/moe")
        let configs = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(XCTUnwrap(v.file.metadata["configs"]).utf8)) as? [String: String])
        XCTAssertEqual(Set(configs.keys), ["qwen3_moe", "mixtral"])
        for (family, text) in configs.sorted(by: { $0.key < $1.key }) {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moe-train-\(family)-\(UUID().uuidString)")
            defer { try? FileManager.default.removeItem(at: dir) }
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            try Data(text.utf8).write(to: dir.appendingPathComponent("config.json"))
            let c = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
            let shapes = Self.shapes(family, c)
            let w = try SafeTensorsWriter(url: dir.appendingPathComponent("model.safetensors"), tensors: shapes.map { ($0.0, DType.bf16, $0.1) }, metadata: ["format": "pt"])
            for (name, shape) in shapes { try Self.weights(name, shape.reduce(1, *)).withUnsafeBytes { try w.write(name, bytes: $0) } }
            try w.finish()
            let arch = try LlamaCheckpoint.config(directory: dir.path)
            XCTAssertNotNil(arch.experts, family)
            // PEFT's LoRA on the attention, A and B from their names.
            var adapter = PEFTAdapter(rank: 8, loraAlpha: 16, targetModules: ModelArchitecture.attentionProjections)
            for l in 0..<arch.layers {
                for p in arch.projections(layer: l) {
                    let path = p.modulePath(layer: l)
                    func values(_ kind: String, _ n: Int) -> [Float] { Self.weights("\(path).\(kind)", n).map { HalfPrecision.float(bfloat16Bits: $0) } }
                    adapter.modules[path] = .init(path: path, rank: 8, inFeatures: p.inFeatures, outFeatures: p.outFeatures,
                                                  loraA: values("lora_A", 8 * p.inFeatures), loraB: values("lora_B", p.outFeatures * 8))
                }
            }
            // LoRA on the experts (target_parameters) is refused, not dropped.
            var onExperts = adapter
            onExperts.targetParameters = ["experts.gate_up_proj", "experts.down_proj"]
            XCTAssertThrowsError(try LlamaCheckpoint.load(directory: dir.path, adapter: onExperts), family)
            let m = try LlamaCheckpoint.load(directory: dir.path, adapter: adapter)
            XCTAssertEqual(m.adapters.count, 4 * arch.layers, "\(family): the attention's adapters only")
            XCTAssertTrue(m.layers.allSatisfy { $0.experts != nil }, family)
            func ints(_ name: String) -> [Int] { v.bytes("\(family).\(name)").withUnsafeBytes { raw in (0..<(raw.count / 4)).map { Int(raw.loadUnaligned(fromByteOffset: 4 * $0, as: Int32.self)) } } }
            let ids = ints("input_ids"), labels = ints("labels")
            let examples = (0..<2).map { b in TrainingExample(inputIds: Array(ids[(b * 16)..<((b + 1) * 16)]), labels: Array(labels[(b * 16)..<((b + 1) * 16)])) }
            let trainer = LlamaTrainer(model: m, optimizer: AdamWConfig(lr: 1e-3, weightDecay: 0.01))
            let want = v.floats("\(family).step_losses")
            for (step, w) in want.enumerated() {
                let loss = try trainer.step([examples], seq: 16).loss
                print(String(format: "%@ step %d: loss %.6f, PEFT %.6f, %.2f of the tolerance", family, step, loss, w, abs(loss - w) / (LlamaTests.lossTolerance * abs(w))))
                XCTAssertEqual(loss, w, accuracy: LlamaTests.lossTolerance * abs(w), "\(family) step \(step) loss")
            }
        }
    }
}
