"""GGUF golden vectors from llama.cpp's own gguf-py (PyPI `gguf`), for Tests/GGUFTests.

Vectors/gguf/golden.gguf is written by gguf.GGUFWriter: metadata of every value type (arrays of
strings, ints and floats, non-ASCII text; gguf-py writes no empty array), then tensors:
- `source.N` (F32): the inputs: random normal rows at several scales, an all-zero block, a block
  of exact halves (roundf's ties), one whose largest magnitude is negative, subnormals beside a
  normal block maximum, -0.0 (no all-subnormal block: 1/d overflows there and the int8 cast of
  inf is undefined in C and numpy alike);
- `source.N.f16`, `.bf16`, `.q8_0`, `.q4_0`: gguf.quants.quantize of the same values, which gguf-py
  documents as bit-exact with ggml's C reference (ggml-quants.c quantize_row_*_ref).
The test re-quantizes each source with qlora and compares bytes, parses the whole file, and
re-encodes its header with GGUFHeader, comparing bytes with what gguf-py wrote.

Run: .venv/bin/python Vectors/generate_gguf.py   (gguf from Vectors/requirements.txt)
"""
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf", "golden.gguf")


def sources():
    rng = np.random.default_rng(7)
    yield (rng.standard_normal((4, 64)) * 0.02).astype(np.float32)
    yield (rng.standard_normal((3, 96)) * 3.0).astype(np.float32)
    special = np.zeros((2, 64), dtype=np.float32)
    special[0, 32:64] = np.arange(32, dtype=np.float32) * 0.5 - 8.0        # halves: roundf's ties
    special[1, :32] = rng.standard_normal(32).astype(np.float32)
    special[1, 5] = -7.25                                                  # largest magnitude negative
    special[1, 32:] = np.float32(1e-40)                                    # subnormals (rounded to 0)
    special[1, 33] = np.float32(0.75)                                      # beside a normal block maximum
    special[1, 40] = np.float32(-0.0)
    yield special
    yield (rng.standard_normal((1, 256)) * 1e4).astype(np.float32)


def main():
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    w = gguf.GGUFWriter(OUT, arch="llama")
    w.add_uint8("test.uint8", 200)
    w.add_int8("test.int8", -100)
    w.add_uint16("test.uint16", 60000)
    w.add_int16("test.int16", -30000)
    w.add_uint32("test.uint32", 4_000_000_000)
    w.add_int32("test.int32", -2_000_000_000)
    w.add_float32("test.float32", 1e-5)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "naïve — 日本語")
    w.add_uint64("test.uint64", 2**63 + 5)
    w.add_int64("test.int64", -(2**62))
    w.add_float64("test.float64", 0.1)
    w.add_array("test.strings", ["<s>", "</s>", "▁the", ""])
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, -1.25])
    for i, x in enumerate(sources()):
        w.add_tensor(f"source.{i}", x)
        for name, qtype in [("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0)]:
            q = gguf.quants.quantize(x, qtype)
            w.add_tensor(f"source.{i}.{name}", q, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(OUT)
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes, {len(r.tensors)} tensors, {len(r.fields)} fields (gguf {getattr(gguf, '__version__', 'from PyPI')})")


if __name__ == "__main__":
    main()
