import XCTest
import QLoRA
import TestSupport

/// PEFT's merge_and_unload (Vectors/quant/merge.safetensors).
final class LoRAMergeTests: XCTestCase {
    func testDenseMergesMatchPEFT() throws {
        let v = try VectorFile("merge")
        var checked = 0
        for (id, p) in v.cases.sorted(by: { $0.key < $1.key }) where (p["base_dtype"] as! String) != "nf4" {
            let baseType = ElementType(rawValue: p["base_dtype"] as! String)!
            let adapterType = ElementType(rawValue: p["adapter_dtype"] as! String)!
            let rankPattern = p["rank_pattern"] as! [String: Int], alphaPattern = p["alpha_pattern"] as! [String: Int]
            for module in p["modules"] as! [String] {
                let info = v.info("\(id).base.\(module)")
                let fanIn = p["fan_in_fan_out"] as! Bool
                let (n, k) = fanIn ? (info.shape[1], info.shape[0]) : (info.shape[0], info.shape[1])
                let r = rankPattern[module] ?? (p["r"] as! Int)
                let alpha = Double(alphaPattern[module] ?? (p["lora_alpha"] as! Int))
                let config = LoRAConfig(rank: r, alpha: alpha, useRSLoRA: p["use_rslora"] as! Bool)
                let d = LoRAMerge.delta(loraA: v.floats("\(id).\(module).lora_A.weight"), loraB: v.floats("\(id).\(module).lora_B.weight"),
                                        rank: r, inFeatures: k, outFeatures: n, scaling: config.scaling, adapterType: adapterType, fanInFanOut: fanIn)
                var out = [UInt8](repeating: 0, count: n * k * baseType.byteSize)
                try v.withElements("\(id).base.\(module)") { base in
                    out.withUnsafeMutableBytes { LoRAMerge.add(base: base, delta: d, into: .view($0, as: baseType)) }
                }
                XCTAssertNil(byteMismatch(out, v.bytes("\(id).merged.\(module)"), name: "\(id) \(module)", elementSize: baseType.byteSize))
                checked += 1
            }
        }
        XCTAssertEqual(checked, 13)
    }

    /// A bnb-4bit base: dequantize exactly, add delta in fp32, then either round once to bf16
    /// (the "merged_16bit" export) or re-quantize the fp32 sum (PEFT's merge_and_unload, whose
    /// new quant state records float32).
    func testFourBitMergeMatchesPEFT() throws {
        let v = try VectorFile("merge")
        let p = try XCTUnwrap(v.cases["nf4_r8"])
        let (n, k, r) = (32, 64, 8)
        let q = try v.withElements("nf4_r8.base.proj") { try quantize4Bit($0, shape: [n, k]) }
        // dequantize_4bit returns the recorded dtype: bf16, as the base was quantized from bf16
        let deq = q.dequantizedBytes().withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) } }
        let d = LoRAMerge.delta(loraA: v.floats("nf4_r8.proj.lora_A.weight"), loraB: v.floats("nf4_r8.proj.lora_B.weight"),
                                rank: r, inFeatures: k, outFeatures: n, scaling: LoRAConfig(rank: r, alpha: 16).scaling)
        var m16 = [UInt8](repeating: 0, count: n * k * 2)
        deq.withUnsafeBufferPointer { b in m16.withUnsafeMutableBytes { LoRAMerge.add(base: .float32(b), delta: d, into: .view($0, as: .bfloat16)) } }
        XCTAssertNil(byteMismatch(m16, v.bytes("nf4_r8.merged_16bit.proj"), name: "merged_16bit", elementSize: 2))

        XCTAssertEqual(p["merged_quant_state_dtype"] as? String, "torch.float32")
        var sum = [Float](repeating: 0, count: n * k)
        deq.withUnsafeBufferPointer { b in sum.withUnsafeMutableBufferPointer { LoRAMerge.add(base: .float32(b), delta: d, into: .float32($0)) } }
        let merged = try sum.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [n, k]) }
        XCTAssertNil(byteMismatch(merged.packed, v.bytes("nf4_r8.merged_4bit.proj"), name: "merged 4-bit packed"))
        guard case .nested(let nested) = merged.state.absmax else { return XCTFail("double quant expected") }
        XCTAssertNil(byteMismatch(nested.quantized, v.bytes("nf4_r8.merged_4bit.proj.absmax"), name: "merged absmax"))
        XCTAssertNil(byteMismatch(rawBytes(nested.absmax), v.bytes("nf4_r8.merged_4bit.proj.nested_absmax"), name: "merged nested absmax", elementSize: 4))
        XCTAssertNil(byteMismatch(merged.dequantizedBytes(as: .float32), v.bytes("nf4_r8.merged_4bit.dequantized"), name: "merged 4-bit dequantized", elementSize: 4))
    }
}
