"""A golden merge of PEFT 0.21.2's LoRA on a mixture of experts (issue 23): `target_modules="all-linear"`
on a tiny Qwen3-MoE, which PEFT resolves to the attention projections plus, through `target_parameters`,
each sparse layer's fused experts (experts.gate_up_proj at twice the rank, via rank_pattern
`.*\\.gate_up_proj`; experts.down_proj) and its router (gate.weight), PEFT's ParamWrapper.

The model: transformers' Qwen3MoeConfig, hidden 32, 2 layers (layer 0 dense via mlp_only_layers=[0],
intermediate 32; layer 1 with 4 experts of 16, top 2), 2 heads of 16, 1 key/value head, vocab 32;
weights drawn by torch (seed 0; experts and router N(0, 0.1) since transformers initialises some to
zero), saved in bf16 by save_pretrained, which writes the experts one by one
(`mlp.experts.E.gate_proj/up_proj/down_proj`). LoRA B drawn N(0, 0.05) (seed 5) so the merge changes
the weights.

Written to Vectors/peft_kinds/moe-all-linear/:
  base/        config.json and model.safetensors (the bf16 base)
  adapter/     adapter_config.json + adapter_model.safetensors as PeftModel.save_pretrained writes them
  expected.json  versions, the resolved adapter config fields, and for every tensor of
               merge_and_unload()'s model as its save_pretrained writes it: dtype, shape, SHA-256 of its
               bytes, and whether the merge changed it

Run: .venv/bin/python Vectors/generate_moe_merge.py   (~3 s)
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings

if os.environ.get("PYTHONHASHSEED") != "0":  # PEFT writes target_modules in set order
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore")
import torch
import transformers
import peft
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from peft import LoraConfig, PeftModel, get_peft_model

assert peft.__version__ == "0.21.2", peft.__version__
torch.set_num_threads(1)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_kinds", "moe-all-linear")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    base, adapter = os.path.join(OUT, "base"), os.path.join(OUT, "adapter")
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                         decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 3 or n.endswith("mlp.gate.weight"):
                p.copy_(0.1 * torch.randn(p.shape))
    model.to(torch.bfloat16).save_pretrained(base)
    os.remove(os.path.join(base, "generation_config.json"))  # not read by the merge
    torch.manual_seed(5)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape))
    pm.save_pretrained(adapter)
    for extra in ("README.md",):
        if os.path.exists(os.path.join(adapter, extra)):
            os.remove(os.path.join(adapter, extra))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter).merge_and_unload()
    before = load_file(os.path.join(base, "model.safetensors"))
    with tempfile.TemporaryDirectory() as t:
        merged.save_pretrained(t)
        after = load_file(os.path.join(t, "model.safetensors"))
    def sha(v):
        return hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    tensors = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape), "sha256": sha(v),
                   "changed": k not in before or not torch.equal(before[k].view(torch.uint8), v.view(torch.uint8))}
               for k, v in sorted(after.items())}
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    doc = {"versions": {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
           "adapter_config": {k: config[k] for k in ("r", "lora_alpha", "target_modules", "target_parameters", "rank_pattern")},
           "tensors": tensors}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{sum(t['changed'] for t in tensors.values())} of {len(tensors)} tensors changed; target_parameters {config['target_parameters']}")


if __name__ == "__main__":
    main()
