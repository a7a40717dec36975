"""What llama.cpp's convert_hf_to_gguf.py writes for a Llama's tokenizer side files: the golden for
`qlora export`'s special vocabulary (gguf-py's SpecialVocab; issue 16), under
Vectors/gguf/llama-tiny/special/.

Each variant is Vectors/llama/tiny's config.json with Vectors/gguf/llama-tiny/tokenizer.model and
the side files real checkpoints carry, written here by hand after real ones:
- `chat`: TinyLlama-1.1B-Chat's layout: tokenizer_config.json (add_bos_token, add_eos_token,
  added_tokens_decoder for <unk>/<s>/</s>, bos/eos/unk/pad tokens, a chat_template string,
  legacy) and tokenizer.json (added_tokens, Llama's normalizer, TemplateProcessing <s> A /
  <s> A <s> B, a BPE model);
- `added`: added tokens in added_tokens.json and added_tokens_decoder (special, looking special,
  user-defined with ▁), eos_token naming an added token, pad_token as an object, add_prefix_space
  false, add_eos_token true, TemplateProcessing <s> A </s>, a BertNormalizer's lowercase flag, and
  chat_template.jinja with additional_chat_templates/tool_use.jinja (the named-templates form);
- `jsontemplate`: chat_template.json and a tokenizer_config.json without tokenizer.json.

For each, `VARIANT.gguf` is the converter's `--vocab-only` output (no tensors: every metadata key
and value it writes), and `VARIANT/` the side files. The directory is named `tiny`.

Run: .venv/bin/python Vectors/generate_gguf_special.py --llama-cpp DIR
     DIR: a llama.cpp source tree (the llama-cpp-python sdist vendors one under vendor/llama.cpp).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "gguf", "llama-tiny")
OUT = os.path.join(TINY, "special")

SPECIAL = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def pieces():
    import sentencepiece as spm
    p = spm.SentencePieceProcessor(model_file=os.path.join(TINY, "tokenizer.model"))
    return [p.id_to_piece(i) for i in range(p.get_piece_size())]


def tokenizer_json(added, single, pair, normalizer):
    vocab = {piece: i for i, piece in enumerate(pieces())}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [dict(id=i, content=c, **dict(SPECIAL, special=s)) for i, c, s in added],
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": {}},
        "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": []},
    }


def tok(t):
    return {"SpecialToken": {"id": t, "type_id": 0}}


def seq(s):
    return {"Sequence": {"id": s, "type_id": 0 if s == "A" else 1}}


LLAMA_NORMALIZER = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}


def variants():
    base_decoder = {str(i): dict(content=c, **SPECIAL) for i, c in [(0, "<unk>"), (1, "<s>"), (2, "</s>")]}
    chat = {
        "tokenizer_config.json": {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": base_decoder, "bos_token": "<s>",
                                  "chat_template": ZEPHYR, "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
                                  "model_max_length": 2048, "pad_token": "</s>", "padding_side": "right", "sp_model_kwargs": {},
                                  "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False},
        "tokenizer.json": tokenizer_json([(0, "<unk>", True), (1, "<s>", True), (2, "</s>", True)], [tok("<s>"), seq("A")],
                                         [tok("<s>"), seq("A"), tok("<s>"), seq("B")], LLAMA_NORMALIZER),
    }
    decoder = dict(base_decoder)
    decoder.update({"170": dict(content="<|im_start|>", **SPECIAL), "171": dict(content="<|im_end|>", **dict(SPECIAL, special=False)),
                    "172": dict(content="\u2581hello\u2581world", **dict(SPECIAL, special=False))})
    added = {
        "added_tokens.json": {"<|im_start|>": 170, "<|im_end|>": 171, "<extra>": 173, "<out_of_range>": 400},
        "tokenizer_config.json": {"add_bos_token": True, "add_eos_token": True, "add_prefix_space": False, "added_tokens_decoder": decoder,
                                  "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": {"content": "<unk>", "lstrip": False},
                                  "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"},
        "tokenizer.json": tokenizer_json([(0, "<unk>", True), (1, "<s>", True), (2, "</s>", True), (170, "<|im_start|>", True),
                                          (171, "<|im_end|>", False), (172, "\u2581hello\u2581world", False)],
                                         [tok("<s>"), seq("A"), tok("</s>")], [tok("<s>"), seq("A"), tok("</s>"), seq("B"), tok("</s>")],
                                         {"type": "Sequence", "normalizers": [{"type": "BertNormalizer", "lowercase": True}]}),
        "chat_template.jinja": CHATML,
        "additional_chat_templates/tool_use.jinja": "{{ tools }}" + CHATML,
    }
    jsontemplate = {
        "tokenizer_config.json": {"add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer"},
        "chat_template.json": {"chat_template": CHATML},
    }
    return {"chat": chat, "added": added, "jsontemplate": jsontemplate}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    a = ap.parse_args()
    convert = os.path.join(a.llama_cpp, "convert_hf_to_gguf.py")
    os.makedirs(OUT, exist_ok=True)
    for name, files in variants().items():
        keep = os.path.join(OUT, name)
        shutil.rmtree(keep, ignore_errors=True)
        with tempfile.TemporaryDirectory() as t:
            model = os.path.join(t, "tiny")
            os.makedirs(model)
            shutil.copy(os.path.join(HERE, "llama", "tiny", "config.json"), model)
            shutil.copy(os.path.join(TINY, "tokenizer.model"), model)
            for rel, content in files.items():
                for d in (model, keep):
                    path = os.path.join(d, rel)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False))
            subprocess.run([sys.executable, convert, model, "--vocab-only", "--outfile", os.path.join(OUT, name + ".gguf")], check=True,
                           capture_output=True)
        print(f"wrote {OUT}/{name}.gguf and {name}/")


if __name__ == "__main__":
    main()
