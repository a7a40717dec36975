import CheckpointFormats
import Foundation
import QLoRA
import SafeTensors

/// What `qlora inspect` reports: every tensor as stored, each 4-bit weight as one logical
/// tensor with its quantization, and totals. Byte counts are exact (from the headers).
public struct InspectReport: Codable, Sendable {
    public struct Tensor: Codable, Sendable {
        public var name: String
        public var dtype: String
        public var shape: [Int]
        /// Bytes stored for this tensor; for a 4-bit weight, data plus all its constants.
        public var bytes: Int
        public var quantization: Quantization?
    }

    public struct Quantization: Codable, Sendable {
        public var quantType: String
        public var blocksize: Int
        public var doubleQuant: Bool
        /// Dtype recorded in the quant state (the dequantization default).
        public var originalDtype: String
        public var dataBytes: Int
        /// absmax, nested absmax and both code tables, as stored (the JSON excluded).
        public var constantBytes: Int
        public var dataBitsPerParameter: Double
        public var constantBitsPerParameter: Double
        /// Block scales that are not finite (NaN or ±Inf), which dequantize to NaN or infinite
        /// weights: `dequantize`, `merge` and `train` refuse the weight. Nil when there are none.
        public var nonFiniteScales: Int?
        /// Where the first one comes from (`BnB4BitFormat.nonFiniteScale`), when there are any.
        public var nonFiniteScalesProblem: String?
    }

    public var path: String
    public var shards: [String]
    public var tensors: [Tensor]
    public var totalBytes: Int
    public var totalParameters: Int
    public var quantizedParameters: Int
}

public func inspectCheckpoint(path: String) throws -> InspectReport {
    let reader = try CheckpointReader(path: path)
    let groups = try BnB4BitFormat.groups(of: reader)
    var member: Set<String> = []
    for g in groups { member.formUnion(g.members) }
    var tensors: [InspectReport.Tensor] = []
    var params = 0, quantized = 0
    let byName = Dictionary(uniqueKeysWithValues: groups.map { ($0.name, $0) })
    for e in reader.entries {
        if let g = byName[e.name] {
            let state = try BnB4BitFormat.state(of: g, from: reader, allowNonFiniteScales: true)
            // The packed data's size is its stored size (`state(of:)` checked it is ceil(n / 2)):
            // nothing of the weight is read.
            let dataBytes = reader.info(named: g.name)?.byteCount ?? 0
            let nonFinite = BnB4BitFormat.nonFiniteScale(state, name: g.name, key: BnB4BitFormat.quantStateKey(g.name, g.quantType))
            let n = state.elementCount
            let stored = g.members.reduce(0) { $0 + (reader.info(named: $1)?.byteCount ?? 0) }
            let json = reader.info(named: BnB4BitFormat.quantStateKey(g.name, g.quantType))?.byteCount ?? 0
            let constants = stored - dataBytes - json
            tensors.append(.init(
                name: e.name, dtype: "4bit", shape: state.shape, bytes: stored,
                quantization: .init(
                    quantType: state.quantType.rawValue, blocksize: state.blocksize, doubleQuant: state.isDoubleQuantized,
                    originalDtype: state.dtype.rawValue, dataBytes: dataBytes, constantBytes: constants,
                    dataBitsPerParameter: n == 0 ? 0 : Double(dataBytes * 8) / Double(n),
                    constantBitsPerParameter: n == 0 ? 0 : Double(constants * 8) / Double(n),
                    nonFiniteScales: nonFinite?.count,
                    nonFiniteScalesProblem: nonFinite.map { "\($0.tensor): \($0.problem)" })))
            params += n
            quantized += n
        } else if !member.contains(e.name) {
            tensors.append(.init(name: e.name, dtype: e.info.dtype.rawValue, shape: e.info.shape, bytes: e.info.byteCount, quantization: nil))
            params += e.info.elementCount
        }
    }
    let total = reader.entries.reduce(0) { $0 + $1.info.byteCount }
    return InspectReport(path: path, shards: reader.shardFileNames, tensors: tensors, totalBytes: total,
                         totalParameters: params, quantizedParameters: quantized)
}
