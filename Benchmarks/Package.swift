// swift-tools-version:6.1
// Benchmarks for the qlora package, kept apart from it so that the root package does not
// depend on ordo-one/benchmark. Run from this folder:
//   swift package --disable-sandbox benchmark          (all suites, release build)
//   swift build -c release --product qlora-kernel-timer (the timer compare_bnb.py runs)
import PackageDescription

let package = Package(
    name: "qlora-benchmarks",
    platforms: [.macOS(.v13)],
    dependencies: [
        // Naming the trait explicitly also switches off the default "RuntimeInterposer" trait,
        // whose package (swift-runtime-interposer) is not available here. No jemalloc needed.
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(name: "qlora", path: ".."),
    ],
    targets: [
        /// Seeded test tensors shared by the benchmark suite and the timer.
        .target(
            name: "BenchmarkSupport",
            path: "Sources/BenchmarkSupport"
        ),
        /// ordo-one/benchmark suite: `swift package benchmark`.
        .executableTarget(
            name: "Quantization",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "QLoRA", package: "qlora"),
                "BenchmarkSupport",
            ],
            path: "Benchmarks/Quantization",
            plugins: [
                .plugin(name: "BenchmarkPlugin", package: "benchmark"),
            ]
        ),
        /// Plain median-of-N timer used by compare_bnb.py (prints one JSON object).
        .executableTarget(
            name: "qlora-kernel-timer",
            dependencies: [
                .product(name: "QLoRA", package: "qlora"),
                "BenchmarkSupport",
            ],
            path: "Sources/qlora-kernel-timer"
        ),
    ]
)
