import FileOutput
import Foundation

/// A SentencePiece `tokenizer.model` (the protobuf ModelProto of google/sentencepiece's
/// sentencepiece_model.proto): the pieces with their scores and types, which is all a GGUF's
/// vocabulary needs. Untrusted bytes: every length is checked, a problem is one line naming the file.
public struct SentencePieceModel: Sendable, Equatable {
    /// sentencepiece_model.proto's SentencePiece.Type (NORMAL when the field is absent).
    public enum PieceType: Int, Sendable {
        case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6
    }

    public struct Piece: Sendable, Equatable {
        public var piece: String
        public var score: Float
        public var type: PieceType
    }

    public var pieces: [Piece]

    public init(pieces: [Piece]) { self.pieces = pieces }

    /// Parses ModelProto's `pieces` (field 1); the trainer, normalizer and other specs are skipped.
    public init(bytes: [UInt8], file: String) throws {
        var r = ProtobufReader(bytes: bytes[...], file: file)
        var pieces: [Piece] = []
        while let (field, wire) = try r.key() {
            guard field == 1, wire == 2 else { try r.skip(wire); continue }
            var m = ProtobufReader(bytes: try r.lengthDelimited(), file: file)
            var piece: String?, score: Float = 0, type = PieceType.normal
            while let (f, w) = try m.key() {
                switch (f, w) {
                case (1, 2):
                    guard let s = String(validating: try m.lengthDelimited(), as: UTF8.self) else { throw m.fail("piece \(pieces.count) is not UTF-8") }
                    piece = s
                case (2, 5): score = Float(bitPattern: try m.fixed32())
                case (3, 0):
                    let v = try m.varint()
                    guard v <= 6, let t = PieceType(rawValue: Int(v)) else { throw m.fail("piece \(pieces.count) has type \(v) (1 to 6)") }
                    type = t
                default: try m.skip(w)
                }
            }
            guard let piece else { throw r.fail("piece \(pieces.count) has no text") }
            pieces.append(Piece(piece: piece, score: score, type: type))
        }
        guard !pieces.isEmpty else { throw r.fail("no pieces: not a SentencePiece model") }
        self.pieces = pieces
    }

    public init(file: String) throws {
        let data = try InputFile.read(file)
        try self.init(bytes: [UInt8](data), file: file)
    }
}

/// The protobuf wire format, as far as reading a ModelProto needs.
struct ProtobufReader {
    var bytes: ArraySlice<UInt8>
    let file: String

    func fail(_ problem: String) -> CheckpointError { .invalidPath(path: file, problem: problem) }

    mutating func varint() throws -> UInt64 {
        var v: UInt64 = 0
        for shift in stride(from: 0, to: 64, by: 7) {
            guard let b = bytes.popFirst() else { throw fail("the file ends inside a varint") }
            v |= UInt64(b & 0x7F) << UInt64(shift)
            if b & 0x80 == 0 { return v }
        }
        throw fail("a varint longer than 10 bytes")
    }

    /// The next field number and wire type, or nil at the end.
    mutating func key() throws -> (Int, Int)? {
        guard !bytes.isEmpty else { return nil }
        let k = try varint()
        guard k >> 3 > 0, k >> 3 <= UInt64(Int32.max) else { throw fail("a field number of \(k >> 3)") }
        return (Int(k >> 3), Int(k & 7))
    }

    mutating func lengthDelimited() throws -> ArraySlice<UInt8> {
        let n = try varint()
        guard n <= UInt64(bytes.count) else { throw fail("a field of \(n) bytes runs past the end (\(bytes.count) left)") }
        let s = bytes.prefix(Int(n))
        bytes = bytes.dropFirst(Int(n))
        return s
    }

    mutating func fixed32() throws -> UInt32 {
        guard bytes.count >= 4 else { throw fail("the file ends inside a 32-bit field") }
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(bytes[bytes.startIndex + i]) << UInt32(8 * i) }
        bytes = bytes.dropFirst(4)
        return v
    }

    mutating func skip(_ wire: Int) throws {
        switch wire {
        case 0: _ = try varint()
        case 1:
            guard bytes.count >= 8 else { throw fail("the file ends inside a 64-bit field") }
            bytes = bytes.dropFirst(8)
        case 2: _ = try lengthDelimited()
        case 5: _ = try fixed32()
        default: throw fail("wire type \(wire), which ModelProto does not use")
        }
    }
}

extension SentencePieceModel {
    /// The vocabulary llama.cpp's convert_hf_to_gguf.py writes for this model
    /// (`_create_vocab_sentencepiece`): `vocabSize` entries (config.json's vocab_size), first all
    /// "[PADi]" with score -10000 and type UNUSED, then piece i at id i with its score and type
    /// (NORMAL unless the piece is UNKNOWN, CONTROL, UNUSED or BYTE: a USER_DEFINED piece becomes
    /// NORMAL), pieces past `vocabSize` dropped. Types are GGUF's token types (the same numbers).
    /// The added tokens (added_tokens.json, added_tokens_decoder) go on top: `SpecialVocabulary`.
    public func ggufVocabulary(vocabSize: Int) -> (tokens: [String], scores: [Float], types: [Int32]) {
        var tokens = (0..<vocabSize).map { "[PAD\($0)]" }
        var scores = [Float](repeating: -10000, count: vocabSize)
        var types = [Int32](repeating: Int32(PieceType.unused.rawValue), count: vocabSize)
        for (id, p) in pieces.enumerated() where id < vocabSize {
            tokens[id] = p.piece
            scores[id] = p.score
            switch p.type {
            case .unknown, .control, .unused, .byte: types[id] = Int32(p.type.rawValue)
            case .normal, .userDefined: types[id] = Int32(PieceType.normal.rawValue)
            }
        }
        return (tokens, scores, types)
    }
}
