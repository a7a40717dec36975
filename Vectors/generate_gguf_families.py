"""What llama.cpp writes for each model family's checkpoint: the golden for `qlora export` of the
families other than Llama (issue 16), Vectors/gguf/families.json.

Each family's checkpoint is Vectors/families/FAMILY/tiny-nf4 (transformers' NF4 quantization of a
tiny random model, issue 12) dequantized by transformers + bitsandbytes (`model.dequantize()`;
its state dict saved in bf16, config.json without quantization_config) into a directory named `tiny`, with the tokenizer the family
uses: SentencePiece (Vectors/gguf/llama-tiny/tokenizer.model) for Mistral. On that,
`convert_hf_to_gguf.py --outtype auto` and then `llama-quantize IN OUT Q4_K_M 2`. For each family
and both files: size, sha256, metadata keys in order with their types, and every tensor's name,
type, dimensions and bytes' sha256. The Swift test exports tiny-nf4 itself (qlora's dequantize
is bitsandbytes' to the bit) with the same tokenizer and compares.

Run: .venv/bin/python Vectors/generate_gguf_families.py --llama-cpp DIR --quantize BIN
     (as generate_gguf_quantize.py; needs torch, transformers, bitsandbytes, sentencepiece)
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file

transformers.logging.set_verbosity_error()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate_gguf_quantize import describe, llama_cpp_args, small_weights  # noqa: E402
SPM = os.path.join(HERE, "gguf", "llama-tiny", "tokenizer.model")
FAMILIES = {"mistral": [SPM], "qwen2": [SPM], "qwen3": [SPM], "phi3": [SPM], "phi3-longrope": [SPM]}


# A Phi-3 with LongRoPE (Phi-3-mini-128k, Phi-3.5-mini): the family's tiny config with long and
# short rope factors, its bf16 weights from each tensor's name (small_weights), so only this rule
# is committed and the Swift test writes the same checkpoint.
LONGROPE = {"max_position_embeddings": 1024, "original_max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                "long_factor": [1.0, 1.25, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0], "short_factor": [1.0, 1.0, 1.0, 1.0625, 1.125, 1.25, 1.5, 2.0]}}


def phi3_longrope(d):
    with open(os.path.join(HERE, "families", "phi3", "tiny-nf4", "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    config.update(LONGROPE)
    shapes = {"model.embed_tokens.weight": [256, 64], "model.norm.weight": [64], "lm_head.weight": [256, 64]}
    for l in range(2):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": [64], p + "post_attention_layernorm.weight": [64], p + "self_attn.qkv_proj.weight": [128, 64],
                       p + "self_attn.o_proj.weight": [64, 64], p + "mlp.gate_up_proj.weight": [256, 64], p + "mlp.down_proj.weight": [64, 128]})
    tensors = {n: torch.from_numpy(small_weights(n, int(np.prod(sh))).astype(np.int16)).view(torch.bfloat16).reshape(sh) for n, sh in shapes.items()}
    os.makedirs(d)
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def convert_and_quantize(a, gguf, convert, t, d):
    auto = os.path.join(t, "auto.gguf")
    r = subprocess.run([sys.executable, convert, d, "--outtype", "auto", "--outfile", auto], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{d}: convert failed:\n{r.stderr[-2000:]}")
    q = os.path.join(t, "q4_k_m.gguf")
    subprocess.run([a.quantize, auto, q, "Q4_K_M", "2"], check=True, capture_output=True)
    return {"auto": describe(gguf, auto, dequantized=False), "q4_k_m": describe(gguf, q, dequantized=False)}


def main():
    a, gguf = llama_cpp_args("--quantize")
    convert = os.path.join(a.llama_cpp, "convert_hf_to_gguf.py")
    report = {}
    for family, tokenizer_files in FAMILIES.items():
        with tempfile.TemporaryDirectory() as t:
            if family == "phi3-longrope":
                d = os.path.join(t, "tiny")
                phi3_longrope(d)
                for f in tokenizer_files:
                    shutil.copy(f, d)
                report[family] = convert_and_quantize(a, gguf, convert, t, d)
                continue
            source = os.path.join(HERE, "families", family, "tiny-nf4")
            model = AutoModelForCausalLM.from_pretrained(source, device_map="cpu", dtype=torch.bfloat16)
            model.dequantize()
            d = os.path.join(t, "tiny")
            os.makedirs(d)
            save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, os.path.join(d, "model.safetensors"),
                      metadata={"format": "pt"})
            with open(os.path.join(source, "config.json")) as f:
                config = json.load(f)
            config.pop("quantization_config")
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            for f in tokenizer_files:
                shutil.copy(f, d)
            report[family] = convert_and_quantize(a, gguf, convert, t, d)
    write_golden(os.path.join(HERE, "gguf", "families.json"), report, a.llama_cpp,
                 "transformers dequantize() + save_pretrained; convert_hf_to_gguf.py --outtype auto; llama-quantize IN OUT Q4_K_M 2")


def write_golden(path, report, llama_cpp, scripts, indent=1):
    """The report with how it was made (the llama.cpp tree's commit, transformers' version), as JSON."""
    commit = subprocess.run(["git", "-C", llama_cpp, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report["made_by"] = {"scripts": scripts, "commit": commit, "transformers": transformers.__version__}
    with open(path, "w") as f:
        json.dump(report, f, indent=indent, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}: " + ", ".join(f"{k} {v['auto']['bytes']} / {v['q4_k_m']['bytes']} B" for k, v in report.items() if k != "made_by"))


if __name__ == "__main__":
    main()
