"""Golden MXFP4 decoding (gpt-oss' expert format) by transformers 5.23's own
`transformers.integrations.mxfp4.convert_moe_packed_tensors`, what `Mxfp4Config(dequantize=True)` runs.

The packed bytes come from SplitMix64 (Sources/QLoRA/Numerics/SplitMix64.swift, written again here), so
no tensor is committed: for each case, blocks [experts, out, groups, 16] and then scales
[experts, out, groups] are the low bytes of successive next() values from the seed. Every scale byte
0-255 can occur, so the extremes (2^-127, 2^128: finite products and 0 · 2^128) are covered.

Writes Vectors/quant/mxfp4.json: per case the seed, the shapes, and the SHA-256 of the decoded bf16
tensor [experts, groups·32, out] as bytes, with its count of infinities and negative zeros.
Run: .venv/bin/python Vectors/generate_mxfp4.py   (~1 s)
"""
import hashlib
import json
import os

import torch
import transformers
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

M = (1 << 64) - 1
CASES = [dict(seed=1, experts=2, out=8, groups=3), dict(seed=2, experts=3, out=5, groups=1), dict(seed=3, experts=1, out=64, groups=4)]


def splitmix64(seed):
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & M
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        yield z ^ (z >> 31)


def main():
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": []}
    for c in CASES:
        g = splitmix64(c["seed"])
        e, o, n = c["experts"], c["out"], c["groups"]
        blocks = torch.tensor([next(g) & 0xFF for _ in range(e * o * n * 16)], dtype=torch.uint8).reshape(e, o, n, 16)
        scales = torch.tensor([next(g) & 0xFF for _ in range(e * o * n)], dtype=torch.uint8).reshape(e, o, n)
        d = convert_moe_packed_tensors(blocks, scales)
        assert list(d.shape) == [e, n * 32, o] and d.dtype == torch.bfloat16
        bits = d.contiguous().view(torch.int16)
        out["cases"].append(dict(c, shape=list(d.shape), sha256=hashlib.sha256(d.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest(),
                                 infinities=int(torch.isinf(d).sum()), negative_zeros=int((bits == -32768).sum())))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant", "mxfp4.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(out["cases"]))


if __name__ == "__main__":
    main()
