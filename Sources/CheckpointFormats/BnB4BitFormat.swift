import Foundation
import QLoRA
import SafeTensors

/// The tensors transformers writes for one bitsandbytes-4bit weight `NAME`
/// (`Linear4bit.state_dict()` with the quant state packed for safetensors):
///
/// | tensor | dtype | shape |
/// |---|---|---|
/// | `NAME` | U8, BF16, F16 or F32 (`quant_storage`) | [ceil(n/2) / itemsize, 1] packed nibbles |
/// | `NAME.absmax` | U8 (double quant) or F32 | [blocks] |
/// | `NAME.quant_map` | F32 | [16] |
/// | `NAME.nested_absmax` | F32 | [ceil(blocks/256)] (double quant only) |
/// | `NAME.nested_quant_map` | F32 | [256] (double quant only) |
/// | `NAME.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 | [len] UTF-8 JSON |
///
/// The JSON is Python's `json.dumps` of {quant_type, blocksize, dtype, shape} plus, with
/// double quant, {nested_blocksize, nested_dtype, nested_offset}, in that key order.
///
/// `quant_storage` (`BitsAndBytesConfig(bnb_4bit_quant_storage=...)`, which FSDP and DeepSpeed
/// QLoRA use) changes only how the packed bytes are typed: bitsandbytes views the same bytes as
/// that dtype (`packed.squeeze().view(quant_storage).unsqueeze(1)`), so a byte count that is not a
/// multiple of its size cannot be stored. `nested_dtype` is float32 unless the model was saved
/// after a CPU forward pass (`NestedAbsmax.dtype`).
public enum BnB4BitFormat {
    public static let quantStatePrefix = ".quant_state.bitsandbytes__"

    /// The dtypes bitsandbytes' packed weight may be stored as, by their torch names.
    public static let quantStorages: [String: DType] = Dictionary(uniqueKeysWithValues: [DType.u8, .bf16, .f16, .f32].map {
        (BnBQuantizationConfig.torchName($0), $0)
    })

    /// The packed weight's shape when stored as `storage`: [ceil(n/2) / itemsize, 1]; nil when
    /// ceil(n/2) bytes are not a whole number of `storage` elements (bitsandbytes' view fails too).
    public static func packedShape(elementCount n: Int, storage: DType) -> [Int]? {
        let bytes = CheckedSize.ceilingDivision(n, 2)
        return bytes % storage.byteSize == 0 ? [bytes / storage.byteSize, 1] : nil
    }

    public static func quantStateKey(_ name: String, _ type: QuantType) -> String { name + quantStatePrefix + type.rawValue }

    /// The quant-state JSON bytes, identical to bitsandbytes' `pack_dict_to_tensor`.
    public static func quantStateJSON(_ s: QuantState) -> [UInt8] {
        guard case .nested(let n) = s.absmax else {
            return quantStateJSON(quantType: s.quantType, blocksize: s.blocksize, dtype: s.dtype, shape: s.shape, nestedOffset: nil)
        }
        return quantStateJSON(quantType: s.quantType, blocksize: s.blocksize, dtype: s.dtype, shape: s.shape, nestedOffset: n.offset,
                              nestedBlocksize: n.blocksize, nestedDtype: n.dtype)
    }

    /// The same from its fields: `nestedOffset` is nil without double quantization (the
    /// nested blocksize is bitsandbytes' 256).
    public static func quantStateJSON(quantType: QuantType, blocksize: Int, dtype: ElementType, shape: [Int], nestedOffset: Float?,
                                      nestedBlocksize: Int = 256, nestedDtype: ElementType = .float32) -> [UInt8] {
        var json = "{\"quant_type\": \"\(quantType.rawValue)\", \"blocksize\": \(blocksize), \"dtype\": \"\(dtype.rawValue)\", "
        json += "\"shape\": [\(shape.map(String.init).joined(separator: ", "))]"
        if let offset = nestedOffset {
            // Python's float repr and Swift's Double.description are both the shortest
            // round-tripping form, with the same exponent style ("1e-05", "2.5e+37"). A 16-bit
            // offset is exact in fp32 and in Python's float alike.
            json += ", \"nested_blocksize\": \(nestedBlocksize), \"nested_dtype\": \"\(nestedDtype.rawValue)\", \"nested_offset\": \(Double(offset))"
        }
        json += "}"
        return Array(json.utf8)
    }

    /// The tensor declarations (name, dtype, shape) a quantized weight expands to, in the
    /// order they are written. `quantStorage` must hold the packed bytes (`packedShape` not nil).
    public static func declarations(name: String, quantType: QuantType, blocksize: Int, elementCount n: Int,
                                    doubleQuant: Bool, jsonByteCount: Int, quantStorage: DType = .u8) -> [(name: String, dtype: DType, shape: [Int])] {
        let blocks = CheckedSize.ceilingDivision(n, blocksize)
        guard let packed = packedShape(elementCount: n, storage: quantStorage) else {
            preconditionFailure("\(CheckedSize.ceilingDivision(n, 2)) packed bytes are not a whole number of \(quantStorage.rawValue) elements")
        }
        var d: [(name: String, dtype: DType, shape: [Int])] = [(name, quantStorage, packed)]
        if doubleQuant {
            d.append((name + ".absmax", .u8, [blocks]))
            d.append((name + ".quant_map", .f32, [16]))
            d.append((name + ".nested_absmax", .f32, [CheckedSize.ceilingDivision(blocks, 256)]))
            d.append((name + ".nested_quant_map", .f32, [256]))
        } else {
            d.append((name + ".absmax", .f32, [blocks]))
            d.append((name + ".quant_map", .f32, [16]))
        }
        d.append((quantStateKey(name, quantType), .u8, [jsonByteCount]))
        return d
    }

    /// The tensors' bytes in `declarations` order (the packed bytes are the same for every storage).
    public static func payloads(_ q: Quantized4Bit) -> [[UInt8]] {
        let s = q.state
        let code = s.quantType.code.withUnsafeBytes { Array($0) }
        var p: [[UInt8]] = [q.packed]
        switch s.absmax {
        case .plain(let a):
            p.append(a.withUnsafeBytes { Array($0) })
            p.append(code)
        case .nested(let n):
            p.append(n.quantized)
            p.append(code)
            p.append(n.absmax.withUnsafeBytes { Array($0) })
            p.append(n.code.withUnsafeBytes { Array($0) })
        }
        p.append(quantStateJSON(s))
        return p
    }

    /// A 4-bit weight found in a checkpoint: its name and where its parts are.
    public struct Group: Sendable {
        public var name: String
        public var quantType: QuantType
        /// Every tensor name belonging to this weight (the weight itself included).
        public var members: [String]
    }

    /// Finds the 4-bit weights among `names` by their quant-state tensors. A weight with a quant
    /// state for each 4-bit type appears once per type; `groups(of:)` refuses that.
    public static func groups(in names: [String]) -> [Group] {
        let present = Set(names)
        var out: [Group] = []
        for key in names {
            guard let r = key.range(of: quantStatePrefix, options: .backwards) else { continue }
            let base = String(key[..<r.lowerBound])
            guard let type = QuantType(rawValue: String(key[r.upperBound...])) else { continue }
            let members = [base, base + ".absmax", base + ".quant_map", base + ".nested_absmax", base + ".nested_quant_map", key]
            out.append(Group(name: base, quantType: type, members: members.filter { present.contains($0) }))
        }
        return out
    }

    /// The 4-bit weights of a checkpoint, one per weight: a weight whose quant state is stored
    /// for both nf4 and fp4 (`….quant_state.bitsandbytes__nf4` and `…__fp4`) is refused, naming
    /// its file and both tensors (bitsandbytes would take whichever it met first).
    public static func groups(of reader: CheckpointReader) throws -> [Group] {
        let all = groups(in: reader.tensorNames)
        var seen: [String: Group] = [:]
        for g in all {
            if let other = seen[g.name] {
                let file = reader.filePath(of: g.name)
                throw CheckpointError.invalidTensor(file: file, tensor: g.name, problem: "has two quant states, '\(quantStateKey(g.name, other.quantType))' and "
                                                   + "'\(quantStateKey(g.name, g.quantType))'; a 4-bit weight has one quant type")
            }
            seen[g.name] = g
        }
        return all
    }

    /// The dtype a checked weight's packed bytes are stored as (its `quant_storage`).
    public static func quantStorage(of g: Group, from reader: CheckpointReader) -> DType {
        reader.info(named: g.name)?.dtype ?? .u8
    }

    /// Reads and checks one 4-bit weight from a checkpoint, whatever its `quant_storage` (the same
    /// `Quantized4Bit` for each). Errors name the file and tensor.
    public static func load(_ g: Group, from reader: CheckpointReader) throws -> Quantized4Bit {
        let state = try state(of: g, from: reader)
        return Quantized4Bit(packed: reader.withBytes(of: g.name) { Array($0) }, state: state)
    }

    /// Reads and checks one 4-bit weight's quant state (everything but the packed data, whose
    /// size is checked): what planning a job needs before any output is written.
    ///
    /// Sizes come from the JSON, so none is trusted: the shape's product is checked for overflow
    /// and held to the packed weight's real byte count before any other size is derived from it.
    /// A block scale that is not finite (NaN or ±Inf in absmax, nested_absmax, nested_quant_map or
    /// nested_offset) would dequantize to NaN or ±Inf weights and is refused, naming the tensor,
    /// unless `allowNonFiniteScales` (inspect, which reports them).
    public static func state(of g: Group, from reader: CheckpointReader, allowNonFiniteScales: Bool = false) throws -> QuantState {
        func file(_ t: String) -> String { reader.filePath(of: t) }
        func fail(_ t: String, _ problem: String) -> CheckpointError { .invalidTensor(file: file(t), tensor: t, problem: problem) }
        func bytes(_ t: String) throws -> [UInt8] {
            guard reader.info(named: t) != nil else { throw fail(g.name, "missing companion tensor '\(t)'") }
            return reader.withBytes(of: t) { Array($0) }
        }
        func floats(_ t: String, count: Int) throws -> [Float] {
            guard let i = reader.info(named: t) else { throw fail(g.name, "missing companion tensor '\(t)'") }
            guard i.dtype == .f32, i.elementCount == count else {
                throw fail(t, "expected F32 with \(count) elements, found \(i.dtype.rawValue) \(i.shape)")
            }
            return reader.withBytes(of: t) { loadFloats($0) }
        }
        let key = quantStateKey(g.name, g.quantType)
        let jsonBytes = try bytes(key)
        guard let obj = try? JSONSerialization.jsonObject(with: Data(jsonBytes)) as? [String: Any] else {
            throw fail(key, "quant state is not a JSON object")
        }
        guard let qtName = obj["quant_type"] as? String, let qt = QuantType(rawValue: qtName), qt == g.quantType else {
            throw fail(key, "quant_type missing or not '\(g.quantType.rawValue)'")
        }
        guard let bs = obj["blocksize"] as? Int else { throw fail(key, "blocksize missing") }
        guard QuantState.validBlocksizes.contains(bs) else { throw fail(key, "invalid blocksize \(bs)") }
        guard let dtName = obj["dtype"] as? String, let dt = ElementType(rawValue: dtName) else {
            throw fail(key, "dtype missing or unsupported (\(obj["dtype"] ?? "nil"))")
        }
        guard let shape = obj["shape"] as? [Int], shape.allSatisfy({ $0 >= 0 }) else { throw fail(key, "shape missing or invalid") }
        guard let n = CheckedSize.product(shape) else { throw fail(key, "shape \(shape) has more elements than fit in a 64-bit integer") }
        guard let packedInfo = reader.info(named: g.name) else { throw fail(g.name, "missing packed weight") }
        guard quantStorages.values.contains(packedInfo.dtype) else {
            throw fail(g.name, "packed weight is \(packedInfo.dtype.rawValue); bitsandbytes' quant_storage is uint8, bfloat16, float16 or float32 (U8, BF16, F16, F32)")
        }
        // From here n ≤ 2 × the packed bytes really stored, so no size below can overflow.
        let packedBytes = CheckedSize.ceilingDivision(n, 2)
        guard packedInfo.byteCount == packedBytes else {
            throw fail(g.name, "packed weight has \(packedInfo.byteCount) bytes (\(packedInfo.dtype.rawValue) \(packedInfo.shape)), expected \(packedBytes) for the quant state's shape \(shape)")
        }
        let blocks = CheckedSize.ceilingDivision(n, bs)
        let code = try floats(g.name + ".quant_map", count: 16)
        guard code.map(\.bitPattern) == qt.code.map(\.bitPattern) else { throw fail(g.name + ".quant_map", "is not bitsandbytes' \(qt.rawValue) code") }
        let absmax: QuantState.Absmax
        if let nestedOffset = obj["nested_offset"] {
            guard let off = (nestedOffset as? NSNumber)?.doubleValue else { throw fail(key, "nested_offset is not a number") }
            guard let nbs = obj["nested_blocksize"] as? Int, nbs > 0 else { throw fail(key, "nested_blocksize missing or not a positive integer") }
            guard QuantState.validBlocksizes.contains(nbs) else {
                throw fail(key, "nested_blocksize \(nbs) is not a blocksize bitsandbytes uses (a power of two from 32 to 4096; it writes 256)")
            }
            guard let ndtName = obj["nested_dtype"] as? String, let ndt = ElementType(rawValue: ndtName) else {
                throw fail(key, "nested_dtype \(obj["nested_dtype"].map { "'\($0)'" } ?? "missing"); expected float32, bfloat16 or float16")
            }
            guard let ai = reader.info(named: g.name + ".absmax"), ai.dtype == .u8, ai.elementCount == blocks else {
                throw fail(g.name + ".absmax", "expected U8 with \(blocks) elements (double quantization)")
            }
            let q = try bytes(g.name + ".absmax")
            let nested = try floats(g.name + ".nested_absmax", count: CheckedSize.ceilingDivision(blocks, nbs))
            let ncode = try floats(g.name + ".nested_quant_map", count: 256)
            // torch.tensor(float(nested_offset)): the JSON's double rounded to fp32.
            absmax = .nested(NestedAbsmax(quantized: q, absmax: nested, blocksize: nbs, offset: Float(off), code: ncode, dtype: ndt))
        } else {
            if let ai = reader.info(named: g.name + ".absmax"), ai.dtype == .bf16 || ai.dtype == .f16 {
                throw fail(g.name + ".absmax", "is \(ai.dtype.rawValue) \(ai.shape), not F32: bitsandbytes writes this when a model without double quantization "
                           + "is saved after a CPU forward pass (its scales transposed to [in/blocksize, out] and rounded to 16 bits) and reads it back "
                           + "in the wrong order itself; quantize the original weights again")
            }
            absmax = .plain(try floats(g.name + ".absmax", count: blocks))
        }
        let state = QuantState(quantType: qt, blocksize: bs, dtype: dt, shape: shape, absmax: absmax)
        do { try state.validate() } catch { throw fail(key, "\(error)") }
        if !allowNonFiniteScales, let (tensor, problem, _) = nonFiniteScale(state, name: g.name, key: key) { throw fail(tensor, problem) }
        return state
    }

    /// The first non-finite block scale of `state`: the tensor (or quant-state field) it comes
    /// from and the problem, or nil when every scale is finite.
    public static func nonFiniteScale(_ state: QuantState, name: String, key: String) -> (tensor: String, problem: String, count: Int)? {
        let values = state.absmaxValues()
        guard let block = values.firstIndex(where: { !$0.isFinite }) else { return nil }
        let bad = values.filter { !$0.isFinite }.count
        let effect = "\(bad) of \(values.count) block scales are not finite (block \(block): \(values[block])), which dequantizes to NaN or infinite weights"
        switch state.absmax {
        case .plain:
            return (name + ".absmax", "absmax: " + effect, bad)
        case .nested(let n):
            if let i = n.absmax.firstIndex(where: { !$0.isFinite }) { return (name + ".nested_absmax", "nested_absmax[\(i)] is \(n.absmax[i]); " + effect, bad) }
            if !n.offset.isFinite { return (key, "nested_offset is \(n.offset); " + effect, bad) }
            if let i = n.code.firstIndex(where: { !$0.isFinite }) { return (name + ".nested_quant_map", "nested_quant_map[\(i)] is \(n.code[i]); " + effect, bad) }
            return (name + ".absmax", "absmax (double-quantized): " + effect, bad)
        }
    }
}
