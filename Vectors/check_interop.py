"""Does the Python stack load what qlora writes, and get the same numbers? (issue 12)

Run by hand where torch, transformers, PEFT and bitsandbytes are installed (CI never runs it):

    swift build -c release --product qlora
    .venv/bin/python Vectors/check_interop.py [path/to/qlora]      # default .build/release/qlora

For the mixtures of experts (Qwen3-MoE with a dense first layer, Mixtral, gpt-oss) quantize and dequantize
are checked the same way (experts and router stay bf16, as transformers 5 + bitsandbytes keep them); merge
of an adapter on the attention, on the experts (target_parameters) and PEFT's all-linear equals PEFT's
merge_and_unload (gpt-oss, whose file keeps the experts fused, refuses an adapter on them); export writes
Mixtral and refuses a Qwen3-MoE with a dense layer (llama.cpp's qwen3moe has none) and gpt-oss without
tokenizer.json; train follows transformers + PEFT on Mixtral (LoRA on the attention) and refuses the
Qwen3-MoE with a dense layer and gpt-oss with one line.

For each model family (a tiny random model written by transformers' save_pretrained in bf16) it
runs the qlora binary and loads every output back:

  quantize    for NF4 + double quant, FP4 without, and NF4 + double quant stored as bfloat16
              (bnb_4bit_quant_storage, for FSDP): transformers' from_pretrained of qlora's
              checkpoint gives the logits of transformers' own quantization of the same dense
              model, and qlora stored the tensors and config.json its save_pretrained stores
              (names, dtypes, shapes, bytes)
  dequantize  qlora's dequantized checkpoint loads as a plain model; its tensors and logits are
              those of transformers' `model.dequantize()` of its own NF4 model; and qlora's
              dequantize of transformers' own 4-bit files gives those tensors too
  train       from the same initial PEFT adapter (B non-zero), on the same data with the same
              batches, qlora train's losses follow transformers + PEFT's with torch's AdamW
              (lr 1e-3, weight decay 0.01) over 4 steps, within LOSS_TOLERANCE; and
              PeftModel.from_pretrained loads qlora's trained adapter onto transformers' NF4
              model: every LoRA weight lands, none missing, and it changes the logits; PEFT's
              LoraConfig reads its adapter_config.json and writes back the same keys and types
  merge       qlora's merge of that adapter equals PEFT's merge_and_unload: into the dense
              model; into the NF4 model re-quantized (`--requantize`, what PEFT does to a
              Linear4bit); and into the NF4 model dequantized to bf16 (`merged_16bit`, PEFT on
              transformers' dequantized model). Each output loads with from_pretrained.

One line per check, `PASS` or `FAIL`, with the largest difference where there is one; the exit
status is the number of failures. Torch runs with one thread.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore")
import torch
import transformers
import peft
import bitsandbytes
import safetensors
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, GptOssConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                          Qwen2Config, Qwen3Config, Qwen3MoeConfig)
from peft import LoraConfig, PeftModel, get_peft_model

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)

# The families checked: (name, config class, its fields). Add a family by adding a line.
FAMILIES = [
    ("llama", LlamaConfig, dict(SMALL, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32})),
    ("mistral", MistralConfig, dict(SMALL, rope_theta=10000.0, sliding_window=None)),
    ("qwen2", Qwen2Config, dict(SMALL, rope_theta=10000.0)),                  # q/k/v biases
    ("qwen3", Qwen3Config, dict(SMALL, rope_theta=10000.0, head_dim=32)),     # q/k norms, head_dim != hidden/heads
    ("phi3", Phi3Config, dict(SMALL, rope_theta=10000.0, pad_token_id=0)),    # fused qkv_proj, gate_up_proj
]
# Mixtures of experts (issue 23): quantize, dequantize, merge, export, and train (Mixtral here; Qwen3-MoE's dense layer and gpt-oss refused).
MOE = [
    ("qwen3_moe", Qwen3MoeConfig, dict(SMALL, head_dim=32, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                       decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True, rope_theta=10000.0)),
    ("mixtral", MixtralConfig, dict(SMALL, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                    rope_theta=10000.0)),
    ("gpt_oss", GptOssConfig, dict(SMALL, head_dim=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"], attention_bias=True, swiglu_limit=7.0,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 8})),
]
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
FP4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                         bnb_4bit_compute_dtype=torch.bfloat16)
# The 4-bit file variants: (name, qlora quantize flags, transformers' config).
NF4_BF16_STORAGE = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
VARIANTS = [("nf4-dq", [], NF4), ("fp4-nodq", ["--quant-type", "fp4", "--no-double-quant"], FP4),
            ("nf4-dq-storage-bf16", ["--quant-storage", "bfloat16"], NF4_BF16_STORAGE)]
results = []
# Relative loss agreement over a few training steps: the bound Tests/TrainingTests/LlamaTests.swift
# states for one step (lossTolerance: bf16 roundings that go the other way in a differently
# ordered fp32 sum), which AdamW's few steps keep.
LOSS_TOLERANCE = 2e-3


def check(family, command, what, ok, detail=""):
    results.append((family, command, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {family:8} {command:10} {what}{'  (' + detail + ')' if detail else ''}", flush=True)


def qlora(binary, *args):
    r = subprocess.run([binary, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"qlora {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", attn_implementation="eager", **kw).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def same_tensors(ours_path, theirs_sd):
    """Every tensor of a safetensors file equals `theirs_sd`'s (same names, dtypes, shapes, bytes)."""
    ours = load_file(ours_path)
    theirs = {k: v.contiguous() for k, v in theirs_sd.items()}
    problems = []
    if set(ours) != set(theirs):
        problems.append(f"names: only qlora {sorted(set(ours) - set(theirs))[:3]}, only theirs {sorted(set(theirs) - set(ours))[:3]}")
    for k in sorted(set(ours) & set(theirs)):
        a, b = ours[k], theirs[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{k}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif not torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a, b.view(torch.uint8) if b.dtype != torch.uint8 else b):
            problems.append(f"{k}: bytes differ (max {max_diff(a, b):.3g})")
    return problems, len(theirs)


def shard(directory):
    return os.path.join(directory, "model.safetensors")


def quantize_both(binary, family, variant, dense_dir, out, flags, bnb, with_their_files=None):
    """qlora quantize of dense_dir into out, checked against transformers' own 4-bit load of it as its
    save_pretrained writes it (tensors, config.json); returns that model and with_their_files(its directory)."""
    qlora(binary, "quantize", dense_dir, out, *flags)
    theirs_q = load(dense_dir, quantization_config=bnb, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as t:
        theirs_q.save_pretrained(t)
        problems, n = same_tensors(shard(out), load_file(shard(t)))
        with open(os.path.join(t, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
            same_config = f.read() == g.read()
        extra = with_their_files(t) if with_their_files else None
    check(family, "quantize", f"{variant}: stored tensors equal transformers' save_pretrained ({n} tensors)", not problems,
          "; ".join(problems[:3]))
    check(family, "quantize", f"{variant}: config.json equals transformers' byte for byte", same_config)
    return theirs_q, extra


def train_checks(binary, family, dense_dir, fields, work, targets, ids):
    """qlora train from PEFT's initial adapter follows transformers + PEFT + torch AdamW over 4 steps;
    PEFT loads the adapter qlora trains and reads its adapter_config.json. Returns the trained adapter."""
    data, adapter = os.path.join(work, "data.jsonl"), os.path.join(work, "adapter")
    g = torch.Generator().manual_seed(2)
    with open(data, "w") as f:
        for _ in range(8):
            x = torch.randint(0, fields["vocab_size"], (16,), generator=g).tolist()
            f.write(json.dumps({"input_ids": x, "labels": [-100] * 4 + x[4:]}) + "\n")
    # Training itself: the same initial adapter, data and batches on both sides.
    init = os.path.join(work, "init-adapter")
    torch.manual_seed(3)
    pm0 = get_peft_model(load(dense_dir, quantization_config=NF4, dtype=torch.bfloat16),
                         LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm0.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.05)
    pm0.save_pretrained(init)
    r = subprocess.run([binary, "train", "--model", dense_dir, "--data", data, "--adapter", init, "--steps", "4", "--seq-len", "16",
                        "--batch", "2", "--lr", "0.001", "--save-every", "0", "--out", os.path.join(work, "follow")],
                       capture_output=True, text=True)
    ours_losses = [float(x) for x in re.findall(r"step \d+/\d+  loss ([0-9.]+)", r.stderr)]
    pm1 = PeftModel.from_pretrained(load(dense_dir, quantization_config=NF4, dtype=torch.bfloat16), init, is_trainable=True).train()
    opt = torch.optim.AdamW([p for p in pm1.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    examples = [json.loads(line) for line in open(data)]
    theirs_losses = []
    for step in range(4):
        batch = [examples[(2 * step + i) % len(examples)] for i in range(2)]
        opt.zero_grad()
        out = pm1(input_ids=torch.tensor([e["input_ids"] for e in batch]), labels=torch.tensor([e["labels"] for e in batch]))
        out.loss.backward()
        opt.step()
        theirs_losses.append(out.loss.item())
    worst = max((abs(a - b) / abs(b) for a, b in zip(ours_losses, theirs_losses)), default=float("inf"))
    check(family, "train", f"losses follow transformers + PEFT + torch AdamW over 4 steps (relative, tolerance {LOSS_TOLERANCE})",
          r.returncode == 0 and len(ours_losses) == 4 and worst <= LOSS_TOLERANCE,
          f"qlora {[round(x, 4) for x in ours_losses]}, PEFT {[round(x, 4) for x in theirs_losses]}, worst {worst:.2g}")

    qlora(binary, "train", "--model", dense_dir, "--data", data, "--steps", "3", "--seq-len", "16", "--batch", "2", "--rank", "8",
          "--alpha", "16", "--lr", "0.01", "--save-every", "0", "--out", adapter)
    base = load(dense_dir, quantization_config=NF4, dtype=torch.bfloat16)
    before = logits(base, ids)
    pm = PeftModel.from_pretrained(base, adapter).eval()
    stored = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    params = {k.replace(".default", ""): v for k, v in pm.named_parameters() if "lora_" in k}
    landed = set(params) == set(stored) and all(torch.equal(params[k].float(), stored[k].float()) for k in stored)
    after = logits(pm, ids)
    with tempfile.TemporaryDirectory() as t:
        LoraConfig.from_pretrained(adapter).save_pretrained(t)
        with open(os.path.join(t, "adapter_config.json")) as f, open(os.path.join(adapter, "adapter_config.json")) as g:
            theirs_c, ours_c = json.load(f), json.load(g)
    kinds = lambda d: {k: (type(v).__name__, sorted(v) if k == "target_modules" else v) for k, v in d.items()}
    differ = sorted(k for k in set(theirs_c) | set(ours_c) if kinds(theirs_c).get(k) != kinds(ours_c).get(k))
    check(family, "train", "adapter_config.json: PEFT's LoraConfig reads it and writes the same keys, types, values", not differ,
          f"differ: {differ}" if differ else "")
    check(family, "train", f"PeftModel.from_pretrained ({type(pm).__name__}): all {len(stored)} LoRA weights land, logits change",
          landed and max_diff(after, before) > 0, f"{len(params)} LoRA parameters, {len(stored)} stored")

    return adapter


def family_checks(binary, family, config_class, fields, work):
    torch.manual_seed(0)
    dense_dir, q_dir, d_dir = (os.path.join(work, n) for n in ("dense", "q-nf4-dq", "d"))
    model = AutoModelForCausalLM.from_config(config_class(**fields))
    with torch.no_grad():  # norms away from 1 so that their weights matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
    model.to(torch.bfloat16).save_pretrained(dense_dir)
    linears = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if not n.endswith("lm_head"))
    ids = torch.randint(0, fields["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))

    # quantize, every 4-bit variant: qlora writes, transformers reads; transformers writes, qlora reads
    for variant, flags, bnb in VARIANTS:
        out = os.path.join(work, "q-" + variant)

        def read_theirs(t):  # the other way: qlora dequantizes transformers' file as transformers does
            back = os.path.join(work, "theirs-deq-" + variant)
            qlora(binary, "dequantize", t, back)
            theirs_q2 = load(dense_dir, quantization_config=bnb, dtype=torch.bfloat16)
            theirs_q2.dequantize()
            return same_tensors(shard(back), theirs_q2.state_dict())[0]
        theirs_q, read_problems = quantize_both(binary, family, variant, dense_dir, out, flags, bnb, read_theirs)
        ours_q = load(out)
        n4 = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in ours_q.modules())
        diff = max_diff(logits(ours_q, ids), logits(theirs_q, ids))
        check(family, "quantize", f"{variant}: from_pretrained: {n4} Linear4bit, logits equal transformers' own quantization",
              n4 == linears and diff == 0, f"max |diff| {diff:.3g}")
        check(family, "dequantize", f"{variant}: qlora reads transformers' file: tensors equal its dequantize()", not read_problems,
              "; ".join(read_problems[:3]))

    # dequantize
    qlora(binary, "dequantize", q_dir, d_dir)
    ours_d = load(d_dir)
    plain = not any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in ours_d.modules()) and getattr(ours_d.config, "quantization_config", None) is None
    theirs_d = load(dense_dir, quantization_config=NF4, dtype=torch.bfloat16)
    theirs_d.dequantize()
    problems, n = same_tensors(shard(d_dir), theirs_d.state_dict())
    check(family, "dequantize", f"loads as a plain model; tensors equal transformers' dequantize() ({n})", plain and not problems, "; ".join(problems[:3]))
    diff = max_diff(logits(ours_d, ids), logits(theirs_d, ids))
    check(family, "dequantize", "logits equal transformers' dequantized model", diff == 0, f"max |diff| {diff:.3g}")

    # train
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = train_checks(binary, family, dense_dir, fields, work, targets, ids)

    # merge: dense base
    m_dir = os.path.join(work, "merged")
    qlora(binary, "merge", dense_dir, adapter, m_dir)
    peft_dense = PeftModel.from_pretrained(load(dense_dir, dtype=torch.bfloat16), adapter).merge_and_unload()
    problems, n = same_tensors(shard(m_dir), peft_dense.state_dict())
    diff = max_diff(logits(load(m_dir), ids), logits(peft_dense, ids))
    check(family, "merge", f"dense base: tensors equal PEFT's merge_and_unload ({n}); loads, logits equal", not problems and diff == 0,
          "; ".join(problems[:3]) or f"max |diff| {diff:.3g}")

    # merge: NF4 base, re-quantized (PEFT merges into a Linear4bit by dequantize, add, quantize)
    mq_dir = os.path.join(work, "merged-nf4")
    qlora(binary, "merge", q_dir, adapter, mq_dir, "--requantize")
    peft_q = PeftModel.from_pretrained(load(dense_dir, quantization_config=NF4, dtype=torch.bfloat16), adapter).merge_and_unload()
    with tempfile.TemporaryDirectory() as t:
        peft_q.save_pretrained(t)
        problems, n = same_tensors(shard(mq_dir), load_file(shard(t)))
    diff = max_diff(logits(load(mq_dir), ids), logits(peft_q, ids))
    check(family, "merge", f"NF4 base --requantize: tensors equal PEFT's merge_and_unload ({n}); loads, logits equal",
          not problems and diff == 0, "; ".join(problems[:3]) or f"max |diff| {diff:.3g}")

    # merge: NF4 base to bf16 (merged_16bit): PEFT on transformers' dequantized NF4 model
    m16_dir = os.path.join(work, "merged-16bit")
    qlora(binary, "merge", q_dir, adapter, m16_dir)
    deq = load(dense_dir, quantization_config=NF4, dtype=torch.bfloat16)
    deq.dequantize()
    peft_16 = PeftModel.from_pretrained(deq, adapter).merge_and_unload()
    problems, n = same_tensors(shard(m16_dir), peft_16.state_dict())
    diff = max_diff(logits(load(m16_dir), ids), logits(peft_16, ids))
    check(family, "merge", f"NF4 base to bf16: tensors equal PEFT on transformers' dequantized model ({n}); logits equal",
          not problems and diff == 0, "; ".join(problems[:3]) or f"max |diff| {diff:.3g}")


def moe_checks(binary, family, config_class, fields, work):
    """A mixture of experts: qlora quantize writes what transformers 5 + bitsandbytes write (attention and dense
    MLPs 4-bit, experts and router bf16) and transformers loads it with its own 4-bit load's logits; dequantize
    gives transformers' dequantize(); merge is PEFT's (target_parameters included, where the file holds the
    experts one by one); what does not handle experts refuses with one line."""
    torch.manual_seed(0)
    dense_dir = os.path.join(work, "dense")
    model = AutoModelForCausalLM.from_config(config_class(**fields))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            elif "router" in n or n.endswith("mlp.gate.weight") or "sinks" in n or p.dim() == 3 or n.endswith("_bias"):
                p.copy_(0.1 * torch.randn(p.shape))   # transformers initialises some of these to zero: routing must matter
    model.to(torch.bfloat16).save_pretrained(dense_dir)
    ids = torch.randint(0, fields["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    for variant, flags, bnb in VARIANTS:
        out = os.path.join(work, "q-" + variant)
        theirs_q, _ = quantize_both(binary, family, variant, dense_dir, out, flags, bnb)
        ours_q = load(out)
        n4 = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in ours_q.modules())
        t4 = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in theirs_q.modules())
        experts = [p.dtype for n_, p in ours_q.named_parameters() if "experts" in n_]
        diff = max_diff(logits(ours_q, ids), logits(theirs_q, ids))
        check(family, "quantize", f"{variant}: from_pretrained: {n4} Linear4bit (transformers' own: {t4}), experts {sorted(set(map(str, experts)))}, "
              "logits equal transformers' own 4-bit load", n4 == t4 and diff == 0 and experts and all(d == torch.bfloat16 for d in experts),
              f"max |diff| {diff:.3g}")
    d_dir = os.path.join(work, "d")
    qlora(binary, "dequantize", os.path.join(work, "q-nf4-dq"), d_dir)
    theirs_d = load(dense_dir, quantization_config=NF4, dtype=torch.bfloat16)
    theirs_d.dequantize()
    diff = max_diff(logits(load(d_dir), ids), logits(theirs_d, ids))
    check(family, "dequantize", "loads as a plain model; logits equal transformers' dequantize()", diff == 0, f"max |diff| {diff:.3g}")
    # merge: LoRA on the attention, on the experts too (target_parameters), and PEFT's all-linear (the router too,
    # gate_up at 2r) merge as PEFT's merge_and_unload; gpt-oss keeps its experts fused in the file: refused
    fused = family == "gpt_oss"
    for name, config in (("attention", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
                         ("experts", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                          target_parameters=["experts.gate_up_proj", "experts.down_proj"])),
                         ("all-linear", dict(target_modules="all-linear"))):
        adapter, merged = os.path.join(work, name + "-adapter"), os.path.join(work, name + "-merged")
        torch.manual_seed(3)
        pm = get_peft_model(load(dense_dir, dtype=torch.bfloat16), LoraConfig(r=4, lora_alpha=8, **config))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape) * 0.05)
        pm.save_pretrained(adapter)
        r = subprocess.run([binary, "merge", dense_dir, adapter, merged], capture_output=True, text=True)
        if fused and "target_parameters" in config:
            lines = r.stderr.strip().splitlines()
            check(family, "merge", "LoRA on experts the file keeps fused is refused with one line, nothing written",
                  r.returncode != 0 and len(lines) == 1 and "fused" in lines[0] and not os.path.exists(merged), lines[0] if lines else "")
            continue
        peft_merged = PeftModel.from_pretrained(load(dense_dir, dtype=torch.bfloat16), adapter).merge_and_unload()
        with tempfile.TemporaryDirectory() as t:
            peft_merged.save_pretrained(t)
            problems, n = same_tensors(shard(merged), load_file(shard(t))) if r.returncode == 0 else ([r.stderr.strip()], 0)
        diff = max_diff(logits(load(merged), ids), logits(peft_merged, ids)) if r.returncode == 0 else float("inf")
        check(family, "merge", f"{name} adapter: tensors equal PEFT's merge_and_unload as saved ({n}); loads, logits equal",
              not problems and diff == 0, "; ".join(problems[:3]) or f"max |diff| {diff:.3g}")
    if family == "gpt_oss":
        # gpt-oss' published format: the experts as MXFP4 blocks and scales (random bytes, every scale 100-140),
        # read by qlora dequantize as transformers' Mxfp4Config(dequantize=True) reads them
        from transformers import Mxfp4Config
        mx_dense, mx_dir, mx_out = (os.path.join(work, n) for n in ("mxfp4-dense", "mxfp4", "mxfp4-bf16"))
        # MXFP4 packs 32 values a block: every expert input a multiple of 32 (gpt-oss' 2880 is 90 of them)
        AutoModelForCausalLM.from_config(config_class(**dict(fields, intermediate_size=64))).to(torch.bfloat16).save_pretrained(mx_dense)
        os.makedirs(mx_dir)
        g = torch.Generator().manual_seed(4)
        packed = {}
        for k, v in load_file(shard(mx_dense)).items():
            if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
                e, n_in, n_out = v.shape
                packed[k + "_blocks"] = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
                packed[k + "_scales"] = torch.randint(100, 141, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
            else:
                packed[k] = v
        safetensors.torch.save_file(packed, shard(mx_dir), metadata={"format": "pt"})
        with open(os.path.join(mx_dense, "config.json")) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                                          "model.embed_tokens", "lm_head"]}
        with open(os.path.join(mx_dir, "config.json"), "w") as f:
            json.dump(cfg, f)
        qlora(binary, "dequantize", mx_dir, mx_out)
        theirs_mx = load(mx_dir, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
        problems, n = same_tensors(shard(mx_out), theirs_mx.state_dict())
        diff = max_diff(logits(load(mx_out), ids), logits(theirs_mx, ids))
        check(family, "dequantize", f"MXFP4 experts: tensors equal Mxfp4Config(dequantize=True)'s ({n}); loads as plain bf16, logits equal",
              not problems and diff == 0, "; ".join(problems[:3]) or f"max |diff| {diff:.3g}")
    data = os.path.join(work, "data.jsonl")
    with open(data, "w") as f:
        f.write(json.dumps({"input_ids": list(range(16))}) + "\n")
    # export writes what llama.cpp's converter writes (GGUFQuantizeTests; check_gguf_client.py runs the files in
    # llama.cpp), with the tokenizer the converter reads: Mixtral's SentencePiece one here. llama.cpp's qwen3moe has
    # no dense MLP, so this Qwen3-MoE's dense first layer is refused; gpt-oss' converter reads tokenizer.json alone.
    gguf_out = os.path.join(work, "x.gguf")
    if family == "mixtral":
        shutil.copy(os.path.join(HERE, "gguf", "llama-tiny", "tokenizer.model"), dense_dir)
    r = subprocess.run([binary, "export", dense_dir, gguf_out, "--type", "f16"], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    if family == "mixtral":
        check(family, "export", "writes a GGUF", r.returncode == 0 and os.path.getsize(gguf_out) > 0, r.stderr.strip()[-300:])
    else:
        why = "mlp_only_layers" if family == "qwen3_moe" else "tokenizer.json"
        check(family, "export", f"refused with one line naming {why}, nothing written",
              r.returncode != 0 and len(lines) == 1 and why in lines[0] and not os.path.exists(gguf_out), lines[0] if lines else "")
    if family == "mixtral":
        # LoRA on the attention; the router and experts frozen in bf16.
        train_checks(binary, family, dense_dir, fields, work, ["q_proj", "k_proj", "v_proj", "o_proj"], ids)
        return
    # Qwen3-MoE's dense first layer and gpt-oss are not trained here: refused with one line.
    args = ["train", "--model", dense_dir, "--data", data, "--steps", "1", "--seq-len", "16", "--out", os.path.join(work, "a")]
    r = subprocess.run([binary, *args], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    check(family, "train", "refused with one line, nothing written", r.returncode != 0 and len(lines) == 1
          and not os.path.exists(os.path.join(work, "a")), lines[0] if lines else "")


def main():
    binary = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release/qlora")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, safetensors {safetensors.__version__}, "
          f"Python {sys.version.split()[0]}; {binary}", flush=True)
    for family, config_class, fields in FAMILIES:
        with tempfile.TemporaryDirectory(prefix=f"interop-{family}-") as work:
            try:
                family_checks(binary, family, config_class, fields, work)
            except Exception as e:  # a crash is a failed check of the family, named
                check(family, "-", f"stopped: {type(e).__name__}: {e}", False)
    for family, config_class, fields in MOE:
        with tempfile.TemporaryDirectory(prefix=f"interop-{family}-") as work:
            try:
                moe_checks(binary, family, config_class, fields, work)
            except Exception as e:
                check(family, "-", f"stopped: {type(e).__name__}: {e}", False)
    failed = sum(not ok for _, _, ok in results)
    print(f"{len(results) - failed} of {len(results)} checks passed")
    sys.exit(failed)


if __name__ == "__main__":
    main()
