"""What llama.cpp's convert_hf_to_gguf.py writes for a tiny Llama with a real SentencePiece
tokenizer: the golden for `qlora export` (issue 16), under Vectors/gguf/llama-tiny/.

The model is Vectors/llama/tiny (transformers' random Llama: 2 layers, hidden 64, 4 heads, 2 KV
heads, vocab 256, Llama-3 rope scaling, bf16) with `tokenizer.model`, a SentencePiece BPE model
trained here on a fixed word list (170 pieces, no byte fallback, identity normalization; kept
once made, so regenerating does not change it). The converter runs on a copy named `tiny` (the
directory name becomes general.name "Tiny"):
- `vocab.gguf`: `--vocab-only`: every metadata key and value the converter writes (hparams and
  tokenizer), no tensors (6 KB);
- `export.json`: for each `--outtype` f32, f16, bf16 and q8_0: the file's size and sha256, the
  header's sha256 (everything before the tensor data), every metadata key with its GGUF type, and
  every tensor's name, ggml type, dimensions and sha256 of its bytes.

Run: .venv/bin/python Vectors/generate_gguf_llama.py --llama-cpp DIR
     DIR: a llama.cpp source tree (the llama-cpp-python sdist vendors one under vendor/llama.cpp);
     needs torch, sentencepiece and the gguf package (Vectors/requirements.txt).
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gguf", "llama-tiny")


def tokenizer_model():
    path = os.path.join(OUT, "tokenizer.model")
    if os.path.exists(path):
        return path
    import sentencepiece as spm
    random.seed(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "QLoRA", "adapter", "merge", "llama", "token",
             "ïs", "naïve", "日本", "語"]
    with tempfile.TemporaryDirectory() as t:
        corpus = os.path.join(t, "corpus.txt")
        with open(corpus, "w") as f:
            f.write("\n".join(" ".join(random.choice(words) for _ in range(12)) for _ in range(2000)))
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(t, "tokenizer"), vocab_size=256, model_type="bpe",
                                       character_coverage=1.0, byte_fallback=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                       hard_vocab_limit=False, normalization_rule_name="identity", minloglevel=2)
        shutil.copy(os.path.join(t, "tokenizer.model"), path)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(a.llama_cpp, "gguf-py"))
    import gguf
    convert = os.path.join(a.llama_cpp, "convert_hf_to_gguf.py")
    os.makedirs(OUT, exist_ok=True)
    tok = tokenizer_model()
    report = {}
    with tempfile.TemporaryDirectory() as t:
        model = os.path.join(t, "tiny")
        os.makedirs(model)
        for f in ["config.json", "model.safetensors"]:
            shutil.copy(os.path.join(HERE, "llama", "tiny", f), model)
        shutil.copy(tok, model)
        subprocess.run([sys.executable, convert, model, "--vocab-only", "--outfile", os.path.join(OUT, "vocab.gguf")], check=True,
                       capture_output=True)
        for outtype in ["f32", "f16", "bf16", "q8_0"]:
            path = os.path.join(t, f"tiny-{outtype}.gguf")
            subprocess.run([sys.executable, convert, model, "--outtype", outtype, "--outfile", path], check=True, capture_output=True)
            data = open(path, "rb").read()
            r = gguf.GGUFReader(path)
            start = min(int(x.data_offset) for x in r.tensors)
            report[outtype] = {
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "header_sha256": hashlib.sha256(data[:start]).hexdigest(),
                "metadata": [[k, gguf.GGUFValueType(f.types[0]).name] for k, f in r.fields.items() if not k.startswith("GGUF.")],
                "tensors": [[x.name, x.tensor_type.name, [int(n) for n in x.shape], hashlib.sha256(x.data.tobytes()).hexdigest()]
                            for x in r.tensors],
            }
    # The converter's commit where the tree is a git checkout, and its own files' hashes.
    commit = subprocess.run(["git", "-C", a.llama_cpp, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    sources = ["convert_hf_to_gguf.py", "conversion/base.py", "conversion/llama.py", "gguf-py/gguf/gguf_writer.py", "gguf-py/gguf/quants.py"]
    report["made_by"] = {"script": "convert_hf_to_gguf.py", "tree": os.path.abspath(a.llama_cpp).split("/vendor/")[0].split("/")[-1], "commit": commit,
                         "sha256": {f: hashlib.sha256(open(os.path.join(a.llama_cpp, f), "rb").read()).hexdigest()[:16] for f in sources}}
    with open(os.path.join(OUT, "export.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    sizes = ", ".join(f"{k} {v['bytes']} B" for k, v in report.items() if k != "made_by")
    print(f"wrote {OUT}: vocab.gguf, export.json ({sizes})")


if __name__ == "__main__":
    main()
