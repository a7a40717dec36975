"""How transformers + bitsandbytes + PEFT hold a mixture-of-experts model after a 4-bit load (the
"experts stay 16-bit" issue), for qlora's memory model.

transformers 5 keeps each MoE layer's experts as fused 3-D nn.Parameters (`experts.gate_up_proj`,
`experts.down_proj`; gpt-oss also `*_bias`) on an experts module that is not an nn.Linear, and the
router as an nn.Parameter of a TopKRouter module; transformers' bitsandbytes integration
(`replace_with_bnb_linear`) swaps only `type(module) is nn.Linear` (and GPT-2's Conv1D) for
`bnb.nn.Linear4bit`, and the 4-bit quantizer quantizes only the weights of Linear4bit modules. This
script records what really happens, per family, on three tiny random models built with
transformers' own config classes (2 layers, hidden 64, vocab 256, untied head, top-2 routing; every
weight drawn by torch, seed 0, saved in bf16):

- qwen3_moe: Qwen3MoeForCausalLM, 8 experts of moe_intermediate_size 48; layer 0 dense
  (mlp_only_layers=[0]: a Qwen3MoeMLP of intermediate_size 128 made of three nn.Linear), layer 1
  sparse; norm_topk_prob, per-head q/k norms, head_dim 32;
- mixtral: MixtralForCausalLM, 4 experts of intermediate_size 96 in both layers;
- gpt_oss: GptOssForCausalLM, 4 experts of intermediate_size 48 with biases, router bias,
  attention biases and sinks, head_dim 16, layer_types sliding/full (sliding_window 8), yarn rope.

Per family: the checkpoint `save_pretrained` writes (config.json fields, tensor names and shapes);
every parameter and buffer after `from_pretrained(path, quantization_config=BitsAndBytesConfig(NF4,
double quant, bf16 compute), dtype=bfloat16, device_map="cpu")` (name, shape, dtype, owning module
class, storage bytes, and for each Params4bit its logical shape and every quant-state tensor),
summed per kind; the dense bf16 load; PEFT 0.21.2 `get_peft_model` with `target_modules="all-linear"`,
with `target_parameters` on the experts, and both together (what is adapted, the resolved config,
trainable count, one train-mode forward and backward); bitsandbytes' experimental
`nn.parametrize.replace_parameter_4bit` on one expert parameter (bytes after, dequantization, a
forward) and on all of them followed by PEFT target_parameters; for gpt_oss, loading a checkpoint
whose config.json carries the published MXFP4 quantization_config with a BitsAndBytesConfig.
`real_size`: the published configs (Qwen3-30B-A3B, Mixtral-8x7B-v0.1, gpt-oss-20b; fields written
from the models' Hugging Face config.json as published, no network) built by transformers on the
meta device and passed through the same quantizer's module replacement
(`Bnb4BitHfQuantizer._process_model_before_weight_loading`); 4-bit bytes from bitsandbytes' layout
(`nf4_bytes`), which the script checks against every Params4bit of the tiny loads, and the whole
meta path checked against the tiny loads' real bytes.

Bytes are storage nbytes (`untyped_storage().nbytes()`); `held_bytes` counts each storage once
(`storages_shared` counts storages seen twice: 0 here, every Params4bit has its own quant-state
tensors; a parametrization's quant state is a plain attribute, added by hand). `rows` fields: see
`row_fields` and `quant_state_layout`. `bnb_parametrize.max_abs_error_cpu_kernel` is what reading the
parameter gives; `..._flat_blocks` bitsandbytes' portable dequantization of the same bytes: the native
CPU kernel differs when the last dimension is not a multiple of the blocksize (gpt_oss [4, 64, 96]).

Run: .venv/bin/python Vectors/generate_moe.py   (writes Vectors/memory/moe.json; ~6 s, CPU)
"""
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import torch.nn as nn
import transformers
import peft
import bitsandbytes
import bitsandbytes as bnb
import bitsandbytes.nn.parametrize  # noqa: F401  (bitsandbytes.nn does not import it)
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors import safe_open
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GptOssConfig, MixtralConfig, Qwen3MoeConfig
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory", "moe.json")

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=32, intermediate_size=128, moe_intermediate_size=48,
                                        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
                                        norm_topk_prob=True, attention_bias=False, use_sliding_window=False,
                                        rms_norm_eps=1e-6, rope_theta=1000000.0),
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=None, rms_norm_eps=1e-5, rope_theta=1000000.0),
    # gpt-oss's published config.json carries both experts_per_token (its own name) and num_experts_per_tok
    # (what transformers reads): GptOssConfig has no mapping for experts_per_token, it is kept as an extra key.
    "gpt_oss": lambda: GptOssConfig(**COMMON, head_dim=16, intermediate_size=48, num_local_experts=4,
                                    num_experts_per_tok=2, experts_per_token=2, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"], attention_bias=True,
                                    rms_norm_eps=1e-5, swiglu_limit=7.0,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                     "original_max_position_embeddings": 8}),
}
# The shape-deciding fields of each real model's published config.json (Qwen/Qwen3-30B-A3B,
# mistralai/Mixtral-8x7B-v0.1, openai/gpt-oss-20b), written here from the published files; no network.
REAL = {
    "qwen3_moe": ("Qwen/Qwen3-30B-A3B", lambda: Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, attention_bias=False, tie_word_embeddings=False,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
        bos_token_id=151643, eos_token_id=151645, router_aux_loss_coef=0.001)),
    "mixtral": ("mistralai/Mixtral-8x7B-v0.1", lambda: MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
        bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.02)),
    "gpt_oss": ("openai/gpt-oss-20b", lambda: GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, experts_per_token=4,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 12, attention_bias=True,
        tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5, swiglu_limit=7.0,
        initial_context_length=4096, router_aux_loss_coef=0.9, eos_token_id=200002, pad_token_id=199999,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096})),
}
# What the published config.json names differently from what transformers 5.23 writes back.
REAL_NOTES = {
    "qwen3_moe": {"published_keys": {"num_experts": 128}, "note": "published config.json says num_experts; "
                  "Qwen3MoeConfig maps it (attribute_map num_experts -> num_local_experts) and save_pretrained "
                  "writes num_local_experts"},
    "mixtral": {"published_keys": {}, "note": "checkpoint tensors are per expert: "
                "model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight and block_sparse_moe.gate.weight; "
                "transformers fuses them on load (conversion_mapping.py 'mixtral')"},
    "gpt_oss": {"published_keys": {"experts_per_token": 4, "num_experts_per_tok": 4, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}},
                "note": "published checkpoint holds the experts as MXFP4 (gate_up_proj_blocks/_scales, "
                        "down_proj_blocks/_scales); everything else bf16. The meta build here is the bf16 layout "
                        "(what Mxfp4Config(dequantize=True) or a bf16 re-upload gives)"},
}
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
CONFIG_FIELDS = ["model_type", "architectures", "dtype", "vocab_size", "hidden_size", "intermediate_size",
                 "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_experts", "num_local_experts", "num_experts_per_tok", "experts_per_token", "decoder_sparse_step",
                 "mlp_only_layers", "norm_topk_prob", "layer_types", "sliding_window", "use_sliding_window",
                 "tie_word_embeddings", "attention_bias", "swiglu_limit", "rope_parameters", "router_aux_loss_coef",
                 "quantization_config"]
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.bfloat16)


def dt(d):
    return str(d).replace("torch.", "")


def nbytes(t):
    return t.untyped_storage().nbytes()


def pattern(name):
    """Layer and expert indices replaced by *."""
    return re.sub(r"\.experts\.\d+\.", ".experts.*.", re.sub(r"\.layers\.\d+\.", ".layers.*.", name))


def err(e):
    return f"{type(e).__name__}: {e}"[:500]


def kind_of(name, owner_cls, is4):
    """The memory-model kind of a parameter or buffer, by its name and owning module."""
    if is4:
        return "quantized_projection"
    if ".experts." in name:
        return "expert_bias" if name.endswith("_bias") else "expert_weight"
    if ".mlp.gate." in name or ".mlp.router." in name:
        return "router"
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in owner_cls.lower():
        return "norm"
    if name.endswith("sinks"):
        return "sinks"
    if "rotary_emb" in name:
        return "rotary_buffer"
    if name.endswith(".bias"):
        return "linear_bias"
    if owner_cls == "Linear":
        return "linear_weight_16bit"
    return "other"


QS_DTYPES = {"absmax": "uint8", "code": "float32", "offset": "float32", "nested_absmax": "float32",
             "nested_code": "float32"}


def quant_state_tensors(qs):
    """Every tensor of a bitsandbytes QuantState, as (name, tensor)."""
    out = [("absmax", qs.absmax), ("code", qs.code)]
    if qs.offset is not None:
        out.append(("offset", qs.offset))
    if qs.state2 is not None:
        out += [("nested_absmax", qs.state2.absmax), ("nested_code", qs.state2.code)]
    return out


def nf4_bytes(numel, blocksize=64, nested_blocksize=256, double_quant=True):
    """bitsandbytes 4-bit storage of one weight of `numel` values: the packed data and every quant-state
    tensor, as quantize_4bit lays it out (flat blocks; checked against every Params4bit of the tiny loads)."""
    blocks = -(-numel // blocksize)
    d = dict(weight=-(-numel // 2), code=16 * 4)
    if double_quant:
        d.update(absmax=blocks, offset=4, nested_absmax=4 * -(-blocks // nested_blocksize), nested_code=256 * 4)
    else:
        d.update(absmax=4 * blocks)
    return d


def inventory(model):
    """Every parameter and buffer: rows, a per-kind summary and totals (each storage counted once)."""
    owners = dict(model.named_modules())
    rows, seen, kinds, shared = [], set(), {}, []
    tot = dict(held_bytes=0, parameters=0, parameter_bytes=0, buffer_bytes=0, quant_state_bytes=0)

    def count(t, field):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key in seen:
            shared.append(key)
            return False
        seen.add(key)
        tot["held_bytes"] += st.nbytes()
        tot[field] += st.nbytes()
        return True

    entries = [(n, p, "parameter") for n, p in model.named_parameters(remove_duplicate=False)]
    entries += [(n, b, "buffer") for n, b in model.named_buffers(remove_duplicate=False)]
    for name, t, what in entries:
        mod_name, _, _ = name.rpartition(".")
        owner = type(owners[mod_name]).__name__
        is4 = isinstance(t, bnb.nn.Params4bit)
        k = kind_of(name, owner, is4)
        row = [name, owner, list(t.shape), dt(t.dtype), nbytes(t), k]
        new = count(t, "parameter_bytes" if what == "parameter" else "buffer_bytes")
        numel = t.numel()
        qsb = 0
        if is4:
            qs = t.quant_state
            qst = quant_state_tensors(qs)
            assert [(n, dt(v.dtype)) for n, v in qst] == [(n, QS_DTYPES[n]) for n in QS_DTYPES], name
            assert list(qst[0][1].shape) == [-(-math.prod(qs.shape) // qs.blocksize)] and qst[1][1].numel() == 16
            row.append([list(qs.shape), dt(qs.dtype), qs.quant_type, qs.blocksize, qs.state2.blocksize,
                        [nbytes(v) for _, v in qst]])
            for _, v in qst:
                qsb += nbytes(v) if count(v, "quant_state_bytes") else 0
            numel = math.prod(qs.shape)
            want = nf4_bytes(numel, qs.blocksize, qs.state2.blocksize)
            assert want == dict(weight=nbytes(t), **{n: nbytes(v) for n, v in qst}), (name, want)
        if what == "parameter" and new:
            tot["parameters"] += numel
        if not new:
            row.append("shared")
        row[0] = pattern(name)
        same = next((r for r in rows if r[:-1] == row), None)
        if same is None:
            rows.append(row + [1])
        else:  # layers alike: one row, counted
            same[-1] += 1
        ks = kinds.setdefault(k, dict(count=0, numel=0, bytes=0, quant_state_bytes=0, requires_grad=0, dtypes=[]))
        ks["count"] += 1
        ks["requires_grad"] += int(t.requires_grad)
        ks["numel"] += numel
        ks["bytes"] += nbytes(t) if new else 0
        ks["quant_state_bytes"] += qsb
        if dt(t.dtype) not in ks["dtypes"]:
            ks["dtypes"].append(dt(t.dtype))
    tot["storages_shared"] = len(shared)  # tied weights or shared quant-state tensors (none here)
    return rows, kinds, tot


@contextlib.contextmanager
def captured():
    """Collects Python warnings and transformers/peft log records of WARNING and above."""
    rec = {"warnings": [], "logs": []}

    class H(logging.Handler):
        def emit(self, r):
            rec["logs"].append(f"{r.name}: {r.getMessage()}"[:300])

    h = H(level=logging.WARNING)
    loggers = [logging.getLogger("transformers"), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(h)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        try:
            yield rec
        finally:
            for lg in loggers:
                lg.removeHandler(h)
            for w in ws:
                s = f"{w.category.__name__}: {w.message}"[:300]
                if s not in rec["warnings"] and "is_gradient_checkpointing" not in s:
                    rec["warnings"].append(s)


def load4(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**BNB), dtype=torch.bfloat16,
                                                device_map="cpu")


def step(model, vocab, seed=1):
    """One train-mode forward and backward on 2 x 12 tokens: the loss, the trainable parameters that got no
    gradient, and what was warned."""
    model.train()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    with captured() as log:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    res = dict(loss=float(out.loss.detach()),
               trainable_without_grad=sorted({pattern(n.removeprefix("base_model.model."))
                                              for n, p in model.named_parameters() if p.requires_grad and p.grad is None}))
    if log["warnings"] or log["logs"]:
        res["log"] = {k: [w.split("\n")[0][:200] for w in v] for k, v in log.items()}
    return res


def trainable(pm):
    ps = [p for p in pm.parameters() if p.requires_grad]
    return dict(trainable_parameters=sum(p.numel() for p in ps), trainable_bytes=sum(nbytes(p) for p in ps),
                trainable_dtypes=sorted({dt(p.dtype) for p in ps}))


def resolved_config(pm):
    c = pm.peft_config["default"]
    tm = c.target_modules
    return dict(target_modules=sorted(tm) if isinstance(tm, (set, list)) else tm,
                target_parameters=sorted(c.target_parameters or []), rank_pattern=dict(c.rank_pattern or {}),
                alpha_pattern=dict(c.alpha_pattern or {}), r=c.r, lora_alpha=c.lora_alpha)


def adapted(pm):
    """Each adapted module (pattern) with its LoRA class, its base class and, for a ParamWrapper, the wrapped
    parameter, its shape and the adapter shapes."""
    out = {}
    for n, m in pm.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        d = dict(lora=type(m).__name__, base=type(m.get_base_layer()).__name__)
        if isinstance(m, ParamWrapper):
            p = m.get_param()
            assert p.dtype == torch.bfloat16
            d.update(parameter=m.parameter_name, param_shape=list(p.shape),
                     num_experts=m.num_experts, in_features=m.in_features, out_features=m.out_features,
                     swapped_in_out=m._did_swap_in_out_features,
                     base_is_transposed=bool(getattr(m.get_base_layer(), "is_transposed", False)))
        assert m.scaling["default"] == 2.0  # alpha / r everywhere (rank_pattern doubles both)
        d.update(r=m.r["default"], lora_A=list(m.lora_A["default"].weight.shape),
                 lora_B=list(m.lora_B["default"].weight.shape))
        key = pattern(n.removeprefix("base_model.model.") + ".")[:-1]
        if key in out:
            assert {k: v for k, v in out[key].items() if k != "count"} == d, (key, out[key], d)
            out[key]["count"] += 1
        else:
            out[key] = dict(d, count=1)
    return dict(sorted(out.items()))


def candidates(model):
    """Modules of the loaded 4-bit model an adapter could sit on: every Linear/Linear4bit, router and experts."""
    out = {}
    for n, m in model.named_modules():
        c = type(m).__name__
        if isinstance(m, nn.Linear) or "Router" in c or c.endswith("Experts"):
            out[n] = c
    return out


def peft_case(path, cfg, lc, prepare=None, same_as=None):
    model = load4(path)
    res = dict(config={k: v for k, v in lc.items()})
    if len(lc.get("target_parameters", [])) > 2:
        res["config"]["target_parameters"] = "model.layers.N.mlp.experts.gate_up_proj and .down_proj of every MoE layer"
    if prepare is not None:
        res.update(prepare(model))
    cand = candidates(model)
    try:
        with captured() as log:
            pm = get_peft_model(model, LoraConfig(**lc))
    except Exception as e:
        res["error"] = err(e)
        return res
    ad = adapted(pm)
    ad_names = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, m in pm.named_modules()
                if isinstance(m, LoraLayer)}
    flags = dict(router_adapted=any(".mlp.gate" in n or ".mlp.router" in n for n in ad),
                 experts_adapted=any(".experts" in n for n in ad))
    if same_as is not None:  # the details only of what differs from that case's adapted modules
        res["adapted_modules"] = sorted(ad)
        ad = {k: v for k, v in ad.items() if same_as["adapted"].get(k) != v}
        res["adapted_note"] = "adapted: only the modules whose adapter differs from peft_all_linear's"
    rc = resolved_config(pm)
    if rc["target_parameters"] == sorted(lc.get("target_parameters", [])) and not lc.get("target_modules"):
        rc = "as config"
    res.update(log=log, resolved_config=rc, adapted=ad,
               not_adapted=sorted({f"{pattern(n + '.')[:-1]} ({c})" for n, c in cand.items() if n not in ad_names
                                   and n != "lm_head"}),
               **flags, **trainable(pm))
    try:
        res["train_step"] = step(pm, cfg.vocab_size)
    except Exception as e:
        res["train_step"] = dict(error=err(e))
    return res


def parametrize_all(model):
    """bitsandbytes' replace_parameter_4bit on every expert weight; the bytes held after."""
    names = []
    for n, m in model.named_modules():
        if n.endswith("mlp.experts"):
            for pn in ("gate_up_proj", "down_proj"):
                bnb.nn.parametrize.replace_parameter_4bit(m, pn, compress_statistics=True, quant_type="nf4")
                names.append(f"{n}.{pn}")
    tot = inventory(model)[2]
    qsb = parametrization_state_bytes(model)
    return dict(parametrized=names, held_bytes_after_parametrize=tot["held_bytes"] + qsb,
                of_which_parametrization_quant_state_bytes=qsb)


def parametrization_state_bytes(model):
    """The quant-state tensors bitsandbytes' parametrizations hold as a plain attribute (`quant_state`), which
    named_parameters()/named_buffers() do not list."""
    return sum(nbytes(v) for m in model.modules() if isinstance(m, bnb.nn.parametrize.Bnb4bitParametrization)
               for _, v in quant_state_tensors(m.quant_state))


def parametrize_case(path, cfg):
    """bitsandbytes' replace_parameter_4bit on one expert parameter of the 4-bit model."""
    model = load4(path)
    name, experts = next((n, m) for n, m in model.named_modules() if n.endswith("mlp.experts"))
    orig = experts.gate_up_proj.detach().clone()
    res = dict(module=name, parameter="gate_up_proj",
               call="bitsandbytes.nn.parametrize.replace_parameter_4bit(module, 'gate_up_proj', "
                    "compress_statistics=True, quant_type='nf4')",
               before=[list(orig.shape), dt(orig.dtype), nbytes(experts.gate_up_proj)])
    held0 = inventory(model)[2]["held_bytes"]
    try:
        bnb.nn.parametrize.replace_parameter_4bit(experts, "gate_up_proj", compress_statistics=True, quant_type="nf4")
    except Exception as e:
        res["error"] = err(e)
        return res
    par = experts.parametrizations.gate_up_proj
    stored, qs = par.original, par[0].quant_state
    qst = quant_state_tensors(qs)
    assert nf4_bytes(orig.numel(), qs.blocksize, qs.state2.blocksize) == dict(
        weight=nbytes(stored), **{n: nbytes(v) for n, v in qst})
    deq = experts.gate_up_proj
    absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    flat = _dequantize_4bit_compute(stored.reshape(-1), absmax.float(), qs.code, qs.blocksize, tuple(qs.shape), qs.dtype)
    res.update(
        stored=[f"{name}.parametrizations.gate_up_proj.original", type(stored).__name__, list(stored.shape),
                dt(stored.dtype), nbytes(stored), bool(stored.requires_grad)],
        quant_state={n: [list(v.shape), dt(v.dtype), nbytes(v)] for n, v in qst}, blocksize=qs.blocksize,
        quant_type=qs.quant_type,
        held_bytes_delta=inventory(model)[2]["held_bytes"] + parametrization_state_bytes(model) - held0,
        quant_state_seen_as_buffer=any(v is qs.absmax for v in model.buffers()),
        accessed=[list(deq.shape), dt(deq.dtype)], max_abs_value=float(orig.float().abs().max()),
        max_abs_error_cpu_kernel=float((deq.float() - orig.float()).abs().max()),
        max_abs_error_flat_blocks=float((flat.float() - orig.float()).abs().max()),
        cpu_kernel_equals_flat_blocks=bool(torch.equal(deq, flat)),
        state_dict_keys=sorted(k.removeprefix(name + ".") for k in model.state_dict() if k.startswith(name + ".")))
    try:
        res["train_step_loss"] = step(model, cfg.vocab_size)["loss"]  # the base is not frozen: it just runs
    except Exception as e:
        res["train_step_error"] = err(e)
    return res


def checkpoint_layout(path):
    tensors = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as s:
                for k in s.keys():
                    sl = s.get_slice(k)
                    assert sl.get_dtype() == "BF16", k
                    g = tensors.setdefault(pattern(k), [list(sl.get_shape()), 0])
                    assert g[0] == list(sl.get_shape()), k
                    g[1] += 1
    return dict(all_dtype="BF16", fields=["shape", "count"], **dict(sorted(tensors.items())))


def mxfp4_with_bnb(path, tmp):
    """A checkpoint whose config.json carries gpt-oss-20b's published MXFP4 quantization_config, loaded with a
    BitsAndBytesConfig."""
    d = os.path.join(tmp, "gpt_oss-mxfp4-config")
    os.makedirs(d)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = REAL_NOTES["gpt_oss"]["published_keys"]["quantization_config"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    os.symlink(os.path.join(path, "model.safetensors"), os.path.join(d, "model.safetensors"))
    try:
        with captured() as log:
            load4(d)
        return dict(loaded=True, log=log)
    except Exception as e:
        return dict(loaded=False, error=err(e))


# ----------------------------------------------------------------------------- meta device

def meta_inventory(make):
    """The model built on the meta device and passed through the 4-bit quantizer's module replacement (what
    from_pretrained does before any weight is read), with the bytes a load then holds: nf4_bytes for each
    Linear4bit weight, 2 bytes a value for everything else (the tiny loads hold every other parameter in bf16)."""
    cfg = make()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    dense = dict(parameters=n, bytes=2 * n)
    q = Bnb4BitHfQuantizer(BitsAndBytesConfig(**BNB))
    with captured() as log:
        q._process_model_before_weight_loading(model, device_map={"": "cpu"})
    owners = dict(model.named_modules())
    groups, kinds = {}, {}
    held = experts4 = 0
    for n, p in model.named_parameters():
        mod_name, _, leaf = n.rpartition(".")
        owner = type(owners[mod_name]).__name__
        is4 = q.param_needs_quantization(model, n)
        k = kind_of(n, owner, is4)
        b4 = nf4_bytes(p.numel())
        nb, qsb = (b4["weight"], sum(b4.values()) - b4["weight"]) if is4 else (2 * p.numel(), 0)
        g = groups.setdefault(pattern(n), [list(p.shape), owner, k, "nf4" if is4 else "bfloat16", 0, nb, qsb])
        g[4] += 1
        ks = kinds.setdefault(k, dict(count=0, numel=0, bytes=0, quant_state_bytes=0))
        ks["count"] += 1
        ks["numel"] += p.numel()
        ks["bytes"] += nb
        ks["quant_state_bytes"] += qsb
        held += nb + qsb
        # the same model with every 3-D expert weight parametrized to 4-bit (replace_parameter_4bit, NF4, double quant)
        experts4 += sum(b4.values()) if (is4 or k == "expert_weight") else nb
    by_kind = {k: v["bytes"] + v["quant_state_bytes"] for k, v in kinds.items()}
    return cfg, q, log, dense, dict(held_bytes=held, bytes_by_kind=by_kind, tensors=groups,
                                    held_bytes_if_expert_weights_parametrized_nf4=experts4)


def real_size(fam):
    repo, make = REAL[fam]
    cfg, q, log, dense, inv = meta_inventory(make)
    fields = {k: v for k, v in cfg.to_dict().items() if k in CONFIG_FIELDS and k not in ("dtype", "architectures")}
    return dict(source=repo, **REAL_NOTES[fam], config=fields,
                modules_to_not_convert=sorted(q.modules_to_not_convert), replacement_log=log, dense_bf16=dense,
                after_4bit=inv)


# ----------------------------------------------------------------------------- per family

def family(fam, tmp):
    cfg = TINY[fam]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # every weight random, norms away from 1, biases and sinks away from 0
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            elif n.endswith("bias") or n.endswith("sinks"):
                p.copy_(0.1 * torch.randn(p.shape))
            else:
                p.copy_(0.05 * torch.randn(p.shape))
    path = os.path.join(tmp, fam)
    model.save_pretrained(path)
    saved_cfg = json.load(open(os.path.join(path, "config.json")))
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    rname, router = next((n, m) for n, m in model.named_modules() if n.endswith("mlp.gate") or n.endswith("mlp.router"))
    mods = dict(
        experts=dict(cls=type(experts).__name__, is_nn_linear=isinstance(experts, nn.Linear),
                     is_transposed=experts.is_transposed, is_concatenated=experts.is_concatenated,
                     has_bias=experts.has_bias, experts_implementation=model.config._experts_implementation),
        router=dict(name=pattern(rname + ".")[:-1], cls=type(router).__name__, is_nn_linear=isinstance(router, nn.Linear),
                    parameters={k: list(v.shape) for k, v in router.named_parameters()}),
        mlp_per_layer=[type(layer.mlp).__name__ for layer in model.model.layers])
    del model

    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
    _, dense_kinds, dense_tot = inventory(dense)
    del dense

    with captured() as log:
        q = load4(path)
    rows, kinds, tot = inventory(q)
    four = [r[0] for r in rows if r[5] == "quantized_projection"]
    assert all(r[3] == "bfloat16" for r in rows if r[5] not in ("quantized_projection", "rotary_buffer"))
    # the meta-device path used for the real sizes gives the tiny load's bytes exactly
    _, _, _, mdense, minv = meta_inventory(TINY[fam])
    assert minv["held_bytes"] == tot["parameter_bytes"] + tot["quant_state_bytes"], (minv["held_bytes"], tot)
    assert mdense["bytes"] == dense_tot["parameter_bytes"]
    res = dict(
        saved_config_json={k: saved_cfg[k] for k in CONFIG_FIELDS if k in saved_cfg},
        saved_checkpoint_tensors=checkpoint_layout(path),
        modules=mods,
        load_4bit=dict(
            modules_to_not_convert=sorted(q.hf_quantizer.modules_to_not_convert),
            keep_in_fp32_modules=sorted(q._keep_in_fp32_modules or []), log=log,
            any_expert_param_4bit=any(".experts." in n for n in four),
            any_router_param_4bit=any(".mlp.gate." in n or ".mlp.router." in n for n in four),
            totals=tot, by_kind=kinds, rows=rows),
        dense_bf16_load=dict(totals=dense_tot, bytes_by_kind={k: v["bytes"] for k, v in dense_kinds.items()},
                             dtypes=sorted({d for v in dense_kinds.values() for d in v["dtypes"]})),
    )
    try:
        res["load_4bit"]["train_step_loss"] = step(q, cfg.vocab_size)["loss"]
    except Exception as e:
        res["load_4bit"]["train_step_error"] = err(e)
    del q
    base = dict(r=8, lora_alpha=16, lora_dropout=0.0)
    res["peft_all_linear"] = peft_case(path, cfg, dict(base, target_modules="all-linear"))
    res["peft_target_parameters"] = peft_case(path, cfg, dict(base, target_modules=None, target_parameters=EXPERT_PARAMS),
                                              same_as=res["peft_all_linear"])
    res["peft_all_linear_and_target_parameters"] = peft_case(
        path, cfg, dict(base, target_modules="all-linear", target_parameters=EXPERT_PARAMS),
        same_as=res["peft_all_linear"])
    res["bnb_parametrize"] = parametrize_case(path, cfg)
    res["bnb_parametrize_all_then_peft_target_parameters"] = peft_case(
        path, cfg, dict(base, target_modules=None, target_parameters=EXPERT_PARAMS), prepare=parametrize_all)
    # the meta path's parametrized estimate is what replace_parameter_4bit really leaves
    pa = res["bnb_parametrize_all_then_peft_target_parameters"]
    want = pa["held_bytes_after_parametrize"] - tot["buffer_bytes"]
    assert minv["held_bytes_if_expert_weights_parametrized_nf4"] == want
    full = [f"model.layers.{i}.mlp.{p}" for i in range(cfg.num_hidden_layers) for p in EXPERT_PARAMS
            if fam != "qwen3_moe" or i not in cfg.mlp_only_layers]
    res["bnb_parametrize_all_then_peft_target_parameters_full_names"] = peft_case(
        path, cfg, dict(base, target_modules=None, target_parameters=full), prepare=parametrize_all)
    if fam == "gpt_oss":
        res["mxfp4_config_with_bnb"] = mxfp4_with_bnb(path, tmp)
    res["real_size"] = real_size(fam)
    return res


def prune(o):
    """Drops empty warning and log lists, and logs left empty."""
    if isinstance(o, dict):
        o = {k: prune(v) for k, v in o.items() if not (k in ("warnings", "logs") and v == [])}
        return {k: v for k, v in o.items() if not (k.endswith("log") and v == {})}
    return [prune(v) for v in o] if isinstance(o, list) else o


def compact(o, ind=0, width=200):
    """JSON with every container that fits in `width` columns, and every record without a dict inside, on one line."""
    s = json.dumps(o)
    vals = o.values() if isinstance(o, dict) else o if isinstance(o, list) else []
    flat = not any(isinstance(v, dict) for v in vals) and len(s) <= 2.5 * width  # a record of scalars and short lists
    if len(s) + ind <= width or flat or not isinstance(o, (dict, list)) or not o:
        return s
    pad = " " * (ind + 1)
    if isinstance(o, dict):
        items = [f"{pad}{json.dumps(k)}: {compact(v, ind + 1, width)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * ind + "}"
    return "[\n" + ",\n".join(pad + compact(v, ind + 1, width) for v in o) + "\n" + " " * ind + "]"


def main():
    out = dict(
        about=__doc__.split("\n\nRun:")[0],
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                      bitsandbytes=bitsandbytes.__version__, python=sys.version.split()[0]),
        bnb_config={k: (dt(v) if isinstance(v, torch.dtype) else v) for k, v in BNB.items()},
        real_size_note="real_size.config: the published config.json's fields, written here from the models' "
                       "Hugging Face files as published (no network); a missing log means nothing was warned",
        row_fields=["name (layer index as *)", "owner module class", "shape", "dtype", "bytes (each)", "kind",
                    "for a Params4bit: [logical shape, logical dtype, quant_type, blocksize, nested blocksize, "
                    "quant-state bytes [absmax, code, offset, nested_absmax, nested_code]]", "how many (layers alike)"],
        quant_state_layout=dict(absmax="uint8 [ceil(numel / blocksize)] (double quant: 8-bit codes of the fp32 absmax)",
                                code="float32 [16] (the NF4 table)", offset="float32 [] (mean subtracted before "
                                "the nested quantization)", nested_absmax="float32 [ceil(blocks / nested blocksize)]",
                                nested_code="float32 [256] (the 8-bit dynamic map)"),
        meta_tensor_fields=["shape", "owner", "kind", "dtype after a 4-bit load", "count", "bytes each",
                            "quant-state bytes each"],
        families={})
    with tempfile.TemporaryDirectory() as tmp:
        for fam in TINY:
            print(fam, flush=True)
            out["families"][fam] = family(fam, tmp)
    with open(OUT, "w") as f:
        f.write(compact(prune(out)) + "\n")
    print(OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
