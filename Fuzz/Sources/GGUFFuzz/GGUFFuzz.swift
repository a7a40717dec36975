// libFuzzer entry point for the GGUF reader. For every input it checks that:
// - GGUFFile(bytes:file:) either throws a GGUFError whose description is one line naming the
//   file, or returns a file whose tensors all lie inside the bytes, at aligned offsets, with byte
//   counts matching their type and dimensions, and each tensor's bytes can be read;
// - a parsed header re-encoded by GGUFHeader (with the parsed tensors laid out afresh) parses
//   back to the same metadata and tensor infos (encoder/parser agreement).
import Foundation
import GGUF

nonisolated(unsafe) var fuzzSink: UInt8 = 0

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Data(bytes: data, count: size)
    let file: GGUFFile
    do {
        file = try GGUFFile(bytes: bytes, file: "fuzz.gguf")
    } catch let e as GGUFError {
        let text = e.description
        precondition(text.hasPrefix("fuzz.gguf: "), "description does not name the file: \(text)")
        precondition(!text.contains("\n") && !text.contains("\r"), "description is not one line: \(text)")
        return 0
    } catch {
        fatalError("unexpected error type: \(error)")
    }
    for t in file.header.tensors {
        precondition(t.offset % file.header.alignment == 0, "unaligned tensor \(t.name)")
        precondition(t.type.byteCount(t.ne) == t.byteCount, "byte count of \(t.name)")
        precondition(file.dataOffset + t.offset + t.byteCount <= bytes.count, "tensor \(t.name) out of bounds")
        let d = file.data(of: t)
        if let b = d.first { fuzzSink &+= b }
    }
    // Re-encode: the same header with the tensors laid out in order (the reader accepts only
    // that layout, so the offsets are the input's), then parse it back.
    let rebuilt: GGUFHeader
    do {
        rebuilt = try GGUFHeader(metadata: file.metadata, tensors: file.header.tensors.map { ($0.name, $0.ne, $0.type) })
    } catch {
        fatalError("a parsed header does not re-encode: \(error)")
    }
    let encoded = Data(rebuilt.encoded()) + Data(count: rebuilt.dataByteCount)
    let again: GGUFFile
    do { again = try GGUFFile(bytes: encoded, file: "re-encoded.gguf") } catch { fatalError("re-encoded header does not parse: \(error)") }
    precondition(again.header.tensors == rebuilt.tensors && rebuilt.tensors == file.header.tensors, "tensor infos differ after a round trip")
    precondition(again.metadata.count == file.metadata.count, "metadata count differs")
    for (a, b) in zip(again.metadata, file.metadata) {
        precondition(a.key == b.key && sameValue(a.value, b.value), "metadata \(a.key) differs after a round trip")
    }
    return 0
}

/// Equal, with NaN floats equal to themselves by bits.
func sameValue(_ a: GGUFValue, _ b: GGUFValue) -> Bool {
    switch (a, b) {
    case (.float32(let x), .float32(let y)): return x.bitPattern == y.bitPattern
    case (.float64(let x), .float64(let y)): return x.bitPattern == y.bitPattern
    case (.array(let ta, let xa), .array(let tb, let xb)): return ta == tb && xa.count == xb.count && zip(xa, xb).allSatisfy { sameValue($0, $1) }
    default: return a == b
    }
}
