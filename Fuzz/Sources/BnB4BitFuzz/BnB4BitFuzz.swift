// libFuzzer entry point for bitsandbytes' 4-bit quant state (BnB4BitFormat.state(of:from:) and
// load, through CheckpointReader and inspectCheckpoint).
//
// Input: 4 choice bytes, then the quant-state JSON. The harness writes one safetensors file with
// a weight `w` as transformers lays it out: the packed weight, absmax, quant_map, (with
// double quantization) nested_absmax and nested_quant_map, and the JSON as
// `w.quant_state.bitsandbytes__<nf4|fp4>`. The companions' sizes follow the JSON when it parses
// (so fuzzed JSON reaches the checks behind the parse), and the choice bytes give them a wrong
// dtype, a count off by one, a wrong code table or no tensor at all.
//
// For every input it checks that:
// - the reader and `load` either throw a CheckpointError or SafeTensorsError whose description
//   is one line naming the file, or return a state whose invariants hold (element count =
//   product of the shape, ceil(n/2) packed bytes, absmax per block) and that dequantizes to n
//   values;
// - `inspectCheckpoint` agrees (same error or a report of the same shape);
// - a loaded state written back (`quantStateJSON`, `payloads`) loads again to the same weight.

import CheckpointFormats
import CheckpointJobs
import Foundation
import FuzzSupport
import QLoRA
import SafeTensors

/// Largest element count whose tensors the harness writes (ceil(n/2) packed bytes); beyond it
/// the packed weight is written short, which `state(of:from:)` must reject.
let maxElements = 1 << 15
/// Largest companion tensor the harness writes, in elements.
let maxCompanion = 1 << 12

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var choices = Choices(UnsafeRawBufferPointer(start: data, count: size), count: 4)
    let path = scratchPath("bnb.safetensors")
    let quantType: QuantType = choices.next(2) == 0 ? .nf4 : .fp4
    writeFile(safetensorsImage(companions(json: choices.rest, quantType: quantType, choices: &choices)), to: path)
    check(path: path)
    return 0
}

/// What the JSON asks for, as far as it parses (bitsandbytes' defaults otherwise).
struct Declared {
    var blocksize = 64
    var elements = 64
    var nested = false
    var nestedBlocksize = 256

    init(_ json: [UInt8]) {
        guard let obj = try? JSONSerialization.jsonObject(with: Data(json)) as? [String: Any] else { return }
        if let b = obj["blocksize"] as? Int, b > 0 { blocksize = b }
        if let s = obj["shape"] as? [Int] { elements = checkedProduct(s) ?? Int.max }
        nested = obj["nested_offset"] != nil
        if let b = obj["nested_blocksize"] as? Int, b > 0 { nestedBlocksize = b }
    }

    /// ceil(a / b) without overflow.
    static func blocks(_ a: Int, _ b: Int) -> Int { a / b + (a % b == 0 ? 0 : 1) }
}

/// A count the choice byte leaves as it is (most values) or moves off by one, or to 0.
func perturbed(_ count: Int, _ choice: Int) -> Int {
    switch choice {
    case 5: return count + 1
    case 6: return max(count - 1, 0)
    case 7: return 0
    default: return count
    }
}

func companions(json: [UInt8], quantType: QuantType, choices: inout Choices) -> [TensorSpec] {
    let d = Declared(json)
    let c1 = choices.next(), c2 = choices.next(), c3 = choices.next()
    // The packed weight: its storage dtype (bitsandbytes' four, and two it never writes) and size.
    let storages: [DType] = [.u8, .u8, .bf16, .f16, .f32, .i8, .f64, .u8]
    let storage = storages[Int(c1 & 7)]
    var packedBytes = d.elements == Int.max ? 2 : (d.elements / 2 + d.elements % 2)
    packedBytes = perturbed(min(packedBytes, maxElements / 2 + 1), Int(c1 >> 3) & 7)
    let packedCount = packedBytes / storage.byteSize
    var t: [TensorSpec] = [TensorSpec(name: "w", dtype: storage, shape: [packedCount, 1],
                                      bytes: filler(packedCount * storage.byteSize, seed: c1))]
    // absmax: per block, U8 with double quantization and F32 without (or the other, or 16-bit).
    let blocks = min(Declared.blocks(d.elements == Int.max ? 1 : d.elements, d.blocksize), maxCompanion)
    let absmaxKinds: [DType?] = [nil, nil, nil, .f32, .u8, .bf16, .f16, .i32]
    let absmaxType = absmaxKinds[Int(c2 & 7)] ?? (d.nested ? .u8 : .f32)
    let absmaxCount = perturbed(blocks, Int(c2 >> 3) & 7)
    let absmaxBytes = absmaxType == .f32 ? finiteFloatBytes(absmaxCount, seed: c2) : filler(absmaxCount * absmaxType.byteSize, seed: c2)
    t.append(TensorSpec(name: "w.absmax", dtype: absmaxType, shape: [absmaxCount], bytes: absmaxBytes))
    // quant_map: the right code, the other type's code, or 15 values.
    let codeType: QuantType = (c3 & 1) == 0 ? quantType : (quantType == .nf4 ? .fp4 : .nf4)
    var code = codeType.code
    if (c3 & 6) == 6 { code.removeLast() }
    t.append(TensorSpec(name: "w.quant_map", dtype: .f32, shape: [code.count], bytes: code.withUnsafeBytes { Array($0) }))
    // Double quantization's second level, when the JSON asks for it (or the choice adds it).
    if d.nested || (c3 & 8) != 0 {
        let nestedCount = perturbed(min(Declared.blocks(absmaxCount, d.nestedBlocksize), maxCompanion), Int(c3 >> 4) & 7)
        t.append(TensorSpec(name: "w.nested_absmax", dtype: .f32, shape: [nestedCount], bytes: finiteFloatBytes(nestedCount, seed: c3)))
        let nestedCode = (c3 & 0x80) == 0 ? 256 : 255
        t.append(TensorSpec(name: "w.nested_quant_map", dtype: .f32, shape: [nestedCode], bytes: finiteFloatBytes(nestedCode, seed: ~c3)))
    }
    // Drop one companion now and then (index from the choice bits not used above).
    if (c2 >> 6) == 3 { t.remove(at: Int(c1 >> 6) % t.count) }
    t.append(TensorSpec(name: BnB4BitFormat.quantStateKey("w", quantType), dtype: .u8, shape: [json.count], bytes: json))
    return t
}

func check(path: String) {
    let types: [Any.Type] = [CheckpointError.self, SafeTensorsError.self]
    let loaded: Quantized4Bit
    do {
        let reader = try CheckpointReader(path: path)
        let groups = BnB4BitFormat.groups(in: reader.tensorNames)
        require(groups.count == 1 && groups[0].name == "w", "groups: \(groups)")
        loaded = try BnB4BitFormat.load(groups[0], from: reader)
    } catch {
        checkError(error, files: [path], types: types)
        do {
            // inspect loads a 4-bit weight where it meets the packed tensor; without one it
            // lists nothing for the group (its companions are hidden as members).
            // A weight whose block scales are not finite is listed by inspect, flagged: it reads
            // the file to report what is wrong with it; dequantize, merge and train refuse it.
            let report = try inspectCheckpoint(path: path)
            let packed = (try? CheckpointReader(path: path))?.info(named: "w") != nil
            let nonFinite = "\(error)".contains("not finite")
            require(!packed || nonFinite, "inspectCheckpoint accepted what load rejected: \(error)")
            require(nonFinite || !report.tensors.contains { $0.name == "w" }, "inspect lists a weight it could not load")
        } catch let inspectError {
            checkError(inspectError, files: [path], types: types)
        }
        return
    }
    let s = loaded.state
    let n = s.elementCount
    require(checkedProduct(s.shape) == n, "element count \(n) for shape \(s.shape)")
    require(loaded.packed.count == n / 2 + n % 2, "\(loaded.packed.count) packed bytes for \(n) elements")
    require(s.blockCount == n / s.blocksize + (n % s.blocksize == 0 ? 0 : 1), "block count")
    switch s.absmax {
    case .plain(let a): require(a.count == s.blockCount)
    case .nested(let nested):
        require(nested.quantized.count == s.blockCount)
        require(nested.dequantized().count == s.blockCount)
    }
    let values = loaded.dequantizedFloat32()
    require(values.count == n, "dequantized \(values.count) values, expected \(n)")
    if let last = values.last { fuzzSink &+= UInt8(truncatingIfNeeded: last.bitPattern) }

    do {
        let report = try inspectCheckpoint(path: path)
        require(report.tensors.count == 1 && report.tensors[0].shape == s.shape, "inspect: \(report.tensors)")
        require(report.quantizedParameters == n)
    } catch {
        fatalError("inspectCheckpoint rejected what load accepted: \(error)")
    }
    roundTrip(loaded, storage: try! CheckpointReader(path: path).info(named: "w")!.dtype)
}

/// Writes `q` back as bitsandbytes would (quantStateJSON, payloads) and reads it again.
func roundTrip(_ q: Quantized4Bit, storage: DType) {
    let s = q.state
    let payloads = BnB4BitFormat.payloads(q)
    let names = BnB4BitFormat.declarations(name: "w", quantType: s.quantType, blocksize: s.blocksize, elementCount: s.elementCount,
                                           doubleQuant: s.isDoubleQuantized, jsonByteCount: payloads.last!.count, quantStorage: storage)
    require(names.count == payloads.count)
    var tensors: [TensorSpec] = []
    for (i, (d, bytes)) in zip(names, payloads).enumerated() {
        // Shapes from the bytes written (the declarations assume a nested blocksize of 256).
        let shape = i == 0 ? d.shape : [bytes.count / d.dtype.byteSize]
        tensors.append(TensorSpec(name: d.name, dtype: d.dtype, shape: shape, bytes: bytes))
    }
    let path = scratchPath("bnb-again.safetensors")
    writeFile(safetensorsImage(tensors), to: path)
    do {
        let reader = try CheckpointReader(path: path)
        let again = try BnB4BitFormat.load(BnB4BitFormat.groups(in: reader.tensorNames)[0], from: reader)
        require(again == q, "written back, the weight reads differently: \(String(decoding: payloads.last!, as: UTF8.self))")
    } catch {
        fatalError("written back, the weight does not load: \(error); JSON \(String(decoding: payloads.last!, as: UTF8.self))")
    }
}
