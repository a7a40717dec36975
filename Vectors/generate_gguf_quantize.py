"""What llama.cpp writes for `convert_hf_to_gguf.py --outtype auto` followed by `llama-quantize
TYPE`: the golden for `qlora export --type q8_0|q4_0|q4_k_m|iq4_nl` (issue 16).

Two Llama checkpoints with the real SentencePiece tokenizer of Vectors/gguf/llama-tiny:
- `tiny`: Vectors/llama/tiny (hidden 64, intermediate 128): every row is shorter than a
  256-value K block, so llama-quantize's fallbacks decide (Q4_K -> Q5_0, Q6_K -> Q8_0);
- `small`: hidden 256, intermediate 512, 4 layers, 8 heads over 2 KV heads (GQA 4, so IQ4_NL
  gives attn_v Q5_K), vocab 256, bf16 weights made by `small_weights` from each tensor's name
  alone. Nothing of it is committed: the Swift test writes the same bytes from the same rule
  (Tests/CheckpointJobsTests/GGUFQuantizeTests.swift `smallCheckpoint`).

For each model and type, Vectors/gguf/quantize.json holds the file's size and sha256, every
metadata key in order with its GGUF type, and every tensor's name, ggml type, dimensions,
sha256 of its bytes and sha256 of its values as the gguf package dequantizes them (fp32), in
file order; and the sha256 of each model's safetensors, so the Swift
test knows it wrote the same checkpoint.

Run: .venv/bin/python Vectors/generate_gguf_quantize.py --llama-cpp DIR --quantize BIN
     DIR: a llama.cpp source tree (the llama-cpp-python sdist vendors one under vendor/llama.cpp);
     BIN: llama-quantize built from that tree (cmake -B build -DBUILD_SHARED_LIBS=ON && cmake
     --build build --target llama-quantize); needs numpy, torch, safetensors and sentencepiece.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "gguf", "llama-tiny", "tokenizer.model")
TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "IQ4_NL"]

SMALL_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


def fnv1a(name):
    h = 0x811C9DC5
    for b in name.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def small_weights(name, count):
    """bf16 bits from the tensor's name and each element's index: a 32-bit mix of (FNV-1a(name)
    xor i); weights get a random sign, exponent 2^-9..2^-2 and 7-bit mantissa; norms 1..2."""
    i = np.arange(count, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = (np.uint32(fnv1a(name)) ^ i) * np.uint32(0x9E3779B1)
        h ^= h >> np.uint32(15)
        h = h * np.uint32(0x85EBCA77)
        h ^= h >> np.uint32(13)
    mantissa = (h >> np.uint32(4)) & np.uint32(0x7F)
    if name.endswith("norm.weight"):
        bits = (np.uint32(127) << np.uint32(7)) | mantissa
    else:
        bits = ((h & np.uint32(1)) << np.uint32(15)) | ((np.uint32(118) + ((h >> np.uint32(1)) & np.uint32(7))) << np.uint32(7)) | mantissa
    return bits.astype(np.uint16)


def small_tensors(c):
    h, f, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": [c["vocab_size"], h], "model.norm.weight": [h], "lm_head.weight": [c["vocab_size"], h]}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                       p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h], p + "self_attn.v_proj.weight": [kv, h],
                       p + "self_attn.o_proj.weight": [h, h], p + "mlp.gate_proj.weight": [f, h], p + "mlp.up_proj.weight": [f, h],
                       p + "mlp.down_proj.weight": [h, f]})
    return shapes


def write_small(directory):
    import torch
    from safetensors.torch import save_file
    tensors = {}
    for name, shape in small_tensors(SMALL_CONFIG).items():
        bits = small_weights(name, int(np.prod(shape))).astype(np.int16)
        tensors[name] = torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(SMALL_CONFIG, f, indent=2)


def llama_cpp_args(*extra):
    """The scripts' command line: --llama-cpp DIR (plus `extra` required options), and gguf-py from that tree."""
    ap = argparse.ArgumentParser()
    for option in ("--llama-cpp",) + extra:
        ap.add_argument(option, required=True)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(a.llama_cpp, "gguf-py"))
    import gguf
    return a, gguf


def describe(gguf, path, dequantized=True):
    """A GGUF file's size, sha256, metadata keys with their types, and per tensor its name, type,
    dimensions, bytes' sha256 and (with `dequantized`) the sha256 of its fp32 values."""
    data = open(path, "rb").read()
    r = gguf.GGUFReader(path)

    def tensor(x):
        row = [x.name, x.tensor_type.name, [int(n) for n in x.shape], hashlib.sha256(x.data.tobytes()).hexdigest()]
        if dequantized:
            row.append(hashlib.sha256(gguf.quants.dequantize(x.data, x.tensor_type).astype("<f4").tobytes()).hexdigest())
        return row
    return {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "metadata": [[k, gguf.GGUFValueType(f.types[0]).name] for k, f in r.fields.items() if not k.startswith("GGUF.")],
        "tensors": [tensor(x) for x in r.tensors],
    }


def main():
    a, gguf = llama_cpp_args("--quantize")
    convert = os.path.join(a.llama_cpp, "convert_hf_to_gguf.py")
    report = {}
    with tempfile.TemporaryDirectory() as t:
        for model in ["tiny", "small"]:
            d = os.path.join(t, model)
            os.makedirs(d)
            if model == "tiny":
                for f in ["config.json", "model.safetensors"]:
                    shutil.copy(os.path.join(HERE, "llama", "tiny", f), d)
            else:
                write_small(d)
            shutil.copy(TOKENIZER, d)
            entry = {"safetensors_sha256": hashlib.sha256(open(os.path.join(d, "model.safetensors"), "rb").read()).hexdigest()}
            auto = os.path.join(t, f"{model}-auto.gguf")
            subprocess.run([sys.executable, convert, d, "--outtype", "auto", "--outfile", auto], check=True, capture_output=True)
            entry["auto"] = describe(gguf, auto)
            for q in TYPES:
                out = os.path.join(t, f"{model}-{q}.gguf")
                subprocess.run([a.quantize, auto, out, q, "2"], check=True, capture_output=True)
                entry[q.lower()] = describe(gguf, out)
            report[model] = entry
    commit = subprocess.run(["git", "-C", a.llama_cpp, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    sources = ["convert_hf_to_gguf.py", "src/llama-quant.cpp", "ggml/src/ggml-quants.c", "ggml/src/gguf.cpp"]
    report["made_by"] = {"scripts": "convert_hf_to_gguf.py --outtype auto; llama-quantize IN OUT TYPE 2",
                         "tree": os.path.abspath(a.llama_cpp).split("/vendor/")[0].split("/")[-1], "commit": commit,
                         "sha256": {f: hashlib.sha256(open(os.path.join(a.llama_cpp, f), "rb").read()).hexdigest()[:16] for f in sources}}
    path = os.path.join(HERE, "gguf", "quantize.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}: " + ", ".join(f"{m} {q} {report[m][q]['bytes']} B" for m in ["tiny", "small"] for q in ["auto"] + [x.lower() for x in TYPES]))


if __name__ == "__main__":
    main()
