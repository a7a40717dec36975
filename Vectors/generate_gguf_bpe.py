"""What llama.cpp's convert_hf_to_gguf.py writes for a byte-level BPE tokenizer (tokenizer.json):
the golden for `qlora export` of Qwen2/Qwen3 and Llama 3 style tokenizers (issue 16), under
Vectors/gguf/bpe/.

The converter names the pre-tokenizer (tokenizer.ggml.pre) by the sha256 of the Hugging Face
tokenizer's ids for a fixed text, listed for the models it knows. qlora names it by the
tokenizer's definition instead (normalizer, Split regex, ByteLevel). This script checks that the
definitions it records are the real ones: it rebuilds Qwen1.5's and Llama 3's tokenizers from
llama.cpp's own vocabularies (models/ggml-vocab-qwen2.gguf, ggml-vocab-llama-bpe.gguf: tokens and
merges) with those definitions, and the converter's hash function names them "qwen2" and
"llama-bpe" (it stops if not). Those files are too large to commit (6-8 MB).

The committed variants are small byte-level BPE tokenizers trained here (tokenizers' BpeTrainer on
a fixed word list, 320 tokens) with each real definition and realistic side files:
- `qwen2/`: Qwen2.5's layout (NFC, Qwen's regex, ByteLevel post-processor, <|endoftext|>,
  <|im_start|>, <|im_end|> special, a non-special added token, tokenizer_config.json with eos
  <|im_end|>, pad <|endoftext|>, bos null, a chat template), with Vectors/families/qwen2's config;
- `llama3/`: Llama 3's layout (no normalizer, Llama 3's regex, TemplateProcessing with
  <|begin_of_text|>, <|eot_id|> as eos), with Vectors/llama/tiny's config.
Their hashes are not in the converter's list, so for them its get_vocab_base_pre is replaced by
the name the definition has (the check above is what ties the two). Each variant's `VARIANT.gguf`
is the converter's `--vocab-only` output (vocab_size 320 in config.json).

Run: .venv/bin/python Vectors/generate_gguf_bpe.py --llama-cpp DIR
     (torch, transformers and tokenizers; DIR as for generate_gguf_llama.py)
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gguf", "bpe")
QWEN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def definition(tk, name):
    if name == "qwen2":
        tk.normalizer = normalizers.NFC()
        pattern = QWEN
    else:
        pattern = LLAMA3
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tk.decoder = decoders.ByteLevel()


def check_real(llama_cpp, gguf):
    """The converter's hash names llama.cpp's own Qwen1.5 and Llama 3 vocabularies, rebuilt with these definitions."""
    sys.path.insert(0, llama_cpp)
    import conversion.base as base
    from transformers import AutoTokenizer
    names = {}
    for vocab_name, name, bos in [("qwen2", "qwen2", None), ("llama-bpe", "llama-bpe", 128000)]:
        f = gguf.GGUFReader(os.path.join(llama_cpp, "models", f"ggml-vocab-{vocab_name}.gguf")).fields
        tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
        merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"].contents()]
        tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens) if types[i] == 1}, merges=merges, ignore_merges=name == "llama-bpe"))
        definition(tk, name)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, t in enumerate(tokens) if types[i] == 3])
        if bos is None:
            tk.post_processor = processors.ByteLevel(trim_offsets=False)
        else:
            tk.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
                single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 {tokens[bos]}:1 $B:1", special_tokens=[(tokens[bos], bos)])])
        with tempfile.TemporaryDirectory() as t:
            tk.save(os.path.join(t, "tokenizer.json"))
            with open(os.path.join(t, "tokenizer_config.json"), "w") as fp:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, fp)
            got = base.TextModel.get_vocab_base_pre(None, AutoTokenizer.from_pretrained(t))
        if got != name:
            sys.exit(f"the {name} definition does not reproduce llama.cpp's vocabulary: the converter says {got!r}")
        names[vocab_name] = got
    return names


def train(name):
    random.seed(1)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "QLoRA", "adapter", "merge", "llama", "token", "naïve",
             "日本", "語", "I've", "it's", "3.14", "2026", "\n", "  ", "Qwen"]
    corpus = [" ".join(random.choice(words) for _ in range(12)) for _ in range(2000)]
    tk = Tokenizer(models.BPE())
    definition(tk, name)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    return tk


def variants():
    qwen = train("qwen2")
    n = qwen.get_vocab_size()
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)
    qwen.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    qwen.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    decoder = {str(qwen.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                                          "special": t != "<tool_call>"} for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]}
    qwen_config = {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": None, "chat_template": CHATML,
                   "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768,
                   "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    llama = train("llama3")
    bos, eot = "<|begin_of_text|>", "<|eot_id|>"
    llama.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [bos, "<|end_of_text|>", eot]])
    bos_id = llama.token_to_id(bos)
    llama.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])])
    llama_config = {"bos_token": bos, "clean_up_tokenization_spaces": True, "eos_token": eot, "model_input_names": ["input_ids", "attention_mask"],
                    "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
                    "added_tokens_decoder": {str(llama.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                                           "single_word": False, "special": True} for t in [bos, "<|end_of_text|>", eot]}}
    return {"qwen2": (qwen, qwen_config, os.path.join(HERE, "families", "qwen2", "tiny-nf4", "config.json"), "qwen2", n),
            "llama3": (llama, llama_config, os.path.join(HERE, "llama", "tiny", "config.json"), "llama-bpe", bos_id)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(a.llama_cpp, "gguf-py"))
    import gguf
    check = check_real(a.llama_cpp, gguf)
    sys.path.insert(0, a.llama_cpp)
    import convert_hf_to_gguf as convert
    import conversion.base as base
    os.makedirs(OUT, exist_ok=True)
    for variant, (tk, tokenizer_config, config_path, name, special_id) in variants().items():
        keep = os.path.join(OUT, variant)
        shutil.rmtree(keep, ignore_errors=True)
        os.makedirs(keep)
        tk.save(os.path.join(keep, "tokenizer.json"))
        with open(os.path.join(keep, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        with open(config_path) as f:
            config = json.load(f)
        config.pop("quantization_config", None)
        config["vocab_size"] = 320
        if variant == "qwen2":
            config["bos_token_id"], config["eos_token_id"] = tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|im_end|>")
        else:
            config["bos_token_id"], config["eos_token_id"] = tk.token_to_id("<|begin_of_text|>"), tk.token_to_id("<|eot_id|>")
        with tempfile.TemporaryDirectory() as t:
            d = os.path.join(t, "tiny")
            shutil.copytree(keep, d)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            shutil.copy(os.path.join(d, "config.json"), os.path.join(keep, "config.json"))
            base.TextModel.get_vocab_base_pre = lambda self, tokenizer, name=name: name
            sys.argv = ["convert_hf_to_gguf.py", d, "--vocab-only", "--outfile", os.path.join(OUT, variant + ".gguf")]
            convert.main()
        print(f"wrote {OUT}/{variant}.gguf and {variant}/ (pre {name})")
    with open(os.path.join(OUT, "pre-tokenizer-check.json"), "w") as f:
        json.dump({"converter_names_the_rebuilt_real_vocabularies": check}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
