"""Exact parameter counts of the model presets `qlora memory` knows, from transformers itself.

Each preset's published config (the values of its Hugging Face config.json that decide tensor
shapes) is instantiated on the meta device with transformers' own model class, and every
parameter is recorded: name pattern (layer index replaced by *), shape and how many times it
occurs. Run: .venv/bin/python Vectors/generate_presets.py  (writes Vectors/memory/presets.json)
"""
import json
import os
import re

import torch
import transformers
from transformers import (AutoModelForCausalLM, GptOssConfig, LlamaConfig, Llama4TextConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config, Qwen3MoeConfig)

# The shape-deciding fields of each model's published config.json.
PRESETS = {
    "llama-2-7b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)),
    "llama-2-13b": (LlamaConfig, dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                                      num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False)),
    "llama-2-70b": (LlamaConfig, dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                                      num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)),
    "llama-65b": (LlamaConfig, dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                                    num_key_value_heads=64, vocab_size=32000, tie_word_embeddings=False)),
    "llama-3.1-8b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)),
    "llama-3.1-70b": (LlamaConfig, dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)),
    "mistral-7b": (MistralConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "qwen2.5-14b": (Qwen2Config, dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                                      num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)),
    "qwen2.5-32b": (Qwen2Config, dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                                      num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)),
    "qwen3-8b": (Qwen3Config, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)),
    "qwen3-32b": (Qwen3Config, dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                                    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)),
    "phi-4": (Phi3Config, dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
                               num_key_value_heads=10, vocab_size=100352, tie_word_embeddings=False, pad_token_id=100349)),
    "llama-3.2-1b": (LlamaConfig, dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                       num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)),
    "llama-3.2-3b": (LlamaConfig, dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)),
    # Mixtures of experts (issue 23): Qwen/Qwen3-30B-A3B, mistralai/Mixtral-8x7B-v0.1, openai/gpt-oss-20b and -120b.
    "qwen3-30b-a3b": (Qwen3MoeConfig, dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                                           num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                                           num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                                           vocab_size=151936, tie_word_embeddings=False)),
    "mixtral-8x7b": (MixtralConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                                         tie_word_embeddings=False)),
    "gpt-oss-20b": (GptOssConfig, dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                                       num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                                       vocab_size=201088, sliding_window=128, tie_word_embeddings=False,
                                       layer_types=["sliding_attention", "full_attention"] * 12)),
    # meta-llama/Llama-4-Scout-17B-16E's text_config (Llama4ForCausalLM; the vision tower is not counted).
    "llama-4-scout": (Llama4TextConfig, dict(hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
                                             num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=16,
                                             num_experts_per_tok=1, interleave_moe_layer_step=1, vocab_size=202048, use_qk_norm=True,
                                             tie_word_embeddings=False)),
    "gpt-oss-120b": (GptOssConfig, dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64,
                                        num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4,
                                        vocab_size=201088, sliding_window=128, tie_word_embeddings=False,
                                        layer_types=["sliding_attention", "full_attention"] * 18)),
}


def main():
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "presets": {}}
    for name, (cls, fields) in PRESETS.items():
        cfg = cls(**fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        groups = {}
        for pname, p in model.named_parameters():  # a tied lm_head is the embedding, counted once
            key = re.sub(r"\.layers\.\d+\.", ".layers.*.", pname)
            g = groups.setdefault(key, {"shape": list(p.shape), "count": 0})
            assert g["shape"] == list(p.shape), pname
            g["count"] += 1
        total = sum(p.numel() for p in model.parameters())
        out["presets"][name] = {"model_type": cfg.model_type, "config": fields, "total_parameters": total, "tensors": groups}
        print(f"{name}: {total:,} parameters")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory", "presets.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
