import CheckpointFormats
import QLoRA
import TestSupport

extension VectorFile {
    /// An int64 tensor of a golden file (token ids, labels) as Ints.
    func ints(_ name: String) -> [Int] {
        bytes(name).withUnsafeBytes { raw in (0..<(raw.count / 8)).map { Int(raw.loadUnaligned(fromByteOffset: 8 * $0, as: Int64.self)) } }
    }

    /// PEFT's initial adapters of a training golden (`init.<path>.lora_A/B.weight`, r 8, alpha
    /// 16) on every linear module of `arch`.
    func initialAdapter(_ arch: ModelArchitecture) -> PEFTAdapter {
        var adapter = PEFTAdapter(rank: 8, loraAlpha: 16, targetModules: arch.moduleNames)
        for l in 0..<arch.layers {
            for p in arch.projections {
                let path = p.modulePath(layer: l)
                let a = info("init.\(path).lora_A.weight"), b = info("init.\(path).lora_B.weight")
                adapter.modules[path] = .init(path: path, rank: 8, inFeatures: a.shape[1], outFeatures: b.shape[0],
                                              loraA: floats("init.\(path).lora_A.weight"), loraB: floats("init.\(path).lora_B.weight"))
            }
        }
        return adapter
    }
}

/// max |a - b| / max |b|.
func relMax(_ got: [Float], _ want: [Float]) -> Double {
    var d = 0.0, s = 0.0
    for i in want.indices { d = max(d, Double(abs(got[i] - want[i]))); s = max(s, Double(abs(want[i]))) }
    return d / s
}
