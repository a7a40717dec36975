import XCTest
import QLoRA
import TestSupport

/// torch.nn.utils.clip_grad_norm_ (Vectors/quant/clip.safetensors). torch sums squares in fp32 in
/// its own order, qlora in Float64: the total norm agrees within 2e-7 relative (a couple of fp32
/// roundings), and the clipped gradients within that plus one rounding of the product.
final class GradientClippingTests: XCTestCase {
    func testMatchesTorchClipGradNorm() throws {
        let v = try VectorFile("clip")
        for maxNorm in [1, 100] {
            var grads = (0..<3).map { v.floats("grad\($0)") }
            let total = try GradientClipping.clipGradNorm(&grads, maxNorm: Double(maxNorm))
            let want = v.floats("max\(maxNorm).total_norm")[0]
            XCTAssertEqual(Double(total), Double(want), accuracy: 2e-7 * Double(want), "total norm, max_norm \(maxNorm)")
            for i in 0..<3 {
                let w = v.floats("max\(maxNorm).clipped\(i)")
                for j in w.indices { XCTAssertEqual(grads[i][j], w[j], accuracy: 4e-7 * abs(w[j]) + 1e-30, "max_norm \(maxNorm) grad\(i)[\(j)]") }
            }
        }
    }

    func testNonFiniteGradientIsRefusedAndLeftUntouched() throws {
        var grads: [[Float]] = [[1, 2, 3], [1, .nan]]
        XCTAssertThrowsError(try GradientClipping.clipGradNorm(&grads, maxNorm: 0.1)) {
            XCTAssertEqual(($0 as? GradientClipping.NonFiniteGradient)?.tensor, 1)
        }
        XCTAssertEqual(grads[0], [1, 2, 3])
        var a: [Float] = [3, 4]
        let norm = try a.withUnsafeMutableBufferPointer { try GradientClipping.clipGradNorm([$0], maxNorm: 1) }
        XCTAssertEqual(norm, 5)
        XCTAssertEqual(a[0], 3 * (1 / (5 + 1e-6)), accuracy: 1e-7)
    }
}
