"""What llama.cpp's convert_lora_to_gguf.py writes for a PEFT LoRA adapter: the golden for
`qlora export --lora-only` (issue 16), Vectors/gguf/lora.json.

The adapter is for Vectors/llama/tiny (`--base`), rank 4, alpha 8, on all seven projections of
both layers, with bf16 A and B computed from each tensor's name by generate_gguf_quantize.py's
`small_weights` hash (so only adapter_config.json is committed, in Vectors/gguf/lora/; the Swift
test writes the same adapter_model.safetensors). For each `--outtype` (f32, f16, bf16, q8_0):
size, sha256, metadata keys in order with their types, and every tensor's name, type, dimensions
and bytes' sha256.

Run: .venv/bin/python Vectors/generate_gguf_lora.py --llama-cpp DIR   (torch, transformers, safetensors)
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_gguf_quantize import describe, llama_cpp_args, small_weights  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gguf", "lora")
RANK, ALPHA = 4, 8
CONFIG = {"base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
          "lora_alpha": ALPHA, "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": RANK, "task_type": "CAUSAL_LM",
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "use_rslora": False}


def adapter_tensors():
    """name -> shape of every lora_A/lora_B of the adapter (llama/tiny: hidden 64, intermediate 128, kv 32)."""
    dims = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64), "gate_proj": (64, 128), "up_proj": (64, 128),
            "down_proj": (128, 64)}
    shapes = {}
    for layer in range(2):
        for module, (n_in, n_out) in dims.items():
            group = "mlp" if module.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            p = f"base_model.model.model.layers.{layer}.{group}.{module}"
            shapes[p + ".lora_A.weight"] = [RANK, n_in]
            shapes[p + ".lora_B.weight"] = [n_out, RANK]
    return shapes


def main():
    a, gguf = llama_cpp_args()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "adapter_config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    report = {}
    with tempfile.TemporaryDirectory() as t:
        adapter = os.path.join(t, "adapter")
        os.makedirs(adapter)
        shutil.copy(os.path.join(OUT, "adapter_config.json"), adapter)
        tensors = {n: torch.from_numpy(small_weights(n, int(np.prod(s))).astype(np.int16)).view(torch.bfloat16).reshape(s)
                   for n, s in adapter_tensors().items()}
        save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
        base = os.path.join(t, "tiny")
        os.makedirs(base)
        shutil.copy(os.path.join(HERE, "llama", "tiny", "config.json"), base)
        for outtype in ["f32", "f16", "bf16", "q8_0"]:
            out = os.path.join(t, f"lora-{outtype}.gguf")
            r = subprocess.run([sys.executable, os.path.join(a.llama_cpp, "convert_lora_to_gguf.py"), adapter, "--base", base, "--outtype", outtype,
                                "--outfile", out], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(r.stderr[-3000:])
            report[outtype] = describe(gguf, out, dequantized=False)
    commit = subprocess.run(["git", "-C", a.llama_cpp, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report["made_by"] = {"script": "convert_lora_to_gguf.py ADAPTER --base llama/tiny --outtype T", "commit": commit}
    with open(os.path.join(HERE, "gguf", "lora.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote Vectors/gguf/lora.json: " + ", ".join(f"{k} {v['bytes']} B" for k, v in report.items() if k != "made_by"))


if __name__ == "__main__":
    main()
