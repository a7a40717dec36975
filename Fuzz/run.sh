#!/usr/bin/env bash
# Builds the libFuzzer + AddressSanitizer harnesses and runs each for a bounded number of inputs.
# Usage: Fuzz/run.sh [runs] [harness...]   (default 200000 inputs per harness, every harness)
# Harnesses:
#   safetensors   the safetensors header parser and shard-index decoder (Fuzz/build.sh)
#   bnb4bit       bitsandbytes' 4-bit quant state: BnB4BitFormat.load, inspectCheckpoint
#   peft          PEFTAdapter.load(directory:): adapter_config.json and the adapter's tensors
#   hfconfig      ModelArchitecture(configFile:), the tensor counts and MemoryEstimate
#   trainingdata  loadTrainingData(path:vocabSize:)
#   gguf          GGUFFile(bytes:file:) and GGUFHeader's encoder against it
# The last five are the SwiftPM package in Fuzz/ (Package.swift), built once, every module
# instrumented. Seeds: Fuzz/seeds/<harness>/ (make_seeds.py writes them from Vectors/) and, for
# safetensors, Vectors/safetensors/. New inputs accumulate in Fuzz/corpus/<harness>/, crashes land
# in Fuzz/artifacts/<harness>/ (both gitignored); reproduce one with
#   SWIFT_BACKTRACE=enable=no Fuzz/.build/release/<Harness>Fuzz <file>
# Extra libFuzzer flags come from FUZZ_FLAGS, e.g. FUZZ_FLAGS="-fork=2 -ignore_crashes=1" to keep
# going past crashes. libFuzzer's final stats are printed at the end of each run; the script
# exits non-zero when any harness failed, after running the others.
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:-200000}"
shift || true
harnesses=("$@")
[ ${#harnesses[@]} -eq 0 ] && harnesses=(safetensors bnb4bit peft hfconfig trainingdata gguf)

# The Swift runtime's backtracer would symbolicate for minutes; libFuzzer prints the stack.
export SWIFT_BACKTRACE=enable=no
# swift-foundation's FileManager.contents(atPath:) leaks its 4 KiB buffer on an empty file.
export LSAN_OPTIONS="suppressions=$PWD/Fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"

declare -A binary=([bnb4bit]=BnB4BitFuzz [peft]=PEFTAdapterFuzz [hfconfig]=HFConfigFuzz [trainingdata]=TrainingDataFuzz [gguf]=GGUFFuzz)
declare -A maxlen=([safetensors]=4096 [bnb4bit]=4096 [peft]=4096 [hfconfig]=4096 [trainingdata]=8192 [gguf]=16384)

built_package=0
build() {
    if [ "$1" = safetensors ]; then
        Fuzz/build.sh .build/fuzz-safetensors
    elif [ $built_package = 0 ]; then
        # --sanitize=fuzzer tells SwiftPM that libFuzzer provides main; -sanitize=fuzzer,address
        # (one flag: the last -sanitize wins) instruments every module for coverage and ASan.
        (cd Fuzz && swift build -c release --sanitize=fuzzer --sanitize=address -Xswiftc -sanitize=fuzzer,address) && built_package=1
    fi
}

failed=()
for h in "${harnesses[@]}"; do
    case "$h" in safetensors|bnb4bit|peft|hfconfig|trainingdata|gguf) ;; *) echo "unknown harness '$h'" >&2; exit 2 ;; esac
    echo "== $h: $runs inputs"
    build "$h" || { failed+=("$h (build)"); continue; }
    mkdir -p "Fuzz/corpus/$h" "Fuzz/artifacts/$h"
    if [ "$h" = safetensors ]; then
        exe=.build/fuzz-safetensors
        dict=Fuzz/safetensors.dict
        cp Fuzz/seeds/safetensors/* Vectors/safetensors/*.safetensors Vectors/safetensors/sharded/* "Fuzz/corpus/$h/"
    else
        exe="Fuzz/.build/release/${binary[$h]}"
        dict="Fuzz/.build/$h.dict"
        cat Fuzz/dicts/json.dict "Fuzz/dicts/$h.dict" > "$dict"
        cp Fuzz/seeds/$h/* "Fuzz/corpus/$h/"
        [ "$h" = gguf ] && cp Vectors/gguf/*.gguf "Fuzz/corpus/$h/"
    fi
    # shellcheck disable=SC2086
    "$exe" -runs="$runs" -max_len="${maxlen[$h]}" -timeout=10 -print_final_stats=1 -dict="$dict" \
        -artifact_prefix="Fuzz/artifacts/$h/" ${FUZZ_FLAGS:-} "Fuzz/corpus/$h" || failed+=("$h")
    # Each fuzzing process (one per -fork job) writes its inputs into its own scratch folder.
    [ "$h" != safetensors ] && rm -rf /dev/shm/qlora-fuzz-"${binary[$h]}"-* 2>/dev/null
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (inputs in Fuzz/artifacts/)" >&2
    exit 1
fi
