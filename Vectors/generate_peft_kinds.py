"""Golden merges of every LoRA-type adapter kind PEFT 0.21.2 writes for a causal LM besides
plain LoRA: DoRA (bf16, fp32 and bnb-NF4 bases), modules_to_save, a resized vocabulary and
trainable tokens. Each is made on the tiny Llama of generate_llama.py (Vectors/llama/tiny and
tiny-nf4: hidden 64, 2 layers, vocab 256).

Written to Vectors/peft_kinds/<case>/:
  adapter/                 adapter_config.json + adapter_model.safetensors as PEFT's save_pretrained
                           writes them (its README.md model card removed)
  merged.safetensors       the tensors of `merge_and_unload()`'s model, as its save_pretrained writes
                           them, that differ from the base's (new-shaped ones included; for dora-nf4
                           every quant-state tensor of each re-quantized module)
  expected.json            versions, the merged config.json fields that differ from the base's
                           config.json, the changed tensor names, adapter tensor names/shapes/dtypes,
                           and the merged model's fp32 logits (eval mode, CPU, eager attention) for
                           fixed input ids, written as exact floats
  dora-nf4/merged_16bit.safetensors   what PEFT's bnb Linear4bit.merge computes before
                           re-quantizing (w_data, bf16), the "merged to 16-bit" export; expected.json
                           also has its logits and the SHA-256 of bitsandbytes' dequantization of every
                           re-quantized weight
  modules-to-save-old/adapter/        the modules-to-save adapter as PEFT < 0.7 wrote it by default
                           (adapter_model.bin, torch.save; the config with v0.6.2's fields): the
                           tensor key names never changed (see Vectors/README.md)

Every adapter directory is loaded back by PeftModel.from_pretrained onto a fresh base and merged
again; the script stops unless that merge writes the same bytes. Vectors/check_peft_kinds.py
compares another tool's merged checkpoint with expected.json.

Run: .venv/bin/python Vectors/generate_peft_kinds.py [--keep]   (~10 s; torch with one thread; --keep
     leaves PEFT's merged checkpoints in a temporary folder and prints their paths)
"""
import hashlib
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
import bitsandbytes.functional as bnbF
import safetensors
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import variants as lora_variants

assert peft.__version__ == "0.21.2", peft.__version__
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*4-bit linear may get different generations.*")
VECTORS = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(VECTORS, "peft_kinds")
TINY = os.path.join(VECTORS, "llama", "tiny")
TINY_NF4 = os.path.join(VECTORS, "llama", "tiny-nf4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [1, 5, 17, 200, 3, 255, 42, 7]
DT = {"bf16": torch.bfloat16, "f32": torch.float32, "nf4": torch.bfloat16}
VERSIONS = {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__, "safetensors": safetensors.__version__}
CONFIG_FIELDS = ["peft_type", "task_type", "r", "lora_alpha", "use_dora", "use_rslora", "target_modules",
                 "modules_to_save", "trainable_token_indices", "fan_in_fan_out", "bias", "lora_bias",
                 "init_lora_weights", "base_model_name_or_path", "inference_mode", "peft_version"]
# The fields of PEFT v0.6.2's LoraConfig and PeftConfig (src/peft/tuners/lora/config.py, src/peft/config.py),
# the last release whose save_pretrained defaulted to safe_serialization=False (adapter_model.bin).
V062_FIELDS = ["alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
               "init_lora_weights", "layers_pattern", "layers_to_transform", "lora_alpha", "lora_dropout",
               "modules_to_save", "peft_type", "r", "rank_pattern", "revision", "target_modules", "task_type"]


def rng(seed):
    return torch.Generator().manual_seed(seed)


def load_base(kind):
    """The tiny Llama as the case's base: bf16 or fp32 from llama/tiny, or llama/tiny-nf4 (its
    quantization_config: NF4, double quant, bf16 compute). name_or_path is what PEFT records as
    base_model_name_or_path: the repository-relative path, not this machine's."""
    if kind == "nf4":
        # Quantized on load from llama/tiny, as generate_llama.py made tiny-nf4 (main() checks that the
        # bytes are tiny-nf4's): transformers 5.23 cannot save a model loaded from a pre-quantized
        # checkpoint (revert_weight_conversion raises NotImplementedError for the bnb deserialization).
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        m = AutoModelForCausalLM.from_pretrained(TINY, quantization_config=bnb, dtype=torch.bfloat16, device_map="cpu",
                                                 attn_implementation="eager")
        m.name_or_path = "Vectors/llama/tiny-nf4"
    else:
        m = AutoModelForCausalLM.from_pretrained(TINY, dtype=DT[kind], attn_implementation="eager")
        m.name_or_path = "Vectors/llama/tiny"
    return m.eval()


def base_config_path(kind):
    return os.path.join(TINY_NF4 if kind == "nf4" else TINY, "config.json")


def fill_lora(pm, seed):
    """lora_A ~ 0.1·N(0,1) and lora_B ~ 0.05·N(0,1) (B non-zero: the merge is not trivial), drawn in
    named_parameters order from one generator."""
    g = rng(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_A." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def scale_magnitudes(pm, seed):
    """DoRA magnitudes: PEFT's initial ones (the base weight's row norms) times U[0.5, 1.5)."""
    g = rng(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.copy_(p * (0.5 + torch.rand(p.shape, generator=g)))


def save_adapter(pm, case_dir, **kw):
    d = os.path.join(case_dir, "adapter")
    pm.save_pretrained(d, **kw)
    os.remove(os.path.join(d, "README.md"))  # PEFT's model card: not needed
    return d


def adapter_listing(d):
    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in sorted(sd.items())}


def config_fields(d):
    with open(os.path.join(d, "adapter_config.json")) as f:
        cfg = json.load(f)
    return {k: cfg[k] for k in CONFIG_FIELDS if k in cfg}


def config_changes(merged_dir, base_cfg_path):
    """The merged config.json's fields that differ from the base's, and those it drops."""
    with open(os.path.join(merged_dir, "config.json")) as f:
        merged = json.load(f)
    with open(base_cfg_path) as f:
        base = json.load(f)
    changed = {k: v for k, v in merged.items() if k not in base or base[k] != v}
    removed = sorted(k for k in base if k not in merged)
    return changed, removed


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def changed_tensors(merged_dir, base_dir):
    merged = load_file(os.path.join(merged_dir, "model.safetensors"))
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    assert set(base) <= set(merged), sorted(set(base) - set(merged))
    return merged, sorted(k for k, v in merged.items() if k not in base or not same(v, base[k]))


def logits_of(model, ids, with_dtype=False):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits
    return (out.float(), str(out.dtype).replace("torch.", "")) if with_dtype else out.float()


def assert_same_files(dir_a, dir_b, what):
    a = load_file(os.path.join(dir_a, "model.safetensors"))
    b = load_file(os.path.join(dir_b, "model.safetensors"))
    assert set(a) == set(b), what
    bad = [k for k in a if not same(a[k], b[k])]
    assert not bad, f"{what}: {bad[:5]}"


def dumps(obj, indent=0):
    """JSON with dicts one key a line (sorted) and lists of numbers on one line; floats as Python's
    repr, which reads back as the same double (every fp32 and bf16 logit is one exactly)."""
    pad = "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {dumps(obj[k], indent + 1)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(obj, list) and obj and all(isinstance(x, list) for x in obj):
        return "[\n" + ",\n".join(pad + dumps(x, indent + 1) for x in obj) + "\n" + "  " * indent + "]"
    return json.dumps(obj, separators=(",", ": "))


def write_expected(case_dir, doc):
    with open(os.path.join(case_dir, "expected.json"), "w") as f:
        f.write(dumps(doc) + "\n")


class Tmp:
    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="peft_kinds_")

    def __call__(self, name):
        d = os.path.join(self.root, name)
        shutil.rmtree(d, ignore_errors=True)
        return d


def finish_case(name, kind, merged, tmp, base_dir, adapter_dir, ids, reload_fn, extra=None, keep_all_of=None):
    """Save the merged model, record what changed and the logits, and check that PEFT loading the
    adapter directory onto a fresh base merges to the same bytes."""
    case_dir = os.path.join(OUT, name)
    merged_dir = tmp(name + "-merged")
    merged.save_pretrained(merged_dir)
    tensors, changed = changed_tensors(merged_dir, base_dir)
    keep = list(changed)
    if keep_all_of is not None:  # every tensor of a changed module (the quant state of a re-quantized weight)
        keep = sorted(k for k in tensors if any(k.startswith(m) for m in keep_all_of(changed)))
    save_file({k: tensors[k].contiguous() for k in keep}, os.path.join(case_dir, "merged.safetensors"),
              metadata={"format": "pt"})
    cfg_changed, cfg_removed = config_changes(merged_dir, base_config_path(kind))
    logits, logits_dtype = logits_of(merged.eval(), ids, with_dtype=True)

    # The committed adapter, loaded by PEFT onto a fresh base, must merge to the same bytes.
    fresh = reload_fn()
    again = PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload()
    again_dir = tmp(name + "-reloaded")
    again.save_pretrained(again_dir)
    assert_same_files(merged_dir, again_dir, name + " reload")
    assert torch.equal(logits_of(again.eval(), ids), logits), name

    doc = {"case": name, "versions": VERSIONS, "base": "Vectors/llama/" + ("tiny-nf4" if kind == "nf4" else "tiny"),
           "base_dtype": {"bf16": "bfloat16", "f32": "float32", "nf4": "nf4 (bnb 4-bit, bf16 compute)"}[kind],
           "adapter_tensors": adapter_listing(adapter_dir), "adapter_config": config_fields(adapter_dir),
           "merged_config_changed": cfg_changed, "merged_config_removed": cfg_removed,
           "changed_tensors": changed, "merged_safetensors": keep,
           "input_ids": [ids], "logits_shape": list(logits.shape), "logits_dtype_before_float": logits_dtype,
           "logits": logits[0].tolist(), "attn_implementation": "eager", "torch_threads": 1}
    doc.update(extra or {})
    write_expected(case_dir, doc)
    print(f"{name}: {len(changed)} changed tensors, config {cfg_changed} {cfg_removed}")
    return merged_dir, logits


def base_dir_of(model, tmp, name):
    d = tmp(name + "-base")
    model.save_pretrained(d)
    return d


def dora(kind, tmp):
    name = f"dora-{kind}"
    case_dir = os.path.join(OUT, name)
    os.makedirs(case_dir)
    torch.manual_seed(0)  # PEFT draws lora_A's initial values from torch's global generator
    model = load_base(kind)
    base_dir = base_dir_of(model, tmp, name)
    if kind == "nf4":
        assert_same_files(base_dir, TINY_NF4, "the NF4 base is llama/tiny-nf4")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS,
                                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    fill_lora(pm, 300)
    scale_magnitudes(pm, 310)
    adapter_dir = save_adapter(pm, case_dir)
    extra = {"magnitude_keys": sorted(k for k in adapter_listing(adapter_dir) if "lora_magnitude_vector" in k),
             "merge": "W' = ((m / ||W + dW||_row).view(-1, 1) * (W + dW)).to(W.dtype), dW = (B @ A) * lora_alpha / r in fp32 "
                      "(fp32 adapters), W + dW promoted to fp32, the row norm torch.linalg.norm(dim=1) in fp32 on the CPU; "
                      + ("W = dequantize_4bit(base) in bf16, W' re-quantized by bnb.nn.Params4bit (NF4, double quant, blocksize 64)"
                         if kind == "nf4" else f"W the {DT[kind]} base weight".replace("torch.", ""))}

    layers = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_magnitude_vector")}
    # PEFT's formula, computed here from the layers' own tensors before merging: the merge must equal it.
    ours = {}
    for n, m in layers.items():
        a = m.lora_A["default"].weight.detach()
        b = m.lora_B["default"].weight.detach()
        mag = m.lora_magnitude_vector["default"].weight.detach()
        base_w = m.get_base_layer().weight
        w = bnbF.dequantize_4bit(base_w.data, base_w.quant_state) if kind == "nf4" else base_w.detach()
        delta = (b @ a) * m.scaling["default"]                       # fp32 (the adapters are fp32)
        norm = torch.linalg.norm(w + 1 * delta, dim=1).to((w + delta).dtype)  # get_weight_norm, scaling=1
        ours[n] = ((mag / norm).view(-1, 1) * (w + delta)).to(w.dtype)
        assert a.dtype == b.dtype == mag.dtype == torch.float32

    captured = {}
    orig_merge_safe = lora_variants.DoraLinearVariant.merge_safe
    if kind == "nf4":  # bnb's Linear4bit.merge re-quantizes merge_safe's result: capture it (w_data)
        def capture(module, active_adapter, orig_weight):
            out = orig_merge_safe(module, active_adapter, orig_weight)
            captured[id(module)] = out.detach().clone()
            return out
        lora_variants.DoraLinearVariant.merge_safe = staticmethod(capture)
    try:
        ids_of = {id(m): n for n, m in layers.items()}
        merged = pm.merge_and_unload()
    finally:
        lora_variants.DoraLinearVariant.merge_safe = staticmethod(orig_merge_safe)

    if kind == "nf4":
        w16 = {ids_of[k] + ".weight": v for k, v in captured.items()}
        assert len(w16) == len(layers) and all(v.dtype == torch.bfloat16 for v in w16.values())
        for n in layers:
            assert same(ours[n], w16[n + ".weight"]), n
        save_file(w16, os.path.join(case_dir, "merged_16bit.safetensors"), metadata={"format": "pt"})
        deq, qs_dtypes = {}, set()
        code = bnbF.get_4bit_type("nf4", device="cpu")
        for n in layers:
            p = merged.get_submodule(n).weight
            st = p.quant_state
            qs_dtypes.add(str(st.dtype).replace("torch.", ""))
            d = bnbF.dequantize_4bit(p.data, st)
            absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
            portable = _dequantize_4bit_compute(p.data.reshape(-1), absmax.float(), code, st.blocksize, tuple(st.shape), st.dtype)
            assert same(d, portable), n  # the CPU kernel agrees with the portable path on these shapes
            deq[n + ".weight"] = d
        # Recorded as SHA-256 of the bf16 bytes (little-endian, row-major) to keep Vectors/ small: the
        # dequantization is a function of merged.safetensors, and the test can hash its own.
        extra["dequantized_sha256"] = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                                       for k, v in sorted(deq.items())}
        extra.update({"merged_quant_state_dtype": sorted(qs_dtypes),
                      "merged_16bit": "merged_16bit.safetensors: w_data = (magnitude / ||W + dW||_row).view(-1, 1) * (W + dW) "
                                      "in fp32, cast to bf16 by PEFT (orig_dtype is the dequantized weight's); the existing "
                                      "case's .to(bfloat16) leaves it as it is",
                      "dequantized": "dequantized_sha256: bitsandbytes.functional.dequantize_4bit of each re-quantized "
                                     "weight, bf16 [out, in], equal to its portable _dequantize_4bit_compute"})
    else:
        for n in layers:
            assert same(ours[n], merged.get_submodule(n).weight.detach()), n

    def reload():
        torch.manual_seed(1)
        return load_base(kind)

    keep_all_of = (lambda changed: {k.split(".weight")[0] + ".weight" for k in changed}) if kind == "nf4" else None
    merged_dir, logits = finish_case(name, kind, merged, tmp, base_dir, adapter_dir, IDS, reload, extra, keep_all_of)

    if kind == "nf4":
        # The merged-to-16-bit export: the dense bf16 tiny Llama with w_data as each projection weight.
        dense = load_base("bf16")
        nf4_base = load_file(os.path.join(TINY_NF4, "model.safetensors"))
        for k, v in dense.state_dict().items():  # the unquantized tensors are llama/tiny's
            if k in nf4_base and nf4_base[k].dtype == torch.bfloat16:
                assert same(v, nf4_base[k]), k
        with torch.no_grad():
            for k, v in w16.items():
                dense.get_submodule(k[: -len(".weight")]).weight.copy_(v)
        d16 = tmp(name + "-16bit")
        dense.save_pretrained(d16)
        l16 = logits_of(dense, IDS)
        doc = json.load(open(os.path.join(case_dir, "expected.json")))
        doc["logits_merged_16bit"] = l16[0].tolist()
        doc["merged_16bit_config"] = "Vectors/llama/tiny/config.json (bf16, no quantization_config)"
        write_expected(case_dir, doc)
        return {name: merged_dir, name + "-16bit": d16}
    return {name: merged_dir}


def modules_to_save(tmp):
    name = "modules-to-save"
    case_dir = os.path.join(OUT, name)
    os.makedirs(case_dir)
    torch.manual_seed(0)
    model = load_base("bf16")
    base_dir = base_dir_of(model, tmp, name)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    fill_lora(pm, 400)
    wrapper = pm.base_model.model.lm_head
    copy = wrapper.modules_to_save["default"].weight
    assert copy.dtype == torch.bfloat16 and copy.requires_grad
    with torch.no_grad():
        copy.copy_((copy.float() + 0.02 * torch.randn(copy.shape, generator=rng(410))).to(copy.dtype))
    expected_head = copy.detach().clone()
    adapter_dir = save_adapter(pm, case_dir)
    merged = pm.merge_and_unload()
    assert same(merged.lm_head.weight.detach(), expected_head)  # the trained copy, unwrapped as it is

    # The same tensors as PEFT < 0.7 wrote them by default: torch.save'd adapter_model.bin, and an
    # adapter_config.json with v0.6.2's fields (json.dumps(indent=2, sort_keys=True), no newline).
    old = os.path.join(OUT, name + "-old", "adapter")
    os.makedirs(old)
    sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    torch.save(sd, os.path.join(old, "adapter_model.bin"))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(old, "adapter_config.json"), "w") as f:
        f.write(json.dumps({k: cfg.get(k) for k in V062_FIELDS}, indent=2, sort_keys=True))

    def reload():
        torch.manual_seed(1)
        return load_base("bf16")

    merged_dir, logits = finish_case(name, "bf16", merged, tmp, base_dir, adapter_dir, IDS, reload,
                                     {"modules_to_save_keys": sorted(k for k in sd if ".lora_" not in k)})
    old_merged = PeftModel.from_pretrained(reload(), old).merge_and_unload()
    od = tmp(name + "-old-merged")
    old_merged.save_pretrained(od)
    assert_same_files(merged_dir, od, "modules-to-save-old")
    assert torch.equal(logits_of(old_merged.eval(), IDS), logits)
    print("modules-to-save-old: PEFT loads it and merges to the same bytes")
    return {name: merged_dir, name + "-old": od}


def resized_vocab(tmp):
    """Added tokens the way PEFT's docs order first ("Extending the vocabulary": resize, then
    trainable_token_indices for the new ids), on the input embedding and on the untied lm_head,
    saved with save_embedding_layers=True (the resized layers go into the adapter file)."""
    name = "resized-vocab"
    case_dir = os.path.join(OUT, name)
    os.makedirs(case_dir)
    new = [256, 257, 258, 259]
    model = load_base("bf16")
    base_dir = base_dir_of(model, tmp, name)
    torch.manual_seed(500)  # transformers' mean_resizing draws the new rows from torch's global generator
    model.resize_token_embeddings(260)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                                          trainable_token_indices={"embed_tokens": new, "lm_head": new},
                                          task_type="CAUSAL_LM"))
    fill_lora(pm, 510)
    g = rng(520)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    adapter_dir = save_adapter(pm, case_dir, save_embedding_layers=True)
    merged = pm.merge_and_unload()
    assert merged.config.vocab_size == 260

    def reload():  # resized as PEFT's docs say, but with other new rows: the adapter file's must win
        m = load_base("bf16")
        torch.manual_seed(501)
        m.resize_token_embeddings(260)
        return m

    extra = {"new_token_ids": new, "trainable_tokens_keys": sorted(k for k in adapter_listing(adapter_dir) if "token_adapter" in k)}
    merged_dir, _ = finish_case(name, "bf16", merged, tmp, base_dir, adapter_dir, IDS + new, reload, extra)
    # The saved layers replace the resized base's: the fresh base's new rows are not what the file holds.
    sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    fresh = reload()
    fresh_rows = {"model.embed_tokens": fresh.model.embed_tokens.weight[256:].clone(), "lm_head": fresh.lm_head.weight[256:].clone()}
    loaded = PeftModel.from_pretrained(fresh, adapter_dir).base_model.model
    for mod, rows in fresh_rows.items():
        w = loaded.get_submodule(mod).token_adapter.base_layer.weight
        assert same(w, sd[f"base_model.model.{mod}.token_adapter.base_layer.weight"]) and not torch.equal(w[256:], rows), mod
    return {name: merged_dir}


def trainable_tokens(tmp):
    name = "trainable-tokens"
    case_dir = os.path.join(OUT, name)
    os.makedirs(case_dir)
    idx = [3, 17, 200, 255]
    torch.manual_seed(0)
    model = load_base("bf16")
    base_dir = base_dir_of(model, tmp, name)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                                          trainable_token_indices={"embed_tokens": idx}, task_type="CAUSAL_LM"))
    fill_lora(pm, 600)
    g = rng(610)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                assert p.dtype == torch.float32
                p.add_(0.02 * torch.randn(p.shape, generator=g))
                deltas = p.detach().clone()
    base_embed = model.model.embed_tokens.token_adapter.base_layer.weight.detach().clone()
    adapter_dir = save_adapter(pm, case_dir)
    merged = pm.merge_and_unload()
    want = base_embed.index_copy(0, torch.tensor(idx), deltas.to(base_embed.dtype))
    assert same(merged.model.embed_tokens.weight.detach(), want)

    def reload():
        torch.manual_seed(1)
        return load_base("bf16")

    extra = {"token_indices": idx, "trainable_tokens_keys": sorted(k for k in adapter_listing(adapter_dir) if "token_adapter" in k)}
    merged_dir, _ = finish_case(name, "bf16", merged, tmp, base_dir, adapter_dir, IDS, reload, extra)
    return {name: merged_dir}


def main():
    keep = "--keep" in sys.argv  # leave the merged checkpoints in a temporary folder (for check_peft_kinds.py)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    tmp = Tmp()
    dirs = {}
    for kind in ("bf16", "f32", "nf4"):
        dirs.update(dora(kind, tmp))
    dirs.update(modules_to_save(tmp))
    dirs.update(resized_vocab(tmp))
    dirs.update(trainable_tokens(tmp))
    if keep:
        print("merged checkpoints:")
        for k, v in dirs.items():
            print(f"  {k} {v}")
    else:
        shutil.rmtree(tmp.root)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"peft_kinds: {total} bytes")


if __name__ == "__main__":
    main()
