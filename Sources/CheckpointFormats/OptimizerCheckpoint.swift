import Foundation
import QLoRA
import SafeTensors

/// AdamW state for a set of named parameters, saved as safetensors so a run resumes
/// bit-identically: `<name>.exp_avg` and `<name>.exp_avg_sq` (F32, flat), with the step counts
/// and hyper-parameters in the metadata (`step.<name>`, `adamw` as JSON).
public struct OptimizerCheckpoint: Sendable {
    public var config: AdamWConfig
    public var states: [String: AdamWState]

    public init(config: AdamWConfig, states: [String: AdamWState]) {
        self.config = config
        self.states = states
    }

    /// Written to a temporary file beside `path` and renamed into place.
    public func save(to path: String) throws {
        var meta: [String: String] = ["format": "qlora-adamw"]
        meta["adamw"] = String(decoding: try JSONEncoder().encode(config), as: UTF8.self)
        var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
        for (name, s) in states.sorted(by: { $0.key < $1.key }) {
            meta["step.\(name)"] = String(s.step)
            tensors.append((name + ".exp_avg", .f32, [s.expAvg.count], s.expAvg.withUnsafeBytes { Array($0) }))
            tensors.append((name + ".exp_avg_sq", .f32, [s.expAvgSq.count], s.expAvgSq.withUnsafeBytes { Array($0) }))
        }
        try SafeTensorsWriter.write(url: URL(fileURLWithPath: path), tensors: tensors, metadata: meta)
    }

    public static func load(path: String) throws -> OptimizerCheckpoint {
        let f = try SafeTensorsFile(path: path)
        guard f.metadata["format"] == "qlora-adamw", let cfgText = f.metadata["adamw"],
              let config = try? JSONDecoder().decode(AdamWConfig.self, from: Data(cfgText.utf8)) else {
            throw CheckpointError.invalidPath(path: path, problem: "not a qlora optimizer checkpoint (metadata 'format'/'adamw' missing)")
        }
        var states: [String: AdamWState] = [:]
        for (key, value) in f.metadata where key.hasPrefix("step.") {
            let name = String(key.dropFirst(5))
            guard let step = Int(value), step >= 0 else { throw CheckpointError.invalidPath(path: path, problem: "step of '\(name)' is not a count") }
            guard let m = f.info(named: name + ".exp_avg"), let v = f.info(named: name + ".exp_avg_sq"), m.dtype == .f32, v.dtype == .f32,
                  m.elementCount == v.elementCount else {
                throw CheckpointError.invalidTensor(file: path, tensor: name, problem: "exp_avg / exp_avg_sq missing, not F32, or of different sizes")
            }
            var s = AdamWState(count: m.elementCount)
            s.step = step
            s.expAvg = f.withBytes(of: m.name) { loadFloats($0) }
            s.expAvgSq = f.withBytes(of: v.name) { loadFloats($0) }
            states[name] = s
        }
        return OptimizerCheckpoint(config: config, states: states)
    }
}
