"""Check a merged checkpoint made by another tool (e.g. qlora's merge) against PEFT's own merge
recorded by generate_peft_kinds.py in Vectors/peft_kinds/<case>/expected.json.

    .venv/bin/python Vectors/check_peft_kinds.py CASE DIR [--tolerance T]

DIR is laid out as transformers' save_pretrained writes it (config.json + model.safetensors).
It is loaded with AutoModelForCausalLM (bf16, fp32, or for dora-nf4 with the quantization_config
in its config.json: bitsandbytes 4-bit, bf16 compute), eager attention, eval mode, on the CPU
with one thread, as the generator ran; it is fed the case's input ids and its fp32 logits are
compared with expected.json. Prints the max abs difference; exits 1 unless every logit is within
the tolerance (default 0: equal).

CASE: dora-bf16, dora-f32, dora-nf4 (the re-quantized merge), dora-nf4-16bit (the merged-to-16-bit
export: a bf16 checkpoint without quantization_config), modules-to-save, modules-to-save-old
(same expectation as modules-to-save), resized-vocab, trainable-tokens.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
from transformers import AutoModelForCausalLM

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_kinds")
# case -> (expected.json folder, logits key, dtype to load with)
CASES = {
    "dora-bf16": ("dora-bf16", "logits", torch.bfloat16),
    "dora-f32": ("dora-f32", "logits", torch.float32),
    "dora-nf4": ("dora-nf4", "logits", torch.bfloat16),
    "dora-nf4-16bit": ("dora-nf4", "logits_merged_16bit", torch.bfloat16),
    "modules-to-save": ("modules-to-save", "logits", torch.bfloat16),
    "modules-to-save-old": ("modules-to-save", "logits", torch.bfloat16),
    "resized-vocab": ("resized-vocab", "logits", torch.bfloat16),
    "trainable-tokens": ("trainable-tokens", "logits", torch.bfloat16),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("dir", help="the merged checkpoint: config.json + model.safetensors")
    ap.add_argument("--tolerance", type=float, default=0.0, help="largest allowed |difference| of a logit (default 0)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    folder, key, dtype = CASES[args.case]
    with open(os.path.join(HERE, folder, "expected.json")) as f:
        expected = json.load(f)
    with open(os.path.join(args.dir, "config.json")) as f:
        cfg = json.load(f)
    quantized = "quantization_config" in cfg
    if quantized != (args.case == "dora-nf4"):
        print(f"FAIL: config.json {'has' if quantized else 'has no'} quantization_config, "
              f"which case {args.case} {'does not expect' if quantized else 'expects'}")
        return 1
    for k, v in expected.get("merged_config_changed", {}).items():
        if args.case != "dora-nf4-16bit" and cfg.get(k) != v:
            print(f"FAIL: config.json {k} = {cfg.get(k)!r}, PEFT's merge wrote {v!r}")
            return 1

    kwargs = {"dtype": dtype, "attn_implementation": "eager"}
    if quantized:
        kwargs["device_map"] = "cpu"  # transformers reads the bitsandbytes quantization_config from config.json
    model = AutoModelForCausalLM.from_pretrained(args.dir, **kwargs).eval()
    ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    want = torch.tensor([expected[key]], dtype=torch.float64)
    if tuple(logits.shape) != tuple(want.shape):
        print(f"FAIL: logits shape {tuple(logits.shape)}, expected {tuple(want.shape)}")
        return 1
    # Every expected value is an fp32 (or bf16) number written exactly, so compare in float64.
    diff = (logits.double() - want).abs()
    worst = diff.max().item()
    bad = int((diff > args.tolerance).sum()) + int(torch.isnan(diff).sum())
    where = tuple(int(i) for i in torch.nonzero(diff == worst)[0]) if worst > 0 else None
    print(f"{args.case}: max abs difference {worst!r}" + (f" at {where}" if where else "")
          + f", {bad} of {diff.numel()} logits over tolerance {args.tolerance}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
