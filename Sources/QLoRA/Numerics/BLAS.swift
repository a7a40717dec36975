import COpenBLAS
import CQLoRAKernels

/// The OpenBLAS this process runs on.
///
/// Debian's OpenBLAS 0.3.21 does not recognise AMD Zen 4/5 and falls back to its AVX2
/// "Haswell" kernels; `OPENBLAS_CORETYPE=SkylakeX` selects its AVX-512 kernels (~1.8x faster
/// sgemm here). The variable is read once, when the library loads, so a program must set it
/// before starting (the `qlora` command re-executes itself with it; see `preferredCoreType`).
public enum BLAS {
    /// The kernel set OpenBLAS picked (`openblas_get_corename`), e.g. "Haswell", "SkylakeX".
    public static var coreName: String { String(cString: openblas_get_corename()) }
    /// OpenBLAS's thread count.
    public static var threads: Int { Int(openblas_get_num_threads()) }
    public static func setThreads(_ n: Int) { openblas_set_num_threads(Int32(max(1, n))) }

    /// Runs `body` with OpenBLAS held to one thread, for GEMMs that are already one per worker
    /// thread (attention) or too small to split (LoRA's rank-r products): OpenBLAS's own
    /// threads would only contend for the cores, and they keep spinning after a call returns.
    static func withOneThread<R>(_ body: () -> R) -> R {
        let saved = Int(openblas_get_num_threads())
        if saved != 1 { openblas_set_num_threads(1) }
        defer { if saved != 1 { openblas_set_num_threads(Int32(saved)) } }
        return body()
    }

    /// The `OPENBLAS_CORETYPE` worth asking for on this CPU, or nil: "SkylakeX" only when the
    /// CPU has every AVX-512 subset those kernels use, so no kernel the CPU lacks is chosen.
    public static var preferredCoreType: String? {
        qlora_cpu_has_skylakex_features() != 0 ? "SkylakeX" : nil
    }
}
