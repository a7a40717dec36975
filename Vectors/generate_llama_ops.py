"""Per-op golden vectors for the Llama decoder's ops (issue 11), in llm.c's manner.

Each op runs through the module or function transformers' Llama uses, in bf16 exactly as the
model runs it (bf16 inputs, autograd through the bf16 ops), on a given upstream gradient:

  rmsnorm    LlamaRMSNorm (fp32 math, weight * bf16(normalized)); the weight frozen
  rope       ROPE_INIT_FUNCTIONS["llama3"] and the default inverse frequencies, LlamaRotaryEmbedding's
             cos/sin tables, apply_rotary_pos_emb on q and k
  attention  eager_attention_forward on the rotated q and k (repeat_kv for grouped keys/values, the
             eager causal mask from create_causal_mask, softmax in fp32 then cast to bf16), no
             dropout; its dq and dk are rope's upstream gradients, as in the model
  swiglu     ACT2FN["silu"](gate) * up
  linear     F.linear(x, W) in bf16 (lm_head), W frozen
  loss       ForCausalLMLoss (logits upcast to fp32, labels shifted, ignore_index -100, mean)
  bf16       fp32 -> bf16 conversion (`.to(torch.bfloat16)`) of edge values and random values

Tensors are stored in qlora's layout (tokens-major: [batch, seq, heads, head_dim]); bf16 tensors as
BF16. The shapes and parameters, and the library versions, are in the `cases` metadata. Shapes are
tiny (Vectors/ keeps under 5 MB); ops whose rows are independent use one sequence of 7 tokens.
Torch runs with one thread.

Run: .venv/bin/python Vectors/generate_llama_ops.py   (writes Vectors/llama/ops.safetensors)
"""
import json
import math
import os
import types

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import numpy
import safetensors
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb,
                                                      eager_attention_forward)

torch.set_num_threads(1)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama", "ops.safetensors")
BF16 = torch.bfloat16

B, S, H, KV, D, HIDDEN, INTER, VOCAB = 2, 7, 4, 2, 16, 64, 96, 50
EPS = 1e-5
THETA = 500000.0
LLAMA3 = {"rope_type": "llama3", "rope_theta": THETA, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # Llama 3.1's values
TABLE_POSITIONS = 32


def config(head_dim=D, heads=H, rope=LLAMA3):
    return LlamaConfig(hidden_size=head_dim * heads, intermediate_size=INTER, num_hidden_layers=1, num_attention_heads=heads,
                       num_key_value_heads=KV, vocab_size=VOCAB, max_position_embeddings=131072, rms_norm_eps=EPS,
                       rope_parameters=dict(rope), attn_implementation="eager")


def main():
    g = torch.Generator().manual_seed(11)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=g) * scale

    def bf(*shape, scale=1.0):
        return randn(*shape, scale=scale).to(BF16)

    def leaf(t):
        return t.clone().requires_grad_(True)

    def tokens_major(t):  # [B, heads, S, D] -> [B, S, heads, D]
        return t.detach().transpose(1, 2).contiguous()

    tensors, cases = {}, {}
    cfg = config()

    # RMSNorm: rows of different magnitudes (embeddings ~0.02, a residual stream ~1 to ~30).
    norm = LlamaRMSNorm(HIDDEN, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(HIDDEN))
    norm = norm.to(BF16).requires_grad_(False)
    row_scale = torch.tensor([0.02, 1.0, 30.0, 3.0, 0.3, 1.0, 10.0]).reshape(S, 1)
    x = leaf((randn(S, HIDDEN) * row_scale).to(BF16))
    y = norm(x)
    dy = bf(S, HIDDEN)
    y.backward(dy)
    tensors.update({"rmsnorm.x": x.detach(), "rmsnorm.weight": norm.weight.detach(), "rmsnorm.y": y.detach(),
                    "rmsnorm.dy": dy, "rmsnorm.dx": x.grad})
    cases["rmsnorm"] = {"tokens": S, "hidden": HIDDEN, "eps": EPS, "dtype": str(y.dtype)}

    # RoPE: inverse frequencies (llama3 scaling at head_dim 16 and at Llama 3.1 8B's 128; the
    # default at 128 with theta 10000), cos/sin tables, and the rotation of q and k.
    inv16, scaling16 = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    inv128, _ = ROPE_INIT_FUNCTIONS["llama3"](config(head_dim=128, heads=32))
    default128, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(
        config(head_dim=128, heads=32, rope={"rope_type": "default", "rope_theta": 10000.0}))
    assert scaling16 == 1.0
    rotary = LlamaRotaryEmbedding(cfg)
    assert torch.equal(rotary.inv_freq, inv16)
    cos, sin = rotary(torch.zeros(1, dtype=BF16), torch.arange(TABLE_POSITIONS)[None])
    tensors.update({"rope.inv_freq.llama3.d16": inv16, "rope.inv_freq.llama3.d128": inv128,
                    "rope.inv_freq.default.d128": default128, "rope.cos": cos[0], "rope.sin": sin[0]})
    # q and k rotated, then attention on them: attention's dq and dk flow back through the rotation.
    q = leaf(bf(B, H, S, D, scale=1.5))
    k = leaf(bf(B, KV, S, D, scale=1.5))
    cs, sn = rotary(q, torch.arange(S)[None].expand(B, S))
    qe, ke = apply_rotary_pos_emb(q, k, cs, sn)
    qe.retain_grad()
    ke.retain_grad()
    v = leaf(bf(B, KV, S, D))
    mask = create_causal_mask(config=cfg, inputs_embeds=torch.zeros(B, S, HIDDEN, dtype=BF16), attention_mask=None,
                              past_key_values=None, position_ids=torch.arange(S)[None].expand(B, S))
    assert mask is not None and mask.dtype == BF16 and mask.shape == (B, 1, S, S)
    module = types.SimpleNamespace(num_key_value_groups=H // KV, training=False)
    out, _ = eager_attention_forward(module, qe, ke, v, mask, scaling=D ** -0.5)  # out: [B, S, H, D]
    dout = bf(B, S, H, D)
    out.backward(dout)
    tensors.update({"rope.q": tokens_major(q), "rope.k": tokens_major(k), "rope.dq": tokens_major(q.grad),
                    "rope.dk": tokens_major(k.grad),
                    # attention's inputs are rope's outputs, its dq and dk rope's upstream gradients
                    "attention.q": tokens_major(qe), "attention.k": tokens_major(ke), "attention.v": tokens_major(v),
                    "attention.out": out.detach(), "attention.dout": dout, "attention.dq": tokens_major(qe.grad),
                    "attention.dk": tokens_major(ke.grad), "attention.dv": tokens_major(v.grad)})
    assert qe.grad.dtype == BF16 and ke.grad.dtype == BF16
    cases["rope"] = {"batch": B, "seq": S, "heads": H, "kv_heads": KV, "head_dim": D, "rope_parameters": LLAMA3,
                     "table_positions": TABLE_POSITIONS, "d128": {"heads": 32, "llama3": LLAMA3, "default_theta": 10000.0},
                     "chain": "rope.q/k -> attention.q/k; attention.dq/dk -> rope.dq/dk"}
    cases["attention"] = {"batch": B, "seq": S, "heads": H, "kv_heads": KV, "head_dim": D, "scaling": D ** -0.5,
                          "mask": "create_causal_mask (eager): finfo(bf16).min above the diagonal"}

    # SwiGLU.
    gate = leaf(bf(S, INTER, scale=3.0))
    up = leaf(bf(S, INTER))
    y = ACT2FN["silu"](gate) * up
    dy = bf(S, INTER)
    y.backward(dy)
    tensors.update({"swiglu.gate": gate.detach(), "swiglu.up": up.detach(), "swiglu.y": y.detach(), "swiglu.dy": dy,
                    "swiglu.dgate": gate.grad, "swiglu.dup": up.grad})
    cases["swiglu"] = {"tokens": S, "intermediate": INTER}

    # lm_head: a bf16 linear without bias.
    x = leaf(bf(S, HIDDEN))
    w = bf(VOCAB, HIDDEN, scale=0.2)
    y = F.linear(x, w)
    dy = bf(S, VOCAB, scale=0.01)
    y.backward(dy)
    tensors.update({"linear.x": x.detach(), "linear.w": w, "linear.y": y.detach(), "linear.dy": dy, "linear.dx": x.grad})
    cases["linear"] = {"tokens": S, "in": HIDDEN, "out": VOCAB}

    # Causal-LM loss on bf16 logits, with ignored labels.
    logits = leaf(bf(B, S, VOCAB, scale=3.0))
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[0, :2] = -100
    labels[1, 4:] = -100
    loss = ForCausalLMLoss(logits, labels, vocab_size=VOCAB)
    loss.backward()
    tensors.update({"loss.logits": logits.detach(), "loss.labels": labels.to(torch.int64), "loss.loss": loss.detach().reshape(1),
                    "loss.dlogits": logits.grad})
    cases["loss"] = {"batch": B, "seq": S, "vocab": VOCAB, "ignore_index": -100, "counted": int((labels[:, 1:] != -100).sum())}

    # fp32 -> bf16: ties either way, the largest finite values, overflow, subnormals, infinities, NaNs.
    u = numpy.array([0x00000000, 0x80000000, 0x3F800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000,
                     0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000, 0x00000001, 0x00008000, 0x00018000,
                     0x007FFFFF, 0x00800000, 0x80008000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
                     0x7FBFFFFF, 0x7FC12345], dtype=numpy.uint32)
    edges = torch.from_numpy(u.view(numpy.float32).copy())
    values = torch.cat([edges, randn(32, scale=100.0), randn(32, scale=1e-3)])
    tensors.update({"bf16.x": values, "bf16.y": values.to(BF16)})
    cases["bf16"] = {"count": values.numel(), "edges": len(u)}

    for name, t in tensors.items():
        assert t.dtype in (BF16, torch.float32, torch.int64), name
        if t.dtype != torch.int64 and name not in ("bf16.x", "bf16.y"):
            assert torch.isfinite(t.float()).all(), name
    cases["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                         "numpy": numpy.__version__, "torch_threads": torch.get_num_threads(),
                         "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    # One metadata key: safetensors writes several in a random order, so the file's bytes would vary.
    meta = {"cases": json.dumps(cases, sort_keys=True)}
    save_file({n: t.contiguous() for n, t in tensors.items()}, OUT, metadata=meta)
    print("llama ops:", len(tensors), "tensors,", os.path.getsize(OUT), "bytes; loss", loss.item())


if __name__ == "__main__":
    main()
