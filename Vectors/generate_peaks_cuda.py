"""The GPU's side of `qlora fit --runtime cuda` (issue 21): what CUDA really holds for the steps
`Vectors/generate_peaks.py` measures on CPU, and the longest sequence that fits a memory cap.

For each configuration of generate_peaks.py's grid (the same random 2-layer checkpoints, recipes,
lengths and batches) one training step runs on the GPU, its first as there:

    loss = model(input_ids=ids, labels=labels).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

and the script records torch.cuda.max_memory_allocated() and max_memory_reserved() above what
was allocated and reserved before the step, and (with --trace-allocator) the allocator's own
history of the step (torch.cuda.memory._record_memory_history), so that qlora's replay of the
same step (`StepTimeline.onCUDA`) can be held to it allocation by allocation.

The CUDA context is measured as what `torch.cuda.mem_get_info` says is used right after the
first CUDA call, less what the allocator reserves then.

--fit runs the published setting (Unsloth's benchmark: Llama 3.1 8B's shapes, all 32 layers,
QLoRA r=32 on all seven projections, batch 1, checkpointing) at a memory cap of 8, 12, 16, 24,
40, 48 and 80 GB (torch.cuda.set_per_process_memory_fraction; the context counted inside the
cap as on a card of that size) and bisects the longest sequence whose step does not run out of
memory, for each recipe: peft, peft-kbit, and TRL's SFTTrainer when trl is installed. The
weights are random (the memory does not depend on their values).

Run on a CUDA machine (nothing here runs without one):
    .venv/bin/python Vectors/generate_peaks_cuda.py [--only NAME,...] [--trace-allocator] [--fit]
Writes Vectors/memory/peaks_cuda.json with the GPU's name, its memory, and the versions.
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate_peaks as gp  # noqa: E402  (the CPU grid, its checkpoints and recipes)

FIT_CAPS_GB = [8, 12, 16, 24, 40, 48, 80]


def load(c, tmp):
    """The configuration's model on the GPU, wrapped as its recipe wraps it (generate_peaks.py's own loader)."""
    return gp.load_model(c, gp.checkpoint(c["arch"], tmp) if "arch" in c else c["dir"], device_map={"": 0})[1]


def step(model, batch, seq, vocab):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).cuda()
    labels = ids.clone()
    labels[:, :8] = -100
    model.train()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del loss, opt, ids, labels


def measure(c, tmp, trace):
    torch.cuda.empty_cache()
    model = load(c, tmp)
    torch.cuda.synchronize()
    base_alloc, base_res = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    if trace:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    t0 = time.time()
    step(model, c["batch"], c["seq"], model.config.vocab_size)
    torch.cuda.synchronize()
    rec = dict(name=c["name"], baseline_allocated=base_alloc, baseline_reserved=base_res,
               max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
               end_allocated=torch.cuda.memory_allocated(), end_reserved=torch.cuda.memory_reserved(),
               alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0), seconds=round(time.time() - t0, 2))
    if trace:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        # The step's allocator events, in order: action (alloc, free_requested, segment_alloc, ...) and size.
        rec["allocator_events"] = [[e["action"], e["size"]] for dev in snap["device_traces"] for e in dev]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def llama31_8b_dir(tmp):
    """Llama 3.1 8B's published shapes (meta-llama/Llama-3.1-8B config.json), random bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = os.path.join(tmp, "llama-3.1-8b")
    if not os.path.exists(d):
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192), tie_word_embeddings=False, torch_dtype="bfloat16")
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                m = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        m.save_pretrained(d)
        del m
        gc.collect()
        torch.cuda.empty_cache()
    return d


def fits(c, seq):
    try:
        model = load(dict(c, seq=seq), None)
        step(model, 1, seq, model.config.vocab_size)
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    model = None
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def largest(c, cap_bytes, total):
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
    lo, hi = 0, 1
    while fits(c, hi * 1024):
        lo, hi = hi * 1024, hi * 2
        if hi * 1024 > 1 << 20:
            break
    hi *= 1024
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if fits(c, mid):
            lo = mid
        else:
            hi = mid
    torch.cuda.set_per_process_memory_fraction(1.0)
    return lo or None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--trace-allocator", action="store_true")
    ap.add_argument("--fit", action="store_true", help="bisect the longest fitting length for Llama 3.1 8B at 8-80 GB caps")
    ap.add_argument("--out", default=os.path.join(HERE, "memory", "peaks_cuda.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("generate_peaks_cuda.py: no CUDA device here; run it on a machine with an NVIDIA GPU")
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    import transformers, peft, bitsandbytes
    doc = dict(about="generate_peaks_cuda.py: max_memory_allocated/reserved above the step's start for generate_peaks.py's grid on CUDA, "
                     "and (fit) the longest sequence of Llama 3.1 8B QLoRA r=32 all linear, batch 1, checkpointing, that runs without OOM at each cap",
               gpu=torch.cuda.get_device_name(), gpu_total_bytes=total, context_bytes_after_init=context,
               versions=dict(torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__, peft=peft.__version__,
                             bitsandbytes=bitsandbytes.__version__, python=sys.version.split()[0]),
               configs=[], fit=[])
    only = set(filter(None, args.only.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        for c in gp.grid():
            if only and c["name"] not in only and c["arch"] not in only:
                continue
            if not gp.runs_here(c):   # a row of another transformers release (its own venv)
                continue
            r = measure(c, tmp, args.trace_allocator)
            print(f"{r['name']}: allocated +{r['max_allocated'] - r['baseline_allocated']:,} reserved +{r['max_reserved'] - r['baseline_reserved']:,}", flush=True)
            doc["configs"].append(r)
        if args.fit:
            d = llama31_8b_dir(tmp)
            for recipe in ("peft", "peft-kbit"):
                for cap in FIT_CAPS_GB:
                    c = dict(dir=d, recipe=recipe, ckpt=True, r=32, targets="all", batch=1)
                    n = largest(c, cap * 1e9, total)
                    print(f"llama-3.1-8b {recipe} {cap} GB: {n}", flush=True)
                    doc["fit"].append(dict(model="llama-3.1-8b", recipe=recipe, cap_gb=cap, largest_seq_len=n))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
