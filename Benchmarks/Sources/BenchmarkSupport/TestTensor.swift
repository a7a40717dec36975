#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The tensor every benchmark uses: a 4096 x 11008 fp32 weight (one LLaMA-7B MLP projection),
/// 45,088,768 elements, 180 MB as fp32 — far larger than any cache on the machines we run on,
/// so every timed pass streams from and to DRAM.
public enum TestTensor {
    public static let rows = 4096
    public static let cols = 11008
    public static var shape: [Int] { [rows, cols] }
    public static var count: Int { rows * cols }

    /// Standard-normal values from a fixed seed (xoshiro256** and Box–Muller), the same on every run.
    public static func normal(count: Int = TestTensor.count, seed: UInt64 = 0x5EED_0F_4B17) -> [Float] {
        var rng = Xoshiro256StarStar(seed: seed)
        return [Float](unsafeUninitializedCapacity: count) { buf, initialized in
            var i = 0
            while i < count {
                // u1 in (0, 1], u2 in [0, 1): 53-bit uniforms.
                let u1 = Double((rng.next() >> 11) + 1) * 0x1p-53
                let u2 = Double(rng.next() >> 11) * 0x1p-53
                let r = (-2 * log(u1)).squareRoot()
                let t = 2 * Double.pi * u2
                buf[i] = Float(r * cos(t))
                if i + 1 < count { buf[i + 1] = Float(r * sin(t)) }
                i += 2
            }
            initialized = count
        }
    }

    /// Reads raw little-endian fp32 values (e.g. a tensor written by `compare_bnb.py`).
    public static func readRawFloat32(path: String, count: Int = TestTensor.count) -> [Float]? {
        guard let f = fopen(path, "rb") else { return nil }
        defer { fclose(f) }
        var values = [Float](repeating: 0, count: count)
        let read = values.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, f) }
        return read == count * MemoryLayout<Float>.size ? values : nil
    }
}

/// xoshiro256** seeded through SplitMix64.
public struct Xoshiro256StarStar: RandomNumberGenerator {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var z = seed
        func splitMix() -> UInt64 {
            z &+= 0x9E37_79B9_7F4A_7C15
            var x = z
            x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
            x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
            return x ^ (x >> 31)
        }
        s = (splitMix(), splitMix(), splitMix(), splitMix())
    }

    @inline(__always)
    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = s.3 << 45 | s.3 >> 19
        return result
    }
}
