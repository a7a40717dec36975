import Foundation
import QLoRA
import SafeTensors
import XCTest

/// The repository root, found from this source file's path.
public let repositoryRoot: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// How to regenerate the vectors, said wherever a vector is missing or disagrees.
public let regenerateHint = "regenerate with Vectors/generate.py (see Vectors/README.md)"

/// A golden-vector file from Vectors/quant, made by Vectors/generate.py with bitsandbytes.
public final class VectorFile {
    public let file: SafeTensorsFile
    public let name: String
    /// Case id -> parameters, from the file's `cases` metadata.
    public let cases: [String: [String: Any]]

    public init(_ name: String, directory: String = "Vectors/quant") throws {
        self.name = name
        let url = repositoryRoot.appendingPathComponent(directory).appendingPathComponent(name + ".safetensors")
        file = try SafeTensorsFile(url: url)
        if let text = file.metadata["cases"], let data = text.data(using: .utf8),
           let obj = try JSONSerialization.jsonObject(with: data) as? [String: [String: Any]] {
            cases = obj
        } else {
            cases = [:]
        }
    }

    public func has(_ tensor: String) -> Bool { file.info(named: tensor) != nil }

    public func info(_ tensor: String) -> TensorInfo {
        guard let i = file.info(named: tensor) else { fatalError("\(name): no tensor '\(tensor)'; \(regenerateHint)") }
        return i
    }

    public func bytes(_ tensor: String) -> [UInt8] {
        _ = info(tensor)
        return file.withBytes(of: tensor) { Array($0) }
    }

    public func floats(_ tensor: String) -> [Float] {
        precondition(info(tensor).dtype == .f32, "\(tensor) is not F32")
        return file.withBytes(of: tensor) { raw in (0..<(raw.count / 4)).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) } }
    }

    /// Runs `body` on the tensor's elements as a `FloatElements` view.
    public func withElements<R>(_ tensor: String, _ body: (FloatElements) throws -> R) rethrows -> R {
        let type: ElementType
        switch info(tensor).dtype {
        case .f32: type = .float32
        case .bf16: type = .bfloat16
        case .f16: type = .float16
        default: fatalError("\(tensor) is not a float tensor")
        }
        let bytes = file.withBytes(of: tensor) { Array($0) }  // an aligned copy: file offsets need not be
        return try bytes.withUnsafeBytes { try body(.view($0, as: type)) }
    }
}

/// A test case with a fresh temporary directory, `tmp`, removed after each test
/// (`QLORA_KEEP_TEST_FILES=1` keeps it and prints its path, e.g. to load what a test wrote with
/// the Python stack by hand).
open class TemporaryDirectoryTestCase: XCTestCase {
    public var tmp: URL!

    open override func setUpWithError() throws {
        try super.setUpWithError()
        tmp = FileManager.default.temporaryDirectory.appendingPathComponent("qlora-tests-\(getpid())-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
    }

    open override func tearDownWithError() throws {
        if let tmp {
            if ProcessInfo.processInfo.environment["QLORA_KEEP_TEST_FILES"] != nil { print("kept \(tmp.path)") } else { try? FileManager.default.removeItem(at: tmp) }
        }
        try super.tearDownWithError()
    }

    /// Names of the entries in `directory` (default: the temporary directory), sorted, hidden
    /// files included (temporary files are hidden).
    public func listing(_ directory: URL? = nil) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: (directory ?? tmp).path).sorted()
    }
}

/// Bytes of an array of trivial values.
public func rawBytes<T>(_ values: [T]) -> [UInt8] {
    values.withUnsafeBytes { Array($0) }
}

/// Compares byte for byte; on a mismatch says where, how many, and the first values.
/// Returns nil when equal, else a one-line report naming the tensor.
public func byteMismatch(_ actual: [UInt8], _ expected: [UInt8], name: String, elementSize: Int = 1) -> String? {
    if actual == expected { return nil }
    if actual.count != expected.count {
        return "\(name): \(actual.count) bytes, expected \(expected.count)"
    }
    var first = -1, count = 0
    var i = 0
    while i < actual.count {
        if actual[i..<(i + elementSize)] != expected[i..<(i + elementSize)] {
            if first < 0 { first = i / elementSize }
            count += 1
        }
        i += elementSize
    }
    let a = Array(actual[(first * elementSize)..<(first * elementSize + elementSize)])
    let e = Array(expected[(first * elementSize)..<(first * elementSize + elementSize)])
    return "\(name): \(count) of \(actual.count / elementSize) elements differ; first at \(first): \(a) vs expected \(e); \(regenerateHint)"
}

@_exported import struct QLoRA.SplitMix64

/// One bf16 ulp at x's magnitude: the spacing of bf16 values in [2^e, 2^(e+1)) is 2^(e-7).
public func bf16Ulp(_ x: Float) -> Double {
    let m = abs(x)
    return m < 0x1p-126 ? 0x1p-133 : Double(sign: .plus, exponent: Int(m.exponent) - 7, significand: 1)
}

/// Holds `got` to torch's `want`: |got - want| ≤ ulps · (one bf16 ulp of |want|); ulps 0 means
/// the same bits. Prints the worst error as a fraction of the tolerance.
public func assertBF16(_ got: [Float], _ want: [Float], _ name: String, ulps: Double, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(got.count, want.count, "\(name): element count", file: file, line: line)
    guard got.count == want.count else { return }
    var worstUlps = 0.0, differ = 0, firstBad: Int?
    for i in want.indices where got[i].bitPattern != want[i].bitPattern {
        differ += 1
        let err = Double(abs(got[i] - want[i]))
        let unit = bf16Ulp(want[i])
        worstUlps = max(worstUlps, err / unit)
        if firstBad == nil && (ulps == 0 || err > ulps * unit) { firstBad = i }
    }
    if let i = firstBad {
        XCTFail("\(name)[\(i)]: \(got[i]) vs torch \(want[i]); \(differ) of \(want.count) differ, up to \(worstUlps) bf16 ulps, allowed \(ulps)", file: file, line: line)
    }
    let tol = ulps == 0 ? "exact" : "\(ulps) bf16 ulps", fraction = ulps == 0 ? (differ == 0 ? 0 : .infinity) : worstUlps / ulps
    print("\(name): max error \(String(format: "%.2f", fraction)) of the tolerance (\(tol)); \(differ) of \(want.count) elements differ")
}

/// Vectors/generate_gguf_quantize.py's `small_weights`: bf16 bits from FNV-1a(name) and the
/// index (weights a random sign, exponent 2^-9...2^-2 and 7-bit mantissa; norms 1...2), so a
/// golden's inputs need not be committed.
public func smallWeights(_ name: String, _ count: Int) -> [UInt16] {
    var seed: UInt32 = 0x811C_9DC5
    for b in name.utf8 { seed = (seed ^ UInt32(b)) &* 0x0100_0193 }
    let norm = name.hasSuffix("norm.weight")
    return (0..<count).map { i in
        var h = (seed ^ UInt32(i)) &* 0x9E37_79B1
        h ^= h >> 15
        h = h &* 0x85EB_CA77
        h ^= h >> 13
        let mantissa = (h >> 4) & 0x7F
        return UInt16(norm ? (127 << 7) | mantissa : ((h & 1) << 15) | ((118 + ((h >> 1) & 7)) << 7) | mantissa)
    }
}
