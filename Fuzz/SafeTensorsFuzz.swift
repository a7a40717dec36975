// libFuzzer entry point for the SafeTensors module. Compiled together with
// Sources/SafeTensors/*.swift into one module (see build.sh), so it uses only the module's
// public API and needs no import.
//
// For every input it checks that:
// - the header parser either throws a SafeTensorsError whose description is one line naming
//   the file, or returns a header whose invariants hold (ranges inside the data buffer, byte
//   counts matching dtype x shape, no overlaps), and every tensor's bytes can be read;
// - a valid header re-encoded with SafeTensorsHeader.encode parses back to the same tensors and
//   metadata (encoder/parser agreement, including escaping of hostile names);
// - SafeTensorsFile(bytes:) agrees with the parser and hands out in-bounds buffers;
// - the same bytes as a shard index either fail cleanly or survive an encode/decode round trip.

/// Keeps the byte reads observable so the optimizer cannot drop them (ASan checks each read).
nonisolated(unsafe) var fuzzSink: UInt8 = 0

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    fuzzHeader(bytes)
    fuzzIndex(bytes)
    return 0
}

private func checkError(_ error: Error, source: String) {
    guard let error = error as? SafeTensorsError else { fatalError("unexpected error type: \(error)") }
    let text = error.description
    precondition(text.hasPrefix(source + ": "), "description does not name the file: \(text)")
    precondition(!text.contains("\n") && !text.contains("\r"), "description is not one line: \(text)")
}

private func fuzzHeader(_ bytes: UnsafeRawBufferPointer) {
    let header: SafeTensorsHeader
    do {
        header = try SafeTensorsHeader.parse(bytes, source: "fuzz.safetensors")
    } catch {
        checkError(error, source: "fuzz.safetensors")
        return
    }
    precondition(header.dataStart + header.dataByteCount == bytes.count)
    var furthestEnd = 0
    var sum: UInt8 = 0
    for tensor in header.tensors {
        let range = tensor.dataOffsets
        precondition(range.lowerBound >= 0 && range.upperBound <= header.dataByteCount)
        precondition(range.count == tensor.elementCount * tensor.dtype.byteSize)
        precondition(range.isEmpty || range.lowerBound >= furthestEnd, "overlap not caught")
        furthestEnd = max(furthestEnd, range.upperBound)
        let slice = UnsafeRawBufferPointer(rebasing: bytes[(header.dataStart + range.lowerBound)..<(header.dataStart + range.upperBound)])
        for byte in slice { sum &+= byte }
    }
    fuzzSink &+= sum

    var image = SafeTensorsHeader.encode(tensors: header.tensors, metadata: header.metadata)
    image.append(contentsOf: bytes[header.dataStart...])
    do {
        let again = try SafeTensorsHeader.parse(image)
        precondition(again.tensors == header.tensors, "re-encoded tensors differ")
        precondition(again.metadata == header.metadata, "re-encoded metadata differs")
        precondition(again.dataStart % 8 == 0, "encoder must pad the header to 8 bytes")
    } catch {
        fatalError("re-encoded header does not parse: \(error)")
    }

    do {
        let file = try SafeTensorsFile(bytes: Array(bytes))
        precondition(file.header == header)
        for tensor in file.tensors {
            file.withBytes(of: tensor.name) { buffer in
                precondition(buffer.count == tensor.byteCount)
                if let last = buffer.last { fuzzSink &+= last }
            }
        }
    } catch {
        fatalError("SafeTensorsFile rejected a valid header: \(error)")
    }
}

private func fuzzIndex(_ bytes: UnsafeRawBufferPointer) {
    let index: ShardIndex
    do {
        index = try ShardIndex(json: bytes, source: "fuzz.index.json")
    } catch {
        checkError(error, source: "fuzz.index.json")
        return
    }
    do {
        let again = try ShardIndex(json: index.encoded())
        precondition(again == index, "index round trip differs")
    } catch {
        fatalError("re-encoded index does not parse: \(error)")
    }
}
