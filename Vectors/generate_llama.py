"""Golden vectors for a QLoRA training step through a whole Llama decoder stack (issue 7).

A tiny random Llama from transformers (2 layers, hidden 64, 4 heads, 2 KV heads, intermediate
128, vocab 256, Llama-3 rope scaling, untied lm_head), saved as a bf16 checkpoint; then loaded by
transformers with bitsandbytes NF4 + double quant (bf16 compute, eager attention) and wrapped by
PEFT with LoRA r=8 on all seven projections (fp32 adapters, B drawn non-zero so every gradient
is non-trivial). Recorded: the logits and loss of one batch, every LoRA gradient, and the
adapter after 3 AdamW steps on that batch. Torch runs with one thread.

Run: .venv/bin/python Vectors/generate_llama.py   (writes Vectors/llama/)
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
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

torch.set_num_threads(1)
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_name(n):
    return n.replace("base_model.model.", "").replace(".default", "")


def save_dense_and_nf4(dense, out_dir):
    """`dense` in bf16 with its norms away from 1 (and biases away from 0) so that they matter,
    saved as out_dir/tiny; then transformers' own NF4 + double quant of it saved as
    out_dir/tiny-nf4 (the bnb-4bit layout transformers writes). Returns the NF4 model."""
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape))
    base_dir = os.path.join(out_dir, "tiny")
    dense.to(torch.bfloat16).save_pretrained(base_dir, safe_serialization=True)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation="eager", device_map="cpu")
    model.save_pretrained(os.path.join(out_dir, "tiny-nf4"), safe_serialization=True)
    return model


def record_training_step(model, targets, record_logits_dtype=False, config_extra=None, init=None, save_dir=None,
                         train=False):
    """PEFT LoRA r=8 (alpha 16, fp32 adapters, B drawn non-zero so every gradient is non-trivial)
    on `targets` of a loaded model, and what qlora's golden tests compare: the adapters as drawn
    ("init."), one batch's ids and labels (with ignored positions), logits and loss, every LoRA
    gradient ("grad."), the adapters after 3 torch AdamW steps at lr 1e-3 ("step3.") and the
    three losses. generate_families.py records each family with it too.

    Every trainable parameter is recorded, in its own dtype (fp32 for LoRA; a DoRA magnitude
    vector and a modules_to_save copy are trainable too). generate_adapter_training.py passes
    `config_extra` (more LoraConfig fields: use_dora, modules_to_save, task_type), `init` (values,
    by recorded name, copied into parameters after B is drawn: the existing goldens' lora_A),
    `save_dir` (PEFT's save_pretrained after the 3 steps, its model card removed) and `train`
    (the step in train mode, as a Trainer runs it; the goldens of this script and of
    generate_families.py ran in the eval mode from_pretrained leaves, where bitsandbytes' CPU
    AVX512-BF16 path repacks every 4-bit weight whose input does not require grad (layer 0's
    q/k/v) on its first forward and computes it with a bf16 absmax)."""
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, bias="none",
                                          **(config_extra or {})))
    if train:
        pm.train()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for n, p in pm.named_parameters():
            if init is not None and adapter_name(n) in init:
                p.copy_(init[adapter_name(n)])
    tensors = {}
    lora = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    for n, p in lora.items():
        tensors["init." + adapter_name(n)] = p.detach().clone()

    ids = torch.randint(0, 256, (2, 16), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 10:] = -100
    tensors["input_ids"] = ids.to(torch.int64)
    tensors["labels"] = labels.to(torch.int64)

    out = pm(input_ids=ids, labels=labels)
    tensors["logits"] = out.logits.detach().float()
    if record_logits_dtype:
        tensors["logits_dtype_is_bf16"] = torch.tensor([1 if out.logits.dtype == torch.bfloat16 else 0])
    tensors["loss"] = out.loss.detach().float().reshape(1)
    out.loss.backward()
    for n, p in lora.items():
        tensors["grad." + adapter_name(n)] = p.grad.detach().clone()

    opt = torch.optim.AdamW(list(lora.values()), lr=1e-3)  # weight decay 0.01, torch's defaults
    losses = [out.loss.item()]
    opt.step()
    for _ in range(1, 3):
        opt.zero_grad()
        o = pm(input_ids=ids, labels=labels)
        o.loss.backward()
        losses.append(o.loss.item())
        opt.step()
    for n, p in lora.items():
        tensors["step3." + adapter_name(n)] = p.detach().clone()
    tensors["step_losses"] = torch.tensor(losses, dtype=torch.float32)
    if save_dir is not None:
        pm.save_pretrained(save_dir)
        os.remove(os.path.join(save_dir, "README.md"))  # PEFT's model card: not needed
    return tensors, out.loss.item(), losses


def main():
    for d in ("tiny", "tiny-nf4"):  # only what this script writes: ops.safetensors is generate_llama_ops.py's
        shutil.rmtree(os.path.join(HERE, d), ignore_errors=True)
    os.makedirs(HERE, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32},
                      torch_dtype="bfloat16")
    model = save_dense_and_nf4(LlamaForCausalLM(cfg), HERE)

    tensors, loss, losses = record_training_step(model, TARGETS, record_logits_dtype=True)

    meta = {"transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
            "torch": torch.__version__, "r": "8", "lora_alpha": "16", "lr": "0.001", "weight_decay": "0.01", "attn": "eager",
            "targets": json.dumps(TARGETS)}
    save_file(tensors, os.path.join(HERE, "golden.safetensors"), metadata=meta)
    print("llama: loss", loss, "losses", losses, len(tensors), "tensors")


if __name__ == "__main__":
    main()
