import XCTest
import Checkpoint
import QLoRA
import SafeTensors
import TestSupport

/// `mergeCheckpoint` end to end against PEFT's merge_and_unload (Vectors/quant/merge.safetensors).
final class MergeTests: XCTestCase {
    var tmp: URL!
    override func setUpWithError() throws {
        tmp = FileManager.default.temporaryDirectory.appendingPathComponent("qlora-merge-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: tmp) }

    func adapter(_ v: VectorFile, _ id: String, modules: [String], p: [String: Any]) -> PEFTAdapter {
        var a = PEFTAdapter(rank: p["r"] as! Int, loraAlpha: Double(p["lora_alpha"] as! Int), targetModules: modules)
        a.useRSLoRA = p["use_rslora"] as! Bool
        a.rankPattern = p["rank_pattern"] as! [String: Int]
        a.alphaPattern = (p["alpha_pattern"] as! [String: Int]).mapValues(Double.init)
        let stored = ElementType(rawValue: p["adapter_dtype"] as! String)!
        for m in modules {
            let ai = v.info("\(id).\(m).lora_A.weight"), bi = v.info("\(id).\(m).lora_B.weight")
            a.modules[m] = .init(path: m, rank: ai.shape[0], inFeatures: ai.shape[1], outFeatures: bi.shape[0],
                                 loraA: v.floats("\(id).\(m).lora_A.weight"), loraB: v.floats("\(id).\(m).lora_B.weight"), storedType: stored)
        }
        return a
    }

    func testDenseBasesMatchPEFT() throws {
        let v = try VectorFile("merge")
        for id in ["float32_r8", "bfloat16_r16_rslora", "bfloat16_r8_bf16adapter", "float32_r8_bf16adapter"] {
            let p = try XCTUnwrap(v.cases[id])
            let base = tmp.appendingPathComponent("\(id)-base.safetensors")
            var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = [("norm.weight", .f32, [2], rawBytes([Float(1), 2]))]
            for m in ["proj_a", "proj_b"] {
                let i = v.info("\(id).base.\(m)")
                tensors.append((m + ".weight", i.dtype, i.shape, v.bytes("\(id).base.\(m)")))
            }
            try SafeTensorsWriter.write(url: base, tensors: tensors)
            let adapterDir = tmp.appendingPathComponent("\(id)-adapter").path
            try adapter(v, id, modules: ["proj_a", "proj_b"], p: p).save(directory: adapterDir)
            let out = tmp.appendingPathComponent("\(id)-merged.safetensors").path
            var options = MergeOptions()
            options.report = true
            let s = try mergeCheckpoint(base: base.path, adapter: adapterDir, output: out, options: options)
            XCTAssertEqual(s.merged, 2)
            XCTAssertEqual(s.copied, 1)
            if id == "float32_r8" {  // an fp32 base stores the exact fp32 sum: no error, ΔW applied as computed
                XCTAssertEqual(s.total.errorToDelta, 0)
                XCTAssertEqual(s.total.deltaCosine, 1, accuracy: 1e-6)
            }
            let f = try SafeTensorsFile(path: out)
            for m in ["proj_a", "proj_b"] {
                XCTAssertNil(byteMismatch(f.withBytes(of: m + ".weight") { Array($0) }, v.bytes("\(id).merged.\(m)"), name: "\(id) \(m)"))
            }
        }
    }

    func testFourBitBaseMatchesPEFT() throws {
        let v = try VectorFile("merge")
        let p = try XCTUnwrap(v.cases["nf4_r8"])
        let dense = tmp.appendingPathComponent("dense.safetensors")
        try SafeTensorsWriter.write(url: dense, tensors: [("proj.weight", .bf16, [32, 64], v.bytes("nf4_r8.base.proj"))])
        let base = tmp.appendingPathComponent("nf4.safetensors").path
        try quantizeCheckpoint(input: dense.path, output: base, options: QuantizeOptions())
        let adapterDir = tmp.appendingPathComponent("adapter").path
        try adapter(v, "nf4_r8", modules: ["proj"], p: p).save(directory: adapterDir)

        let m16 = tmp.appendingPathComponent("m16.safetensors").path
        let s16 = try mergeCheckpoint(base: base, adapter: adapterDir, output: m16, options: MergeOptions())
        XCTAssertTrue(s16.report.isEmpty, "no report unless asked for")
        let f16 = try SafeTensorsFile(path: m16)
        XCTAssertEqual(f16.tensors.map(\.name), ["proj.weight"], "4-bit companions are dropped from a 16-bit merge")
        XCTAssertNil(byteMismatch(f16.withBytes(of: "proj.weight") { Array($0) }, v.bytes("nf4_r8.merged_16bit.proj"), name: "merged_16bit"))

        var o = MergeOptions()
        o.requantize = true
        o.report = true
        let m4 = tmp.appendingPathComponent("m4.safetensors").path
        let summary = try mergeCheckpoint(base: base, adapter: adapterDir, output: m4, options: o)
        let f4 = try SafeTensorsFile(path: m4)
        // The report, recomputed here from PEFT's own tensors: W (dequantized bf16 base),
        // ΔW = merged_16bit's exact fp32 sum − W, Q(W+ΔW) = PEFT's re-quantized weight dequantized.
        let row = try XCTUnwrap(summary.report.first)
        XCTAssertEqual(summary.report.count, 1)
        let q = try v.withElements("nf4_r8.base.proj") { try quantize4Bit($0, shape: [32, 64]) }
        let w = q.dequantizedBytes().withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) } }
        let d = LoRAMerge.delta(loraA: v.floats("nf4_r8.proj.lora_A.weight"), loraB: v.floats("nf4_r8.proj.lora_B.weight"),
                                rank: 8, inFeatures: 64, outFeatures: 32, scaling: 2)
        let written = v.floats("nf4_r8.merged_4bit.dequantized")
        var e2 = 0.0, d2 = 0.0, s2 = 0.0, dot = 0.0, a2 = 0.0
        for i in w.indices {
            let sum = Double(w[i] + d[i]), e = Double(written[i]) - sum, a = Double(written[i]) - Double(w[i])
            e2 += e * e; d2 += Double(d[i]) * Double(d[i]); s2 += sum * sum; dot += a * Double(d[i]); a2 += a * a
        }
        XCTAssertEqual(row.errorToDelta, (e2 / d2).squareRoot(), accuracy: 1e-9)
        XCTAssertEqual(row.errorToWeight, (e2 / s2).squareRoot(), accuracy: 1e-9)
        XCTAssertEqual(row.deltaCosine, dot / (d2 * a2).squareRoot(), accuracy: 1e-9)
        XCTAssertGreaterThan(row.errorToDelta, 0.1, "4-bit re-quantization error is large next to a small ΔW")
        XCTAssertEqual(summary.total.errorToDelta, row.errorToDelta, accuracy: 1e-12)
        XCTAssertNil(byteMismatch(f4.withBytes(of: "proj.weight") { Array($0) }, v.bytes("nf4_r8.merged_4bit.proj"), name: "packed"))
        for part in ["absmax", "nested_absmax", "quant_map", "nested_quant_map", "quant_state.bitsandbytes__nf4"] {
            XCTAssertNil(byteMismatch(f4.withBytes(of: "proj.weight." + part) { Array($0) }, v.bytes("nf4_r8.merged_4bit.proj." + part), name: part))
        }
    }

    func testAdapterThatDoesNotFitTheBaseWritesNothing() throws {
        let v = try VectorFile("merge")
        let p = try XCTUnwrap(v.cases["float32_r8"])
        let base = tmp.appendingPathComponent("base.safetensors")
        let i = v.info("float32_r8.base.proj_a")
        try SafeTensorsWriter.write(url: base, tensors: [("proj_a.weight", i.dtype, i.shape, v.bytes("float32_r8.base.proj_a"))])
        let adapterDir = tmp.appendingPathComponent("adapter").path
        try adapter(v, "float32_r8", modules: ["proj_a", "proj_b"], p: p).save(directory: adapterDir)
        let out = tmp.appendingPathComponent("out.safetensors").path
        XCTAssertThrowsError(try mergeCheckpoint(base: base.path, adapter: adapterDir, output: out, options: MergeOptions())) {
            XCTAssertTrue("\($0)".contains("proj_b.weight") && "\($0)".contains("no such weight"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
    }
}
