"""Does llama.cpp run what `qlora export` writes, and give transformers' numbers? (issue 16)

Run by hand where llama-cpp-python is installed (CI never runs it):

    swift build -c release --product qlora
    .venv/bin/python Vectors/check_gguf_client.py [path/to/qlora [FAMILY,...]]   # default .build/release/qlora, every family

llama-cpp-python built from source works, and so does its sdist's Python package beside a
llama.cpp build of the same tree: PYTHONPATH=<sdist> LLAMA_CPP_LIB_PATH=<build>/bin.

For each family qlora exports (Llama, Mistral, Qwen2, Qwen3, Phi-3; the mixtures of experts
Qwen3-MoE and gpt-oss with the BPE tokenizer, Mixtral with 8 experts and the SentencePiece one,
each with LoRA on the attention) it writes a small random model
with transformers (hidden 256, intermediate 512, 2 layers, 8 heads over 2 KV heads, bf16) with a
real SentencePiece tokenizer (Vectors/gguf/llama-tiny/tokenizer.model) and TinyLlama-Chat-style
side files, and a random PEFT LoRA adapter on every projection; and a Llama and a Qwen2 with
byte-level BPE tokenizers (tokenizer.json with Llama 3's and Qwen2's definitions,
Vectors/gguf/bpe). Then it exports with the adapter
merged on the fly (Llama: every type from the dense model and Q4_K_M from qlora's NF4 quantization
of it; the others bf16 and Q8_0 from the dense model and Q4_K_M from NF4) and checks:

  tokens   llama.cpp's tokenizer gives SentencePiece's (or transformers', for BPE) ids for a fixed
           text, BOS first where the tokenizer adds one;
  special  llama.cpp reads the chat template and pad token of the tokenizer_config.json the model
           carries;
  loads    llama.cpp loads the file and evaluates those tokens;
  lora     the adapter alone (--lora-only, f32) on the bf16 base: llama.cpp's logits with the
           adapter applied unmerged are the fp32 merge's within the bf16 tolerance;
  logits   llama.cpp's logits are transformers' own logits for the weights the file holds
           (a mixture of experts: f32 whole, the other types the median token's, since a
           rounding can flip a token's choice of expert)
           (each GGUF tensor dequantized by the gguf package, q/k rows un-permuted, run through
           transformers in fp32): relative RMS difference within ENGINE_TOLERANCE, the error of
           llama.cpp's arithmetic alone. Beside it, the difference from the fp32 merged model
           (what the type costs) and how often both pick the same next token.

One line per check, PASS or FAIL; the exit status is the number of failures.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore")
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config, Qwen3Config, Qwen3MoeConfig
from peft import LoraConfig, get_peft_model
import llama_cpp
import sentencepiece
import gguf

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "gguf", "llama-tiny", "tokenizer.model")
SPECIAL = os.path.join(HERE, "gguf", "llama-tiny", "special", "chat")
TEXT = "the quick brown fox jumps over the lazy dog and the naïve QLoRA adapter merge"
# For the BPE tokenizers: digits (Llama 3 groups up to three, Qwen2 one), CJK, contractions, newlines.
BPE_TEXT = "It's 2026:\n日本語 and 3.14159 -- the naïve QLoRA adapter's merge\n\n  I'll see"
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "iq4_nl"]

# llama.cpp's arithmetic against transformers' fp32 on the same weights. Every type keeps K and V
# in llama.cpp's F16 cache (about 2e-4 here with F32 weights); F16 and BF16 weights are multiplied
# with activations rounded to that type (BF16: 8 bits, a few 1e-3); the quantized types' dot
# products quantize the activations to 8 bits (Q8_0/Q8_K), about 1e-2 on these logits.
ENGINE_TOLERANCE = {"f32": 1e-3, "f16": 5e-3, "bf16": 2e-2, "q8_0": 3e-2, "q4_0": 3e-2, "q4_k_m": 3e-2, "iq4_nl": 3e-2}
# A mixture of experts' Q4_K_M: each token sums k experts' products of 8-bit-quantized activations,
# weighted by a router whose input carries that error too (the median token measured 2.2e-2 to
# 4.0e-2 on the three tiny MoE models here; bf16 and Q8_0 stay within the dense bounds).
MOE_ENGINE_TOLERANCE = dict(ENGINE_TOLERANCE, q4_k_m=5e-2)

failures = 0


def report(ok, what, detail):
    global failures
    failures += 0 if ok else 1
    print(f"{'PASS' if ok else 'FAIL'}  {what:<44} {detail}")


SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = PROJECTIONS[:4]
# The families qlora exports: (name, config class, its fields, LoRA targets). Real Qwen2/Qwen3
# checkpoints ship BPE tokenizers, which the export does not convert yet; these carry the
# SentencePiece one (convert_hf_to_gguf.py's Qwen2Model tries tokenizer.model first too).
BPE = os.path.join(HERE, "gguf", "bpe")
FAMILIES = [
    ("llama", LlamaConfig, dict(rope_theta=10000.0), PROJECTIONS),
    ("llama3-bpe", LlamaConfig, dict(rope_theta=500000.0), PROJECTIONS),
    ("qwen2-bpe", Qwen2Config, dict(rope_theta=1000000.0), PROJECTIONS),
    ("mistral", MistralConfig, dict(rope_theta=1000000.0, sliding_window=None), PROJECTIONS),
    ("qwen2", Qwen2Config, dict(rope_theta=1000000.0), PROJECTIONS),
    ("qwen3", Qwen3Config, dict(rope_theta=1000000.0, head_dim=64), PROJECTIONS),
    ("phi3", Phi3Config, dict(rope_theta=10000.0, pad_token_id=0, original_max_position_embeddings=512),
     ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    # LongRoPE (Phi-3-mini-128k, Phi-3.5-mini): 512 positions over an original 128, long and short factors.
    ("phi3-longrope", Phi3Config, dict(pad_token_id=0, original_max_position_embeddings=128, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=1.0, original_max_position_embeddings=128,
        long_factor=[1.0 + 0.25 * i for i in range(16)], short_factor=[1.0 + 0.0625 * i for i in range(16)])),
     ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    # Mixtures of experts (issue 23): transformers 5 holds the experts fused; the checkpoint per expert
    # (Qwen3-MoE, Mixtral) or fused and interleaved (gpt-oss, with biases, sinks and yarn rope).
    ("qwen3moe-bpe", Qwen3MoeConfig, dict(rope_theta=1000000.0, head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                                norm_topk_prob=True), ATTENTION),  # as Qwen3-30B-A3B: llama.cpp's qwen3moe always renormalizes
    ("mixtral", MixtralConfig, dict(rope_theta=1000000.0, num_local_experts=8, num_experts_per_tok=2, intermediate_size=256), ATTENTION),
    ("gptoss-bpe", GptOssConfig, dict(head_dim=64, num_local_experts=4, num_experts_per_tok=2, intermediate_size=256, sliding_window=64,
                                      layer_types=["sliding_attention", "full_attention"]), ATTENTION),
]
# The BPE side files a family carries (Vectors/gguf/bpe/NAME): its own name's, else these.
BPE_SIDE = {"qwen3moe-bpe": "qwen2", "gptoss-bpe": "qwen2"}


def make_model(directory, family, config_class, fields, targets):
    """The model, its adapter, its merge, the token ids of TEXT as the Hugging Face side makes them
    (BOS first where the tokenizer adds one), and the tokenizer_config.json it carries."""
    if family.endswith("-bpe"):
        # A byte-level BPE tokenizer.json with Qwen2's or Llama 3's definitions (Vectors/generate_gguf_bpe.py).
        side = os.path.join(BPE, BPE_SIDE.get(family, family.split("-")[0]))
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(side).encode(BPE_TEXT)
        vocab_size = json.load(open(os.path.join(side, "config.json")))["vocab_size"]
        special = {k: v for k, v in json.load(open(os.path.join(side, "config.json"))).items() if k.endswith("_token_id")}
        files = [os.path.join(side, f) for f in ["tokenizer.json", "tokenizer_config.json"]]
    else:
        sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)
        ids = [1] + sp.encode(TEXT)
        vocab_size = sp.get_piece_size() + 6  # room for an added token, and [PAD] ids
        special = {}
        # TinyLlama-Chat's side files (Vectors/generate_gguf_special.py)
        files = [TOKENIZER] + [os.path.join(SPECIAL, f) for f in ["tokenizer_config.json", "tokenizer.json"]]
    config = config_class(**dict(SHAPE, **special, **fields), vocab_size=vocab_size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # transformers 5 leaves fused experts, routers and sinks at zero: give them values
        for n, p in model.named_parameters():
            if p.abs().sum() == 0 or ".experts." in n:
                p.normal_(0, 0.05)
    model.save_pretrained(directory)
    for f in files:
        shutil.copy(f, directory)
    if config_class is Phi3Config:
        # Phi-3's added_tokens.json; llama.cpp looks <|endoftext|> up in every model named phi3.
        with open(os.path.join(directory, "added_tokens.json"), "w") as f:
            json.dump({"<|endoftext|>": vocab_size - 6}, f)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), lora)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.mul_(0.05)
    adapter = directory + "-adapter"
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().eval()
    return ids, adapter, merged, json.load(open(os.path.join(directory, "tokenizer_config.json")))


def unpermute(w, heads):
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_from_gguf(path, config, family):
    """transformers' model holding the GGUF's weights, dequantized to fp32."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "attn_qkv": "self_attn.qkv_proj"}
    if config.model_type == "phi3":
        per_layer["ffn_up"] = "mlp.gate_up_proj"
    if config.model_type == "gpt_oss":
        per_layer.update({"post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router", "attn_sinks": "self_attn.sinks"})
    else:
        per_layer["ffn_gate_inp"] = "mlp.gate"
    state, experts = {}, {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(n) for n in reversed(t.shape)])
        if "_exps." in t.name:  # [experts, out, in] (biases [experts, out]): fused back below
            _, layer, part, kind = t.name.split(".")
            experts[(layer, part.split("_")[1], kind)] = w
            continue
        if t.name in names:
            name = names[t.name]
        elif t.name.startswith("blk."):
            _, layer, part, kind = t.name.split(".")
            name = f"model.layers.{layer}.{per_layer[part]}" + ("" if part == "attn_sinks" else f".{kind}")
            if config.model_type in ("llama", "mistral", "mixtral") and part == "attn_q":  # LlamaModel's permutation, undone
                w = unpermute(w, config.num_attention_heads)
            elif config.model_type in ("llama", "mistral", "mixtral") and part == "attn_k":
                w = unpermute(w, config.num_key_value_heads)
        else:
            continue  # rope_freqs: not a weight
        state[name] = torch.from_numpy(w.copy())
    for layer in sorted({k[0] for k in experts}):
        e = {(p, k): w for (l, p, k), w in experts.items() if l == layer}
        prefix = f"model.layers.{layer}.mlp.experts."
        if config.model_type == "gpt_oss":  # [experts, in, out], gate and up interleaved on the last axis
            gate_up = np.empty(e[("gate", "weight")].shape[:1] + (e[("gate", "weight")].shape[2], 2 * e[("gate", "weight")].shape[1]), np.float32)
            gate_up[..., ::2], gate_up[..., 1::2] = e[("gate", "weight")].transpose(0, 2, 1), e[("up", "weight")].transpose(0, 2, 1)
            bias = np.empty(e[("gate", "bias")].shape[:1] + (2 * e[("gate", "bias")].shape[1],), np.float32)
            bias[:, ::2], bias[:, 1::2] = e[("gate", "bias")], e[("up", "bias")]
            fused = {"gate_up_proj": gate_up, "gate_up_proj_bias": bias, "down_proj": e[("down", "weight")].transpose(0, 2, 1),
                     "down_proj_bias": e[("down", "bias")]}
        else:  # [experts, 2·intermediate, hidden], gate rows first
            fused = {"gate_up_proj": np.concatenate([e[("gate", "weight")], e[("up", "weight")]], axis=1), "down_proj": e[("down", "weight")]}
        for k, w in fused.items():
            state[prefix + k] = torch.from_numpy(np.ascontiguousarray(w))
    model = AutoModelForCausalLM.from_config(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def run_llama_cpp(path, ids, text):
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    text_ids = llm.tokenize(text.encode(), add_bos=True)
    llm.eval(ids)
    return llm, text_ids, np.array(llm.scores[:len(ids)], dtype=np.float32)


def check_lora(qlora, t, family, model_dir, adapter, ids, reference, moe=False):
    """The adapter alone as a LoRA GGUF on the bf16 base: llama.cpp applies it unmerged (scale alpha/r)."""
    base_gguf, lora_gguf = os.path.join(t, family + "-base.gguf"), os.path.join(t, family + "-lora.gguf")
    what = f"{family} lora-only (f32 on a bf16 base)"
    for args in (["export", model_dir, base_gguf, "--type", "bf16"], ["export", "--lora-only", adapter, lora_gguf, "--base", model_dir]):
        r = subprocess.run([qlora, *args], capture_output=True, text=True)
        if r.returncode != 0:
            report(False, what + ": export", r.stderr.strip())
            return
    try:
        runs = []
        for lora in (lora_gguf, None):
            llm = llama_cpp.Llama(model_path=base_gguf, lora_path=lora, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
            llm.eval(ids)
            runs.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
    except Exception as e:
        report(False, what + ": llama.cpp loads", str(e))
        return
    diff, without = rel_rms(runs[0], reference), rel_rms(runs[1], reference)
    if moe:  # the median token's, as for the other types (a rounding can flip a token's expert)
        diff, without = (float(np.median(np.sqrt(((r - reference) ** 2).mean(-1)) / np.sqrt((reference ** 2).mean()))) for r in runs)
    # Within the bf16 tolerance, and the adapter visibly applied: the base alone is at least 4x further off.
    report(diff <= ENGINE_TOLERANCE["bf16"] and 4 * diff <= without, what + ": logits",
           f"vs the fp32 merge {diff:.2e} (≤ {ENGINE_TOLERANCE['bf16']:.0e}; without the adapter {without:.2e}); {os.path.getsize(lora_gguf)} bytes")


def check_family(qlora, t, family, config_class, fields, targets):
    model_dir = os.path.join(t, family)
    ids, adapter, merged, tokenizer_config = make_model(model_dir, family, config_class, fields, targets)
    reference = logits_of(merged.float(), ids)
    nf4 = os.path.join(t, family + "-nf4")
    subprocess.run([qlora, "quantize", model_dir, nf4], check=True, capture_output=True)
    # Llama: every type from the dense base, and Q4_K_M from NF4; the others bf16, Q8_0 and Q4_K_M.
    if family == "llama":
        runs = [(ty, model_dir) for ty in TYPES] + [("q4_k_m", nf4)]
    elif config_class in (Qwen3MoeConfig, MixtralConfig, GptOssConfig):  # f32 too: the experts' layout with no rounding at all
        runs = [("f32", model_dir), ("bf16", model_dir), ("q8_0", model_dir), ("q4_k_m", nf4)]
    else:
        runs = [("bf16", model_dir), ("q8_0", model_dir), ("q4_k_m", nf4)]
    check_lora(qlora, t, family, model_dir, adapter, ids, reference, moe=config_class in (Qwen3MoeConfig, MixtralConfig, GptOssConfig))
    template = tokenizer_config.get("chat_template")
    pad = tokenizer_config.get("pad_token")
    for ty, base in runs:
        what = f"{family} {ty} ({'nf4' if base == nf4 else 'dense'} base)"
        out = os.path.join(t, f"{family}-{ty}-{os.path.basename(base)}.gguf")
        r = subprocess.run([qlora, "export", base, out, "--type", ty, "--adapter", adapter], capture_output=True, text=True)
        if r.returncode != 0:
            report(False, what + ": export", r.stderr.strip())
            continue
        try:
            llm, text_ids, got = run_llama_cpp(out, ids, BPE_TEXT if family.endswith("-bpe") else TEXT)
        except Exception as e:  # llama.cpp refused the file
            report(False, what + ": llama.cpp loads", str(e))
            continue
        source = "transformers" if family.endswith("-bpe") else "SentencePiece"
        report(text_ids == ids, what + ": tokens", f"llama.cpp's {len(text_ids)} ids are {source}'s {len(ids)}" if text_ids == ids
               else f"llama.cpp {text_ids} vs {source} {ids}")
        pad_id = llm.metadata.get("tokenizer.ggml.padding_token_id")
        pad_ok = pad is None or (pad_id is not None and llm.detokenize([int(pad_id)], special=True).decode() == pad)
        report(llm.metadata.get("tokenizer.chat_template") == template and pad_ok,
               what + ": special tokens", "llama.cpp reads the chat template and pad token of tokenizer_config.json")
        held = logits_of(hf_from_gguf(out, merged.config, family), ids)
        engine, cost = rel_rms(got, held), rel_rms(got, reference)
        moe = config_class in (Qwen3MoeConfig, MixtralConfig, GptOssConfig)
        if moe and ty != "f32":
            # A mixture of experts routes each token to its top-k experts: where two router logits
            # nearly tie, a rounding in llama.cpp's arithmetic picks the other expert and that
            # token's logits move by far more than the arithmetic's error. The median token's
            # difference is the arithmetic's; f32 (no rounding, no flip) is held whole.
            per_token = np.sqrt(((got - held) ** 2).mean(-1)) / np.sqrt((held ** 2).mean())
            engine = float(np.median(per_token))
        top1 = float(np.mean(got.argmax(-1) == reference.argmax(-1)))
        bound = (MOE_ENGINE_TOLERANCE if moe else ENGINE_TOLERANCE)[ty]
        report(engine <= bound, what + ": logits",
               f"vs transformers on the file's weights {engine:.2e}{' (median token)' if moe and ty != 'f32' else ''} (≤ {bound:.0e}); "
               f"vs the fp32 merge {cost:.2e}, same top-1 {top1:.0%}; {os.path.getsize(out)} bytes")


def main():
    qlora = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", ".build", "release", "qlora"))
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    for family, config_class, fields, targets in FAMILIES:
        if only is None or family in only:
            with tempfile.TemporaryDirectory() as t:
                check_family(qlora, t, family, config_class, fields, targets)
    print(f"{failures} failure(s)")
    sys.exit(failures)


if __name__ == "__main__":
    main()
