"""Golden vectors for a QLoRA training step of each model family besides generate_llama.py's Llama (issue 12).

For each family a tiny random model from transformers (2 layers, hidden 64, 4 heads, 2 KV heads,
intermediate 128, vocab 256, untied lm_head unless said), with every weight drawn by torch and norms and
biases away from their initial 1 and 0 so that they matter, saved in bf16; then loaded by
transformers with bitsandbytes NF4 + double quant (bf16 compute, eager attention) and saved again
(the bnb-4bit checkpoint qlora's tests load), and wrapped by PEFT with LoRA r=8 on every linear
module of the decoder layers (fp32 adapters, B drawn non-zero). Recorded as generate_llama.py
does: one batch's logits and loss, every LoRA gradient, the adapters after 3 AdamW steps and the
three losses. Torch runs with one thread.

- llama-tied: LlamaForCausalLM with tied embeddings (lm_head is the embedding) and Llama-3.2's rope
  scaling;
- mistral: MistralForCausalLM (no sliding window);
- qwen2: Qwen2ForCausalLM, q/k/v projections with biases;
- qwen3: Qwen3ForCausalLM, per-head q/k RMSNorm, head_dim 32 (not hidden / heads = 16);
- phi3: Phi3ForCausalLM, fused qkv_proj and gate_up_proj (PEFT adapters on the fused modules).

Run: .venv/bin/python Vectors/generate_families.py   (writes Vectors/families/)
"""
import json
import os
import shutil

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import transformers
import peft
import bitsandbytes
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)
from generate_llama import record_training_step, save_dense_and_nf4  # shared with the Llama golden

torch.set_num_threads(1)
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "families")
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
SEPARATE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIED = dict(SHAPE, tie_word_embeddings=True)
FAMILIES = {
    "llama-tied": (LlamaConfig(**TIED, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}), SEPARATE),
    "mistral": (MistralConfig(**SHAPE, rope_theta=10000.0, sliding_window=None), SEPARATE),
    "qwen2": (Qwen2Config(**SHAPE, rope_theta=10000.0, use_sliding_window=False), SEPARATE),
    "qwen3": (Qwen3Config(**SHAPE, head_dim=32, rope_theta=10000.0, attention_bias=False, use_sliding_window=False), SEPARATE),
    "phi3": (Phi3Config(**SHAPE, rope_theta=10000.0, original_max_position_embeddings=256, rope_scaling=None,
                        sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def family(fam, cfg, targets):
    out_dir = os.path.join(HERE, fam)
    os.makedirs(out_dir)
    torch.manual_seed(0)
    cfg.torch_dtype = "bfloat16"
    model = save_dense_and_nf4(AutoModelForCausalLM.from_config(cfg), out_dir)
    shutil.rmtree(os.path.join(out_dir, "tiny"))  # the bnb-4bit file is what the tests load

    tensors, loss, losses = record_training_step(model, targets)

    meta = {"cases": json.dumps({"family": fam, "transformers": transformers.__version__, "peft": peft.__version__,
                                 "bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__.split("+")[0],
                                 "r": 8, "lora_alpha": 16, "lr": 1e-3, "weight_decay": 0.01, "attn": "eager",
                                 "targets": targets}, sort_keys=True)}
    save_file(tensors, os.path.join(out_dir, "golden.safetensors"), metadata=meta)
    print(fam, "loss", loss, "losses", losses, len(tensors), "tensors")


def main():
    shutil.rmtree(HERE, ignore_errors=True)
    os.makedirs(HERE)
    for fam, (cfg, targets) in FAMILIES.items():
        family(fam, cfg, targets)


if __name__ == "__main__":
    main()
