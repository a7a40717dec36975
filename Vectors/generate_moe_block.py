"""Golden vectors for one sparse mixture-of-experts block, forward and input-gradient backward, as
transformers 5.23 runs it on the CPU: Vectors/moe/block.safetensors (bit-exact op test for the Swift
sparse block, in the manner of Vectors/llama/ops.safetensors).

Three cases, T = 16 tokens, hidden H = 64:
  qwen3       Qwen3MoeSparseMoeBlock, 16 experts of I = 32, top 4, norm_topk_prob=True
  mixtral     MixtralSparseMoeBlock, 4 experts of I = 48, top 2 (always renormalised, weights stay fp32)
  qwen3-e128  Qwen3MoeSparseMoeBlock, 128 experts of I = 16, top 8, norm_topk_prob=True (ties, K = 8 orders)

How: each block is layer 0's `mlp` of a one-layer model built by AutoModel.from_config from the
family's config class in bf16, so PreTrainedModel picks transformers' default experts implementation,
`grouped_mm` (asserted; with torch 2.15 on the CPU it calls torch.nn.functional.grouped_mm, i.e.
torch._grouped_mm, also asserted, and never the eager `index_add_` loop). Its parameters are frozen, as PEFT leaves them when
only attention is adapted, and set from names by generate_gguf_quantize.py's `small_weights` (bf16
bits, flat arrays reshaped row-major), so nothing but the outputs is committed:
  gate.weight [E, H]                = small_weights(f"{case}.router")
  experts.gate_up_proj [E, 2I, H]   = small_weights(f"{case}.gate_up")   (rows 0..I-1 gate, I..2I-1 up)
  experts.down_proj [E, H, I]       = small_weights(f"{case}.down")
  input x [T, H]                    = small_weights(f"{case}.x")
  upstream gradient g [T, H]        = small_weights(f"{case}.g")
Then x.requires_grad_(); out = block(x.view(1, T, H)); out.backward(g.view_as(out)), with the router's
logits kept by a forward hook on `block.gate` (retain_grad), and the router's softmax and top-k results
read as the module computed them (a TorchFunctionMode that records F.softmax's and torch.topk's
outputs; the top-k values tensor is the one the router renormalises in place).

Recorded per case, keys "{case}.NAME":
  logits    bf16 [T, E]  the router's output F.linear(x, gate.weight)
  probs     f32  [T, E]  softmax(logits, dtype=float) as the module computed it (== torch.softmax of `logits`)
  topk      i32  [T, K]  selected experts in torch.topk's slot order (torch's tie order, not index order)
  weights   f32  [T, K]  routing weights after renormalisation, before Qwen3's bf16 cast
  out       bf16 [T, H]  the block's output
  d_logits  bf16 [T, E]  gradient of the router logits (through renormalisation, top-k, softmax)
  dx        bf16 [T, H]  gradient of x (router path + experts path)
Metadata: "cases" (per case family, E, K, I, H, T, norm_topk_prob: Mixtral always renormalises, so true),
"versions" (torch, transformers, safetensors, numpy, torch threads, torch's CPU capability: the
softmax and sum reduction orders are those of an AVX512 build; generate on an AVX512 machine) and
"made_by". The header is rewritten with its metadata keys sorted: safetensors writes several metadata
keys in a random order, and the file's bytes should not change from run to run.

Checks (asserted): out, dx, d_logits and the routing are identical when computed twice; the module
ran grouped_mm; probs == torch.softmax(logits, -1, dtype=float); weights == v / v.sum(-1) of the top-k
values. Printed per case: tokens with a tie at the top-k boundary of the bf16 logits, and tokens whose
top-k set (and slot order) differs from lowest-index-first tie breaking (torch's top-k runs
libstdc++'s nth_element/partial_sort: not index order, see the MoE spec).

Run: .venv/bin/python Vectors/generate_moe_block.py   (writes Vectors/moe/block.safetensors; ~6 s, 1 thread)
"""
import json
import os
import struct
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import numpy as np
import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save
from torch.overrides import TorchFunctionMode
from transformers import AutoModel, MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate_gguf_quantize import small_weights  # noqa: E402

torch.set_num_threads(1)
OUT = os.path.join(HERE, "moe", "block.safetensors")
BF16 = torch.bfloat16
T, H = 16, 64
CASES = {
    "qwen3": dict(family="qwen3_moe", E=16, K=4, I=32, norm_topk_prob=True),
    "mixtral": dict(family="mixtral", E=4, K=2, I=48, norm_topk_prob=True),
    "qwen3-e128": dict(family="qwen3_moe", E=128, K=8, I=16, norm_topk_prob=True),
}
# Attention and vocabulary sizes only shape the unused rest of the one-layer model.
COMMON = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=32,
              max_position_embeddings=64)


def bf16(name, shape):
    return torch.from_numpy(small_weights(name, int(np.prod(shape))).astype(np.int16)).view(BF16).reshape(shape)


def build(c):
    if c["family"] == "qwen3_moe":
        cfg = Qwen3MoeConfig(**COMMON, moe_intermediate_size=c["I"], intermediate_size=2 * c["I"], num_experts=c["E"],
                             num_experts_per_tok=c["K"], norm_topk_prob=c["norm_topk_prob"], decoder_sparse_step=1, mlp_only_layers=[])
        cls = Qwen3MoeSparseMoeBlock
    else:
        cfg = MixtralConfig(**COMMON, intermediate_size=c["I"], num_local_experts=c["E"], num_experts_per_tok=c["K"])
        assert cfg.router_jitter_noise == 0.0
        cls = MixtralSparseMoeBlock
    model = AutoModel.from_config(cfg, dtype=BF16)
    assert model.config._experts_implementation == "grouped_mm", model.config._experts_implementation
    block = model.layers[0].mlp
    assert type(block) is cls, type(block)
    assert block.experts.config._experts_implementation == "grouped_mm"
    return block


class Record(TorchFunctionMode):
    """Keeps what the router's softmax and top-k returned, and the names of the functions called."""

    def __init__(self):
        super().__init__()
        self.softmax, self.topk, self.called = [], [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        r = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        self.called.add(name)
        if func is torch.nn.functional.softmax:
            self.softmax.append(r)
        elif name == "topk":
            self.topk.append((r[0].detach().clone(), r[0], r[1]))  # values before, the tensor itself, indices
        return r


def run_once(block, case, c):
    E, K = c["E"], c["K"]
    x = bf16(f"{case}.x", (T, H)).requires_grad_()
    g = bf16(f"{case}.g", (T, H))
    kept = []

    def keep(module, inputs, output):  # returns None: the output is left as it is
        output[0].retain_grad()
        kept.append(output[0])

    hook = block.gate.register_forward_hook(keep)
    with Record() as rec:
        out = block(x.view(1, T, H))
    hook.remove()
    if isinstance(out, tuple):
        out = out[0]
    assert out.shape == (1, T, H) and out.dtype == BF16
    out.backward(g.view_as(out))
    # torch.nn.functional.grouped_mm is a Python wrapper of torch._grouped_mm, which is what the mode sees.
    assert "_grouped_mm" in rec.called and not {"index_add_", "grouped_mm_fallback"} & rec.called, sorted(rec.called)
    assert len(kept) == 1 and len(rec.softmax) == 1 and len(rec.topk) == 1
    logits = kept[0]
    assert logits.shape == (T, E) and logits.dtype == BF16
    probs = rec.softmax[0].detach()
    assert probs.dtype == torch.float32 and torch.equal(probs, torch.softmax(logits.detach(), -1, dtype=torch.float))
    v0, v, idx = rec.topk[0]
    v2, idx2 = torch.topk(probs, K, dim=-1)
    assert torch.equal(v0, v2) and torch.equal(idx, idx2)
    weights = v.detach().clone()  # renormalised in place by the router; Qwen3 casts a copy to bf16 afterwards
    assert weights.dtype == torch.float32 and torch.equal(weights, v0 / v0.sum(-1, keepdim=True))
    return {"logits": logits.detach(), "probs": probs, "topk": idx.to(torch.int32), "weights": weights,
            "out": out.detach().reshape(T, H), "d_logits": logits.grad, "dx": x.grad}


def ties(r, K):
    """Tokens with a tie at the top-k boundary of the bf16 logits; tokens whose top-k set / slot order
    differs from lowest-index-first tie breaking."""
    s = torch.sort(r["logits"].float(), -1, descending=True).values
    boundary = int((s[:, K - 1] == s[:, K]).sum())
    inside = int((s[:, :K - 1] == s[:, 1:K]).any(-1).sum())
    p = r["probs"].numpy()
    low = torch.from_numpy(np.stack([np.lexsort((np.arange(p.shape[1]), -row))[:K] for row in p]).astype(np.int32))
    other_set = int((torch.sort(r["topk"], -1).values != torch.sort(low, -1).values).any(-1).sum())
    other_order = int((r["topk"] != low).any(-1).sum())
    return boundary, inside, other_set, other_order


def write(tensors, meta, path):
    """save_file's bytes with the metadata keys in sorted order (safetensors writes them in hash order)."""
    data = save(tensors, metadata=meta)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data[8 + n:])


def main():
    tensors, cases = {}, {}
    for case, c in CASES.items():
        block = build(c)
        E, I, K = c["E"], c["I"], c["K"]
        with torch.no_grad():
            block.gate.weight.copy_(bf16(f"{case}.router", (E, H)))
            block.experts.gate_up_proj.copy_(bf16(f"{case}.gate_up", (E, 2 * I, H)))
            block.experts.down_proj.copy_(bf16(f"{case}.down", (E, H, I)))
        for p in block.parameters():
            p.requires_grad_(False)
        assert block.gate.weight.dtype == block.experts.gate_up_proj.dtype == block.experts.down_proj.dtype == BF16
        block.train()
        first, second = run_once(block, case, c), run_once(block, case, c)
        for k in first:
            assert torch.equal(first[k], second[k]), f"{case}.{k} differs between two runs"
        want = {"logits": (BF16, (T, E)), "probs": (torch.float32, (T, E)), "topk": (torch.int32, (T, K)), "weights": (torch.float32, (T, K)),
                "out": (BF16, (T, H)), "d_logits": (BF16, (T, E)), "dx": (BF16, (T, H))}
        for k, (dt, sh) in want.items():
            t = first[k]
            assert t.dtype == dt and tuple(t.shape) == sh, (case, k, t.dtype, t.shape)
            assert torch.isfinite(t.float()).all(), (case, k)
            tensors[f"{case}.{k}"] = t.contiguous()
        cases[case] = dict(c, H=H, T=T)
        boundary, inside, other_set, other_order = ties(first, K)
        print(f"{case}: E{E} K{K} I{I}: tokens with a tie at the top-{K} boundary of the bf16 logits {boundary}/{T}, a tie inside "
              f"the top {K} {inside}/{T}; top-k set differs from lowest-index-first {other_set}/{T}, slot order differs {other_order}/{T}; "
              f"max|out| {first['out'].float().abs().max().item():.4g}, max|dx| {first['dx'].float().abs().max().item():.4g}, "
              f"nonzero d_logits {int((first['d_logits'] != 0).sum())}/{T * E}")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                "numpy": np.__version__, "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    meta = {"cases": json.dumps(cases, sort_keys=True), "versions": json.dumps(versions, sort_keys=True), "made_by": "Vectors/generate_moe_block.py"}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    write(tensors, meta, OUT)
    with safe_open(OUT, "pt") as f:
        assert f.metadata() == meta
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t), k
    print("moe block:", len(tensors), "tensors,", os.path.getsize(OUT), "bytes; versions", json.dumps(versions))


if __name__ == "__main__":
    main()
