"""Which modules PEFT adapts for a LoraConfig (issue 13): the names `get_peft_model` wraps with
LoRA layers on a tiny Llama, for `target_modules` as a list, a regex string and "all-linear",
with `layers_to_transform` (an int or a list), `layers_pattern` (a string or a list) and
`exclude_modules`. `PEFTTargetsTests` holds qlora's matching (`PEFTAdapter.Targets`) to them.

Written to Vectors/peft_targets.json:
  modules   every module of the model with a 2-D weight (what a checkpoint shows qlora), with
            its torch class (Linear or Embedding)
  cases     per config: the adapter_config.json fields that select modules, as PEFT's
            save_pretrained writes them, the sorted names of the modules get_peft_model
            adapted, and the error it raised when the config selects none
  versions  the library versions

Run: .venv/bin/python Vectors/generate_peft_targets.py
"""
import json
import os
import sys
import tempfile

# PEFT writes target_modules in set order, which follows str hashes: fix the seed so the
# committed file is reproducible.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))

import torch
import transformers
import peft
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.error import NoMatchingPeftModuleError
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_targets.json")
SELECTING = ["target_modules", "layers_to_transform", "layers_pattern", "exclude_modules"]

CASES = [
    ("list", dict(target_modules=["q_proj", "v_proj"])),
    ("list-full-path", dict(target_modules=["model.layers.1.mlp.down_proj", "o_proj"])),
    ("regex", dict(target_modules=r".*\.(q_proj|k_proj|up_proj)")),
    ("regex-layers", dict(target_modules=r"model\.layers\.[02]\.(self_attn|mlp)\.(?P<kind>[a-z]+)_proj")),
    ("all-linear", dict(target_modules="all-linear")),
    ("all-linear-upper", dict(target_modules="ALL-Linear")),
    ("layers-list", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2])),
    ("layers-int", dict(target_modules=["v_proj", "gate_proj"], layers_to_transform=1)),
    ("layers-pattern", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1, 2], layers_pattern="layers")),
    ("layers-pattern-list", dict(target_modules=["k_proj"], layers_to_transform=[0], layers_pattern=["blocks", "layers"])),
    ("layers-pattern-miss", dict(target_modules=["k_proj"], layers_to_transform=[0], layers_pattern="h")),
    # A target that is the whole module name skips the layer filter (PEFT's `key in target_modules`).
    ("layers-full-path", dict(target_modules=["model.layers.2.self_attn.q_proj", "up_proj"], layers_to_transform=[0])),
    ("exclude-list", dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.1.self_attn.v_proj", "down_proj"])),
    ("exclude-regex", dict(target_modules="all-linear", exclude_modules=r".*\.layers\.1\..*")),
]


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)
    modules = [{"name": n, "class": type(m).__name__}
               for n, m in LlamaForCausalLM(cfg).named_modules()
               if getattr(m, "weight", None) is not None and m.weight.dim() == 2]
    cases = []
    for name, kw in CASES:
        model = LlamaForCausalLM(cfg)
        config = LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM", **kw)
        with tempfile.TemporaryDirectory() as d:
            config.save_pretrained(d)
            with open(os.path.join(d, "adapter_config.json")) as f:
                saved = json.load(f)
        try:
            pm = get_peft_model(model, config)
            adapted = sorted(n for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer))
            error = None
        except NoMatchingPeftModuleError as e:
            # PEFT refuses a config that selects no module.
            adapted, error = [], type(e).__name__
        selecting = {k: saved[k] for k in SELECTING}
        # Sets are written in hash order; sorted, the file does not depend on it.
        for k in ("target_modules", "exclude_modules"):
            if isinstance(selecting[k], list):
                selecting[k] = sorted(selecting[k])
        cases.append({"name": name, "config": selecting, "adapted": adapted, "error": error})
    doc = {"modules": modules, "cases": cases,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
