"""transformers + bitsandbytes + PEFT against `qlora train`: the same checkpoint and the same data,
measured in one run on this CPU (Sources/QLoRA/QLoRA.docc/Training.md, "Speed of a training step").

The checkpoint: a LlamaForCausalLM with --model's shapes, in bf16: llama-2-7b (hidden 4096,
intermediate 11008, 32 heads, its 32,000-token vocabulary) with --layers decoder layers (default 2),
or llama-3.2-1b (hidden 2048, intermediate 8192, 32 heads, 8 KV heads, 16 layers, 128,256 tokens,
tied embeddings). --vocab replaces the vocabulary (--vocab 256 leaves the head out, as earlier
figures did: say so beside them). The data: one JSONL line of random tokens per step. Both sides run NF4 + double
quant with bf16 compute, LoRA r=16 alpha=32 on all seven projections, AdamW at lr 2e-4, one
sequence per step, no gradient checkpointing. Python: SDPA attention, torch.optim.AdamW, torch on
the same number of threads as qlora (all cores); its figure is the median step after one warm-up
step. qlora: `qlora train`, the median of its per-step tokens/s after the first step.

Neither side computes the gradient to the first layer's input (autograd does not, the embedding
being frozen; qlora skips it too): the deeper the model, the less that matters.

Run: .venv/bin/python Benchmarks/compare_torch_train.py [--qlora .build/release/qlora] [--model llama-2-7b|llama-3.2-1b]
     [--layers N] [--vocab V] [--steps S] [tokens ...]
     (default tokens 512 2048, steps 4). Torch comes from Vectors/requirements.txt; CI never runs this.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import transformers
import peft
import bitsandbytes
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
from peft import LoraConfig, get_peft_model

# The shapes --model names (LlamaConfig arguments), from each model's config.json.
MODELS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def python_steps(checkpoint, examples):
    """Seconds of each transformers + bitsandbytes + PEFT training step, one example per step."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cpu")
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-4)
    times = []
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        t = time.perf_counter()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def qlora_steps(binary, checkpoint, data, steps, tokens, work):
    """Tokens/s of each `qlora train` step, as it prints them."""
    r = subprocess.run([binary, "train", "--model", checkpoint, "--data", data, "--steps", str(steps), "--seq-len", str(tokens),
                        "--rank", "16", "--alpha", "32", "--lr", "2e-4", "--save-every", "0", "--out", os.path.join(work, f"adapter-{tokens}")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"qlora train failed: {r.stderr.strip()}")
    return [float(x) for x in re.findall(r"step \d+/\d+  loss [0-9.]+  ([0-9.]+) tokens/s", r.stderr)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", default=".build/release/qlora")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama-2-7b")
    ap.add_argument("--layers", type=int, help="decoder layers (default: llama-2-7b 2, llama-3.2-1b its 16)")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the model's)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("tokens", nargs="*", type=int, default=[512, 2048])
    a = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, {threads} threads; qlora {os.path.abspath(a.qlora)}")
    shape = dict(MODELS[a.model])
    if a.layers is not None:
        shape["num_hidden_layers"] = a.layers
    if a.vocab is not None:
        shape["vocab_size"] = a.vocab
    a.layers, vocab = shape["num_hidden_layers"], shape["vocab_size"]
    cfg = LlamaConfig(**shape, max_position_embeddings=max(4096, max(a.tokens)), torch_dtype="bfloat16")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        checkpoint = os.path.join(work, "model")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(checkpoint)
        for n in a.tokens:
            rng = random.Random(n)
            examples = [{"input_ids": [rng.randrange(vocab) for _ in range(n)]} for _ in range(a.steps)]
            for e in examples:
                e["labels"] = e["input_ids"]
            data = os.path.join(work, f"data-{n}.jsonl")
            with open(data, "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in examples)
            py = python_steps(checkpoint, examples)
            py_tps = n / statistics.median(py[1:] or py)
            ours = qlora_steps(a.qlora, checkpoint, data, a.steps, n, work)
            our_tps = statistics.median(ours[1:] or ours)
            rows.append((n, py_tps, our_tps))
            print(f"{n} tokens: transformers + bitsandbytes + PEFT {py_tps:.0f} tokens/s, qlora train {our_tps:.0f} tokens/s: "
                  f"{our_tps / py_tps:.2f}x  ({a.model}, {a.layers} layers, vocabulary {vocab}, {a.steps} steps, median after the first)", flush=True)
    return rows


if __name__ == "__main__":
    main()
