"""Golden training steps of a mixture of experts: transformers 5.23 + bitsandbytes + PEFT on a tiny
Qwen3-MoE and Mixtral, LoRA on the attention (the experts and router frozen, bf16 as a 4-bit load
keeps them): Vectors/moe/train.safetensors, for `qlora train` (issue 23).

Per family: a 2-layer model (hidden 64, 4 heads over 2 KV heads, vocabulary 256; Qwen3-MoE 8 experts
of 48, top 2, norm_topk_prob; Mixtral 4 experts of 96, top 2) whose every tensor is bf16 bits from
its name (generate_gguf_quantize.py's `small_weights`, names as transformers saves them: one tensor
per expert; scaled by 2^-3 but the norms and routers), config.json as its config class writes it (stored in the file's metadata), loaded with
NF4 + double quant (bf16 compute); PEFT LoRA r 8, alpha 16 on q/k/v/o, A and B from
`small_weights("{module}.lora_A")` / `lora_B`; 2 sequences of 16 tokens from torch.Generator(seed),
the first 4 labels masked; train mode, 3 steps of torch's AdamW (lr 1e-3, weight decay 0.01), 1
thread. A route decided by less than a bf16 rounding is not a fact to hold another implementation
to (one rounding elsewhere in the layer flips it), so the seed is the first from 7 whose every
token, in every sparse layer and step, has its k-th router logit at least MARGIN_ULPS bf16 ulps
above the next (recorded with the margin found). Recorded: input_ids and labels (int32 [2, 16])
and the 3 losses (fp32). Nothing else is committed: the Swift test writes the same checkpoint and
adapter from the names.

Run: .venv/bin/python Vectors/generate_moe_train.py
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate_gguf_quantize import small_weights  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0)
FAMILIES = {
    "qwen3_moe": dict(SMALL, architectures=["Qwen3MoeForCausalLM"], head_dim=16, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "mixtral": dict(SMALL, architectures=["MixtralForCausalLM"], intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MARGIN_ULPS = 4


def bf16(name, shape):
    """small_weights' bf16 values, scaled by 2^-3 (exactly) but the norms and routers: |w| up to
    2^-5, the magnitude of trained weights, where small_weights' own 2^-2 makes activations no real
    model has; the router keeps its scale, so that its logits decide routes by more than a rounding."""
    w = torch.from_numpy(small_weights(name, int(np.prod(shape))).astype(np.int16)).view(torch.bfloat16).reshape(shape)
    return w if name.endswith(("norm.weight", ".gate.weight")) else w * 0.125


def shapes(family, c):
    h, hd = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv, v = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["vocab_size"]
    e = c.get("num_experts") or c["num_local_experts"]
    i = c.get("moe_intermediate_size") if family == "qwen3_moe" else c["intermediate_size"]
    s = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        s.update({p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h], p + "self_attn.q_proj.weight": [q, h],
                  p + "self_attn.k_proj.weight": [kv, h], p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, q]})
        if family == "qwen3_moe":
            s.update({p + "self_attn.q_norm.weight": [hd], p + "self_attn.k_norm.weight": [hd], p + "mlp.gate.weight": [e, h]})
            for x in range(e):
                s.update({p + f"mlp.experts.{x}.gate_proj.weight": [i, h], p + f"mlp.experts.{x}.up_proj.weight": [i, h],
                          p + f"mlp.experts.{x}.down_proj.weight": [h, i]})
        else:
            s[p + "block_sparse_moe.gate.weight"] = [e, h]
            for x in range(e):
                s.update({p + f"block_sparse_moe.experts.{x}.w1.weight": [i, h], p + f"block_sparse_moe.experts.{x}.w3.weight": [i, h],
                          p + f"block_sparse_moe.experts.{x}.w2.weight": [h, i]})
    return s


def main():
    tensors, configs, seeds = {}, {}, {}
    for family, fields in FAMILIES.items():
        config = AutoConfig.for_model(family, **fields)
        config.dtype = "bfloat16"
        text = config.to_json_string(use_diff=True)
        configs[family] = text
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(text)
            save_file({n: bf16(n, sh) for n, sh in shapes(family, json.loads(text)).items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
            nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(d, quantization_config=nf4, dtype=torch.bfloat16, device_map="cpu")
        model.config.use_cache = False
        pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, lora_dropout=0.0, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    module = n.split("base_model.model.", 1)[1].split(".lora_")[0]
                    kind = "lora_A" if ".lora_A." in n else "lora_B"
                    p.copy_(bf16(f"{module}.{kind}", list(p.shape)).float())
        pm.train()
        start = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
        logits = []
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(lambda m, i, o: logits.append((o[0] if isinstance(o, tuple) else o).detach().float()))
        k = fields["num_experts_per_tok"]
        for seed in range(7, 200):
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, fields["vocab_size"], (2, 16), generator=g)
            labels = ids.clone()
            labels[:, :4] = -100
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
            losses, logits[:] = [], []
            for _ in range(3):
                opt.zero_grad()
                loss = pm(input_ids=ids, labels=labels).loss
                loss.backward()
                opt.step()
                losses.append(loss.item())
            # Each token's gap between its k-th and (k+1)-th router logit, in bf16 ulps of the k-th.
            margin = min(float(((s := lg.reshape(-1, lg.shape[-1]).sort(-1, descending=True)[0])[:, k - 1] - s[:, k])
                               .div(torch.ldexp(torch.ones(()), torch.frexp(s[:, k - 1])[1] - 8)).min()) for lg in logits)
            if margin >= MARGIN_ULPS:
                break
        else:
            sys.exit(f"{family}: no seed in 7..199 routes every token by {MARGIN_ULPS} bf16 ulps")
        print(family, "seed", seed, "router margin", margin, "ulps; losses", losses, "trainable", sum(p.numel() for p in pm.parameters() if p.requires_grad))
        seeds[family] = {"seed": seed, "router_margin_ulps": margin}
        tensors.update({f"{family}.input_ids": ids.to(torch.int32), f"{family}.labels": labels.to(torch.int32),
                        f"{family}.step_losses": torch.tensor(losses, dtype=torch.float32)})
    os.makedirs(os.path.join(HERE, "moe"), exist_ok=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": __import__("peft").__version__,
                "bitsandbytes": __import__("bitsandbytes").__version__}
    meta = {"configs": json.dumps(configs, sort_keys=True), "versions": json.dumps(versions, sort_keys=True), "seeds": json.dumps(seeds, sort_keys=True),
            "made_by": "Vectors/generate_moe_train.py"}
    save_file(dict(sorted(tensors.items())), os.path.join(HERE, "moe", "train.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
