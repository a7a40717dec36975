// swift-tools-version:6.0
// libFuzzer + AddressSanitizer harnesses for the parsers above the safetensors reader, kept
// apart from the root package (like Benchmarks/) so that `swift build` and `swift test` there
// never see the sanitizer flags. Build and run through Fuzz/run.sh, which passes
//   swift build -c release --sanitize=fuzzer --sanitize=address -Xswiftc -sanitize=fuzzer,address
// so that every module (the parsers, not only the harness) carries libFuzzer's coverage
// instrumentation and ASan's checks. The safetensors harness is built on its own by build.sh.
import PackageDescription

/// libFuzzer provides `main`; each harness only exports `LLVMFuzzerTestOneInput`.
let harness: [SwiftSetting] = [.unsafeFlags(["-parse-as-library"])]

let package = Package(
    name: "qlora-fuzz",
    platforms: [.macOS(.v13)],
    dependencies: [
        .package(name: "qlora", path: ".."),
    ],
    targets: [
        // MARK: Harnesses (one executable each)

        /// bitsandbytes' 4-bit quant state: fuzzed JSON in a safetensors file with fuzzed
        /// companion tensors, read by `BnB4BitFormat.load` and `inspectCheckpoint`.
        .executableTarget(
            name: "BnB4BitFuzz",
            dependencies: ["FuzzSupport", .product(name: "CheckpointFormats", package: "qlora"),
                           .product(name: "CheckpointJobs", package: "qlora"), .product(name: "QLoRA", package: "qlora"),
                           .product(name: "SafeTensors", package: "qlora")],
            swiftSettings: harness
        ),
        /// GGUF: the reader on fuzzed bytes, and the header encoder against it.
        .executableTarget(
            name: "GGUFFuzz",
            dependencies: [.product(name: "GGUF", package: "qlora")],
            swiftSettings: harness
        ),
        /// A PEFT adapter directory: fuzzed adapter_config.json, fuzzed tensor names, shapes and dtypes.
        .executableTarget(
            name: "PEFTAdapterFuzz",
            dependencies: ["FuzzSupport", .product(name: "CheckpointFormats", package: "qlora"),
                           .product(name: "QLoRA", package: "qlora"), .product(name: "SafeTensors", package: "qlora")],
            swiftSettings: harness
        ),
        /// config.json through `ModelArchitecture(configFile:)`, the tensor counts and `MemoryEstimate`.
        .executableTarget(
            name: "HFConfigFuzz",
            dependencies: ["FuzzSupport", .product(name: "CheckpointFormats", package: "qlora"),
                           .product(name: "Memory", package: "qlora"), .product(name: "QLoRA", package: "qlora")],
            swiftSettings: harness
        ),
        /// `qlora train`'s JSONL reader, `loadTrainingData(path:vocabSize:)`.
        .executableTarget(
            name: "TrainingDataFuzz",
            dependencies: ["FuzzSupport", .product(name: "Training", package: "qlora"),
                           .product(name: "CheckpointFormats", package: "qlora"), .product(name: "QLoRA", package: "qlora")],
            swiftSettings: harness
        ),

        // MARK: Support

        /// Scratch files under /dev/shm, a safetensors image builder, the choice-byte reader and
        /// the error check every harness shares.
        .target(name: "FuzzSupport", dependencies: [.product(name: "SafeTensors", package: "qlora")]),
    ]
)
