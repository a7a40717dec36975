"""One QLoRA decoder-layer step of the Python stack on this CPU, for the same-machine ratio
against `qlora memory --measure` (Sources/QLoRA/QLoRA.docc/Training.md).

transformers + bitsandbytes + PEFT: a one-layer LlamaForCausalLM with llama-2-7b's layer shapes
(hidden 4096, intermediate 11008, 32 heads) and a 256-token vocabulary (so the head costs next to
nothing), NF4 + double quant, bf16 compute, SDPA attention, LoRA r=16 on all seven projections;
the median of 3 timed forward + backward steps after one warm-up, torch on 2 threads.

With --input-grad the layer's input requires a gradient (`enable_input_require_grads()`, as
transformers sets it for gradient checkpointing): the backward then computes the gradient to the
layer's input through q, k, v, gate and up too, as every layer but the first does in a deeper
model. Without it, autograd skips those five input gradients (the embedding is frozen).

Run: .venv/bin/python Benchmarks/python_layer_step.py [--input-grad] [tokens ...]   (default 512 2048)
"""
import os
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

torch.set_num_threads(2)


def main():
    args = sys.argv[1:]
    input_grad = "--input-grad" in args
    lengths = [int(a) for a in args if a != "--input-grad"] or [512, 2048]
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=256, max_position_embeddings=4096, torch_dtype="bfloat16")
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
            dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cpu")
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if input_grad:
        pm.enable_input_require_grads()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, {torch.get_num_threads()} threads")
    for n in lengths:
        ids = torch.randint(0, 256, (1, n))
        times = []
        for i in range(4):
            t = time.perf_counter()
            pm(input_ids=ids, labels=ids).loss.backward()
            times.append(time.perf_counter() - t)
            pm.zero_grad(set_to_none=True)
        s = sorted(times[1:])[1]
        print(f"{n} tokens: {s:.2f} s per step, {n / s:.0f} tokens/s (forward + backward, one layer"
              f"{', gradient to its input' if input_grad else ', no gradient to its input'})")


if __name__ == "__main__":
    main()
