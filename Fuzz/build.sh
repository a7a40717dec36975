#!/usr/bin/env bash
# Builds the libFuzzer + AddressSanitizer harness for the SafeTensors module.
# (Fuzz/run.sh runs it; the other harnesses are the SwiftPM package in Fuzz/.)
# Usage: Fuzz/build.sh [output]   (default .build/fuzz-safetensors; run from anywhere)
# The module's sources are compiled together with the harness into one module, which is why
# Sources/SafeTensors must depend on Foundation/Glibc only.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.build/fuzz-safetensors}"
mkdir -p "$(dirname "$out")"
swiftc -O -sanitize=fuzzer,address -parse-as-library -swift-version 6 -use-ld=lld \
    -module-name SafeTensorsFuzz \
    Sources/SafeTensors/*.swift Fuzz/SafeTensorsFuzz.swift \
    -o "$out"
echo "built $out"
