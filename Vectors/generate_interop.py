"""Golden files for qlora's interchange with the Python stack (issue 12): the JSON files
transformers and PEFT write, which qlora's own files must equal key by key and type by type.

Input: the tiny random Llama of generate_llama.py (Vectors/llama/tiny/, bf16).
Written to Vectors/interop/:
  config-nf4-dq.json          config.json transformers' save_pretrained writes after
                              from_pretrained(..., BitsAndBytesConfig(load_in_4bit, nf4, double
                              quant, bf16 compute))
  config-fp4-nodq.json        the same with fp4 and no double quant
  config-nf4-dq-storage-bf16.json   nf4 + double quant with bnb_4bit_quant_storage=bfloat16
  adapter_config.json         PEFT's save_pretrained of LoraConfig(r=16, lora_alpha=32, the seven
                              projections, task_type CAUSAL_LM): what `qlora train` writes
  adapter_config-patterns.json  LoraConfig(r=8, lora_alpha=12.5, rsLoRA, rank_pattern,
                              alpha_pattern, dropout 0.05, no task type)
  layout-input.json / layout.json   a document with every JSON kind, nesting, empty containers,
                              non-ASCII, control characters and float spellings, written compact
                              and unsorted (the input) and by json.dumps(indent=2, sort_keys=True)
  versions.json               the library versions

Run: .venv/bin/python Vectors/generate_interop.py
"""
import json
import os
import shutil
import sys
import tempfile

# PEFT writes target_modules in set order, which follows str hashes: fix the seed so the
# committed files are reproducible.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import transformers
import peft
import bitsandbytes
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model

torch.set_num_threads(1)
VECTORS = os.path.dirname(os.path.abspath(__file__))
HERE = os.path.join(VECTORS, "interop")
TINY = os.path.join(VECTORS, "llama", "tiny")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized_config(name, **bnb):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **bnb)
    model = AutoModelForCausalLM.from_pretrained(TINY, quantization_config=cfg, dtype=torch.bfloat16, device_map="cpu")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        shutil.copy(os.path.join(d, "config.json"), os.path.join(HERE, name))


def adapter_config(name, base_name, **lora):
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16)
    model.name_or_path = base_name  # PEFT records it as base_model_name_or_path (not this machine's path)
    pm = get_peft_model(model, LoraConfig(**lora))
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        shutil.copy(os.path.join(d, "adapter_config.json"), os.path.join(HERE, name))


def main():
    shutil.rmtree(HERE, ignore_errors=True)
    os.makedirs(HERE)
    quantized_config("config-nf4-dq.json", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantized_config("config-fp4-nodq.json", bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
    quantized_config("config-nf4-dq-storage-bf16.json", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                     bnb_4bit_quant_storage=torch.bfloat16)
    adapter_config("adapter_config.json", "Vectors/llama/tiny", r=16, lora_alpha=32, target_modules=TARGETS,
                   lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    adapter_config("adapter_config-patterns.json", "Vectors/llama/tiny", r=8, lora_alpha=12.5, use_rslora=True,
                   target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 4},
                   alpha_pattern={"down_proj": 24}, lora_dropout=0.05)

    doc = {
        "zeta": [1, 2.0, -0.0, 1e-05, 1e16, 0.0001, 123456789012345678901234567890, 6.0, 1.5e-07, 3.14],
        "alpha": {"nested": {"empty_object": {}, "empty_list": [], "deep": [[[]], [{}], [None, True, False]]}},
        "Beta": "capital sorts first",
        "unicode": "caf\u00e9 \u65e5\u672c \U0001f600 \u00ff\u0100",
        "control": "tab\tnewline\nquote\" backslash\\ bell\x07 del\x7f slash/",
        "\u00e9key": "non-ASCII key", "_private": None, "1": "digit key", "": "empty key",
    }
    with open(os.path.join(HERE, "layout-input.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, ensure_ascii=False))
    with open(os.path.join(HERE, "layout.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")  # transformers' to_json_string

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "bitsandbytes": bitsandbytes.__version__}
    with open(os.path.join(HERE, "versions.json"), "w") as f:
        f.write(json.dumps(versions, indent=2, sort_keys=True) + "\n")
    print("interop:", sorted(os.listdir(HERE)), versions)


if __name__ == "__main__":
    main()
