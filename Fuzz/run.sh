#!/usr/bin/env bash
# Builds the harness and fuzzes the safetensors header parser and the shard index decoder.
# Usage: Fuzz/run.sh [runs]   (default 200000; libFuzzer's final stats are printed at the end)
# Seeds: Fuzz/seeds/ (tiny hand-made edge cases) and the Python-written files in
# Vectors/safetensors/. New inputs accumulate in Fuzz/corpus/ and crashes land in
# Fuzz/artifacts/ (both gitignored). Reproduce a crash with: .build/fuzz-safetensors <file>
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-200000}"
Fuzz/build.sh .build/fuzz-safetensors
mkdir -p Fuzz/corpus Fuzz/artifacts
cp Fuzz/seeds/* Vectors/safetensors/*.safetensors Vectors/safetensors/sharded/* Fuzz/corpus/
exec .build/fuzz-safetensors -runs="$runs" -max_len=4096 -timeout=10 -print_final_stats=1 \
    -dict=Fuzz/safetensors.dict -artifact_prefix=Fuzz/artifacts/ Fuzz/corpus
