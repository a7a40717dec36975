import XCTest
import CheckpointFormats
import CheckpointJobs
import QLoRA
import SafeTensors
import TestSupport

final class CheckpointTests: TemporaryDirectoryTestCase {

    var dense: String { repositoryRoot.appendingPathComponent("Vectors/checkpoint/model.safetensors").path }

    /// A checkpoint quantized by qlora holds exactly the tensors bitsandbytes' Linear4bit
    /// state_dict holds: same names, dtypes, shapes and bytes (quant-state JSON included).
    func testQuantizedCheckpointEqualsBitsandbytesSerialization() throws {
        for qt in QuantType.allCases {
            for dq in [true, false] {
                let name = "bnb-\(qt.rawValue)-\(dq ? "dq" : "nodq")"
                let out = tmp.appendingPathComponent(name + ".safetensors").path
                var o = QuantizeOptions()
                o.quantType = qt
                o.doubleQuant = dq
                try quantizeCheckpoint(input: dense, output: out, options: o)
                let ours = try SafeTensorsFile(path: out)
                let theirs = try SafeTensorsFile(path: repositoryRoot.appendingPathComponent("Vectors/checkpoint/\(name).safetensors").path)
                XCTAssertEqual(Set(ours.tensors.map(\.name)), Set(theirs.tensors.map(\.name)), name)
                for t in theirs.tensors {
                    guard let mine = ours.info(named: t.name) else { continue }
                    XCTAssertEqual(mine.dtype, t.dtype, "\(name) \(t.name) dtype")
                    XCTAssertEqual(mine.shape, t.shape, "\(name) \(t.name) shape")
                    XCTAssertNil(byteMismatch(ours.withBytes(of: t.name) { Array($0) }, theirs.withBytes(of: t.name) { Array($0) },
                                              name: "\(name) \(t.name)"))
                }
            }
        }
    }

    /// The quant-state JSON of every golden case, byte for byte (Python's json.dumps).
    func testQuantStateJSONMatchesEveryGoldenCase() throws {
        var checked = 0
        for group in ["grid", "shapes", "edges"] {
            let v = try VectorFile(group)
            for (id, p) in v.cases {
                let qt = QuantType(rawValue: p["quant_type"] as! String)!
                let q = try v.withElements(p["input"] as! String) {
                    try quantize4Bit($0, shape: p["shape"] as! [Int], quantType: qt, blocksize: p["blocksize"] as! Int,
                                     doubleQuant: p["double_quant"] as! Bool)
                }
                let expected = v.bytes("\(id).quant_state.\(qt.rawValue)")
                XCTAssertEqual(String(decoding: BnB4BitFormat.quantStateJSON(q.state), as: UTF8.self),
                               String(decoding: expected, as: UTF8.self), "\(group)/\(id)")
                checked += 1
            }
        }
        XCTAssertGreaterThanOrEqual(checked, 70)
    }

    /// Reading bitsandbytes' own files: the state loads, and dequantizes to what qlora's
    /// quantization of the dense weight dequantizes to.
    func testDequantizeBitsandbytesCheckpointAndRoundTrip() throws {
        for name in ["bnb-nf4-dq", "bnb-fp4-nodq"] {
            let input = repositoryRoot.appendingPathComponent("Vectors/checkpoint/\(name).safetensors").path
            let out = tmp.appendingPathComponent("\(name)-dense.safetensors").path
            let s = try dequantizeCheckpoint(input: input, output: out)
            XCTAssertEqual(s.dequantized, 3)
            let f = try SafeTensorsFile(path: out)
            let d = try SafeTensorsFile(path: dense)
            XCTAssertEqual(Set(f.tensors.map(\.name)), Set(d.tensors.map(\.name)))
            for t in d.tensors {
                XCTAssertEqual(f.info(named: t.name)?.dtype, t.dtype, t.name)
                XCTAssertEqual(f.info(named: t.name)?.shape, t.shape, t.name)
            }
            let w = "model.layers.0.mlp.down_proj.weight"
            let qt: QuantType = name.contains("nf4") ? .nf4 : .fp4
            let expected = try d.withBytes(of: w) {
                try quantize4Bit(.view($0, as: .bfloat16), shape: [16, 48], quantType: qt, doubleQuant: name.contains("-dq"))
            }.dequantizedBytes()
            XCTAssertEqual(f.withBytes(of: w) { Array($0) }, expected)
        }
    }

    func testShardedDirectoryRoundTripKeepsLayoutAndSidecars() throws {
        // A 2-shard checkpoint with a config.json, made from the dense vector file.
        let d = try SafeTensorsFile(path: dense)
        let src = tmp.appendingPathComponent("src")
        try FileManager.default.createDirectory(at: src, withIntermediateDirectories: true)
        let tensors = d.tensors.map { (name: $0.name, dtype: $0.dtype, shape: $0.shape) }
        let w = try ShardedWriter(directory: src, tensors: tensors, maxShardSize: 3000, metadata: ["format": "pt"])
        for t in d.tensors { try d.withBytes(of: t.name) { try w.write(t.name, bytes: $0) } }
        try w.finish()
        try Data("{\"model_type\": \"llama\"}".utf8).write(to: src.appendingPathComponent("config.json"))
        XCTAssertGreaterThan(w.shards.count, 1)

        let q = tmp.appendingPathComponent("q").path
        try quantizeCheckpoint(input: src.path, output: q, options: QuantizeOptions())
        let reader = try CheckpointReader(path: q)
        XCTAssertEqual(reader.shardFileNames, w.shardFileNames)
        XCTAssertEqual(BnB4BitFormat.groups(in: reader.tensorNames).count, 3)
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: q + "/config.json"))) as! [String: Any]
        XCTAssertEqual((config["quantization_config"] as? [String: Any])?["bnb_4bit_quant_type"] as? String, "nf4")

        let back = tmp.appendingPathComponent("back").path
        try dequantizeCheckpoint(input: q, output: back)
        let r2 = try CheckpointReader(path: back)
        XCTAssertEqual(Set(r2.tensorNames), Set(d.tensors.map(\.name)))
        XCTAssertEqual(r2.withBytes(of: "model.norm.weight") { Array($0) }, d.withBytes(of: "model.norm.weight") { Array($0) })
        XCTAssertFalse(FileManager.default.fileExists(atPath: q + "/.tmp"))
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: tmp.path).filter { $0.hasPrefix(".") }
        XCTAssertEqual(leftovers, [], "staging directories left behind")
    }

    /// safetensors does not align tensors: an F32 weight at an odd byte offset still quantizes.
    func testUnalignedTensorQuantizes() throws {
        var rng = SplitMix64(seed: 3)
        let values = (0..<(4 * 64)).map { _ in rng.normal() }
        let src = tmp.appendingPathComponent("odd.safetensors")
        try SafeTensorsWriter.write(url: src, tensors: [(name: "pad", dtype: .u8, shape: [1], bytes: [7]),
                                                        (name: "layer.weight", dtype: .f32, shape: [4, 64], bytes: rawBytes(values))])
        XCTAssertEqual(try SafeTensorsFile(url: src).info(named: "layer.weight")?.dataOffsets.lowerBound, 1)
        let out = tmp.appendingPathComponent("odd-q.safetensors").path
        try quantizeCheckpoint(input: src.path, output: out, options: QuantizeOptions())
        let expected = try values.withUnsafeBufferPointer { try quantize4Bit(.float32($0), shape: [4, 64]) }
        XCTAssertEqual(try SafeTensorsFile(path: out).withBytes(of: "layer.weight") { Array($0) }, expected.packed)
        XCTAssertEqual(try compareCheckpoints(reference: src.path, actual: src.path).first { $0.name == "layer.weight" }?.statistics.maxAbsError, 0)
    }

    func testBadInputsFailWithoutOutput() throws {
        let out = tmp.appendingPathComponent("out.safetensors").path
        // OUTPUT == INPUT
        XCTAssertThrowsError(try quantizeCheckpoint(input: dense, output: dense, options: QuantizeOptions())) {
            XCTAssertTrue("\($0)".contains("same as INPUT"), "\($0)")
        }
        // Already quantized.
        let bnb = repositoryRoot.appendingPathComponent("Vectors/checkpoint/bnb-nf4-dq.safetensors").path
        XCTAssertThrowsError(try quantizeCheckpoint(input: bnb, output: out, options: QuantizeOptions())) {
            XCTAssertTrue("\($0)".contains("already holds 4-bit"), "\($0)")
        }
        // A non-finite weight: the error names the file and the tensor; no output.
        let bad = tmp.appendingPathComponent("nan.safetensors")
        var values = [Float](repeating: 0.1, count: 64 * 4)
        values[70] = .nan
        try SafeTensorsWriter.write(url: bad, tensors: [(name: "layer.weight", dtype: .f32, shape: [4, 64], bytes: rawBytes(values))])
        XCTAssertThrowsError(try quantizeCheckpoint(input: bad.path, output: out, options: QuantizeOptions())) {
            let s = "\($0)"
            XCTAssertTrue(s.contains("nan.safetensors") && s.contains("layer.weight") && s.contains("element 70"), s)
        }
        // A truncated 4-bit checkpoint: the reader's error names the file.
        let trunc = tmp.appendingPathComponent("trunc.safetensors")
        let bytes = try Data(contentsOf: URL(fileURLWithPath: bnb))
        try bytes.prefix(bytes.count - 100).write(to: trunc)
        XCTAssertThrowsError(try dequantizeCheckpoint(input: trunc.path, output: out)) {
            XCTAssertTrue("\($0)".contains("trunc.safetensors"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: tmp.path).filter { $0.hasPrefix(".") }
        XCTAssertEqual(leftovers, [], "temporary files left behind")
    }
}
