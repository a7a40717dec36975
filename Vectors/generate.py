#!/usr/bin/env python3
"""Golden vectors for qlora, made by the real bitsandbytes 0.50.2 on CPU.

Writes Vectors/quant/*.safetensors. Every case stores its input and everything bitsandbytes
produced from it; the Swift tests compare every byte (Tests/QLoRATests, Tests/CheckpointJobsTests).

    python3 -m venv .venv && .venv/bin/pip install -r Vectors/requirements.txt
    .venv/bin/python Vectors/generate.py

torch runs with one thread: the double-quantization offset is torch's fp32 mean, whose
summation order depends on the thread count (qlora's TorchMean reproduces any count; the
`torch_mean` vectors pin 1-4 threads).
"""
import json, os, sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # bnb wraps its portable dequantize in torch.compile; keep it eager
import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors.torch import save_file

assert bitsandbytes.__version__ == "0.50.2", bitsandbytes.__version__
torch.set_num_threads(1)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant")
os.makedirs(OUT, exist_ok=True)
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Group:
    """One safetensors file of cases; metadata maps case id -> parameters (JSON)."""

    def __init__(self, name):
        self.name, self.tensors, self.cases = name, {}, {}

    def add(self, key, t):
        assert key not in self.tensors, key
        self.tensors[key] = t.detach().contiguous().clone()

    def save(self):
        meta = {"cases": json.dumps(self.cases, sort_keys=True), "bitsandbytes": bitsandbytes.__version__,
                "torch": torch.__version__}
        save_file(self.tensors, os.path.join(OUT, self.name + ".safetensors"), metadata=meta)
        print(f"{self.name}: {len(self.cases)} cases, {len(self.tensors)} tensors")


def quant_case(g, cid, x, quant_type, blocksize, double_quant, deq_dtypes=("float32", "bfloat16", "float16"),
               input_key=None, note=""):
    """Quantize x with bitsandbytes and record packed data, state and dequantizations."""
    if input_key is None:
        input_key = cid + ".input"
        g.add(input_key, x)
    q, st = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    g.add(cid + ".packed", q)
    packed_state = st.as_dict(packed=True)  # exactly what a checkpoint holds
    for k, v in packed_state.items():
        g.add(cid + "." + k.replace("quant_state.bitsandbytes__", "quant_state."), v)
    if double_quant:
        g.add(cid + ".nested_offset", st.offset.reshape(1).float())
    code = F.get_4bit_type(quant_type, device="cpu")
    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        g.add(cid + ".absmax_dequantized", absmax.float())
    mismatches = {}
    for name in deq_dtypes:
        st.dtype = DT[name]
        api = F.dequantize_4bit(q, st)  # the real CPU kernel this machine dispatches to
        portable = _dequantize_4bit_compute(q.reshape(-1), absmax.float(), code, blocksize, tuple(x.shape), DT[name])
        g.add(f"{cid}.dequant.{name}", portable)
        same = torch.equal(api.reshape(-1).view(torch.uint8), portable.reshape(-1).view(torch.uint8))
        if not same:
            g.add(f"{cid}.dequant_cpu_kernel.{name}", api.reshape(portable.shape))
            mismatches[name] = int((api.reshape(-1).float() != portable.reshape(-1).float()).sum())
    g.cases[cid] = {"input": input_key, "quant_type": quant_type, "blocksize": blocksize,
                    "double_quant": double_quant, "dtype": str(x.dtype).replace("torch.", ""),
                    "shape": list(x.shape), "dequant": list(deq_dtypes),
                    "cpu_kernel_differs": mismatches, "note": note}


def rng(seed):
    return torch.Generator().manual_seed(seed)


def main():
    # 1. Every quant type x blocksize x double quant, one fp32 input whose element count is
    #    not a multiple of any blocksize.
    g = Group("grid")
    x = torch.randn(33, 130, generator=rng(1)) * 0.02
    g.add("grid.input", x)
    for qt in ("nf4", "fp4"):
        for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            for dq in (True, False):
                deq = ("float32", "bfloat16", "float16") if bs == 64 else ("float32",)
                quant_case(g, f"{qt}_bs{bs}_{'dq' if dq else 'nodq'}", x, qt, bs, dq, deq, input_key="grid.input")
    g.save()

    # 2. Input dtypes and awkward shapes.
    g = Group("shapes")
    for dt in ("bfloat16", "float16", "float32"):
        x = (torch.randn(64, 96, generator=rng(2)) * 0.05).to(DT[dt])
        for qt in ("nf4", "fp4"):
            quant_case(g, f"{dt}_{qt}_64x96", x, qt, 64, True, note="last dim not a multiple of blocksize")
    for shape in ((1,), (7,), (3, 5), (1023,), (65,), (2, 3, 33)):
        x = torch.randn(*shape, generator=rng(3)) * 3.0
        for qt in ("nf4", "fp4"):
            for dq in (True, False):
                quant_case(g, f"odd_{qt}_{'x'.join(map(str, shape))}_{'dq' if dq else 'nodq'}", x, qt, 64, dq)
    # More than 256 first-level blocks: several nested blocks, the last one partial.
    x = torch.randn(300, 128, generator=rng(4)) * 0.01
    for qt in ("nf4", "fp4"):
        quant_case(g, f"nested_{qt}_300x128_bs32", x, qt, 32, True, ("float32", "bfloat16"))
    g.save()

    # 3. Edge values.
    g = Group("edges")
    # A zero full block, a normal block, and a zero partial block.
    x = torch.cat([torch.zeros(64), torch.randn(64, generator=rng(5)), torch.zeros(10)])
    for qt in ("nf4", "fp4"):
        for dq in (True, False):
            quant_case(g, f"zeros_{qt}_{'dq' if dq else 'nodq'}", x, qt, 64, dq)
    # A constant tensor: every absmax equals the offset, so the nested block is all zero.
    x = torch.full((4, 64), 0.5)
    quant_case(g, "constant_nf4", x, "nf4", 64, True)
    # Values exactly on the code midpoints and one ulp either side, in blocks whose absmax is 1.
    for qt in ("nf4", "fp4"):
        code = F.get_4bit_type(qt, device="cpu")
        s = torch.sort(code).values
        mids = (s[:-1] + s[1:]) / 2
        vals = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                          s, torch.tensor([0.0, -0.0, 1e-3, -1e-3, 0.0026, -0.0026, 1.0, -1.0])])
        n = vals.numel()
        blocks = []
        for i in range(0, n, 63):
            chunk = vals[i:i + 63]
            blocks.append(torch.cat([torch.tensor([1.0]), chunk, torch.zeros(63 - chunk.numel())]))
        x = torch.cat(blocks)
        for dq in (True, False):
            quant_case(g, f"midpoints_{qt}_{'dq' if dq else 'nodq'}", x, qt, 64, dq)
    # Huge and tiny magnitudes (fp32 subnormals included), and mixed ranges inside a block.
    base = torch.randn(64, generator=rng(6))
    base = base / base.abs().max()  # max |base| == 1, so 1.7e38 * base stays finite
    parts = [base * 1e30, base * 1.7e38, base * 1e-30, base * 1e-39, base * 1e-44,
             torch.cat([base[:32] * 1e20, base[32:] * 1e-20])]
    x = torch.cat(parts)
    for qt in ("nf4", "fp4"):
        for dq in (True, False):
            quant_case(g, f"magnitudes_{qt}_{'dq' if dq else 'nodq'}", x, qt, 64, dq)
    xb = (torch.cat([base * 3e38, base * 1e-38, base]).clamp(-3.3e38, 3.3e38)).to(torch.bfloat16)
    quant_case(g, "magnitudes_bf16_nf4", xb, "nf4", 64, True)
    xh = torch.cat([base * 6e4, base * 1e-6, base]).clamp(-65000, 65000).to(torch.float16)
    quant_case(g, "magnitudes_f16_nf4", xh, "nf4", 64, True)
    g.save()

    # 4. The 8-bit dynamic quantizer alone (double quantization's second level), swept over
    #    every LUT bin: blocks of 256 whose first value is 1.0 so the scale is exactly 1. Only
    #    the random part of the input is stored: the test rebuilds the bin centres and edges
    #    from this formula (float64, rounded once to float32; edges also one ulp up).
    g = Group("blockwise8")
    i = torch.arange(65536, dtype=torch.float64)
    centers = (-1.0 + 2.0 * i / 65535.0).float()
    edges = (-1.0 + (2.0 * i + 1.0) / 65535.0).float()[:-1]
    random_part = torch.rand(20000, generator=rng(7)) * 2 - 1
    sweep = torch.cat([centers, edges, torch.nextafter(edges, torch.tensor(2.0)), random_part])
    blocks = [torch.cat([torch.tensor([1.0]), sweep[j:j + 255]]) for j in range(0, sweep.numel(), 255)]
    x = torch.cat(blocks)
    code = F.create_dynamic_map().float()
    q, am = torch.ops.bitsandbytes.quantize_blockwise.default(x, code, 256)
    g.add("sweep.random_input", random_part)
    g.add("sweep.quantized", q)
    g.add("sweep.absmax", am)
    y = torch.randn(5000, generator=rng(8)) * 0.3
    q, am = torch.ops.bitsandbytes.quantize_blockwise.default(y, code, 256)
    g.add("random.input", y)
    g.add("random.quantized", q)
    g.add("random.absmax", am)
    g.add("random.dequantized", torch.ops.bitsandbytes.dequantize_blockwise.default(q, am, code, 256, torch.float32))
    g.add("dynamic_code", code)
    g.cases["blockwise8"] = {"blocksize": 256}
    g.save()

    # 5. torch's fp32 mean at 1-4 threads (the double-quant offset).
    g = Group("torch_mean")
    z = (torch.rand(40000, generator=rng(9)) * 0.1 + 0.01)
    g.add("values", z)
    for n in (1, 5, 7, 8, 100, 1000, 32767, 32768, 33001, 40000):
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            g.add(f"mean.n{n}.t{t}", z[:n].mean().reshape(1))
    torch.set_num_threads(1)
    g.cases["torch_mean"] = {"sizes": [1, 5, 7, 8, 100, 1000, 32767, 32768, 33001, 40000], "threads": [1, 2, 3, 4]}
    g.save()

    # 7. The 4-bit matmul with bf16 compute: bitsandbytes' dequantized bf16 weight times the bf16
    #    input (and bf16 upstream gradient), in fp32 (torch, one thread); and bitsandbytes' own
    #    matmul_4bit (bf16 out) for the shape its CPU kernels handle as flat blocks.
    g = Group("matmul")
    for wid, (out, k, qt, dq) in {"w77x130": (77, 130, "nf4", True), "w96x192": (96, 192, "fp4", False)}.items():
        w = torch.randn(out, k, generator=rng(20 + out)) * 0.05
        quant_case(g, wid, w, qt, 64, dq, ("bfloat16",))
        q, st = F.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
        absmax = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset) if st.nested else st.absmax
        wb = _dequantize_4bit_compute(q.reshape(-1), absmax.float(), F.get_4bit_type(qt, device="cpu"), 64, (out, k), torch.bfloat16)
        for tokens in (1, 5, 33):
            x = torch.randn(tokens, k, generator=rng(30 + tokens))
            dy = torch.randn(tokens, out, generator=rng(40 + tokens))
            g.add(f"{wid}.t{tokens}.x", x)
            g.add(f"{wid}.t{tokens}.dy", dy)
            g.add(f"{wid}.t{tokens}.y", torch.nn.functional.linear(x.bfloat16().float(), wb.float()))
            g.add(f"{wid}.t{tokens}.dx", dy.bfloat16().float() @ wb.float())
            if k % 64 == 0:
                st.dtype = torch.bfloat16
                g.add(f"{wid}.t{tokens}.y_bnb_matmul_4bit", bitsandbytes.matmul_4bit(x.bfloat16(), q.t(), quant_state=st))
        g.cases[wid] = {"out": out, "in": k, "quant_type": qt, "double_quant": dq, "tokens": [1, 5, 33],
                        "input": wid + ".input", "blocksize": 64, "shape": [out, k], "dtype": "float32",
                        "dequant": ["bfloat16"], "cpu_kernel_differs": {}, "note": ""}
    g.save()

    # 8. LoRA on a bnb 4-bit base, through PEFT (issue 4), and ten AdamW steps.
    lora()
    adamw()
    clip()
    merge()

    # 6. A tiny checkpoint and its bitsandbytes-4bit serialization, as transformers saves it
    #    (each nn.Linear replaced by bnb.nn.Linear4bit; the module state_dict).
    checkpoint()


def lora():
    """PEFT's LoRA layer on bnb.nn.Linear4bit (NF4, double quant, bf16 compute): y, dX, dA, dB."""
    import bitsandbytes.nn as bnn
    from peft import LoraConfig, get_peft_model
    g = Group("lora")
    torch.manual_seed(0)  # PEFT initializes lora_A from torch's global generator
    # in_f a multiple of the blocksize: bitsandbytes' AVX-512 CPU dequantize mis-indexes absmax otherwise
    # (Vectors/README.md), and its matmul_4bit uses that kernel.
    out_f, in_f, tokens = 48, 128, 5
    w = torch.randn(out_f, in_f, generator=rng(50)) * 0.05
    g.add("base.weight", w)
    x = torch.randn(tokens, in_f, generator=rng(51))
    dy = torch.randn(tokens, out_f, generator=rng(52))
    g.add("x", x)
    g.add("dy", dy)
    for r, rs, bf16 in ((8, False, False), (16, False, False), (8, True, False), (16, True, False), (8, False, True)):
        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = bnn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                                           compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
                self.proj.weight = bnn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True,
                                                  quant_type="nf4", blocksize=64)

            def forward(self, inp):
                return self.proj(inp)
        model = Tiny().to("cpu")
        model.is_loaded_in_4bit = True  # as transformers sets it; PEFT then wraps with its bnb LoRA layer
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"], use_rslora=rs, bias="none")
        pm = get_peft_model(model, cfg)
        layer = pm.base_model.model.proj
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        with torch.no_grad():  # B is zero at init; give it values so every gradient is non-trivial
            b.copy_(torch.randn(b.shape, generator=rng(53 + r)) * 0.1)
        if bf16:  # bf16 adapter weights: PEFT casts x to bf16 and runs the adapter in bf16
            layer.lora_A["default"].to(torch.bfloat16)
            layer.lora_B["default"].to(torch.bfloat16)
            a = layer.lora_A["default"].weight
            b = layer.lora_B["default"].weight
        cid = f"r{r}{'_rslora' if rs else ''}{'_bf16' if bf16 else ''}"
        g.add(cid + ".lora_A", a.detach().float())  # bf16 values held exactly in fp32
        g.add(cid + ".lora_B", b.detach().float())
        xx = x.clone().requires_grad_(True)
        y = pm(xx)
        y.backward(dy)
        g.add(cid + ".y", y.detach())
        g.add(cid + ".dx", xx.grad)
        g.add(cid + ".dA", a.grad.float())
        g.add(cid + ".dB", b.grad.float())
        if cid == "r8":  # PEFT's own adapter files, as save_pretrained writes them
            adir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_adapter")
            pm.save_pretrained(adir)
            os.remove(os.path.join(adir, "README.md"))  # PEFT's model card: not needed
        g.cases[cid] = {"r": r, "lora_alpha": 2 * r, "use_rslora": rs, "scaling": layer.scaling["default"],
                        "out": out_f, "in": in_f, "tokens": tokens, "peft": __import__("peft").__version__,
                        "lora_A_dtype": str(a.dtype)}
    g.save()


def merge():
    """PEFT's merge_and_unload: dense f32/bf16 bases (r 8/16, rsLoRA, fan_in_fan_out, rank and
    alpha patterns, a bf16 adapter) and a bnb-4bit base (re-quantized, and merged_16bit)."""
    import bitsandbytes.nn as bnn
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D
    g = Group("merge")
    torch.manual_seed(1)
    out_f, in_f = 32, 64  # in_f a multiple of the blocksize (see lora()); small to keep Vectors/ under 5 MB

    def fill_b(pm, seed):
        with torch.no_grad():
            for name, prm in pm.named_parameters():
                if "lora_B" in name:
                    prm.copy_(torch.randn(prm.shape, generator=rng(seed)) * 0.05)
                    seed += 1

    def record(cid, pm, base_names, meta):
        for n, prm in pm.named_parameters():
            if "lora_" in n:
                g.add(cid + "." + n.replace("base_model.model.", "").replace(".default", ""), prm.detach().float())
        merged = pm.merge_and_unload()
        for bn in base_names:
            g.add(f"{cid}.merged.{bn}", getattr(merged, bn).weight.detach())
        g.cases[cid] = meta

    for dt in ("float32", "bfloat16"):
        for r, rs, adapter_bf16 in ((8, False, False), (16, True, False), (8, False, True)):
            class Two(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.proj_a = torch.nn.Linear(in_f, out_f, bias=False)
                    self.proj_b = torch.nn.Linear(in_f, out_f // 2, bias=False)

                def forward(self, x):
                    return self.proj_a(x)
            m = Two().to(DT[dt])
            cid = f"{dt}_r{r}{'_rslora' if rs else ''}{'_bf16adapter' if adapter_bf16 else ''}"
            for bn in ("proj_a", "proj_b"):
                g.add(f"{cid}.base.{bn}", getattr(m, bn).weight.detach().clone())
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj_a", "proj_b"], use_rslora=rs,
                             rank_pattern={"proj_b": 4}, alpha_pattern={"proj_b": 12})
            pm = get_peft_model(m, cfg)
            if adapter_bf16:
                for n, mod in pm.named_modules():
                    if n.endswith("lora_A") or n.endswith("lora_B"):
                        mod.to(torch.bfloat16)
            else:
                for n, mod in pm.named_modules():
                    if n.endswith("lora_A") or n.endswith("lora_B"):
                        mod.to(torch.float32)
            fill_b(pm, 80 + r)
            record(cid, pm, ["proj_a", "proj_b"], {"base_dtype": dt, "r": r, "lora_alpha": 2 * r, "use_rslora": rs,
                   "rank_pattern": {"proj_b": 4}, "alpha_pattern": {"proj_b": 12}, "adapter_dtype": "bfloat16" if adapter_bf16 else "float32",
                   "modules": ["proj_a", "proj_b"], "fan_in_fan_out": False})

    # fan_in_fan_out: a GPT-2 style Conv1D whose weight is [in, out].
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(out_f, in_f)

        def forward(self, x):
            return self.c_attn(x)
    m = Conv()
    g.add("conv_r8.base.c_attn", m.c_attn.weight.detach().clone())
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True))
    fill_b(pm, 90)
    record("conv_r8", pm, ["c_attn"], {"base_dtype": "float32", "r": 8, "lora_alpha": 16, "use_rslora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "adapter_dtype": "float32", "modules": ["c_attn"], "fan_in_fan_out": True})

    # A bnb-4bit base (NF4, double quant, quantized from bf16), r 8.
    w = (torch.randn(out_f, in_f, generator=rng(95)) * 0.05).to(torch.bfloat16)
    g.add("nf4_r8.base.proj", w)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                       quant_type="nf4", quant_storage=torch.uint8)
            self.proj.weight = bnn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64)

        def forward(self, x):
            return self.proj(x)
    m = Tiny().to("cpu")
    m.is_loaded_in_4bit = True
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    fill_b(pm, 97)
    layer = pm.base_model.model.proj
    a = layer.lora_A["default"].weight.detach().float()
    b = layer.lora_B["default"].weight.detach().float()
    g.add("nf4_r8.proj.lora_A.weight", a)
    g.add("nf4_r8.proj.lora_B.weight", b)
    base_w = layer.base_layer.weight
    deq = F.dequantize_4bit(base_w.data, base_w.quant_state)  # bf16, as the base was quantized from bf16
    delta = (b @ a) * layer.scaling["default"]
    g.add("nf4_r8.merged_16bit.proj", (deq.float() + delta).to(torch.bfloat16))  # the common merged_16bit export
    merged = pm.merge_and_unload()
    mw = merged.proj.weight
    g.add("nf4_r8.merged_4bit.proj", mw.data)
    for k, v in mw.quant_state.as_dict(packed=True).items():
        g.add("nf4_r8.merged_4bit.proj." + k, v)
    g.add("nf4_r8.merged_4bit.dequantized", F.dequantize_4bit(mw.data, mw.quant_state).float())
    g.cases["nf4_r8"] = {"base_dtype": "nf4", "r": 8, "lora_alpha": 16, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                         "adapter_dtype": "float32", "modules": ["proj"], "fan_in_fan_out": False,
                         "merged_quant_state_dtype": str(mw.quant_state.dtype)}

    # Two adapters merged in order (merge_and_unload(adapter_names=[...]) loops over them), the
    # second with weight 0.5 (scale_layer multiplies its scaling). A bf16 base is rounded to bf16
    # after each; a bnb-4bit base is re-quantized after each.
    def two_adapters(cid, model, seed):
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]), adapter_name="first")
        pm.add_adapter("second", LoraConfig(r=8, lora_alpha=8, target_modules=["proj"]))
        fill_b(pm, seed)
        layer = pm.base_model.model.proj
        for name in ("first", "second"):
            layer.lora_A[name].to(torch.float32)
            layer.lora_B[name].to(torch.float32)
            g.add(f"{cid}.{name}.proj.lora_A.weight", layer.lora_A[name].weight.detach().float())
            g.add(f"{cid}.{name}.proj.lora_B.weight", layer.lora_B[name].weight.detach().float())
        layer.scaling["second"] *= 0.5
        merged = pm.merge_and_unload(adapter_names=["first", "second"])
        g.cases[cid] = {"adapters": [{"name": "first", "r": 4, "lora_alpha": 8, "weight": 1.0},
                                     {"name": "second", "r": 8, "lora_alpha": 8, "weight": 0.5}]}
        return merged.proj.weight

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(in_f, out_f, bias=False)

        def forward(self, x):
            return self.proj(x)
    m = Dense().to(torch.bfloat16)
    g.add("two_bf16.base.proj", m.proj.weight.detach().clone())
    g.add("two_bf16.merged.proj", two_adapters("two_bf16", m, 110).detach())
    m = Tiny().to("cpu")
    m.is_loaded_in_4bit = True
    mw = two_adapters("two_nf4", m, 120)
    g.add("two_nf4.merged_4bit.proj", mw.data)
    for k, v in mw.quant_state.as_dict(packed=True).items():
        g.add("two_nf4.merged_4bit.proj." + k, v)
    g.save()


def clip():
    """torch.nn.utils.clip_grad_norm_ over three gradient tensors (global L2 norm)."""
    g = Group("clip")
    grads = [torch.randn(8, 37, generator=rng(70)), torch.randn(5, generator=rng(71)) * 3, torch.randn(64, 16, generator=rng(72)) * 0.1]
    for i, t in enumerate(grads):
        g.add(f"grad{i}", t)
    for max_norm in (1.0, 100.0):
        ps = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p_, t in zip(ps, grads):
            p_.grad = t.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        g.add(f"max{int(max_norm)}.total_norm", total.reshape(1))
        for i, p_ in enumerate(ps):
            g.add(f"max{int(max_norm)}.clipped{i}", p_.grad)
    g.cases["clip"] = {"max_norms": [1.0, 100.0], "tensors": 3}
    g.save()


def adamw():
    """torch.optim.AdamW with its defaults on CPU: ten steps on fixed gradients."""
    g = Group("adamw")
    for shape in ((8, 37), (5,), (64, 16)):
        cid = "p" + "x".join(map(str, shape))
        p0 = torch.randn(*shape, generator=rng(60 + len(shape)))
        p = p0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([p])
        g.add(cid + ".param0", p0)
        for step in range(1, 11):
            grad = torch.randn(*shape, generator=rng(100 + step)) * (0.1 if step % 2 else 3.0)
            if step == 4:
                grad[..., 0] = 0.0
            g.add(f"{cid}.grad.{step}", grad)
            p.grad = grad.clone()
            opt.step()
            st = opt.state[p]
            g.add(f"{cid}.param.{step}", p.detach())
            g.add(f"{cid}.exp_avg.{step}", st["exp_avg"])
            g.add(f"{cid}.exp_avg_sq.{step}", st["exp_avg_sq"])
        g.cases[cid] = {"shape": list(shape), "steps": 10, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                        "weight_decay": 1e-2}
    g.save()


def checkpoint():
    import bitsandbytes.nn as bnn
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint")
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(10)
    dense = {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(16, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": (torch.randn(16, 16, generator=g) * 0.1).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": (torch.randn(16, 48, generator=g) * 0.1).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": (torch.randn(48, 16, generator=g) * 0.1).to(torch.bfloat16),
        "model.norm.weight": torch.ones(16, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16),
    }
    save_file(dense, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    for qt in ("nf4", "fp4"):
        for dq in (True, False):
            out = {}
            for name, w in dense.items():
                if w.dim() == 2 and not any(s in name for s in ("embed", "lm_head", "norm")):
                    lin = bnn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                         compress_statistics=dq, quant_type=qt, quant_storage=torch.uint8)
                    lin.weight = bnn.Params4bit(w.clone(), requires_grad=False, compress_statistics=dq,
                                                quant_type=qt, blocksize=64)
                    lin = lin.to("cpu")
                    prefix = name[: -len("weight")]
                    for k, v in lin.state_dict().items():
                        out[prefix + k] = v.detach().clone().contiguous()
                else:
                    out[name] = w
            save_file(out, os.path.join(d, f"bnb-{qt}-{'dq' if dq else 'nodq'}.safetensors"), metadata={"format": "pt"})
    print("checkpoint: dense + 4 bitsandbytes serializations")


if __name__ == "__main__":
    main()
