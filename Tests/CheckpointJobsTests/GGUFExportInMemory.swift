import CheckpointFormats
import CheckpointJobs
import GGUF
import QLoRA
import SafeTensors

/// The export's pieces put together in memory for a single-file Llama checkpoint, so the tests
/// can hold each tensor and the metadata to the converter's (the export itself streams `plan`
/// tensor by tensor into the file).
extension GGUFExport {
    /// Every tensor of a dense Llama-architecture checkpoint as the converter writes it.
    static func llamaTensors(_ reader: CheckpointReader, _ a: ModelArchitecture, outType: GGUFOutType) throws -> [GGUFTensor] {
        try plan(try denseTensors(reader), a, .llama, outType: outType).map { t in
            let x = values(of: t, a) { hf in reader.withBytes(of: hf) { loadFloats($0, as: ElementType(reader.info(named: hf)!.dtype)!) } }
            return GGUFTensor(name: t.name, ne: t.ne, type: t.type, bytes: encode(x, ne: t.ne, name: t.name, outType: outType).1)
        }
    }

    /// The metadata convert_hf_to_gguf.py writes for a Llama-architecture model with a
    /// SentencePiece tokenizer.
    static func llamaMetadata(config: JSONValue, _ a: ModelArchitecture, name: String, parameters: Int, outType: GGUFOutType,
                              vocabulary: (tokens: [String], scores: [Float], types: [Int32]),
                              special: SpecialVocabulary? = nil) -> [(key: String, value: GGUFValue)] {
        metadata(config: config, a, .llama, name: name, parameters: parameters, outType: outType, vocabulary: vocabulary, special: special)
    }
}
