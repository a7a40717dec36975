"""Golden memory timelines of a real QLoRA training step on CPU (issue 14: measured, not guessed).

For each configuration: a random bf16 checkpoint (2 decoder layers, real layer shapes scaled down)
is saved, loaded by transformers with bitsandbytes NF4 + double quant (bf16 compute), wrapped by
PEFT LoRA (dropout 0), and one training step is run on CPU:

    loss = model(input_ids=ids, labels=labels).loss     # the output object (bf16 logits) is dropped here
    loss.backward()
    opt.step()                                           # torch.optim.AdamW(trainable params, lr=2e-4, weight_decay=0.01): single-tensor on CPU
    opt.zero_grad(set_to_none=True)

What is measured is LIVE TENSOR BYTES, not RSS: a TorchDispatchMode sees every aten op (bitsandbytes'
torch.library ops included); each storage an op's outputs use is counted once, by its nbytes, and
a weakref finalizer on the untyped storage subtracts it when the storage is freed. Before the step
every tensor the garbage collector can reach (parameters, buffers, quantized weights and their
quant states, the batch) is counted the same way: the baseline. The live total is checked against
the peak after every op. Scratch memory a kernel allocates and frees inside one op is not seen (op
granularity). The tracker is verified on toy cases whose answers are known by hand (`verify()`).

Phases are marked by hooks: forward pre/post hooks on each decoder layer, the final norm's pre-hook
(start of the head: final norm + lm_head + loss), backward pre-hooks on each decoder layer (the
gradient w.r.t. a layer's output is ready: the end of the backward of what comes after it), and
the driver around backward, step and zero_grad.

Rows with `dora` (names ending in `-dora`) wrap with LoraConfig(use_dora=True): PEFT's DoraLinearVariant
on bitsandbytes' Linear4bit. Rows with `save` (names ending in `-save-lm_head` / `-save-embed_tokens`) wrap with
LoraConfig(modules_to_save=[save]): PEFT's ModulesToSaveWrapper, a deep copy of that module (bf16)
trained whole, in the optimizer with the LoRA parameters; the row adds `save_params`, `save_opt_state`
and `tied` (whether embed_tokens and lm_head share a weight after wrapping).

Rows with `trace` log the head's every op and free (`head_trace`); rows
with `trace_layers` log the last decoder layer's forward, checkpointed recompute and backward
(`layer_trace`: each op's outputs, the bytes it added, live - baseline; each free names the op and
phase that allocated it; zero-byte markers where each LoRA module is entered and left and where each
trainable parameter's gradient is accumulated, from hooks that allocate nothing).

Rows with a `transformers` key (names ending in `-tf4.46`) ran under that older transformers, in a
second venv (Vectors/requirements-tf4.46.txt: torch 2.5.1, transformers 4.46.3, PEFT 0.13.2, no
bitsandbytes, so bf16 LoRA only); every row records the versions it ran with (`versions`). A row is
only run under the transformers it names (rows without the key: not under any the grid names):
naming another venv's row in --only is refused, and a run over the whole grid skips it, keeping
its committed values.

Run: .venv/bin/python Vectors/generate_peaks.py [--only NAME,...] [--verify-only]
     .venv-tf4.46/bin/python Vectors/generate_peaks.py --only NAME-tf4.46,...
Writes Vectors/memory/peaks.json.
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time
import weakref

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import warnings
warnings.filterwarnings("ignore", category=FutureWarning)
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
import transformers
import peft
try:
    import bitsandbytes
except ImportError:  # the transformers 4.46 venv (bf16 LoRA rows only): bitsandbytes of that era needs CUDA for 4-bit
    bitsandbytes = None
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, GptOssConfig, GptOssForCausalLM, LlamaConfig,
                          LlamaForCausalLM, Llama4ForCausalLM, Llama4TextConfig, MixtralConfig, MixtralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)
from peft import LoraConfig, get_peft_model

torch.set_num_threads(int(os.environ.get("PEAKS_THREADS", "2")))
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ----------------------------------------------------------------------------- the tracker

_GEMM4 = torch.ops.bitsandbytes.gemm_4bit.default if bitsandbytes is not None else None
try:
    from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl as _GEMM4_IMPL
except ImportError:  # another bitsandbytes, or none: the op is then counted by its output only
    _GEMM4_IMPL = None

class LiveBytes(TorchDispatchMode):
    """Live tensor bytes, storage by storage, after every op."""

    def __init__(self):
        super().__init__()
        self.live = {}          # StorageImpl address -> nbytes
        self.info = {}          # StorageImpl address -> (phase it was allocated in, op and output that allocated it)
        self.peak_snapshot = None
        self.snap_peaks = False
        self.total = 0
        self.peak = 0
        self.peak_where = None  # (phase, op)
        self.phase = "baseline"
        self.seg_max = 0        # max within the current segment
        self.seg_max_op = None
        self.ops = 0
        self.trace_phases = set()  # phases whose every op and free is logged
        self.trace = []
        self.trace_free_what = False  # layer traces: a free names the op and phase that allocated the storage
        self.base = 0

    def _freed(self, key, n):
        if self.live.get(key) == n:
            del self.live[key]
            self.total -= n
            if self.phase in self.trace_phases:
                what = "free"
                if self.trace_free_what:
                    ph, op = self.info.get(key, ("baseline", "baseline"))
                    what = f"free {op} (from {ph})"
                self.trace.append([self.phase, what, -n, self.total - self.base])

    def mark(self, what):
        """A marker line in a traced phase (a module entered or left, a gradient accumulated); no bytes."""
        if self.phase in self.trace_phases:
            self.trace.append([self.phase, what, 0, self.total - self.base])

    def add(self, t, op="baseline"):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta:
            return
        st = t.untyped_storage()
        key = st._cdata
        n = st.nbytes()
        old = self.live.get(key)
        if old is None:
            self.live[key] = n
            self.info[key] = (self.phase, op if op == "baseline" else f"{op} {str(t.dtype).replace('torch.', '')}{list(t.shape)}")
            self.total += n
            weakref.finalize(st, self._freed, key, n)
        elif old != n:  # resized in place (out= ops): follow the new size
            self.live[key] = n
            self.total += n - old
            weakref.finalize(st, self._freed, key, n)

    def bump(self, op):
        if self.total > self.seg_max:
            self.seg_max, self.seg_max_op = self.total, op
        if self.total > self.peak:
            self.peak, self.peak_where = self.total, (self.phase, op)
            if self.snap_peaks:
                self.peak_snapshot = self.snapshot()

    def snapshot(self, top=12):
        """What is live, summed by the phase that allocated it, and the largest storages not in the baseline."""
        by_phase, big = {}, []
        for k, n in self.live.items():
            ph, what = self.info.get(k, ("baseline", "baseline"))
            by_phase[ph] = by_phase.get(ph, 0) + n
            if ph != "baseline":
                big.append((n, ph, what))
        big.sort(key=lambda x: -x[0])
        return dict(by_phase=by_phase, largest=[list(b) for b in big[:top]])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _GEMM4 and _GEMM4_IMPL is not None:
            # bitsandbytes' CPU gemm_4bit is a Python composite (dequantize the nested absmax to fp32,
            # dequantize the weight to bf16, F.linear): run it under this mode so its temporaries,
            # invisible inside one custom op, are counted like any other op's outputs.
            with self:
                return _GEMM4_IMPL(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        flat, _ = tree_flatten(out)
        name = str(func.overloadpacket.__name__)
        before = self.total
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.add(t, name)
        self.bump(name)
        if self.phase in self.trace_phases:
            shapes = [f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in flat if isinstance(t, torch.Tensor)]
            self.trace.append([self.phase, name + " " + ",".join(shapes), self.total - before, self.total - self.base])
        return out

    def census(self):
        """Every tensor the garbage collector can reach: (count of storages, their bytes)."""
        seen = {}
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
                    st = o.untyped_storage()
                    seen[st._cdata] = st.nbytes()
            except Exception:
                pass
        return seen

    def add_baseline(self):
        gc.collect()
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor):
                    self.add(o)
            except Exception:
                pass
        self.peak = self.seg_max = self.total


def verify():
    """Toy cases with hand-computed answers."""
    res = {}
    # 1. fp32 linear, no bias, x [8, 16] requires grad, W [32, 16] requires grad.
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    tr = LiveBytes()
    tr.add_baseline()
    base = tr.total
    assert base >= (8 * 16 + 32 * 16) * 4
    with tr:
        y = x @ w.t()                 # y [8,32] fp32: +1024; autograd keeps x and w (already live)
        after_mm = tr.total - base
        s = (y * y).sum()             # y*y [8,32] +1024 (kept? no: mul saves y twice, y*y freed after sum) ; s 4 B
        after_sum = tr.total - base
        del y
        after_del = tr.total - base   # y is saved by mul's backward: still live
        s.backward()                  # grads: x.grad [8,16] 512 B, w.grad [32,16] 2048 B
        after_bwd = tr.total - base
    res["linear_fp32"] = dict(after_mm=after_mm, after_sum=after_sum, after_del=after_del, after_backward=after_bwd, peak_above_baseline=tr.peak - base)
    assert after_mm == 8 * 32 * 4, after_mm
    assert after_sum == 8 * 32 * 4 + 4, after_sum                  # y*y was freed inside sum's lifetime; s lives
    assert after_del == 8 * 32 * 4 + 4, after_del                  # mul saved y
    assert after_bwd == 8 * 16 * 4 + 32 * 16 * 4 + 4, after_bwd    # saved y freed; two grads; s
    # peak: y (1024) + y*y (1024) + s (4) during the forward, or y + grad_y (1024) + 2*y*grad... in backward
    # 2. views share storages; bf16 cast allocates; freeing is seen.
    tr = LiveBytes()
    tr.add_baseline()
    base = tr.total
    with tr:
        a = torch.zeros(1000, dtype=torch.float32)
        v = a[10:20].view(2, 5)
        b = a.to(torch.bfloat16)
        d1 = tr.total - base
        del a
        d2 = tr.total - base          # v keeps a's storage
        del v
        d3 = tr.total - base
    res["views_casts"] = dict(after_alloc=d1, after_del_base=d2, after_del_view=d3)
    assert (d1, d2, d3) == (6000, 6000, 2000), (d1, d2, d3)
    del b
    if bitsandbytes is None:  # no 4-bit layer to check: case 4 runs on a bf16 linear
        lin = torch.nn.Linear(128, 64, bias=False, dtype=torch.bfloat16)
        return _census_check(res, lin)
    # 3. the baseline census sees a bnb 4-bit layer's packed weight and quant state.
    lin = bitsandbytes.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    lin.weight = bitsandbytes.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                            compress_statistics=True, quant_type="nf4")
    lin = lin.to("cpu")  # quantizes
    tr = LiveBytes()
    tr.add_baseline()
    qs = lin.weight.quant_state
    expect = {lin.weight.untyped_storage()._cdata: 64 * 128 // 2, qs.absmax.untyped_storage()._cdata: 64 * 128 // 64,
              qs.state2.absmax.untyped_storage()._cdata: 4, qs.code.untyped_storage()._cdata: 64,
              qs.state2.code.untyped_storage()._cdata: 1024}
    for k, n in expect.items():
        assert tr.live.get(k) == n, (k, n, tr.live.get(k))
    res["bnb_layer"] = {"packed_weight": 4096, "absmax_u8": 128, "nested_absmax": 4, "code": 64, "nested_code": 1024}
    return _census_check(res, lin)


def _census_check(res, lin):
    # 4. the live total after an op sequence equals a fresh gc census.
    tr = LiveBytes()
    tr.add_baseline()
    with tr:
        x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
        y = lin(x)
        z = (y.float() ** 2).mean()
        z.backward()
        del y
    gc.collect()
    c = tr.census()
    extra = {k: v for k, v in tr.live.items() if k not in c}
    missing = {k: v for k, v in c.items() if k not in tr.live}
    assert not missing, missing
    res["census_match"] = dict(tracked=tr.total, census=sum(c.values()), tracked_not_in_census=sum(extra.values()))
    return res


# ----------------------------------------------------------------------------- versions

def versions():
    """What this process runs with (a row's `versions`; the file's for the main venv)."""
    v = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    if bitsandbytes is not None:
        v["bitsandbytes"] = bitsandbytes.__version__
    v["python"] = sys.version.split()[0]
    return v


def _is(version, want):
    return version == want or version.startswith(want + ".")


def runs_here(c):
    """A row runs only under the transformers it names (`transformers`: "4.46"); a row naming none,
    under the main venv's, i.e. any transformers that no row of the grid names."""
    want = c.get("transformers")
    if want:
        return _is(transformers.__version__, want)
    return not any(_is(transformers.__version__, g["transformers"]) for g in grid() if g.get("transformers"))


def needs(c):
    want = c.get("transformers")
    return (f"transformers {want} (.venv-tf4.46, Vectors/requirements-tf4.46.txt)" if want
            else "the main venv's transformers (.venv, Vectors/requirements.txt)")


# transformers 5 renamed from_pretrained's torch_dtype to dtype; 4.x would pass `dtype` on to the config
# and load the weights in fp32.
DTYPE_KW = "torch_dtype" if int(transformers.__version__.split(".")[0]) < 5 else "dtype"


# ----------------------------------------------------------------------------- models

def llama_config(h, i, heads, kv, vocab, layers=2):
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, torch_dtype="bfloat16")


def qwen2_config(h, i, heads, kv, vocab, layers=2, tied=True):
    return Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       tie_word_embeddings=tied, torch_dtype="bfloat16")


def qwen3moe_config(mlp_only_layers=()):
    return Qwen3MoeConfig(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_hidden_layers=2,
                          num_attention_heads=16, num_key_value_heads=2, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          decoder_sparse_step=1, mlp_only_layers=list(mlp_only_layers), norm_topk_prob=True,
                          vocab_size=151936, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
                          use_sliding_window=False, tie_word_embeddings=False)


ARCHS = {
    # llama-2-7b's ratios (head_dim 128 -> 64, intermediate 2.6875 h) at hidden 1024, its vocab.
    "llama-h1024": lambda: (LlamaForCausalLM, llama_config(1024, 2816, 16, 16, 32000)),
    # llama-2-7b's exact layer shapes (2 layers).
    "llama-h4096": lambda: (LlamaForCausalLM, llama_config(4096, 11008, 32, 32, 32000)),
    # qwen2.5-0.5b's exact layer shapes (q/k/v biases, GQA 14:2, tied embeddings), vocab cut to 48000.
    "qwen2-h896": lambda: (Qwen2ForCausalLM, qwen2_config(896, 4864, 14, 2, 48000)),
    # qwen2.5-7b's exact layer shapes and vocab (GQA 28:4, q/k/v biases, untied), 2 layers.
    "qwen2-h3584": lambda: (Qwen2ForCausalLM, qwen2_config(3584, 18944, 28, 4, 152064, tied=False)),
    # Mixtures of experts (issue 23), each family's real ratios at half or less of its width, its real
    # vocabulary, expert count and routing: Qwen3-30B-A3B's (128 experts, top 8, q = 2h, GQA 16:2, per-head
    # q/k norms), one dense layer first in the `-dense0` variant (mlp_only_layers); Mixtral-8x7B's (8
    # experts of 3.5h, top 2, GQA 4:1); gpt-oss-20b's (32 experts of h with biases, top 4, router bias,
    # attention biases and sinks, sliding/full layers, yarn rope).
    "qwen3moe-h1024": lambda: (Qwen3MoeForCausalLM, qwen3moe_config()),
    "qwen3moe-h1024-dense0": lambda: (Qwen3MoeForCausalLM, qwen3moe_config(mlp_only_layers=[0])),
    "mixtral-h1024": lambda: (MixtralForCausalLM, MixtralConfig(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)),
    # Llama 4 Scout's text model (16 experts of 1.6h, top 1 with a sigmoid router, a shared expert, MoE in every
    # layer, L2 q/k norm, NoPE every 4th layer, chunked attention past 8192) at hidden 1024, its vocabulary.
    "llama4-h1024": lambda: (Llama4ForCausalLM, Llama4TextConfig(
        hidden_size=1024, intermediate_size=1664, intermediate_size_mlp=3328, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        vocab_size=202048, max_position_embeddings=4096, rms_norm_eps=1e-5, attention_chunk_size=8192, use_qk_norm=True,
        no_rope_layers=[1, 0], tie_word_embeddings=False)),
    "gptoss-h1024": lambda: (GptOssForCausalLM, GptOssConfig(
        hidden_size=1024, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=24, num_key_value_heads=4,
        head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"], attention_bias=True, tie_word_embeddings=False,
        max_position_embeddings=4096, rms_norm_eps=1e-5, swiglu_limit=7.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096})),
}

_CKPT = {}


def checkpoint(arch, tmp):
    if arch not in _CKPT:
        cls, cfg = ARCHS[arch]()
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: half the RAM of the big shapes
        try:
            m = cls(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        d = os.path.join(tmp, arch)
        m.save_pretrained(d)
        del m
        gc.collect()
        _CKPT[arch] = d
    return _CKPT[arch]


def install_marks(tr, layers, core):
    """Phase marks: hooks on each decoder layer (forward pre/post, backward pre) and the final norm."""
    marks = []      # (label, live at end, max within segment, op at max)

    state = {"bwd": False}
    seg_name = ["start"]

    def set_next(name):
        seg_name[0] = name
        tr.phase = name

    def end_seg(label, next_name):
        marks.append(dict(at=label, seg=seg_name[0], live=tr.total, seg_max=tr.seg_max, seg_max_op=tr.seg_max_op))
        tr.seg_max, tr.seg_max_op = tr.total, None
        set_next(next_name)

    hooks = []
    for li, layer in enumerate(layers):
        def pre(mod, args, li=li):
            if state["bwd"]:
                end_seg(f"before_recompute_{li}", f"backward_{li}_recompute")
            else:
                end_seg(f"before_forward_{li}", f"forward_{li}")

        def post(mod, args, out, li=li):
            if state["bwd"]:
                end_seg(f"after_recompute_{li}", f"backward_{li}")
            else:
                end_seg(f"after_forward_{li}", "between" if li + 1 < len(layers) else "final_norm+lm_head+loss")

        def bpre(mod, gout, li=li):
            nxt = "head" if li == len(layers) - 1 else f"layer_{li + 1}"
            end_seg(f"after_backward_{nxt}", f"backward_{li}")

        hooks.append(layer.register_forward_pre_hook(pre))
        hooks.append(layer.register_forward_hook(post))
        hooks.append(layer.register_full_backward_pre_hook(bpre))

    def norm_pre(mod, args):
        if not state["bwd"]:
            end_seg("before_final_norm", "final_norm+lm_head+loss")
    hooks.append(core.norm.register_forward_pre_hook(norm_pre))

    return marks, end_seg, set_next, state, hooks


def record(c, tr, marks, kept_snap, model, layers, tokens, baseline, n_trainable, dtypes, upcast, opt, secs):
    """One configuration's row of peaks.json."""
    V = model.config.vocab_size
    m = {x["at"]: x for x in marks}
    after_fwd = m["after_forward"]["live"]
    head_start = m["before_final_norm"]["live"]
    per_layer = [m[f"after_forward_{i}"]["live"] - m[f"before_forward_{i}"]["live"] for i in range(len(layers))]
    opt_state = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    rec = dict(c)
    rec.update(
        name=c["name"], versions=versions(), tokens=tokens, vocab=V, hidden=model.config.hidden_size, intermediate=model.config.intermediate_size,
        trainable_params=n_trainable, trainable_dtypes=dtypes, fp32_base_params=upcast,
        baseline_bytes=baseline,
        peak_bytes=tr.peak, peak_above_baseline=tr.peak - baseline, peak_phase=tr.peak_where[0], peak_op=tr.peak_where[1],
        kept_after_forward=after_fwd - baseline,
        head_live_delta=after_fwd - head_start,
        kept_by_phase=kept_snap["by_phase"],
        head_kept=kept_snap["by_phase"].get("final_norm+lm_head+loss", 0),
        head_kept_per_token=kept_snap["by_phase"].get("final_norm+lm_head+loss", 0) / tokens,
        per_layer_kept=[kept_snap["by_phase"].get(f"forward_{i}", 0) for i in range(len(layers))],
        per_layer_kept_per_token=[kept_snap["by_phase"].get(f"forward_{i}", 0) / tokens for i in range(len(layers))],
        per_layer_live_delta=per_layer,
        kept_largest=kept_snap["largest"],
        peak_by_phase=tr.peak_snapshot["by_phase"], peak_largest=tr.peak_snapshot["largest"],
        optimizer_state_bytes=opt_state,
        end_bytes=tr.total, end_above_baseline=tr.total - baseline,
        timeline=[[x["at"], x["live"] - baseline, x["seg"], x["seg_max"] - baseline, x["seg_max_op"]] for x in marks],
        ops=tr.ops, seconds=round(secs, 1),
    )
    return rec


NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def lora_config(c):
    kw = dict(use_dora=True) if c.get("dora") else {}
    if c["targets"] in ("attn+experts", "all-linear"):
        # Mixtures of experts: LoRA on each layer's fused 3-D expert parameters through PEFT's
        # target_parameters (`attn+experts`), or PEFT's own "all-linear", which on these models resolves to the
        # attention projections plus target_parameters on the experts and the router (moe.json `peft_all_linear`).
        if c["targets"] == "all-linear":
            return LoraConfig(r=c["r"], lora_alpha=2 * c["r"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        return LoraConfig(r=c["r"], lora_alpha=2 * c["r"], lora_dropout=0.0, target_modules=ATTN,
                          target_parameters=EXPERT_PARAMETERS, task_type="CAUSAL_LM")  # DoRA rows (`-dora`): PEFT's DoraLinearVariant on every target
    if c.get("save"):  # modules_to_save rows (`-save-MODULE`): PEFT's ModulesToSaveWrapper, a trained copy of MODULE
        kw["modules_to_save"] = [c["save"]]
    return LoraConfig(r=c["r"], lora_alpha=2 * c["r"], lora_dropout=0.0, target_modules=ALL if c["targets"] == "all" else ATTN,
                      task_type="CAUSAL_LM", **kw)


def save_info(train_model, model, opt):
    """For a modules_to_save row: every trainable parameter that is not a LoRA matrix (name, dtype, shape,
    bytes), its AdamW state (each tensor's dtype and bytes), and whether the input embedding and lm_head
    still share one weight after get_peft_model (and whether the trained copy shares it)."""
    ps = [(n, p) for n, p in train_model.named_parameters() if p.requires_grad and "lora_" not in n]
    # PEFT's wrapper forwards attribute access to its active copy (`wrapper.weight` is the copy's): the originals
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    emb, orig = getattr(emb, "original_module", emb).weight, getattr(out, "original_module", out).weight
    return dict(
        save_params=[[n, str(p.dtype).replace("torch.", ""), list(p.shape), p.untyped_storage().nbytes()] for n, p in ps],
        save_opt_state=[[n, {k: [str(t.dtype).replace("torch.", ""), t.untyped_storage().nbytes()] for k, t in opt.state[p].items()
                             if isinstance(t, torch.Tensor)}] for n, p in ps],
        tied=dict(config_tie_word_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
                  embed_is_lm_head_original=orig.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr(),
                  trained_copies_share_embed=[n for n, p in ps if p.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()]),
    )


def trace_layer_marks(tr, layer):
    """For a `trace_layers` row: marker lines in the traced layer's trace. Forward pre/post hooks on each
    LoRA module (they fire again in a checkpointed recompute) and post-accumulate-grad hooks on its
    trainable parameters (lora_A, lora_B, DoRA's magnitude): none changes the autograd graph or allocates."""
    hooks = []
    for name, mod in layer.named_modules():
        if not hasattr(mod, "lora_A"):
            continue
        hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: tr.mark(f"enter {name}")))
        hooks.append(mod.register_forward_hook(lambda m, a, o, name=name: tr.mark(f"leave {name}")))
        for pn, p in mod.named_parameters():
            if p.requires_grad:
                hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, what=f"grad {name}.{pn.replace('.default', '')} {str(p.dtype).replace('torch.', '')}{list(p.shape)}": tr.mark(what)))
    return hooks


def load_model(c, d, **kw):
    """A configuration's model from checkpoint directory `d`, wrapped as its recipe wraps it:
    (the transformers model, what trains). `kw` goes to from_pretrained (device_map on a GPU)."""
    if not runs_here(c):
        raise RuntimeError(f"{c.get('name', 'this configuration')} needs {needs(c)}; this is transformers {transformers.__version__}")
    kw = dict(attn_implementation=c.get("attn", "sdpa"), **kw)
    kw[DTYPE_KW] = torch.bfloat16
    method = c.get("method", "qlora")
    if method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(**NF4)
    model = AutoModelForCausalLM.from_pretrained(d, **kw)
    model.config.use_cache = False
    if c.get("experts") == "nf4-parametrize":
        # bitsandbytes' parametrize route (`-experts-nf4` rows): each layer's fused expert parameters quantized
        # whole to NF4 + double quant; reading one dequantizes it to bf16 (moe.json `bnb_parametrize`).
        import bitsandbytes.nn.parametrize as bnb_parametrize
        for mod in model.modules():
            if type(mod).__name__.endswith("Experts"):
                for pn in ("gate_up_proj", "down_proj"):
                    bnb_parametrize.replace_parameter_4bit(mod, pn, compress_statistics=True, quant_type="nf4")
    recipe = c.get("recipe", "peft")
    if c.get("prepare"):
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if recipe == "peft-kbit":
        # The PEFT docs' and the QLoRA paper's recipe, as written there: prepare_model_for_kbit_training
        # with its defaults (it turns checkpointing on with gradient_checkpointing_kwargs={}, so torch's own
        # use_reentrant default applies), then get_peft_model.
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=c["ckpt"])
    elif c["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, model
    return model, get_peft_model(model, lora_config(c))


def run_config(c, tmp):
    model, train_model = load_model(c, checkpoint(c["arch"], tmp))
    train_model.train()
    params = [p for p in train_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    dtypes = sorted({str(p.dtype) for p in params})
    upcast = sorted({f"{n}:{p.dtype}" for n, p in model.named_parameters() if p.dtype == torch.float32 and "lora_" not in n})
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)

    core = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model.base_model.model.model
    layers = list(core.layers)
    B, L = c["batch"], c["seq"]
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100

    tr = LiveBytes()
    marks, end_seg, set_next, state, hooks = install_marks(tr, layers, core)

    gc.collect()
    tr.add_baseline()
    baseline = tr.total
    tr.base = baseline
    tr.snap_peaks = True
    if c.get("trace"):
        tr.trace_phases = {"final_norm+lm_head+loss", "backward_head", "after"}
    if c.get("trace_layers"):
        # the last decoder layer (its input requires grad, as every layer's but the first): its forward,
        # its recompute (checkpointing) and its backward, op by op
        li = len(layers) - 1
        tr.trace_phases |= {f"forward_{li}", f"backward_{li}_recompute", f"backward_{li}"}
        tr.trace_free_what = True
        hooks += trace_layer_marks(tr, layers[li])
    t0 = time.time()
    with tr:
        set_next("embed")
        loss = train_model(input_ids=ids, labels=labels).loss
        end_seg("after_forward", "backward_head")
        kept_snap = tr.snapshot()
        state["bwd"] = True
        loss.backward()
        end_seg("after_backward", "optimizer_step")
        state["bwd"] = False
        opt.step()
        end_seg("after_optimizer_step", "zero_grad")
        opt.zero_grad(set_to_none=True)
        end_seg("after_zero_grad", "end")
    secs = time.time() - t0
    for h in hooks:
        h.remove()

    rec = record(c, tr, marks, kept_snap, model, layers, B * L, baseline, n_trainable, dtypes, upcast, opt, secs)
    if c.get("save"):
        rec.update(save_info(train_model, model, opt))
    if c.get("trace"):
        rec["head_trace"] = [x for x in tr.trace if x[0] in ("final_norm+lm_head+loss", "backward_head", "after")]
    if c.get("trace_layers"):
        rec["layer_trace"] = [x for x in tr.trace if x[0] not in ("final_norm+lm_head+loss", "backward_head", "after")]
    del train_model, model, opt, params, loss, tr
    gc.collect()
    return rec


def run_trl(c, tmp):
    """TRL's SFTTrainer (the installed trl; its version goes in the row), one real training step
    through `trainer.train()`: SFTConfig's defaults but for one step of B sequences of L tokens
    (bf16=True, the Trainer's default optimizer, gradient clipping), LoRA as the other rows. The
    tracker starts at the Trainer's `training_step` and stops at `on_step_end`."""
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    d = checkpoint(c["arch"], tmp)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation=c.get("attn", "sdpa"),
                                                 quantization_config=BitsAndBytesConfig(**NF4))
    V = model.config.vocab_size
    # A word-level tokenizer over the model's vocabulary: the data is already token ids.
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab={f"t{i}": i for i in range(V)}, unk_token="t0")),
                                  pad_token="t0", eos_token="t1")
    B, L = c["batch"], c["seq"]
    g = torch.Generator().manual_seed(1)
    ds = Dataset.from_dict({"input_ids": torch.randint(2, V, (B, L), generator=g).tolist()})
    args = SFTConfig(output_dir=os.path.join(tmp, "trl-out"), per_device_train_batch_size=B, max_steps=1, learning_rate=2e-4,
                     weight_decay=0.01, bf16=True, gradient_checkpointing=c["ckpt"], report_to="none", save_strategy="no",
                     logging_steps=1, max_length=L, packing=False, dataloader_num_workers=0, use_cpu=True)
    tr = LiveBytes()
    run = {}

    class Marks(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **k):
            run["end_seg"]("after_backward", "optimizer_step")
            run["state"]["bwd"] = False

        def on_optimizer_step(self, *a, **k):
            run["end_seg"]("after_optimizer_step", "zero_grad")

        def on_step_end(self, *a, **k):
            run["end_seg"]("after_zero_grad", "end")
            tr.__exit__(None, None, None)
            run["secs"] = time.time() - run["t0"]

    class Tracked(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            gc.collect()
            tr.add_baseline()
            run["baseline"] = tr.base = tr.total
            tr.snap_peaks = True
            if c.get("trace"):
                tr.trace_phases = {"final_norm+lm_head+loss", "backward_head", "after"}
            run["t0"] = time.time()
            tr.__enter__()
            run["set_next"]("embed")
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Tracked(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora_config(c), callbacks=[Marks()])
    core = trainer.model.base_model.model.model
    layers = list(core.layers)
    marks, end_seg, set_next, state, hooks = install_marks(tr, layers, core)
    run.update(end_seg=end_seg, set_next=set_next, state=state)

    def top_post(mod, a, out):
        end_seg("after_forward", "backward_head")
        run["kept"] = tr.snapshot()
        state["bwd"] = True
    hooks.append(trainer.model.register_forward_hook(top_post))
    trainer.train()
    for h in hooks:
        h.remove()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    rec = record(c, tr, marks, run["kept"], model, layers, B * L, run["baseline"], sum(p.numel() for p in params),
                 sorted({str(p.dtype) for p in params}),
                 sorted({f"{n}:{p.dtype}" for n, p in trainer.model.named_parameters() if p.dtype == torch.float32 and "lora_" not in n}),
                 trainer.optimizer, run["secs"])
    rec.update(trl=trl.__version__, optim=str(args.optim), mixed_precision=str(trainer.accelerator.mixed_precision))
    if c.get("trace"):
        rec["head_trace"] = tr.trace
    del trainer, model, tr, params
    gc.collect()
    return rec


def grid():
    cs = []

    def add(arch, seq, ckpt, r, targets, batch, **kw):
        name = f"{arch}-{kw.get('method', 'qlora')}-L{seq}-b{batch}-r{r}-{targets}-{'gc' if ckpt else 'nogc'}"
        if kw.get("attn"):
            name += "-" + kw["attn"]
        if kw.get("method") == "full":
            name = f"{arch}-full-L{seq}-b{batch}-{'gc' if ckpt else 'nogc'}"
        if kw.get("prepare"):
            name += "-prepared"
        if kw.get("recipe"):
            name += "-" + kw["recipe"]
        if kw.get("transformers"):  # run under that transformers, in its own venv (see the docstring)
            name += "-tf" + kw["transformers"]
        if kw.get("dora"):  # LoraConfig(use_dora=True)
            name += "-dora"
        if kw.get("save"):  # LoraConfig(modules_to_save=[save])
            name += "-save-" + kw["save"]
        if kw.get("experts"):  # a mixture of experts' experts quantized by another route
            name += "-experts-" + kw["experts"].split("-")[0]
        cs.append(dict(name=name, arch=arch, seq=seq, ckpt=ckpt, r=r, targets=targets, batch=batch, **kw))

    a = "llama-h1024"
    for seq in (256, 512, 1024, 2048):
        add(a, seq, False, 16, "all", 1, **({"trace": True} if seq == 256 else {}))
        add(a, seq, True, 16, "all", 1, **({"trace": True} if seq == 256 else {}))
    add(a, 1024, False, 64, "all", 1)
    add(a, 1024, False, 16, "attn", 1)
    add(a, 1024, True, 16, "attn", 1)
    add(a, 512, False, 16, "all", 4)
    add(a, 512, True, 16, "all", 4)
    add(a, 1024, False, 16, "all", 1, attn="eager")
    add(a, 1024, True, 16, "all", 1, attn="eager")
    add(a, 1024, False, 16, "all", 1, attn="eager", recipe="peft-kbit")
    add(a, 1024, False, 16, "all", 1, method="lora")
    add(a, 512, False, 16, "all", 4, method="lora")
    add(a, 512, True, 16, "all", 4, method="lora")
    # The same bf16 LoRA steps under transformers 4.46.3 + PEFT 0.13.2 (torch 2.5.1), in .venv-tf4.46.
    add(a, 1024, False, 16, "all", 1, method="lora", transformers="4.46")
    add(a, 512, False, 16, "all", 4, method="lora", transformers="4.46")
    add(a, 512, True, 16, "all", 4, method="lora", transformers="4.46")
    add(a, 256, False, 16, "all", 1, prepare=True)
    add(a, 512, False, 0, "none", 1, method="full")
    # --recipe peft-kbit: prepare_model_for_kbit_training as the PEFT docs call it (issue 21).
    for seq, ckpt in ((256, False), (1024, False), (1024, True), (512, True)):
        add(a, seq, ckpt, 16, "all", 1, recipe="peft-kbit", **({"trace": True} if seq == 256 else {}))
    add(a, 512, True, 16, "all", 4, recipe="peft-kbit")
    add(a, 1024, True, 16, "attn", 1, recipe="peft-kbit")
    # --recipe trl: TRL's SFTTrainer, one step through trainer.train() (issue 21).
    for seq, ckpt, batch in ((256, False, 1), (1024, False, 1), (1024, True, 1), (512, True, 4)):
        add(a, seq, ckpt, 16, "all", batch, recipe="trl", **({"trace": True} if seq == 256 else {}))
    # DoRA (LoraConfig(use_dora=True)): two carry the last decoder layer's op-by-op trace (`layer_trace`).
    add(a, 256, False, 16, "all", 1, dora=True, trace_layers=True)
    add(a, 1024, False, 16, "all", 1, dora=True)
    add(a, 1024, True, 16, "all", 1, dora=True, trace_layers=True)
    add(a, 512, True, 16, "all", 4, dora=True)
    add(a, 1024, False, 16, "attn", 1, dora=True)
    q = "qwen2-h896"
    for seq in (256, 1024, 2048):
        add(q, seq, False, 16, "all", 1)
        add(q, seq, True, 16, "all", 1)
    add(q, 1024, False, 64, "attn", 1)
    add(q, 512, False, 16, "all", 4)
    add(q, 1024, False, 16, "all", 1, attn="eager")
    add(q, 512, False, 16, "all", 4, method="lora")
    add(q, 512, False, 16, "all", 4, method="lora", transformers="4.46")
    add(q, 1024, False, 16, "all", 1, recipe="peft-kbit")
    add(q, 1024, True, 16, "all", 1, recipe="peft-kbit")
    add(q, 1024, True, 16, "all", 1, recipe="trl")
    add(q, 1024, False, 16, "all", 1, dora=True)
    b = "llama-h4096"
    add(b, 256, False, 16, "all", 1)
    add(b, 256, True, 16, "all", 1)
    add(b, 512, False, 16, "all", 1)
    add(b, 512, True, 16, "all", 1)
    add(b, 1024, True, 16, "all", 1)
    add(b, 512, True, 64, "attn", 1)
    for seq in (256, 512, 1024):
        add(b, seq, True, 16, "all", 1, recipe="peft-kbit")
    add(b, 512, False, 16, "all", 1, recipe="peft-kbit")
    add(b, 512, True, 16, "all", 1, recipe="trl")
    add(b, 512, False, 16, "all", 1, recipe="trl")
    add(b, 256, True, 16, "all", 1, dora=True)
    add(b, 512, False, 16, "all", 1, dora=True)
    # modules_to_save (LoraConfig(modules_to_save=[...])): each next to its plain row of the same name without `-save-...`.
    add(a, 512, False, 16, "all", 1, save="lm_head", trace=True)
    add(a, 1024, True, 16, "all", 1, save="lm_head")
    add(a, 512, False, 16, "all", 1, save="embed_tokens")
    add(q, 1024, True, 16, "all", 1, save="lm_head")   # tied embeddings: see `save_params` / `tied` in the row
    add(b, 512, True, 16, "all", 1, save="lm_head", trace=True)   # the weight gradient's mm tops the head's backward here
    add("qwen2-h3584", 256, False, 16, "all", 1)
    add("qwen2-h3584", 256, True, 16, "all", 1)
    add("qwen2-h3584", 256, True, 16, "all", 1, recipe="peft-kbit")
    add("qwen2-h3584", 256, False, 16, "all", 1, recipe="peft-kbit")
    # Mixtures of experts (issue 23): transformers 5's default experts (grouped_mm), bf16 as a 4-bit load
    # leaves them; LoRA on attention, on attention and experts (target_parameters), PEFT's all-linear; the
    # experts quantized through bitsandbytes' parametrize route.
    for m in ("qwen3moe-h1024", "mixtral-h1024"):
        # op-by-op traces (`layer_trace`): Qwen3-MoE's forward and backward with LoRA on the experts (the
        # plain row's trace is the same ops less those), Mixtral's checkpointed recompute
        # (with LoRA on the experts; quantized, it is the same ops after each layer's dequantization)
        fwd, rec = ({"trace_layers": True}, {}) if m.startswith("qwen3") else ({}, {"trace_layers": True})
        add(m, 512, False, 16, "attn", 1)
        add(m, 512, True, 16, "attn", 1)
        add(m, 512, False, 16, "attn+experts", 1, **fwd)
        add(m, 512, True, 16, "attn+experts", 1, **rec)
        add(m, 512, False, 16, "all-linear", 1)
        add(m, 1024, False, 16, "attn", 1)
        add(m, 512, False, 16, "attn", 1, experts="nf4-parametrize")   # its kept_largest names the dequantized copies
        add(m, 512, True, 16, "attn", 1, experts="nf4-parametrize")
    # prepare_model_for_kbit_training on a mixture of experts: every bf16 parameter, the experts included, cast to fp32.
    add("qwen3moe-h1024", 512, False, 16, "attn", 1, recipe="peft-kbit", trace_layers=True)
    add("qwen3moe-h1024", 512, True, 16, "attn", 1, recipe="peft-kbit")
    add("mixtral-h1024", 512, False, 16, "attn", 1, recipe="peft-kbit")
    add("mixtral-h1024", 512, True, 16, "attn+experts", 1, recipe="peft-kbit")
    add("qwen3moe-h1024", 512, False, 16, "attn", 1, recipe="peft-kbit", experts="nf4-parametrize")
    # TRL's SFTTrainer on a mixture of experts (bf16 adapters under autocast, its fused LM head).
    add("qwen3moe-h1024", 512, False, 16, "attn", 1, recipe="trl")
    add("qwen3moe-h1024", 512, True, 16, "attn", 1, recipe="trl")
    add("mixtral-h1024", 512, False, 16, "attn", 1, recipe="trl")
    add("mixtral-h1024", 512, False, 16, "attn+experts", 1, recipe="trl")
    add("qwen3moe-h1024-dense0", 512, False, 16, "attn", 1)
    add("qwen3moe-h1024-dense0", 512, False, 16, "attn+experts", 1)
    add("mixtral-h1024", 256, False, 16, "attn", 4)
    for ckpt in (False, True):
        add("llama4-h1024", 512, ckpt, 16, "attn", 1, **({} if ckpt else {"trace_layers": True}))
    add("llama4-h1024", 512, False, 16, "all", 1)
    # Llama 4 under the other recipes and expert routes: kbit's fp32 experts, the experts quantized (TRL 1.16's fused
    # LM head fails on Llama4ForCausalLM: its base_model is the model itself), LoRA on its [experts, in, out] parameters.
    for ckpt in (False, True):
        add("llama4-h1024", 512, ckpt, 16, "attn", 1, recipe="peft-kbit")
        add("llama4-h1024", 512, ckpt, 16, "attn", 1, experts="nf4-parametrize")
        add("llama4-h1024", 512, ckpt, 16, "attn+experts", 1)
    g = "gptoss-h1024"   # sinks: transformers has no SDPA path for gpt-oss (eager on CPU)
    add(g, 512, False, 16, "attn", 1, attn="eager", trace_layers=True)
    add(g, 512, True, 16, "attn", 1, attn="eager")
    add(g, 512, False, 16, "attn+experts", 1, attn="eager")
    add(g, 512, True, 16, "attn+experts", 1, attn="eager")
    add(g, 512, False, 16, "attn", 1, attn="eager", experts="nf4-parametrize")
    return cs


def summary(path):
    d = json.load(open(path))
    print("| configuration | tokens | baseline B | kept after forward B (per token) | head kept B/token | peak above baseline B (per token) | peak at |")
    print("|---|---|---|---|---|---|---|")
    for c in d["configs"]:
        t = c["tokens"]
        print(f"| {c['name']} | {t} | {c['baseline_bytes']:,} | {c['kept_after_forward']:,} ({c['kept_after_forward'] / t:,.0f}) | "
              f"{c['head_kept_per_token']:,.0f} | {c['peak_above_baseline']:,} ({c['peak_above_baseline'] / t:,.0f}) | {c['peak_phase']} `{c['peak_op']}` |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--verify-only", action="store_true")
    ap.add_argument("--summary", action="store_true", help="print peaks.json as a Markdown table and exit")
    ap.add_argument("--out", default=os.path.join(HERE, "peaks.json"))
    args = ap.parse_args()
    if args.summary:
        return summary(args.out)
    only = set(filter(None, args.only.split(",")))
    wrong = [c for c in grid() if c["name"] in only and not runs_here(c)]
    if wrong:  # named rows of another venv: refused, before anything runs
        sys.exit(f"generate_peaks.py: this is transformers {transformers.__version__}; "
                 + "; ".join(f"{c['name']} needs {needs(c)}" for c in wrong))
    ver = verify()
    print("tracker verified:", json.dumps(ver), flush=True)
    if args.verify_only:
        return
    results, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for c in grid():
            if only and c["name"] not in only and c["arch"] not in only:
                continue
            if not runs_here(c):
                print(f"skipping {c['name']}: needs {needs(c)}; its committed row is kept", flush=True)
                skipped.append(c["name"])
                continue
            r = run_trl(c, tmp) if c.get("recipe") == "trl" else run_config(c, tmp)
            print(f"{r['name']}: {r['seconds']}s baseline {r['baseline_bytes']} kept {r['kept_after_forward']} "
                  f"head {r['head_kept_per_token']:.1f}/tok peak+{r['peak_above_baseline']} at {r['peak_phase']} ({r['peak_op']})", flush=True)
            results.append(r)
    doc = dict(
        about="Live tensor bytes over one QLoRA/LoRA/full training step of transformers + PEFT + bitsandbytes on CPU "
              "(Vectors/generate_peaks.py). Bytes are storage nbytes, each storage once; baseline = every tensor reachable "
              "before the step. timeline rows: [boundary, live - baseline at it, segment ending there, max live - baseline within "
              "that segment, op at that max].",
        versions=versions(),
        tracker_checks=ver,
        configs=results,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if (only or skipped) and os.path.exists(args.out):
        # --only regenerates some configurations (a whole run, all but those of another venv): the others
        # are kept as they were, in the grid's order.
        prev = json.load(open(args.out))
        if prev.get("versions", {}).get("transformers") != transformers.__version__ and (only or not runs_here({})):
            # the file's versions and tracker checks describe the main venv (a whole run there rewrites them):
            # rows from another venv, or some rows, keep them (each row has its own `versions`).
            doc["versions"], doc["tracker_checks"] = prev["versions"], prev["tracker_checks"]
        old = {c["name"]: c for c in prev["configs"]}
        old.update({c["name"]: c for c in doc["configs"]})
        doc["configs"] = [old[c["name"]] for c in grid() if c["name"] in old]
    configs = doc.pop("configs")
    text = json.dumps(doc, indent=1)[:-2] + ',\n "configs": [\n' + ",\n".join(json.dumps(c, separators=(",", ":")) for c in configs) + "\n ]\n}\n"
    json.loads(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
