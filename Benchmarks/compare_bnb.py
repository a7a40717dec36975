#!/usr/bin/env python3
"""Times bitsandbytes' CPU 4-bit quantize/dequantize against qlora's, in one run on one machine.

Both sides run single-threaded on the same 4096 x 11008 fp32 tensor (standard normal, seeded):
  quantize          bnb.functional.quantize_4bit(x, blocksize=64, quant_type="nf4",
                    compress_statistics=True)  vs  qlora quantize4Bit(.nf4, 64, doubleQuant: true)
  dequantize-f32    bnb.functional.dequantize_4bit(packed, state)  (decodes the nested absmax,
                    then the 4-bit codes; allocates its fp32 output)  vs  qlora
                    QuantState.absmaxValues() + dequantize4Bit into a preallocated fp32 buffer
  dequantize-bf16   the same with a bf16 output (bnb: the state's dtype set to bfloat16)
Kernel-only rows (scales already decoded, output preallocated on both sides) follow:
bnb's C kernels cdequantize_blockwise_cpu_nf4_{fp32,bf16} called directly vs qlora's
dequantize4Bit alone.

Each figure is the median of --repeats timed runs after one warm-up run. qlora is timed by the
Swift executable `qlora-kernel-timer` of this package (built here in release mode first), fed the
very same tensor through a raw fp32 file; its packed nibbles and decoded scales are checked
against bitsandbytes' so that both sides provably do the same work.

Usage (from the repository root or anywhere):
  /work/.venv/bin/python Benchmarks/compare_bnb.py [--repeats 7] [--skip-build]
Exits non-zero if torch or bitsandbytes is missing, the Swift build fails, or the outputs differ.
"""

from __future__ import annotations

import argparse
import copy
import ctypes as ct
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, COLS = 4096, 11008
N = ROWS * COLS
BLOCKSIZE = 64
HERE = Path(__file__).resolve().parent
TIMER = "qlora-kernel-timer"


def die(message: str, code: int = 1) -> "NoReturn":  # noqa: F821
    print(f"compare_bnb.py: error: {message}", file=sys.stderr)
    sys.exit(code)


# Single-threaded for both sides: set before torch starts its thread pools.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

try:
    import numpy as np
    import torch
except ImportError as e:
    die(f"torch and numpy are required ({e}); run this with /work/.venv/bin/python "
        "or `pip install torch numpy bitsandbytes==0.50.2`")

try:
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # quiet the optional-kernels warning
    import bitsandbytes
    import bitsandbytes.functional as bnbf
except ImportError as e:
    die(f"bitsandbytes is missing ({e}): nothing to compare against. "
        "Install it with `pip install bitsandbytes==0.50.2` (the version qlora targets).")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def build_timer(skip: bool) -> Path:
    if not skip:
        print(f"building {TIMER} (release) ...", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(["swift", "build", "-c", "release", "--product", TIMER, "--package-path", str(HERE)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            print(r.stdout[-4000:], file=sys.stderr)
            die(f"`swift build -c release --product {TIMER}` failed in {HERE}")
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    r = subprocess.run(["swift", "build", "-c", "release", "--package-path", str(HERE), "--show-bin-path"],
                       capture_output=True, text=True)
    exe = Path(r.stdout.strip()) / TIMER
    if r.returncode != 0 or not exe.exists():
        die(f"{TIMER} not found at {exe} (build it, or drop --skip-build)")
    return exe


def run_timer(exe: Path, op: str, repeats: int, input_path: Path, dump: Path | None = None) -> dict:
    cmd = [str(exe), op, str(repeats), "--input", str(input_path)]
    if dump is not None:
        cmd += ["--dump", str(dump)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        die(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per operation (median reported)")
    ap.add_argument("--skip-build", action="store_true", help=f"use the already built {TIMER}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    exe = build_timer(args.skip_build)

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__} (threads={torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}), bitsandbytes {bitsandbytes.__version__}")
    print(f"tensor: {ROWS}x{COLS} fp32 = {N / 1e6:.1f} M params ({N * 4 / 1e6:.0f} MB), "
          f"nf4, blocksize {BLOCKSIZE}, double quant; median of {args.repeats} runs after 1 warm-up\n", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(ROWS, COLS, generator=gen, dtype=torch.float32)

    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="qlora-bnb-") as tmp:
        tmpdir = Path(tmp)
        input_path = tmpdir / "x.f32"
        x.numpy().astype("<f4").tofile(input_path)

        # --- bitsandbytes -------------------------------------------------------------------
        def bnb_quantize():
            return bnbf.quantize_4bit(x, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")

        packed, state = bnb_quantize()
        state_bf16 = copy.copy(state)
        state_bf16.dtype = torch.bfloat16
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset  # decoded scales

        t_bnb = {
            "quantize": median_seconds(bnb_quantize, args.repeats),
            "dequantize-f32": median_seconds(lambda: bnbf.dequantize_4bit(packed, state), args.repeats),
            "dequantize-bf16": median_seconds(lambda: bnbf.dequantize_4bit(packed, state_bf16), args.repeats),
        }
        # Kernel only: bnb's C dequantize kernels into a preallocated output, scales decoded.
        lib = bnbf.lib
        a_u8 = packed.view(torch.uint8).reshape(ROWS, COLS // 2)
        out32 = torch.empty(ROWS, COLS, dtype=torch.float32)
        out16 = torch.empty(ROWS, COLS, dtype=torch.bfloat16)
        out32.zero_(), out16.zero_()
        ap_, mp_ = bnbf.get_ptr(a_u8), bnbf.get_ptr(absmax)
        args_tail = (ct.c_longlong(BLOCKSIZE), ct.c_longlong(ROWS), ct.c_longlong(COLS))
        t_bnb["dequantize-f32-kernel"] = median_seconds(
            lambda: lib.cdequantize_blockwise_cpu_nf4_fp32(ap_, mp_, bnbf.get_ptr(out32), *args_tail), args.repeats)
        t_bnb["dequantize-bf16-kernel"] = median_seconds(
            lambda: lib.cdequantize_blockwise_cpu_nf4_bf16(ap_, mp_, bnbf.get_ptr(out16), *args_tail), args.repeats)

        # --- qlora ---------------------------------------------------------------------------
        t_q = {}
        level = "?"
        for op in t_bnb:
            res = run_timer(exe, op, args.repeats, input_path, dump=tmpdir if op == "quantize" else None)
            t_q[op] = res["median_s"]
            level = res["kernel_level"]
        memcpy = run_timer(exe, "memcpy-f32", args.repeats, input_path)["median_s"]

        # --- same work? ---------------------------------------------------------------------
        q_packed = np.fromfile(tmpdir / "packed.u8", dtype=np.uint8)
        q_absmax = np.fromfile(tmpdir / "absmax.f32", dtype="<f4")
        b_packed = packed.view(torch.uint8).reshape(-1).numpy()
        b_absmax = absmax.reshape(-1).numpy()
        packed_diff = int(np.count_nonzero(q_packed != b_packed)) if q_packed.shape == b_packed.shape else -1
        absmax_diff = int(np.count_nonzero(q_absmax.view(np.uint32) != b_absmax.view(np.uint32))) \
            if q_absmax.shape == b_absmax.shape else -1

    print(f"{'operation':<24} {'bnb s':>9} {'qlora s':>9} {'bnb Gparams/s':>14} {'qlora Gparams/s':>16} "
          f"{'qlora/bnb':>10}")
    for op in t_bnb:
        tb, tq = t_bnb[op], t_q[op]
        print(f"{op:<24} {tb:9.4f} {tq:9.4f} {N / tb / 1e9:14.3f} {N / tq / 1e9:16.3f} {tb / tq:9.2f}x")
    print(f"{'memcpy 180 MB (limit)':<24} {'':>9} {memcpy:9.4f} {'':>14} {N / memcpy / 1e9:16.3f}")
    print(f"\nqlora kernels: {level}, single-threaded. Rows without -kernel are the public APIs end to end: "
          "bnb's\ndequantize_4bit allocates a fresh output each call, qlora writes into a preallocated one; "
          "the -kernel rows\nhave both sides write preallocated outputs from already decoded scales.")
    print(f"load average at the end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t_start:.1f} s")

    if packed_diff != 0 or absmax_diff != 0:
        print(f"\nMISMATCH: qlora and bitsandbytes quantized differently "
              f"(packed bytes differing: {packed_diff}, decoded scales differing: {absmax_diff}; -1 = shape)",
              file=sys.stderr)
        return 3
    print("check: qlora's packed nibbles and decoded scales are bit-identical to bitsandbytes'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
