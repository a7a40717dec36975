import XCTest
import CheckpointFormats
import CheckpointJobs
import QLoRA
import SafeTensors
import TestSupport

/// `mergeCheckpoint` end to end against PEFT's merge_and_unload (Vectors/quant/merge.safetensors).
final class MergeTests: TemporaryDirectoryTestCase {

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

    /// The nf4_r8 case as files: its bf16 base, that base through `quantizeCheckpoint`, its adapter.
    func fourBitCase() throws -> (VectorFile, dense: URL, base: String, adapterDir: String) {
        let v = try VectorFile("merge")
        let p = try XCTUnwrap(v.cases["nf4_r8"])
        let dense = tmp.appendingPathComponent("dense.safetensors")
        try SafeTensorsWriter.write(url: dense, tensors: [("proj.weight", .bf16, [32, 64], v.bytes("nf4_r8.base.proj"))])
        let base = tmp.appendingPathComponent("nf4.safetensors").path
        try quantizeCheckpoint(input: dense.path, output: base, options: QuantizeOptions())
        let adapterDir = tmp.appendingPathComponent("adapter").path
        try adapter(v, "nf4_r8", modules: ["proj"], p: p).save(directory: adapterDir)
        return (v, dense, base, adapterDir)
    }

    func testFourBitBaseMatchesPEFT() throws {
        let (v, _, base, adapterDir) = try fourBitCase()

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

    /// A GPT-2 style Conv1D base ([in, out]) with a fan_in_fan_out adapter file.
    func testFanInFanOutAdapterFileMatchesPEFT() throws {
        let v = try VectorFile("merge")
        let p = try XCTUnwrap(v.cases["conv_r8"])
        let i = v.info("conv_r8.base.c_attn")
        let base = tmp.appendingPathComponent("conv.safetensors")
        try SafeTensorsWriter.write(url: base, tensors: [("c_attn.weight", i.dtype, i.shape, v.bytes("conv_r8.base.c_attn"))])
        var a = PEFTAdapter(rank: 8, loraAlpha: 16, targetModules: ["c_attn"])
        a.fanInFanOut = true
        let ai = v.info("conv_r8.c_attn.lora_A.weight"), bi = v.info("conv_r8.c_attn.lora_B.weight")
        a.modules["c_attn"] = .init(path: "c_attn", rank: 8, inFeatures: ai.shape[1], outFeatures: bi.shape[0],
                                    loraA: v.floats("conv_r8.c_attn.lora_A.weight"), loraB: v.floats("conv_r8.c_attn.lora_B.weight"))
        XCTAssertEqual(p["fan_in_fan_out"] as? Bool, true)
        let adapterDir = tmp.appendingPathComponent("adapter").path
        try a.save(directory: adapterDir)
        XCTAssertTrue(try PEFTAdapter.load(directory: adapterDir).fanInFanOut)
        let out = tmp.appendingPathComponent("out.safetensors").path
        try mergeCheckpoint(base: base.path, adapter: adapterDir, output: out, options: MergeOptions())
        XCTAssertNil(byteMismatch(try SafeTensorsFile(path: out).withBytes(of: "c_attn.weight") { Array($0) }, v.bytes("conv_r8.merged.c_attn"), name: "c_attn", elementSize: 4))
    }

    func twoAdapters(_ v: VectorFile, _ id: String) throws -> [MergeAdapter] {
        let p = try XCTUnwrap(v.cases[id])
        return try (p["adapters"] as! [[String: Any]]).map { spec in
            let name = spec["name"] as! String, r = spec["r"] as! Int
            var a = PEFTAdapter(rank: r, loraAlpha: Double(spec["lora_alpha"] as! Int), targetModules: ["proj"])
            a.modules["proj"] = .init(path: "proj", rank: r, inFeatures: 64, outFeatures: 32,
                                      loraA: v.floats("\(id).\(name).proj.lora_A.weight"), loraB: v.floats("\(id).\(name).proj.lora_B.weight"))
            let dir = tmp.appendingPathComponent("\(id)-\(name)").path
            try a.save(directory: dir)
            return MergeAdapter(dir, weight: spec["weight"] as! Double)
        }
    }

    /// Two adapters in order, the second at weight 0.5: PEFT's merge_and_unload(adapter_names:)
    /// with scale_layer, on a bf16 base (rounded after each) and a bnb-4bit base (re-quantized after each).
    func testSeveralWeightedAdaptersMatchPEFT() throws {
        let v = try VectorFile("merge")
        let dense = tmp.appendingPathComponent("dense.safetensors")
        try SafeTensorsWriter.write(url: dense, tensors: [("proj.weight", .bf16, [32, 64], v.bytes("two_bf16.base.proj"))])
        let out = tmp.appendingPathComponent("two.safetensors").path
        try mergeCheckpoint(base: dense.path, adapters: twoAdapters(v, "two_bf16"), output: out, options: MergeOptions())
        XCTAssertNil(byteMismatch(try SafeTensorsFile(path: out).withBytes(of: "proj.weight") { Array($0) }, v.bytes("two_bf16.merged.proj"), name: "two bf16", elementSize: 2))

        let dense4 = tmp.appendingPathComponent("dense4.safetensors")
        try SafeTensorsWriter.write(url: dense4, tensors: [("proj.weight", .bf16, [32, 64], v.bytes("nf4_r8.base.proj"))])
        let base4 = tmp.appendingPathComponent("nf4.safetensors").path
        try quantizeCheckpoint(input: dense4.path, output: base4, options: QuantizeOptions())
        var o = MergeOptions()
        o.requantize = true
        let out4 = tmp.appendingPathComponent("two4.safetensors").path
        try mergeCheckpoint(base: base4, adapters: twoAdapters(v, "two_nf4"), output: out4, options: o)
        let f4 = try SafeTensorsFile(path: out4)
        XCTAssertNil(byteMismatch(f4.withBytes(of: "proj.weight") { Array($0) }, v.bytes("two_nf4.merged_4bit.proj"), name: "two nf4 packed"))
        for part in ["absmax", "nested_absmax", "quant_map", "nested_quant_map", "quant_state.bitsandbytes__nf4"] {
            XCTAssertNil(byteMismatch(f4.withBytes(of: "proj.weight." + part) { Array($0) }, v.bytes("two_nf4.merged_4bit.proj." + part), name: "two nf4 " + part))
        }
    }

    /// --max-shard-size re-shards the output (with an index) without changing a byte of any tensor.
    func testMaxShardSizeReshardsTheSameTensors() throws {
        let spec = SampleCheckpointSpec(architecture: ModelArchitecture(name: "sample", hiddenSize: 64, intermediateSize: 128, layers: 2, attentionHeads: 16, vocabSize: 256))
        let base = tmp.appendingPathComponent("sample").path
        try writeSampleCheckpoint(output: base, spec: spec)
        let adapterDir = tmp.appendingPathComponent("sample-adapter").path
        try writeSampleAdapter(directory: adapterDir, spec: spec, rank: 4)
        let plain = tmp.appendingPathComponent("plain").path, sharded = tmp.appendingPathComponent("sharded").path
        try mergeCheckpoint(base: base, adapter: adapterDir, output: plain, options: MergeOptions())
        var o = MergeOptions()
        o.maxShardSize = 40_000
        let s = try mergeCheckpoint(base: base, adapter: adapterDir, output: sharded, options: o)
        let a = try CheckpointReader(path: plain), b = try CheckpointReader(path: sharded)
        XCTAssertEqual(a.shardFileNames, ["model.safetensors"])
        XCTAssertGreaterThan(b.shardFileNames.count, 3)
        XCTAssertNotNil(b.index)
        XCTAssertEqual(a.tensorNames, b.tensorNames)
        for name in a.tensorNames {
            XCTAssertEqual(a.withBytes(of: name) { Array($0) }, b.withBytes(of: name) { Array($0) }, name)
        }
        XCTAssertEqual(s.bytesWritten, b.shardFileNames.reduce(0) { t, f in
            t + ((try? FileManager.default.attributesOfItem(atPath: sharded + "/" + f)[.size] as? Int) ?? 0)
        })
        XCTAssertTrue(FileManager.default.fileExists(atPath: sharded + "/config.json"), "config.json copied beside the shards")
    }

    /// --compare-original: each choice of base against T = dequant(W4) + ΔW, recomputed here from
    /// PEFT's own tensors (the original bf16 base, its bnb quantization, PEFT's merged weights).
    func testCompareOriginalAgainstRecomputation() throws {
        let (v, dense, base, adapterDir) = try fourBitCase()
        var o = MergeOptions()
        o.compareOriginal = dense.path
        let s = try mergeCheckpoint(base: base, adapter: adapterDir, output: tmp.appendingPathComponent("m.safetensors").path, options: o)
        let row = try XCTUnwrap(s.comparison.first)

        let q = try v.withElements("nf4_r8.base.proj") { try quantize4Bit($0, shape: [32, 64]) }
        let w4 = q.dequantizedBytes().withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) } }
        let w16 = v.bytes("nf4_r8.base.proj").withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) } }
        let d = LoRAMerge.delta(loraA: v.floats("nf4_r8.proj.lora_A.weight"), loraB: v.floats("nf4_r8.proj.lora_B.weight"),
                                rank: 8, inFeatures: 64, outFeatures: 32, scaling: 2)
        let deq16 = v.bytes("nf4_r8.merged_16bit.proj").withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { HalfPrecision.float(bfloat16Bits: $0) } }
        let req4 = v.floats("nf4_r8.merged_4bit.dequantized")
        let orig16 = zip(w16, d).map { HalfPrecision.roundedToBFloat16($0 + $1) }  // PEFT's bf16 merge (the dense vectors hold it to the bit)
        func rel(_ x: [Float]) -> Double {
            var e = 0.0, dd = 0.0
            for i in d.indices { let t = Double(w4[i] + d[i]); e += (Double(x[i]) - t) * (Double(x[i]) - t); dd += Double(d[i]) * Double(d[i]) }
            return (e / dd).squareRoot()
        }
        XCTAssertEqual(row.original16, rel(orig16), accuracy: 1e-9)
        XCTAssertEqual(row.dequantized16, rel(deq16), accuracy: 1e-9)
        XCTAssertEqual(row.requantized4, rel(req4), accuracy: 1e-9)
        let shift = zip(w16, w4).map { Double($0 - $1) * Double($0 - $1) }.reduce(0, +)
        XCTAssertEqual(row.baseShift, (shift / d.map { Double($0) * Double($0) }.reduce(0, +)).squareRoot(), accuracy: 1e-9)
        // The dequantized 16-bit base is the closest to what the adapter was trained against.
        XCTAssertLessThan(row.dequantized16, row.requantized4)
        XCTAssertLessThan(row.dequantized16, row.original16)

        // A dense base cannot be compared.
        XCTAssertThrowsError(try mergeCheckpoint(base: dense.path, adapter: adapterDir, output: tmp.appendingPathComponent("x.safetensors").path, options: o)) {
            XCTAssertTrue("\($0)".contains("needs a 4-bit base"), "\($0)")
        }
    }

    /// Released pages of a mapped tensor stay readable (they fault back in from the file).
    func testReleasedPagesStayReadable() throws {
        let url = tmp.appendingPathComponent("big.safetensors")
        let values = (0..<300_000).map { Float($0) }
        try SafeTensorsWriter.write(url: url, tensors: [("t", .f32, [values.count], rawBytes(values))])
        let r = try CheckpointReader(path: url.path)
        let before = r.withBytes(of: "t") { Array($0) }
        r.releasePages(of: "t")
        XCTAssertEqual(r.withBytes(of: "t") { Array($0) }, before)
    }

    /// A merged value that overflows the base's dtype (PEFT's safe_merge check) stops the merge,
    /// naming the tensor and the element, and nothing is written.
    func testNonFiniteMergeWritesNothing() throws {
        var w = [Float](repeating: 0.01, count: 8 * 16)
        w[37] = 3.38e38  // bf16's largest finite value is 3.39e38; the delta pushes it over
        let base = tmp.appendingPathComponent("base.safetensors")
        try SafeTensorsWriter.write(url: base, tensors: [("proj.weight", .bf16, [8, 16], w.map { HalfPrecision.bfloat16Bits($0) }.withUnsafeBytes { Array($0) })])
        var a = PEFTAdapter(rank: 1, loraAlpha: 1, targetModules: ["proj"])
        a.modules["proj"] = .init(path: "proj", rank: 1, inFeatures: 16, outFeatures: 8,
                                  loraA: [Float](repeating: 1, count: 16), loraB: [Float](repeating: 1e38, count: 8))
        let adapterDir = tmp.appendingPathComponent("adapter").path
        try a.save(directory: adapterDir)
        let out = tmp.appendingPathComponent("out.safetensors").path
        XCTAssertThrowsError(try mergeCheckpoint(base: base.path, adapter: adapterDir, output: out, options: MergeOptions())) {
            XCTAssertTrue("\($0)".contains("proj.weight") && "\($0)".contains("merged value 37 is not finite"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmp.path).filter { $0.hasPrefix(".") }, [], "temporary files left behind")
    }

    /// Merging into transformers' bnb-4bit variants (Vectors/bnb_variants): a re-quantized weight keeps
    /// the base's quant_storage (PEFT rebuilds `Params4bit` with the old one's attributes), and a base
    /// with a bf16 nested_dtype merges from bitsandbytes' own dequantization of it.
    func testMergeIntoQuantStorageAndSixteenBitNestedVariants() throws {
        let variants = repositoryRoot.appendingPathComponent("Vectors/bnb_variants")
        let q = "model.layers.0.self_attn.q_proj"
        var a = PEFTAdapter(rank: 2, loraAlpha: 4, targetModules: ["q_proj"])
        var rng = SplitMix64(seed: 12)
        a.modules[q] = .init(path: q, rank: 2, inFeatures: 64, outFeatures: 64, loraA: (0..<128).map { _ in Float(rng.unit() - 0.5) * 0.1 },
                             loraB: (0..<128).map { _ in Float(rng.unit() - 0.5) * 0.01 })
        let adapterDir = tmp.appendingPathComponent("adapter").path
        try a.save(directory: adapterDir)
        func quantStorage(_ dir: String) throws -> String? {
            let c = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/config.json"))) as? [String: Any]
            return (c?["quantization_config"] as? [String: Any])?["bnb_4bit_quant_storage"] as? String
        }
        var o = MergeOptions()
        o.requantize = true
        var packed: [UInt8]? = nil
        for storage in ["uint8", "bfloat16"] {
            let out = tmp.appendingPathComponent("m-\(storage)").path
            try mergeCheckpoint(base: variants.appendingPathComponent("nf4-\(storage)").path, adapter: adapterDir, output: out, options: o)
            let f = try SafeTensorsFile(path: out + "/model.safetensors")
            let info = try XCTUnwrap(f.info(named: q + ".weight"))
            XCTAssertEqual(info.dtype, storage == "uint8" ? .u8 : .bf16)
            XCTAssertEqual(info.shape, storage == "uint8" ? [2048, 1] : [1024, 1])
            XCTAssertEqual(f.info(named: "model.layers.0.self_attn.k_proj.weight")?.dtype, info.dtype, "an unmerged weight is copied as it is")
            XCTAssertEqual(try quantStorage(out), storage)
            let bytes = f.withBytes(of: q + ".weight") { Array($0) }
            if let packed { XCTAssertEqual(bytes, packed, "the same re-quantized bytes, retyped") } else { packed = bytes }
        }
        // A zero B merges to the base itself: bitsandbytes' dequantization of the bf16-nested weight.
        a.modules[q]!.loraB = [Float](repeating: 0, count: 128)
        let zeroDir = tmp.appendingPathComponent("zero-adapter").path
        try a.save(directory: zeroDir)
        let out = tmp.appendingPathComponent("m-forward").path
        try mergeCheckpoint(base: variants.appendingPathComponent("nf4-forward-bf16").path, adapter: zeroDir, output: out, options: MergeOptions())
        let expected = try VectorFile("expected", directory: "Vectors/bnb_variants")
        let f = try SafeTensorsFile(path: out + "/model.safetensors")
        XCTAssertNil(byteMismatch(f.withBytes(of: q + ".weight") { Array($0) }, expected.bytes("nf4-forward-bf16.\(q).weight.dequantized"),
                                  name: "merged bf16-nested q_proj", elementSize: 2))
        XCTAssertEqual(try quantStorage(out), "uint8")
    }
}
