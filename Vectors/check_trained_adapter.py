"""Check that PEFT loads an adapter `qlora train` saved (DoRA, modules_to_save): every tensor in
adapter_model.safetensors reaches the model unchanged, and the model runs.

    .venv/bin/python Vectors/check_trained_adapter.py BASE ADAPTER_DIR [ADAPTER_DIR ...]

BASE is the dense base checkpoint directory the adapter was trained on (e.g. Vectors/llama/tiny
for a run on Vectors/llama/tiny-nf4: the same weights). Prints, per adapter, its use_dora and
modules_to_save and the saved tensors missing from or differing in PEFT's state dict of the
loaded model; exits 1 unless none is.
"""
import sys

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    base, dirs = sys.argv[1], sys.argv[2:]
    bad = 0
    for d in dirs:
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), d)
        saved = load_file(d + "/adapter_model.safetensors")
        back = get_peft_model_state_dict(m)
        missing = [k for k in saved if k not in back]
        differ = [k for k in saved if k in back and not torch.equal(saved[k].to(back[k].dtype), back[k])]
        with torch.no_grad():
            finite = bool(torch.isfinite(m(torch.tensor([[1, 5, 17, 200, 3]])).logits).all())
        cfg = m.peft_config["default"]
        print(f"{d}: use_dora {cfg.use_dora}, modules_to_save {cfg.modules_to_save}; {len(saved)} tensors, "
              f"{len(missing)} missing, {len(differ)} differing; logits finite: {finite}")
        bad += len(missing) + len(differ) + (not finite)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
