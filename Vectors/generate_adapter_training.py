"""Golden QLoRA training steps for the adapter kinds beyond plain LoRA: DoRA and modules_to_save.

The same step as llama/golden.safetensors and families/qwen2/golden.safetensors
(generate_llama.py's record_training_step: PEFT 0.21.2 LoRA r=8, alpha 16, dropout 0, the seven
projections, fp32 adapters, lora_B drawn non-zero from generator 7, the same batch, torch AdamW
lr 1e-3 with its defaults for 3 steps, torch on one thread), on each family's `tiny-nf4`
checkpoint as transformers 5.23 loads it (NF4 + double quant, bf16 compute, eager attention),
with one more LoraConfig field per case and task_type CAUSAL_LM (what `qlora train` writes):

  dora                   use_dora=True: a fp32 magnitude vector per module, as PEFT initializes it
                         (the row norms of the dequantized bf16 weight, B being zero then)
  modules-to-save        modules_to_save=["lm_head"]: a trainable bf16 copy of the (untied) head
  modules-to-save-embed  modules_to_save=["embed_tokens"] (the Llama only, to keep Vectors/ small)

Unlike golden.safetensors these steps run in train mode (`pm.train()`, as a Trainer does). The
old goldens ran in the eval mode from_pretrained leaves, where bitsandbytes' CPU AVX512-BF16 path
repacks each 4-bit weight whose input does not require grad (layer 0's q/k/v) on its first forward
(bf16 absmax, another kernel) and dequantize_4bit of a repacked weight is garbled, which DoRA's
weight norm would read. lora_A starts from golden.safetensors' init values (PEFT draws it from
torch's global generator, whose state generate_llama.py / generate_families.py left after building
the model), lora_B is drawn as there; both are checked equal to golden.safetensors'. The script
first re-records the plain-LoRA golden from tiny-nf4 in eval mode and stops unless it equals
golden.safetensors bit for bit, then runs plain LoRA in train mode (not saved; its losses are
`plain_step_losses`): step 0 of each modules_to_save case must equal it bit for bit.

Written per family (FAMILY_DIR = Vectors/llama, Vectors/families/qwen2):
  FAMILY_DIR/golden-CASE.safetensors   input_ids, labels, loss, step_losses, plain_step_losses,
        logits_dtype_is_bf16; for dora also logits (F32), every gradient (lora_A, lora_B fp32,
        lora_magnitude_vector fp32) and init.*lora_magnitude_vector.weight; for modules-to-save
        logits, every LoRA gradient (= plain LoRA's in train mode) and the copy's gradient (BF16,
        the parameter's dtype); for modules-to-save-embed only the copy's gradient (its logits and
        LoRA gradients are modules-to-save's, checked). Names are the PEFT parameter names without
        "base_model.model." and ".default" (e.g. lm_head.modules_to_save.weight). The copy starts
        as the checkpoint's own tensor (checked, left out). Metadata "cases": JSON.
  FAMILY_DIR/adapter-CASE/   adapter_config.json + adapter_model.safetensors as PEFT's
        save_pretrained writes them after the 3 steps (model card removed). They hold the step-3
        values (step3.* of the old layout; checked bit for bit against the live parameters):
        recorded K -> "base_model.model." + K, with lora_magnitude_vector's ".weight" dropped and
        "X.modules_to_save.weight" -> "X.weight".

Run after generate_llama.py and generate_families.py (that one empties Vectors/families/):
    .venv/bin/python Vectors/generate_adapter_training.py      (~7 s)
"""
import json
import os
import shutil
import sys
import tempfile
import warnings

# PEFT writes target_modules in set order, which follows str hashes (see generate_interop.py).
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import transformers
import peft
import bitsandbytes
import safetensors
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from generate_llama import record_training_step

assert peft.__version__ == "0.21.2", peft.__version__
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)
VECTORS = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {  # name: (directory under Vectors/, LoRA targets, whether golden.safetensors has logits_dtype_is_bf16)
    "llama": ("llama", TARGETS, True),
    "qwen2": ("families/qwen2", TARGETS, False),
}
CASES = {  # name: (LoraConfig fields, the module whose trainable copy modules_to_save makes, families)
    "dora": ({"use_dora": True}, None, ["llama", "qwen2"]),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, "lm_head", ["llama", "qwen2"]),
    "modules-to-save-embed": ({"modules_to_save": ["embed_tokens"]}, "model.embed_tokens", ["llama"]),
}
VERSIONS = {"transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
            "torch": torch.__version__.split("+")[0], "safetensors": safetensors.__version__}


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def load(rel):
    m = AutoModelForCausalLM.from_pretrained(os.path.join(VECTORS, rel, "tiny-nf4"), dtype=torch.bfloat16,
                                             attn_implementation="eager", device_map="cpu")
    m.name_or_path = f"Vectors/{rel}/tiny-nf4"  # PEFT's base_model_name_or_path: the repository path
    return m


def saved_key(recorded):
    """The name PEFT's save_pretrained gives a recorded parameter (get_peft_model_state_dict)."""
    k = "base_model.model." + recorded
    if k.endswith(".lora_magnitude_vector.weight"):
        return k[: -len(".weight")]
    return k.replace(".modules_to_save.", ".")


def dtype_name(t):
    return str(t.dtype).replace("torch.", "")


def family(fam, tmp):
    rel, targets, has_dtype_flag = FAMILIES[fam]
    fam_dir = os.path.join(VECTORS, rel)
    ref = load_file(os.path.join(fam_dir, "golden.safetensors"))
    init_a = {k[len("init."):]: v for k, v in ref.items() if k.startswith("init.") and ".lora_A." in k}
    checkpoint = load_file(os.path.join(fam_dir, "tiny-nf4", "model.safetensors"))

    # The plain-LoRA golden again, from tiny-nf4 and the recorded lora_A: it must be golden.safetensors.
    plain, _, _ = record_training_step(load(rel), targets, record_logits_dtype=has_dtype_flag, init=init_a)
    assert set(plain) == set(ref), sorted(set(plain) ^ set(ref))
    bad = [k for k in ref if not same(plain[k], ref[k])]
    assert not bad, f"{fam}: plain LoRA from tiny-nf4 differs from golden.safetensors: {bad[:5]}"
    print(f"{fam}: plain LoRA re-recorded from tiny-nf4 equals golden.safetensors ({len(ref)} tensors)")

    # The plain-LoRA step in train mode (not saved): step 0 of every modules_to_save case must equal it.
    plain_train, _, plain_losses = record_training_step(load(rel), targets, record_logits_dtype=True, init=init_a,
                                                        config_extra={"task_type": "CAUSAL_LM"}, train=True)
    rel_err = lambda k: ((plain_train[k] - ref[k]).abs().max() / ref[k].abs().max()).item()
    drift = {"logits": rel_err("logits"), "grad": max(rel_err(k) for k in ref if k.startswith("grad."))}
    print(f"{fam}: plain LoRA in train mode: losses {plain_losses}; against golden.safetensors (eval mode) "
          f"max |d logits|/max|logits| {drift['logits']:.3g}, max over LoRA grads {drift['grad']:.3g}")

    summary, first_mts = {}, None
    for case, (fields, mts_module, fams) in CASES.items():
        if fam not in fams:
            continue
        save_dir = os.path.join(tmp, f"{fam}-{case}")
        t, loss, losses = record_training_step(load(rel), targets, record_logits_dtype=True,
                                               config_extra=dict(fields, task_type="CAUSAL_LM"), init=init_a,
                                               save_dir=save_dir, train=True)
        trainable = {k[len("init."):]: dtype_name(v) for k, v in t.items() if k.startswith("init.")}
        for k, v in ref.items():  # the LoRA init is the existing golden's
            if k.startswith("init."):
                assert same(t[k], v), k
        out, left_out = {}, []
        for k in ("input_ids", "labels", "loss", "step_losses", "logits_dtype_is_bf16"):
            out[k] = t[k]
        out["plain_step_losses"] = plain_train["step_losses"]
        if mts_module is None:  # DoRA: a different forward from step 0
            out["logits"] = t["logits"]
            for k, v in t.items():
                if k.startswith("grad.") or (k.startswith("init.") and ".lora_magnitude_vector." in k):
                    out[k] = v
            left_out += [k for k in t if k.startswith("init.") and k not in out]
            same_as = "init.* lora_A/lora_B: golden.safetensors'"
        else:
            copy = f"{mts_module}.modules_to_save.weight"
            assert same(t["init." + copy], checkpoint[f"{mts_module}.weight"]), copy  # a copy of the checkpoint's
            for k in ["logits", "loss"] + [k for k in t if k.startswith("grad.") and k != "grad." + copy]:
                assert same(t[k], plain_train[k]), f"{case}: step 0 is the plain step: {k}"
            if first_mts is None:  # this file also serves as the plain train-mode step 0
                first_mts = case
                out["logits"] = t["logits"]
                out.update({k: v for k, v in t.items() if k.startswith("grad.")})
                same_as = ("init.* lora_A/lora_B: golden.safetensors'; logits, loss and the LoRA grad.* are also "
                           "plain LoRA's in train mode (checked)")
            else:
                out["grad." + copy] = t["grad." + copy]
                same_as = (f"init.* lora_A/lora_B: golden.safetensors'; logits and the LoRA grad.*: golden-{first_mts}."
                           "safetensors' (plain LoRA's step 0 in train mode; checked)")
            left_out += sorted(k for k in t if k not in out and not k.startswith("step3."))

        # The adapter PEFT saved holds exactly the step-3 parameters.
        saved = load_file(os.path.join(save_dir, "adapter_model.safetensors"))
        step3 = {saved_key(k[len("step3."):]): v for k, v in t.items() if k.startswith("step3.")}
        assert set(saved) == set(step3), sorted(set(saved) ^ set(step3))
        assert all(same(saved[k], step3[k]) for k in saved), case

        meta = {"family": fam, "case": case, "versions": VERSIONS, "base": f"Vectors/{rel}/tiny-nf4",
                "lora_config": dict(fields, r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                    target_modules=targets),
                "lr": 1e-3, "weight_decay": 0.01, "optimizer": "torch.optim.AdamW defaults (single-tensor on CPU)",
                "attn": "eager", "torch_threads": 1, "steps": 3,
                "trainable_dtypes": trainable,
                "step3": f"Vectors/{rel}/adapter-{case}/adapter_model.safetensors",
                "saved_names": "recorded K -> 'base_model.model.' + K; '.lora_magnitude_vector.weight' -> "
                               "'.lora_magnitude_vector'; 'X.modules_to_save.weight' -> 'X.weight'",
                "mode": "train (pm.train(); no bitsandbytes CPU repacking)",
                "same_as": same_as,
                "left_out": sorted({k.split(".")[0] + ".*." + ".".join(k.split(".")[-2:]) for k in left_out}),
                "plain_step_losses": "plain LoRA's three losses in train mode (golden.safetensors' are eval mode)",
                "golden_eval_mode_drift": drift}
        if mts_module is not None:
            meta["init_copy"] = f"tiny-nf4/model.safetensors {mts_module}.weight (bf16; checked)"
        dest = os.path.join(fam_dir, f"golden-{case}.safetensors")
        save_file(out, dest, metadata={"cases": json.dumps(meta, sort_keys=True)})
        adapter_dest = os.path.join(fam_dir, f"adapter-{case}")
        shutil.rmtree(adapter_dest, ignore_errors=True)
        shutil.copytree(save_dir, adapter_dest)
        extra = {k: v for k, v in trainable.items() if ".lora_A." not in k and ".lora_B." not in k}
        print(f"{fam} {case}: loss {loss!r} losses {losses} (plain {ref['step_losses'].tolist()}); "
              f"{len(out)} tensors; extra trainable dtypes {sorted(set(extra.values()))}")
        summary[case] = losses
    return summary, plain_losses


def main():
    tmp = tempfile.mkdtemp(prefix="adapter_training_")
    try:
        for fam in FAMILIES:
            family(fam, tmp)
    finally:
        shutil.rmtree(tmp)
    total = 0
    for rel, _, _ in FAMILIES.values():
        d = os.path.join(VECTORS, rel)
        for case in CASES:
            for p in [os.path.join(d, f"golden-{case}.safetensors")] + \
                     [os.path.join(d, f"adapter-{case}", f) for f in ("adapter_config.json", "adapter_model.safetensors")]:
                if os.path.exists(p):
                    total += os.path.getsize(p)
    print(f"written: {total} bytes")


if __name__ == "__main__":
    main()
