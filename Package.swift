// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "qlora",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "qlora", targets: ["QLoRACommand"]),
        .library(name: "QLoRA", targets: ["QLoRA"]),
        .library(name: "SafeTensors", targets: ["SafeTensors"]),
        .library(name: "GGUF", targets: ["GGUF"]),
        .library(name: "CheckpointFormats", targets: ["CheckpointFormats"]),
        .library(name: "CheckpointJobs", targets: ["CheckpointJobs"]),
        .library(name: "Training", targets: ["Training"]),
        .library(name: "Memory", targets: ["Memory"]),
        .library(name: "Claims", targets: ["Claims"]),
        .library(name: "Report", targets: ["Report"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // `make docs`: the DocC archives of the library products (swift package generate-documentation).
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // MARK: Public API

        /// The numerics core, no file I/O: bf16/fp16 (Numerics/), 4-bit and 8-bit blockwise
        /// quantization and the 4-bit matmul (Quantization/), LoRA layers and PEFT's merge (LoRA/),
        /// AdamW and gradient clipping (Optimizer/), the one model-architecture type (Model/), and
        /// the Llama decoder's ops, model and trainer (Llama/).
        .target(name: "QLoRA", dependencies: ["CQLoRAKernels", "COpenBLAS"], linkerSettings: [.linkedLibrary("m")]),
        /// The safetensors format: mmap reader, streaming writer, sharded index. Foundation only,
        /// so the fuzz harness (Fuzz/) compiles it on its own.
        .target(name: "SafeTensors"),
        /// GGUF, llama.cpp's model file: header writer and checked reader (Foundation and
        /// SafeTensors' message escaping only).
        .target(name: "GGUF", dependencies: ["SafeTensors"]),
        /// The file rules: stage-then-rename and exclusive commit for every file and directory the
        /// tool writes (`StagedOutput`: never an input, never over an output without --overwrite,
        /// nothing left on a signal), and regular-file reads of every input (`InputFile`).
        .target(name: "FileOutput", dependencies: ["CFileOps", "SafeTensors"]),
        /// The file formats above safetensors: bitsandbytes' 4-bit layout, PEFT adapters, AdamW
        /// state, config.json (the architecture reader, `quantization_config`), the dtype bridge.
        .target(name: "CheckpointFormats", dependencies: ["QLoRA", "SafeTensors", "FileOutput"]),
        /// Whole-checkpoint jobs on one streaming engine (`CheckpointRewrite`): quantize,
        /// dequantize, merge (Merge/), plus inspect, compare and the synthetic sample writer.
        .target(name: "CheckpointJobs", dependencies: ["CheckpointFormats", "QLoRA", "SafeTensors", "FileOutput", "GGUF"]),
        /// `qlora train`: the Llama checkpoint loader, JSONL data, the run with its resumable
        /// checkpoints and final adapter.
        .target(name: "Training", dependencies: ["CheckpointFormats", "QLoRA", "SafeTensors", "FileOutput", "Memory"]),
        /// Memory per component: estimated from exact parameter counts, and measured (allocator,
        /// RSS, a real decoder layer's step).
        .target(name: "Memory", dependencies: ["QLoRA", "CMallocInfo"]),
        /// The published claims (../shared/claims.md) as data, the checks that give each a verdict, and the precision figures.
        .target(name: "Claims", dependencies: ["Memory", "QLoRA", "SafeTensors", "GGUF", "CheckpointJobs"]),
        /// The main report: the component table, the claims and the memory chart, as Markdown and SVG text.
        .target(name: "Report", dependencies: ["Memory", "Claims", "QLoRA"]),
        /// `qlora bench`: the kernels timed against memcpy/sgemm/sgemv in one run.
        .target(name: "KernelBench", dependencies: ["QLoRA", "COpenBLAS"]),
        /// The `qlora` command: parses, calls the libraries, prints.
        .executableTarget(
            name: "QLoRACommand",
            dependencies: [
                "QLoRA", "SafeTensors", "FileOutput", "CheckpointFormats", "CheckpointJobs", "Training", "KernelBench", "Memory", "Claims", "Report",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // MARK: Implementation details

        /// SIMD kernels with per-function CPU targets and run-time dispatch (AVX-512, AVX2, scalar).
        .target(name: "CQLoRAKernels", cSettings: [.unsafeFlags(["-O3"])]),
        /// glibc's mallinfo2, for measured memory.
        .target(name: "CMallocInfo"),
        /// renameat2(RENAME_NOREPLACE), which Swift's Glibc module does not import.
        .target(name: "CFileOps"),
        /// Debian's libopenblas-dev (pkg-config `openblas`): the only BLAS.
        .systemLibrary(
            name: "COpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),

        // MARK: Tests

        .target(name: "TestSupport", dependencies: ["QLoRA", "SafeTensors"], path: "Tests/TestSupport"),
        .testTarget(name: "QLoRATests", dependencies: ["QLoRA", "TestSupport", "SafeTensors", "COpenBLAS"]),
        .testTarget(name: "SafeTensorsTests", dependencies: ["SafeTensors", "TestSupport"]),
        .testTarget(name: "GGUFTests", dependencies: ["GGUF", "QLoRA", "TestSupport"]),
        .testTarget(name: "FileOutputTests", dependencies: ["FileOutput", "TestSupport"]),
        .testTarget(name: "CheckpointFormatsTests", dependencies: ["CheckpointFormats", "QLoRA", "SafeTensors", "GGUF", "TestSupport"]),
        .testTarget(name: "CheckpointJobsTests", dependencies: ["CheckpointJobs", "CheckpointFormats", "QLoRA", "SafeTensors", "GGUF", "TestSupport"]),
        .testTarget(name: "TrainingTests", dependencies: ["Training", "CheckpointJobs", "CheckpointFormats", "QLoRA", "SafeTensors", "TestSupport"]),
        .testTarget(name: "MemoryTests", dependencies: ["Memory", "QLoRA", "CheckpointFormats", "CheckpointJobs", "SafeTensors", "TestSupport"]),
        .testTarget(name: "ClaimsTests", dependencies: ["Claims", "Memory", "QLoRA", "TestSupport"]),
        .testTarget(name: "CLITests", dependencies: ["TestSupport", "QLoRA", "SafeTensors"]),
    ]
)
