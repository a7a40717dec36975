import COpenBLAS
import XCTest

/// The COpenBLAS system-library target links Debian's libopenblas and its CBLAS works
/// (the 4-bit matmul builds on it).
final class OpenBLASTests: XCTestCase {
    func testSgemmLinksAndMultiplies() {
        // a: [2, 3], b: [3, 2] row-major -> c = a · b: [2, 2]
        let a: [Float] = [1, 2, 3, 4, 5, 6]
        let b: [Float] = [7, 8, 9, 10, 11, 12]
        var c = [Float](repeating: 0, count: 4)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 2, 2, 3, 1, a, 3, b, 2, 0, &c, 2)
        XCTAssertEqual(c, [58, 64, 139, 154])
        let core = String(cString: openblas_get_corename())
        XCTAssertFalse(core.isEmpty)
        print("OpenBLAS core: \(core), threads: \(openblas_get_num_threads())")
    }
}
