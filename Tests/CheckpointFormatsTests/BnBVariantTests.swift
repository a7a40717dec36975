import XCTest
import CheckpointFormats
import QLoRA
import SafeTensors
import TestSupport

/// Every bitsandbytes 4-bit layout transformers' `save_pretrained` writes (Vectors/bnb_variants, made
/// by Vectors/generate_bnb_variants.py): the four `quant_storage` dtypes, and the 16-bit
/// `nested_dtype` a checkpoint saved after a CPU forward pass has. Read with no tolerance against
/// what bitsandbytes itself dequantizes from each file.
final class BnBVariantTests: TemporaryDirectoryTestCase {
    static let storages: [(name: String, dtype: DType)] = [("uint8", .u8), ("bfloat16", .bf16), ("float16", .f16), ("float32", .f32)]
    /// Variant directory -> the key of its expected values in expected.safetensors.
    static let expectedKey = ["nf4-uint8": "uint8", "nf4-bfloat16": "uint8", "nf4-float16": "uint8", "nf4-float32": "uint8",
                              "nf4-forward-bf16": "nf4-forward-bf16", "fp16-forward": "fp16-forward"]

    func directory(_ variant: String) -> String { repositoryRoot.appendingPathComponent("Vectors/bnb_variants/\(variant)").path }

    /// Every 4-bit weight of a variant, loaded, by name.
    func weights(_ variant: String) throws -> [String: (q: Quantized4Bit, storage: DType, json: [UInt8])] {
        let reader = try CheckpointReader(path: directory(variant))
        let groups = BnB4BitFormat.groups(in: reader.tensorNames)
        XCTAssertEqual(groups.count, 7, "\(variant): 4-bit weights; \(regenerateHint)")
        var out: [String: (q: Quantized4Bit, storage: DType, json: [UInt8])] = [:]
        for g in groups {
            let json = reader.withBytes(of: BnB4BitFormat.quantStateKey(g.name, g.quantType)) { Array($0) }
            out[g.name] = (try BnB4BitFormat.load(g, from: reader), BnB4BitFormat.quantStorage(of: g, from: reader), json)
        }
        return out
    }

    /// bnb_4bit_quant_storage only retypes the packed bytes: each storage reads as the same
    /// `Quantized4Bit` as the uint8 file, and its packed tensor is [ceil(n/2) / itemsize, 1].
    func testEveryQuantStorageReadsAsTheUint8Weight() throws {
        let uint8 = try weights("nf4-uint8")
        let file = try SafeTensorsFile(path: directory("nf4-bfloat16") + "/model.safetensors")
        XCTAssertEqual(file.info(named: "model.layers.0.self_attn.k_proj.weight")?.shape, [512, 1], "32×64 NF4 = 1024 bytes = 512 bf16")
        for (name, dtype) in Self.storages {
            let w = try weights("nf4-\(name)")
            XCTAssertEqual(Set(w.keys), Set(uint8.keys))
            for (weight, v) in w {
                XCTAssertEqual(v.storage, dtype, "\(name) \(weight)")
                XCTAssertEqual(v.q, uint8[weight]!.q, "\(name) \(weight): not the uint8 file's weight")
                XCTAssertEqual(v.q.state.nestedDtype, .float32)
            }
        }
    }

    /// Each variant's fp32 absmax and dequantized weight equal bitsandbytes' `dequantize_4bit` of
    /// the same file, bit for bit: the bf16 and fp16 nested dtypes included.
    func testEveryVariantDequantizesAsBitsandbytesDoes() throws {
        let expected = try VectorFile("expected", directory: "Vectors/bnb_variants")
        var dequantized = 0
        for (variant, key) in Self.expectedKey.sorted(by: { $0.key < $1.key }) {
            for (weight, v) in try weights(variant) {
                let absmax = expected.bytes("\(key).\(weight).absmax")
                XCTAssertNil(byteMismatch(rawBytes(v.q.state.absmaxValues()), absmax, name: "\(variant) \(weight) absmax", elementSize: 4))
                guard expected.has("\(key).\(weight).dequantized") else { continue }
                let want = expected.bytes("\(key).\(weight).dequantized")
                XCTAssertEqual(DType(v.q.state.dtype), expected.info("\(key).\(weight).dequantized").dtype)
                for kernel in [KernelChoice.reference, .fast] {
                    XCTAssertNil(byteMismatch(v.q.dequantizedBytes(kernel: kernel), want, name: "\(variant) \(weight) (\(kernel))", elementSize: 2))
                }
                dequantized += 1
            }
        }
        XCTAssertEqual(dequantized, 6 * 3)
    }

    /// After a CPU forward pass bitsandbytes double-quantizes its bf16 (fp16) copy of the absmax
    /// again: nested_dtype is the weight's dtype and the offset a 16-bit value. Reading it as fp32
    /// would move some scales (so the test above holds the 16-bit rounding, not a coincidence).
    func testSixteenBitNestedDtypeIsRecordedAndMatters() throws {
        let expected = try VectorFile("expected", directory: "Vectors/bnb_variants")
        for (variant, dtype) in [("nf4-forward-bf16", ElementType.bfloat16), ("fp16-forward", .float16)] {
            var moved = 0
            for (weight, v) in try weights(variant) {
                guard case .nested(var n) = v.q.state.absmax else { return XCTFail("\(variant) \(weight) is not double-quantized") }
                XCTAssertEqual(n.dtype, dtype, "\(variant) \(weight)")
                let offset16 = dtype == .bfloat16 ? HalfPrecision.roundedToBFloat16(n.offset)
                    : HalfPrecision.float(float16Bits: HalfPrecision.float16Bits(n.offset))
                XCTAssertEqual(n.offset.bitPattern, offset16.bitPattern, "\(variant) \(weight): offset is a \(dtype) value")
                n.dtype = .float32
                let asFP32 = QuantState(quantType: .nf4, blocksize: 64, dtype: dtype, shape: v.q.state.shape, absmax: .nested(n)).absmaxValues()
                if rawBytes(asFP32) != expected.bytes("\(Self.expectedKey[variant]!).\(weight).absmax") { moved += 1 }
            }
            XCTAssertGreaterThan(moved, 0, "\(variant): reading nested_dtype as float32 changes nothing")
        }
    }

    /// The quant-state JSON qlora writes for each loaded state is the file's, byte for byte
    /// (nested_dtype and the 16-bit offset's repr included).
    func testQuantStateJSONOfEveryVariant() throws {
        for variant in Self.expectedKey.keys.sorted() {
            for (weight, v) in try weights(variant) {
                XCTAssertEqual(String(decoding: BnB4BitFormat.quantStateJSON(v.q.state), as: UTF8.self), String(decoding: v.json, as: UTF8.self),
                               "\(variant) \(weight)")
            }
        }
    }

    /// The layout qlora declares for each storage is the one transformers wrote; a byte count that
    /// is not a whole number of storage elements has none.
    func testDeclarationsForEveryStorage() throws {
        for (name, dtype) in Self.storages {
            let file = try SafeTensorsFile(path: directory("nf4-\(name)") + "/model.safetensors")
            for (weight, v) in try weights("nf4-\(name)") {
                let d = BnB4BitFormat.declarations(name: weight, quantType: .nf4, blocksize: 64, elementCount: v.q.state.elementCount,
                                                   doubleQuant: true, jsonByteCount: v.json.count, quantStorage: dtype)
                for t in d {
                    XCTAssertEqual(file.info(named: t.name)?.dtype, t.dtype, "\(name) \(t.name)")
                    XCTAssertEqual(file.info(named: t.name)?.shape, t.shape, "\(name) \(t.name)")
                }
            }
        }
        XCTAssertEqual(BnB4BitFormat.packedShape(elementCount: 7, storage: .bf16), [2, 1])
        XCTAssertNil(BnB4BitFormat.packedShape(elementCount: 5, storage: .bf16))
        XCTAssertNil(BnB4BitFormat.packedShape(elementCount: 12, storage: .f32))
    }

    // MARK: Bad input

    /// One weight of the uint8 file rewritten by `edit` (name, dtype, shape, bytes per tensor).
    func rewritten(_ edit: (inout [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])]) -> Void) throws -> String {
        let src = try SafeTensorsFile(path: directory("nf4-uint8") + "/model.safetensors")
        let prefix = "model.layers.0.self_attn.k_proj.weight"
        var tensors = src.tensors.filter { $0.name.hasPrefix(prefix) }.map { t in
            (name: t.name, dtype: t.dtype, shape: t.shape, bytes: src.withBytes(of: t.name) { Array($0) })
        }
        edit(&tensors)
        let url = tmp.appendingPathComponent("bad.safetensors")
        try SafeTensorsWriter.write(url: url, tensors: tensors)
        return url.path
    }

    func expectError(_ path: String, tensor: String, mentions: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let reader = try CheckpointReader(path: path)
        let g = try XCTUnwrap(BnB4BitFormat.groups(in: reader.tensorNames).first, file: file, line: line)
        XCTAssertThrowsError(try BnB4BitFormat.load(g, from: reader), file: file, line: line) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains(path) && text.contains("'\(tensor)'"), "should name the file and \(tensor): \(text)", file: file, line: line)
            for m in mentions { XCTAssertTrue(text.contains(m), "should mention '\(m)': \(text)", file: file, line: line) }
        }
    }

    func testBadVariantsGiveOneErrorNamingFileAndTensor() throws {
        let w = "model.layers.0.self_attn.k_proj.weight"
        let key = w + ".quant_state.bitsandbytes__nf4"
        func set(_ name: String, _ t: inout [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])],
                 _ f: (inout (name: String, dtype: DType, shape: [Int], bytes: [UInt8])) -> Void) {
            f(&t[t.firstIndex { $0.name == name }!])
        }
        // An unknown storage dtype (I16: the same bytes, 2 per element).
        try expectError(try rewritten { t in set(w, &t) { $0.dtype = .i16; $0.shape = [512, 1] } }, tensor: w, mentions: ["I16", "quant_storage"])
        // A storage whose byte size does not match the shape (BF16 with one element too few).
        try expectError(try rewritten { t in set(w, &t) { $0.dtype = .bf16; $0.shape = [511, 1]; $0.bytes.removeLast(2) } },
                        tensor: w, mentions: ["1022 bytes", "expected 1024"])
        // A nested_dtype other than float32, bfloat16, float16.
        try expectError(try rewritten { t in set(key, &t) { e in
            let json = String(decoding: e.bytes, as: UTF8.self).replacingOccurrences(of: "\"float32\"", with: "\"float64\"")
            e.bytes = Array(json.utf8)
            e.shape = [e.bytes.count]
        } }, tensor: key, mentions: ["nested_dtype 'float64'", "float32, bfloat16 or float16"])
        // A bf16 absmax without double quantization (what bitsandbytes saves after a CPU forward
        // pass with double quant off): refused, with the reason.
        try expectError(try rewritten { t in
            t.removeAll { $0.name.contains("nested") }
            set(key, &t) { e in
                var json = String(decoding: e.bytes, as: UTF8.self)
                json = String(json[..<json.range(of: ", \"nested_blocksize\"")!.lowerBound]) + "}"
                e.bytes = Array(json.utf8)
                e.shape = [e.bytes.count]
            }
            set(w + ".absmax", &t) { $0.dtype = .bf16; $0.shape = [1, 32]; $0.bytes = [UInt8](repeating: 0x3C, count: 64) }
        }, tensor: w + ".absmax", mentions: ["BF16 [1, 32]", "CPU forward pass"])
    }
}

extension QuantState {
    /// `nested_dtype`, or nil without double quantization.
    var nestedDtype: ElementType? { if case .nested(let n) = absmax { return n.dtype } else { return nil } }
}
