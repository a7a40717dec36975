// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "qlora",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "qlora", targets: ["QLoRACommand"]),
        .library(name: "QLoRA", targets: ["QLoRA"]),
        .library(name: "SafeTensors", targets: ["SafeTensors"]),
        .library(name: "Checkpoint", targets: ["Checkpoint"]),
        .library(name: "Memory", targets: ["Memory"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // MARK: Public API

        /// Numerics: bf16/fp16, 4-bit and 8-bit codes, blockwise quantization. No file I/O.
        .target(name: "QLoRA", dependencies: ["CQLoRAKernels", "COpenBLAS"], linkerSettings: [.linkedLibrary("m")]),
        /// The safetensors format: mmap reader, streaming writer, sharded index. Foundation only,
        /// so the fuzz harness (Fuzz/) compiles it on its own.
        .target(name: "SafeTensors"),
        /// Whole checkpoints: the bitsandbytes 4-bit layout, quantize/dequantize/inspect, streamed.
        .target(name: "Checkpoint", dependencies: ["QLoRA", "SafeTensors"]),
        /// Memory per component (estimated from exact parameter counts, and measured), the
        /// published claims checked, and the report.
        .target(name: "Memory", dependencies: ["QLoRA", "SafeTensors", "Checkpoint", "CMallocInfo"]),
        /// `qlora bench`: the kernels timed against memcpy/sgemm/sgemv in one run.
        .target(name: "KernelBench", dependencies: ["QLoRA", "COpenBLAS"]),
        /// The `qlora` command: parses, calls the libraries, prints.
        .executableTarget(
            name: "QLoRACommand",
            dependencies: [
                "QLoRA", "SafeTensors", "Checkpoint", "KernelBench", "Memory",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // MARK: Implementation details

        /// SIMD kernels with per-function CPU targets and run-time dispatch (AVX-512, AVX2, scalar).
        .target(name: "CQLoRAKernels", cSettings: [.unsafeFlags(["-O3"])]),
        /// glibc's mallinfo2, for measured memory.
        .target(name: "CMallocInfo"),
        /// Debian's libopenblas-dev (pkg-config `openblas`): the only BLAS.
        .systemLibrary(
            name: "COpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),

        // MARK: Tests

        .target(name: "TestSupport", dependencies: ["QLoRA", "SafeTensors"], path: "Tests/TestSupport"),
        .testTarget(name: "QLoRATests", dependencies: ["QLoRA", "TestSupport", "SafeTensors", "COpenBLAS"]),
        .testTarget(name: "SafeTensorsTests", dependencies: ["SafeTensors"]),
        .testTarget(name: "CheckpointTests", dependencies: ["Checkpoint", "QLoRA", "SafeTensors", "TestSupport"]),
        .testTarget(name: "MemoryTests", dependencies: ["Memory", "QLoRA", "Checkpoint", "SafeTensors", "TestSupport"]),
        .testTarget(name: "CLITests", dependencies: ["TestSupport", "QLoRA", "SafeTensors"]),
    ]
)
