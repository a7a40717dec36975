"""What llama.cpp writes for a mixture of experts: the golden for `qlora export` of Qwen3-MoE,
Mixtral and gpt-oss (issue 23), Vectors/gguf/moe.json.

For each family a bf16 checkpoint as transformers 5 saves it (Qwen3-MoE and Mixtral one tensor
per expert, Mixtral under its legacy `block_sparse_moe.experts.E.w1|w2|w3` names; gpt-oss its
fused `[experts, in, out]` parameters with gate and up interleaved, biases and sinks), every
tensor's bf16 bits from its name (generate_gguf_quantize.py's `small_weights`), so no weight is
committed: the Swift test writes the same files from Vectors/gguf/moe/FAMILY/config.json (as
transformers writes the config) and the rule. Mixtral has 8 experts, the count at which
llama-quantize changes attn_k, attn_v and attn_output's types. Tokenizers: Qwen3-MoE and gpt-oss
read only tokenizer.json (the byte-level BPE of Vectors/gguf/bpe/qwen2, pre-tokenizer named
"qwen2" as generate_gguf_bpe.py does), Mixtral the SentencePiece Vectors/gguf/llama-tiny.

On each: `convert_hf_to_gguf.py --outtype auto`, then `llama-quantize IN OUT Q4_K_M 2`. Recorded
per file: size, sha256, and each tensor's name and type (what llama-quantize chose for it).

Run: .venv/bin/python Vectors/generate_gguf_moe.py --llama-cpp DIR --quantize BIN [--keep DIR]
     (DIR: llama.cpp's tree, e.g. the llama-cpp-python sdist's vendor/llama.cpp; BIN its llama-quantize)
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate_gguf_quantize import small_weights  # noqa: E402

H, HEADS, KV, HEAD_DIM, LAYERS, I = 256, 4, 2, 64, 2, 256

# As transformers 5.23's config classes write them (AutoConfig.for_model(...).to_json_string()).
CONFIGS = {
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=320, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=I, intermediate_size=2 * I, bos_token_id=300, eos_token_id=302),
    "mixtral": dict(architectures=["MixtralForCausalLM"], vocab_size=256, num_local_experts=8, num_experts_per_tok=2,
                    intermediate_size=I, bos_token_id=1, eos_token_id=2),
    "gpt_oss": dict(architectures=["GptOssForCausalLM"], vocab_size=320, num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=I, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
                    bos_token_id=300, eos_token_id=302),
}
COMMON = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
              max_position_embeddings=256, tie_word_embeddings=False)
TOKENIZERS = {"qwen3_moe": ["bpe/qwen2/tokenizer.json", "bpe/qwen2/tokenizer_config.json"],
              "mixtral": ["llama-tiny/tokenizer.model"],
              "gpt_oss": ["bpe/qwen2/tokenizer.json", "bpe/qwen2/tokenizer_config.json"]}


def config_json(family):
    from transformers import AutoConfig
    c = AutoConfig.for_model(family, **COMMON, **CONFIGS[family])
    c.dtype = "bfloat16"
    return c.to_json_string(use_diff=True)


def shapes(family, c):
    """The tensors transformers 5.23's save_pretrained writes for `family`, names and shapes."""
    v, e = c["vocab_size"], c.get("num_experts") or c["num_local_experts"]
    q, kv = HEADS * HEAD_DIM, KV * HEAD_DIM
    s = {"model.embed_tokens.weight": [v, H], "model.norm.weight": [H], "lm_head.weight": [v, H]}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        s.update({p + "input_layernorm.weight": [H], p + "post_attention_layernorm.weight": [H],
                  p + "self_attn.q_proj.weight": [q, H], p + "self_attn.k_proj.weight": [kv, H],
                  p + "self_attn.v_proj.weight": [kv, H], p + "self_attn.o_proj.weight": [H, q]})
        if family == "qwen3_moe":
            s.update({p + "self_attn.q_norm.weight": [HEAD_DIM], p + "self_attn.k_norm.weight": [HEAD_DIM], p + "mlp.gate.weight": [e, H]})
            for x in range(e):
                s.update({p + f"mlp.experts.{x}.gate_proj.weight": [I, H], p + f"mlp.experts.{x}.up_proj.weight": [I, H],
                          p + f"mlp.experts.{x}.down_proj.weight": [H, I]})
        elif family == "mixtral":
            s[p + "block_sparse_moe.gate.weight"] = [e, H]
            for x in range(e):
                s.update({p + f"block_sparse_moe.experts.{x}.w1.weight": [I, H], p + f"block_sparse_moe.experts.{x}.w3.weight": [I, H],
                          p + f"block_sparse_moe.experts.{x}.w2.weight": [H, I]})
        else:
            for n, rows in (("q", q), ("k", kv), ("v", kv)):
                s[p + f"self_attn.{n}_proj.bias"] = [rows]
            s.update({p + "self_attn.o_proj.bias": [H], p + "self_attn.sinks": [HEADS], p + "mlp.router.weight": [e, H], p + "mlp.router.bias": [e],
                      p + "mlp.experts.gate_up_proj": [e, H, 2 * I], p + "mlp.experts.gate_up_proj_bias": [e, 2 * I],
                      p + "mlp.experts.down_proj": [e, I, H], p + "mlp.experts.down_proj_bias": [e, H]})
    return s


def write_checkpoint(family, d):
    import torch
    from safetensors.torch import save_file
    os.makedirs(d)
    text = open(os.path.join(HERE, "gguf", "moe", family, "config.json")).read()
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write(text)
    tensors = {n: torch.from_numpy(small_weights(n, int(np.prod(sh))).astype(np.int16)).view(torch.bfloat16).reshape(sh)
               for n, sh in shapes(family, json.loads(text)).items()}
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    for f in TOKENIZERS[family]:
        shutil.copy(os.path.join(HERE, "gguf", f), d)


def describe(gguf, path):
    data = open(path, "rb").read()
    r = gguf.GGUFReader(path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "tensors": [f"{x.name} {x.tensor_type.name}" for x in r.tensors]}


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    ap.add_argument("--quantize", required=True)
    ap.add_argument("--keep", help="a directory to keep the checkpoints and files in")
    ap.add_argument("--configs", action="store_true", help="(re)write Vectors/gguf/moe/FAMILY/config.json from transformers' config classes")
    a = ap.parse_args()
    if a.configs:
        for family in CONFIGS:
            os.makedirs(os.path.join(HERE, "gguf", "moe", family), exist_ok=True)
            with open(os.path.join(HERE, "gguf", "moe", family, "config.json"), "w") as f:
                f.write(config_json(family))
    sys.path.insert(0, os.path.join(a.llama_cpp, "gguf-py"))
    import gguf
    report = {}
    with tempfile.TemporaryDirectory() as t:
        root = a.keep or t
        for family in CONFIGS:
            d = os.path.join(root, family, "tiny")  # general.name comes from the directory's name
            shutil.rmtree(os.path.dirname(d), ignore_errors=True)
            write_checkpoint(family, d)
            auto, q = os.path.join(root, family, "auto.gguf"), os.path.join(root, family, "q4_k_m.gguf")
            # The BPE tokenizer is not one the converter knows by hash: its pre-tokenizer is named (as generate_gguf_bpe.py).
            pre = "-" if family == "mixtral" else "qwen2"
            code = ("import sys, runpy; LC = sys.argv.pop(1); pre = sys.argv.pop(1); sys.path[:0] = [LC, LC + '/gguf-py']\n"
                    "from conversion import base\n"
                    "if pre != '-': base.TextModel.get_vocab_base_pre = lambda self, tok, name=pre: name\n"
                    "sys.argv[0] = LC + '/convert_hf_to_gguf.py'; runpy.run_path(sys.argv[0], run_name='__main__')")
            r = subprocess.run([sys.executable, "-c", code, a.llama_cpp, pre, d, "--outtype", "auto", "--outfile", auto], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{family}: convert failed:\n{r.stderr[-3000:]}")
            subprocess.run([a.quantize, auto, q, "Q4_K_M", "2"], check=True, capture_output=True)
            report[family] = {"auto": describe(gguf, auto), "q4_k_m": describe(gguf, q)}
    from generate_gguf_families import write_golden
    write_golden(os.path.join(HERE, "gguf", "moe.json"), report, a.llama_cpp,
                 "small_weights checkpoints; convert_hf_to_gguf.py --outtype auto; llama-quantize IN OUT Q4_K_M 2", indent=0)

if __name__ == "__main__":
    main()
