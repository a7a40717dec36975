#!/usr/bin/env python3
"""Writes the safetensors test vectors with the reference (Rust-backed) Python library.

Usage: /work/.venv/bin/python Vectors/generate_safetensors.py
(needs safetensors, torch, numpy; tested with safetensors 0.8.0, torch 2.x).

Outputs, in Vectors/safetensors/ (a few KB in all):
  dtypes.safetensors    every dtype the Swift module supports, a 0-d scalar and an empty
                        tensor, written by safetensors.torch.save_file, metadata {"format": "pt"}
  sharded/              a 2-shard checkpoint in the transformers layout:
                        model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
                        (index written like transformers: json.dumps(indent=2, sort_keys=True) + "\\n")
  expected.json         for each file: metadata, and per tensor dtype, shape, data_offsets as
                        the library laid them out, the raw little-endian bytes as hex, and the
                        values (floats as JSON numbers, exactly representable; integers as decimal
                        strings so that no JSON reader rounds them; booleans as booleans)

The outputs are deterministic, so rerunning must leave git clean.
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "safetensors")


def dtypes_tensors():
    # Values chosen to be exactly representable in their dtype, with sign bits, subnormals and
    # extremes where cheap, so byte-level mistakes show up.
    return {
        "f32": torch.tensor([[1.5, -2.25, 3.0], [0.0, 0.0009765625, -1.0e30]], dtype=torch.float32),
        "f64": torch.tensor([1.0 / 3.0, -2.0**-1074, 1.0e300], dtype=torch.float64),
        "bf16": torch.tensor([1.0, -0.5, 3.140625, 65280.0], dtype=torch.bfloat16),
        "f16": torch.tensor([1.0, -2.0, 2.0**-24, 65504.0], dtype=torch.float16),
        "f8_e4m3": torch.tensor([1.0, -0.5, 448.0, 2.0**-9], dtype=torch.float8_e4m3fn),
        "f8_e5m2": torch.tensor([1.0, -0.5, 57344.0, 2.0**-16], dtype=torch.float8_e5m2),
        "u8": torch.arange(0, 250, 25, dtype=torch.uint8).reshape(2, 5),
        "i8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
        "i16": torch.tensor([-32768, -2, 3, 32767], dtype=torch.int16),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "i32": torch.tensor([[-(2**31), 7], [0, 2**31 - 1]], dtype=torch.int32),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
        "i64": torch.tensor([-1, 0, 2**40, -(2**62)], dtype=torch.int64),
        "u64": torch.tensor([0, 2**63 + 5], dtype=torch.uint64),
        "bool": torch.tensor([True, False, True], dtype=torch.bool),
        "scalar": torch.tensor(7.25, dtype=torch.float32),
        "empty": torch.zeros((0, 4), dtype=torch.float32),
    }


def sharded_tensors():
    g = torch.Generator().manual_seed(0)
    # Randomish but exactly reproducible: small integers scaled by powers of two.
    def t(shape, dtype):
        ints = torch.randint(-64, 64, shape, generator=g)
        return (ints.to(torch.float64) / 16).to(dtype)
    shard1 = {
        "model.embed_tokens.weight": t((4, 3), torch.float32),
        "model.layers.0.self_attn.q_proj.weight": t((3, 3), torch.bfloat16),
    }
    shard2 = {
        "model.layers.0.mlp.up_proj.weight": t((2, 3), torch.float16),
        "lm_head.weight": t((4, 3), torch.float32),
        "model.norm.weight": t((3,), torch.float32),
    }
    return shard1, shard2


def raw_bytes(tensor):
    """Little-endian bytes of a tensor, as safetensors stores them."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def values(tensor):
    flat = tensor.reshape(-1)
    if tensor.dtype == torch.bool:
        return [bool(v) for v in flat.tolist()]
    if tensor.dtype.is_floating_point:
        return [float(v) for v in flat.to(torch.float64).tolist()]
    # Integers as decimal strings: JSON readers (Foundation's included) go through Double or
    # Int64 and would mangle 2**63 + 5.
    if tensor.dtype == torch.uint64:  # tolist() would wrap through int64
        return [str(v) for v in flat.view(torch.int64).numpy().view("uint64").tolist()]
    return [str(int(v)) for v in flat.tolist()]


def describe(path, tensors):
    """Expected-values record for one file, with offsets read back from the written header."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    entries = {}
    for name, tensor in tensors.items():
        entry = header[name]
        entries[name] = {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "data_offsets": entry["data_offsets"],
            "hex": raw_bytes(tensor).hex(),
            "values": values(tensor),
        }
    order = sorted(entries, key=lambda k: (entries[k]["data_offsets"], k))
    return {
        "file_size": os.path.getsize(path),
        "data_start": 8 + n,
        "metadata": metadata,
        "order": order,
        "tensors": entries,
    }


def main():
    os.makedirs(os.path.join(OUT, "sharded"), exist_ok=True)
    expected = {}

    tensors = dtypes_tensors()
    path = os.path.join(OUT, "dtypes.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    expected["dtypes.safetensors"] = describe(path, tensors)

    shards = sharded_tensors()
    weight_map = {}
    total_size = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path = os.path.join(OUT, "sharded", name)
        save_file(shard, path, metadata={"format": "pt"})
        expected["sharded/" + name] = describe(path, shard)
        for key, tensor in shard.items():
            weight_map[key] = name
            total_size += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    with open(os.path.join(OUT, "sharded", "model.safetensors.index.json"), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    expected["sharded/model.safetensors.index.json"] = index

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
