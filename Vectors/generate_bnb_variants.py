"""Golden vectors for every bitsandbytes 4-bit checkpoint variant transformers writes (issue 12).

A tiny random Llama (1 layer, hidden 64, 4 heads, 2 KV heads, intermediate 64, vocab 32, untied
lm_head) saved in bf16 (`dense/`), then loaded by transformers with `BitsAndBytesConfig` (NF4,
double quant, blocksize 64, bf16 compute) on CPU and saved with `save_pretrained`:

- `nf4-{uint8,bfloat16,float16,float32}/`: `bnb_4bit_quant_storage` = that dtype. The packed
  weight is the uint8 layout's bytes viewed as the storage dtype: shape [ceil(n/2) / itemsize, 1].
- `nf4-forward-bf16/`: the uint8 model saved after one eval-mode, no-grad CPU forward pass. On a
  CPU with AVX512-BF16, bitsandbytes then repacks each weight for its CPU kernel
  (`_convert_weight_packed_for_cpu`: absmax dequantized and cast to bf16) and `save_pretrained`
  undoes it (`_convert_weight_packed_for_cpu_inverse`): the bf16 absmax is double-quantized
  again in the weight's dtype, so the file says `nested_dtype: "bfloat16"`, its offset is a bf16
  mean, and the absmax bytes differ.
- `fp16-forward/`: the same from a model loaded in float16: `nested_dtype: "float16"`.

`expected.safetensors` holds, per variant (`uint8` for the four storages, which are checked to
dequantize identically) and weight, the fp32 absmax bitsandbytes' `dequantize_4bit` uses for the
saved file (`QuantState.from_dict`), and for q_proj, k_proj and down_proj the dequantized weight
(in its quant-state dtype). The script checks that transformers' own reload gives the same values.

Run: .venv/bin/python Vectors/generate_bnb_variants.py            (writes Vectors/bnb_variants/)
     .venv/bin/python Vectors/generate_bnb_variants.py --check DIR
         loads DIR, qlora's `qlora quantize Vectors/bnb_variants/dense DIR --quant-storage bfloat16`,
         with AutoModelForCausalLM.from_pretrained on CPU and compares its tensors and logits
         with transformers' own quantization of the same model (not a vector; run by hand).
"""
import json
import os
import shutil
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import transformers
import bitsandbytes
import bitsandbytes.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

assert bitsandbytes.__version__ == "0.50.2", bitsandbytes.__version__
torch.set_num_threads(1)
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bnb_variants")
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
WEIGHTS = [f"model.layers.0.{p}.weight" for p in PROJ]
DEQUANTIZED = WEIGHTS[:2] + WEIGHTS[-1:]  # the whole dequantized weight is kept for these (size); absmax for all
STORAGES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IDS = torch.tensor([[1, 5, 9, 30, 2, 17, 4, 11]])


def bnb_config(storage):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=storage)


def quantized(dense_dir, storage=torch.uint8, dtype=torch.bfloat16):
    return LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=bnb_config(storage), dtype=dtype, device_map="cpu")


def save(model, name):
    """save_pretrained, keeping only config.json and model.safetensors (the bytes tests read)."""
    d = os.path.join(HERE, name)
    model.save_pretrained(d, safe_serialization=True)
    for f in os.listdir(d):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(d, f))
    return d


def read_back(d, weight):
    """What bitsandbytes makes of one saved weight: its quant state from the file, the fp32
    absmax dequantize_4bit uses, and the dequantized weight."""
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        packed = f.get_tensor(weight)
        qs = {k[len(weight) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(weight + ".")}
    state = F.QuantState.from_dict(qs, device="cpu")
    absmax = F.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset  # as dequantize_4bit does
    return packed, state, absmax.float(), F.dequantize_4bit(packed, state)


def main():
    assert F.has_avx512bf16(), "the forward-pass variants need a CPU with AVX512-BF16 (bitsandbytes repacks only there)"
    shutil.rmtree(HERE, ignore_errors=True)
    os.makedirs(HERE)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=32, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    dense = LlamaForCausalLM(cfg).to(torch.bfloat16)
    dense_dir = save(dense, "dense")

    expected, cases = {}, {}
    for name, storage in STORAGES.items():
        d = save(quantized(dense_dir, storage), f"nf4-{name}")
        cases[f"nf4-{name}"] = {"quant_storage": name, "forward": False, "dtype": "bfloat16", "nested_dtype": "float32"}
    for name, dtype in (("nf4-forward-bf16", torch.bfloat16), ("fp16-forward", torch.float16)):
        m = quantized(dense_dir, torch.uint8, dtype)
        m.eval()
        with torch.no_grad():
            m(input_ids=IDS)
        assert getattr(m.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False)
        save(m, name)
        cases[name] = {"quant_storage": "uint8", "forward": True, "dtype": str(dtype)[6:], "nested_dtype": str(dtype)[6:]}

    # The dequantized weights: once for the four storages (checked equal here), once per forward variant.
    for case, p in cases.items():
        d = os.path.join(HERE, case)
        reloaded = AutoModelForCausalLM.from_pretrained(d, device_map="cpu")
        for w in WEIGHTS:
            packed, state, absmax, deq = read_back(d, w)
            nested = state.state2.dtype
            assert str(nested)[6:] == p["nested_dtype"], (case, w, nested)
            n = state.shape.numel()
            assert packed.dtype == STORAGES[p["quant_storage"]] and packed.shape == ((n + 1) // 2 // packed.element_size(), 1), (case, w)
            mod = reloaded.get_submodule(w[: -len(".weight")])
            assert torch.equal(F.dequantize_4bit(mod.weight.data, mod.weight.quant_state), deq), (case, w)
            key = "uint8" if not p["forward"] else case
            if p["forward"] or case == "nf4-uint8":
                if w in DEQUANTIZED:
                    expected[f"{key}.{w}.dequantized"] = deq.contiguous()
                expected[f"{key}.{w}.absmax"] = absmax.contiguous()
            else:
                assert torch.equal(deq, read_back(os.path.join(HERE, "nf4-uint8"), w)[3]), (case, w)
                assert torch.equal(absmax, expected[f"uint8.{w}.absmax"]), (case, w)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__}
    for p in cases.values():
        p.update(versions, weights=WEIGHTS, dequantized=DEQUANTIZED)
    meta = {"cases": json.dumps(cases, sort_keys=True)}  # one key, so the file's bytes are reproducible
    save_file(expected, os.path.join(HERE, "expected.safetensors"), metadata=meta)
    print("bnb_variants:", sorted(cases), len(expected), "tensors")


def check(ours_dir):
    """qlora's --quant-storage bfloat16 output, loaded by transformers, against transformers' own."""
    dense_dir = os.path.join(HERE, "dense")
    theirs = quantized(dense_dir, torch.bfloat16)
    cfg = json.load(open(os.path.join(ours_dir, "config.json")))
    qc = cfg["quantization_config"]
    print("qlora's quantization_config:", json.dumps(qc, sort_keys=True))
    if isinstance(qc.get("llm_int8_threshold"), int):
        # Known qlora bug (fixed separately): json writes 6.0 as 6, which transformers refuses
        # ("llm_int8_threshold must be a float"). Load a copy with that one value patched.
        import tempfile
        patched = tempfile.mkdtemp()
        for f in os.listdir(ours_dir):
            shutil.copy(os.path.join(ours_dir, f), patched)
        qc["llm_int8_threshold"] = float(qc["llm_int8_threshold"])
        json.dump(cfg, open(os.path.join(patched, "config.json"), "w"))
        print("patched llm_int8_threshold to", qc["llm_int8_threshold"], "in a copy:", patched)
        ours_dir_loaded = patched
    else:
        ours_dir_loaded = ours_dir
    ours = AutoModelForCausalLM.from_pretrained(ours_dir_loaded, device_map="cpu")
    print("loaded: quantization_config", ours.config.quantization_config.to_dict()["bnb_4bit_quant_storage"],
          "q_proj weight", ours.model.layers[0].self_attn.q_proj.weight.dtype, tuple(ours.model.layers[0].self_attn.q_proj.weight.shape))
    same = True
    with safe_open(os.path.join(ours_dir, "model.safetensors"), "pt") as a:
        ref = os.path.join(HERE, "nf4-bfloat16", "model.safetensors")
        with safe_open(ref, "pt") as b:
            assert set(a.keys()) == set(b.keys()), set(a.keys()) ^ set(b.keys())
            for k in b.keys():
                x, y = a.get_tensor(k), b.get_tensor(k)
                if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                    same = False
                    print("differs:", k, x.dtype, tuple(x.shape), y.dtype, tuple(y.shape))
    print("every tensor byte-identical to transformers' nf4-bfloat16:", same)
    with torch.no_grad():
        for m in (ours, theirs):
            m.eval()
        lo, lt = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    print("logits", lo.dtype, tuple(lo.shape), "identical:", torch.equal(lo, lt), "max |diff|", (lo.float() - lt.float()).abs().max().item())
    # PEFT's merge_and_unload on a bf16-storage base keeps the storage (Params4bit(**weight.__dict__)).
    import peft
    base = quantized(dense_dir, torch.bfloat16)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))
    merged = pm.merge_and_unload()
    w = merged.model.layers[0].self_attn.q_proj.weight
    print("PEFT merge_and_unload keeps quant_storage:", w.dtype, tuple(w.shape), w.quant_storage, "nested", w.quant_state.state2.dtype)
    return same and torch.equal(lo, lt)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(0 if check(sys.argv[2]) else 1)
    main()
