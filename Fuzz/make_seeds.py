#!/usr/bin/env python3
"""Writes the seed inputs of the bnb4bit, peft, hfconfig and trainingdata harnesses into
Fuzz/seeds/<harness>/ from the real files in Vectors/ plus hand-made edge cases.
Standard library only. Run from anywhere: python3 Fuzz/make_seeds.py

Input layouts (see each harness's header comment):
  bnb4bit       4 choice bytes + quant-state JSON  (choice 0: bit 0 = fp4 key; choice 1: bits 0-2 = packed storage)
  peft          3 choice bytes + adapter_config.json
  hfconfig      config.json as it is
  trainingdata  1 choice byte (vocabulary: 0 -> 1, 1 -> 26, 2 -> 256, 3 -> 32000, ...) + JSONL
"""
import hashlib
import json
import pathlib
import struct

root = pathlib.Path(__file__).resolve().parent.parent
seeds = root / "Fuzz" / "seeds"

# The packed weight's storage choice for each safetensors dtype (BnB4BitFuzz's `storages`).
STORAGE_CHOICE = {"U8": 0, "BF16": 2, "F16": 3, "F32": 4}


# Inputs already filed under Fuzz/crashes-found/ as crashes are not written as seeds (a crashing
# seed stops libFuzzer before it fuzzes anything).
crashes = {f.read_bytes() for f in (root / "Fuzz" / "crashes-found").rglob("*") if f.is_file() and f.suffix != ".md"}


def write(harness, data):
    if data in crashes:
        return
    folder = seeds / harness
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def tensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    for name, t in header.items():
        if name != "__metadata__":
            begin, end = t["data_offsets"]
            yield name, t, data[begin:end]


def bnb_seeds():
    files = [root / "Vectors/llama/tiny-nf4/model.safetensors", *sorted(root.glob("Vectors/families/*/tiny-nf4/model.safetensors")),
             *sorted(root.glob("Vectors/bnb_variants/*/model.safetensors")), *sorted(root.glob("Vectors/checkpoint/bnb-*.safetensors"))]
    seen = set()
    for f in files:
        found = dict((name, (t, b)) for name, t, b in tensors(f))
        for name, (t, js) in found.items():
            if ".quant_state.bitsandbytes__" not in name or js in seen:
                continue
            seen.add(js)
            base = name.split(".quant_state.")[0]
            fp4 = 1 if name.endswith("__fp4") else 0
            storage = STORAGE_CHOICE.get(found[base][0]["dtype"], 0)
            write("bnb4bit", bytes([fp4, storage, 0, 0]) + js)
    edge = [
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": []}',
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [0]}',
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [1]}',
        b'{"quant_type": "nf4", "blocksize": 32, "dtype": "float16", "shape": [7, 33]}',
        b'{"quant_type": "nf4", "blocksize": 4096, "dtype": "float32", "shape": [4097]}',
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [9223372036854775807]}',
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4294967296, 4294967296]}',
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [3, 5], "nested_blocksize": 1, "nested_dtype": "float32", "nested_offset": 0.5}',
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64], "nested_blocksize": 256, "nested_dtype": "bfloat16", "nested_offset": 1e39}',
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64], "nested_blocksize": 9223372036854775807, "nested_dtype": "float32", "nested_offset": -0.0}',
        b'{"quant_type": "nf4", "blocksize": -64, "dtype": "float32", "shape": [-1]}',
        b'{"quant_type": "fp4", "blocksize": 64.0, "dtype": "int8", "shape": "x"}',
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": {"a\\n": [1]}, "shape": [2]}',
        b'[1, 2, 3]',
        b'',
    ]
    for js in edge:
        write("bnb4bit", bytes([0, 0, 0, 0]) + js)
    write("bnb4bit", bytes([1, 0, 0, 0]) + edge[3].replace(b"nf4", b"fp4"))


def peft_seeds():
    for f in [root / "Vectors/peft_adapter/adapter_config.json", *sorted(root.glob("Vectors/interop/adapter_config*.json"))]:
        write("peft", bytes([0, 0, 0]) + f.read_bytes())
    edge = [
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
         "rank_pattern": {"q_proj": 2, "model.layers.1.mlp.down_proj": 3}, "alpha_pattern": {"v_proj": 0.5}},
        {"r": 1, "lora_alpha": 1e300, "lora_dropout": 0.05, "use_rslora": True, "fan_in_fan_out": True, "task_type": None},
        {"r": 9223372036854775807, "lora_alpha": -1},
        {"r": 8, "lora_alpha": 16, "peft_type": "LOHA"},
        {"r": 8, "lora_alpha": 16, "use_dora": True},
        {"r": 0, "lora_alpha": 16},
        {"r": 8.5, "lora_alpha": "16"},
    ]
    for i, c in enumerate(edge):
        write("peft", bytes([i, 3 * i, 7 * i]) + json.dumps(c).encode())
    write("peft", bytes([0, 0, 0]) + b'{"r": 8, "lora_alpha": 1e400}')
    write("peft", bytes([0, 0, 0]) + b'{"r": 8, "lora_alpha": 16, "peft_type": "multi\\nline"}')


def hfconfig_seeds():
    files = [*sorted(root.glob("Vectors/**/config.json")), *sorted(root.glob("Vectors/interop/config-*.json"))]
    for f in files:
        write("hfconfig", f.read_bytes())
    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    edge = [
        {**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}},
        {**base, "model_type": "qwen3", "head_dim": 32, "use_sliding_window": True, "sliding_window": 16, "layer_types": ["sliding_attention"]},
        {**base, "model_type": "phi3", "partial_rotary_factor": 0.75, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
        {**base, "num_local_experts": 8, "vision_config": {}, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
        {**base, "num_key_value_heads": 0},
        {**base, "num_key_value_heads": -4},
        {**base, "head_dim": 0},
        {**base, "hidden_size": 1 << 40, "vocab_size": 1 << 40},
        {**base, "num_hidden_layers": 9223372036854775807},
        {**base, "hidden_size": 3},
    ]
    for c in edge:
        write("hfconfig", json.dumps(c).encode())
    write("hfconfig", b"[]")


def trainingdata_seeds():
    copy = "\n".join(json.dumps({"input_ids": [1, a, b, 2, a, b], "labels": [-100, -100, -100, -100, a, b]})
                     for a, b in [(10, 11), (12, 25), (24, 13)]) + "\n"
    write("trainingdata", bytes([1]) + copy.encode())
    write("trainingdata", bytes([2]) + b'{"input_ids": [0, 255]}\n\n  \n{"input_ids": [5], "labels": [-100]}')
    write("trainingdata", bytes([0]) + b'{"input_ids": [0], "labels": [0]}\r\n{"input_ids": [1]}')
    write("trainingdata", bytes([5]) + b'{"input_ids": [9223372036854775807, -1], "labels": [1.5, 2]}')
    write("trainingdata", bytes([3]) + b'{"input_ids": [], "labels": []}\n{"input_ids": "x"}\n[1]\n')


bnb_seeds()
peft_seeds()
hfconfig_seeds()
trainingdata_seeds()
for h in ["bnb4bit", "peft", "hfconfig", "trainingdata"]:
    print(h, len(list((seeds / h).iterdir())), "seeds")
