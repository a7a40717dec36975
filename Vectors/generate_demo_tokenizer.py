"""Vectors/demo/tokenizer.model, the tokenizer `make demo` copies into its checkpoint (issue 25):
SentencePiece BPE, 512 pieces, trained on Vectors/demo/corpus.txt with Llama 2's settings, byte
fallback included (<0x00>..<0xFF> at ids 3-258, so llama.cpp can tokenize any text). One thread,
a fixed seed and an in-memory corpus: a rerun writes the same bytes.

--llama-cpp DIR also writes Vectors/demo/vocab.json: size and sha256 of that tree's
convert_hf_to_gguf.py --vocab-only output for a directory `model` with the tokenizer and the demo's
`qlora sample` config.json at vocab_size 512 and 8192 (padded). DemoTokenizerTests holds qlora to it.

Run: .venv/bin/python Vectors/generate_demo_tokenizer.py [--llama-cpp DIR]
     (sentencepiece; --llama-cpp also the converter's imports: torch, numpy)
"""
import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "demo")
VOCAB_SIZE = 512
# config.json as `qlora sample --layers 2 --hidden 1024 --intermediate 2816 --vocab V` writes it.
CONFIG = '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, ' \
         '"num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": %d, "torch_dtype": "bfloat16"}'


def train():
    import sentencepiece as spm
    with open(os.path.join(OUT, "corpus.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    # Llama 2's trainer_spec and normalizer_spec but for the size, the threads and the input.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB_SIZE,
        character_coverage=0.99995, split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
        split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True, max_sentencepiece_length=16,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, vocabulary_output_piece_score=True, hard_vocab_limit=True,
        num_threads=1, minloglevel=2)
    data = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.get_piece_size() == VOCAB_SIZE
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert all(sp.is_byte(3 + b) and sp.id_to_piece(3 + b) == f"<0x{b:02X}>" for b in range(256))
    text = "Hello, World! It's 2026: 3 + 4 = 7. naïve café, 日本"
    assert sp.decode(sp.encode(text)) == text
    path = os.path.join(OUT, "tokenizer.model")
    old = open(path, "rb").read() if os.path.exists(path) else None
    with open(path, "wb") as f:
        f.write(data)
    print(f"{path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"
          f"{'' if old is None else ' (unchanged)' if old == data else ' (CHANGED)'}")
    return path


def converter_golden(llama_cpp, tokenizer):
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    import gguf
    report = {}
    for vocab_size in [VOCAB_SIZE, 8192]:
        with tempfile.TemporaryDirectory() as t:
            model = os.path.join(t, "model")
            os.makedirs(model)
            with open(os.path.join(model, "config.json"), "w") as f:
                f.write(CONFIG % vocab_size)
            with open(tokenizer, "rb") as src, open(os.path.join(model, "tokenizer.model"), "wb") as dst:
                dst.write(src.read())
            out = os.path.join(t, "vocab.gguf")
            subprocess.run([sys.executable, os.path.join(llama_cpp, "convert_hf_to_gguf.py"), model, "--vocab-only", "--outfile", out],
                           check=True, capture_output=True)
            data = open(out, "rb").read()
            r = gguf.GGUFReader(out)
            types = r.fields["tokenizer.ggml.token_type"]
            report[str(vocab_size)] = {
                "config": json.loads(CONFIG % vocab_size),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "byte_tokens": sum(1 for i in range(len(types.data)) if types.contents(i) == gguf.TokenType.BYTE),
            }
            if vocab_size == VOCAB_SIZE:  # the other file's keys are the same
                report[str(vocab_size)]["metadata"] = [f"{k} {gguf.GGUFValueType(f.types[0]).name}" for k, f in r.fields.items()
                                                       if not k.startswith("GGUF.")]
    commit = subprocess.run(["git", "-C", llama_cpp, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    sources = ["convert_hf_to_gguf.py", "conversion/base.py", "conversion/llama.py", "gguf-py/gguf/gguf_writer.py", "gguf-py/gguf/vocab.py"]
    report["made_by"] = {"script": "convert_hf_to_gguf.py --vocab-only", "tree": os.path.abspath(llama_cpp).split("/vendor/")[0].split("/")[-1],
                         "commit": commit,
                         "sha256": {f: hashlib.sha256(open(os.path.join(llama_cpp, f), "rb").read()).hexdigest()[:16] for f in sources}}
    path = os.path.join(OUT, "vocab.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}: " + ", ".join(f"vocab_size {k}: {v['bytes']} B, {v['byte_tokens']} BYTE tokens" for k, v in report.items() if k != "made_by"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", help="a llama.cpp source tree: also write vocab.json with its converter")
    a = ap.parse_args()
    tokenizer = train()
    if a.llama_cpp:
        converter_golden(a.llama_cpp, tokenizer)


if __name__ == "__main__":
    main()
