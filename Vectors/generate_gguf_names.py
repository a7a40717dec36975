"""What llama.cpp's converter makes of a checkpoint's name and generation_config.json (gguf-py's
Metadata heuristics; issue 16): the golden for `qlora export`'s general.* keys,
Vectors/gguf/names.json.

- `components`: gguf-py's `Metadata.get_model_id_components(id, total_params)` and `id_to_title`
  for model ids as they appear in directory names and config.json's `_name_or_path`, each with
  the parameter count 0 (unknown), a count that matches its size label, and one that does not;
- `files`: the converter's `--vocab-only` metadata (every general.* key in order, with its type
  and value) for Vectors/llama/tiny with the tiny tokenizer in directories with real models'
  names, with and without `_name_or_path` in config.json, sampling settings in
  generation_config.json, and model cards (README.md front matter) written after real ones.

Run: .venv/bin/python Vectors/generate_gguf_names.py --llama-cpp DIR
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
IDS = ["tiny", "TinyLlama-1.1B-Chat-v1.0", "meta-llama/Llama-2-7b-chat-hf", "Qwen2.5-0.5B-Instruct", "Mistral-7B-Instruct-v0.3",
       "Meta-Llama-3.1-8B-Instruct", "Phi-3-mini-128k-instruct", "bloom-7b1", "Qwen/Qwen3-8B", "gemma-2-9b-it", "my_model", "v2model",
       "Llama-3.2-1B-Instruct-Q4_K_M", "SmolLM2-135M", "mistral-7b-v0.1-lora", "Yi-1.5-34B-Chat-16K", "./local-run", "a--b--c", "x", "7B",
       "Mixtral-8x7B-Instruct-v0.1", "deepseek-llm-7b-base", "OLMo-2-1124-7B", "tiny model name", "org/Name_With_Underscores-2.5b-it"]
# Model cards (README.md front matter) as real checkpoints carry them.
CARD_TINYLLAMA = """---
license: apache-2.0
datasets:
- cerebras/SlimPajama-627B
- bigcode/starcoderdata
- HuggingFaceH4/ultrachat_200k
- HuggingFaceH4/ultrafeedback_binarized
language:
- en
widget:
  - example_title: Fibonacci (Python)
    messages:
      - role: system
        content: You are a chatbot who can help code!
      - role: user
        content: Write me a function to calculate the first 10 digits of the fibonacci sequence in Python and print it out to the CLI.
---
<div align="center">

# TinyLlama-1.1B
</div>
"""
CARD_QWEN = """---
license: apache-2.0
license_link: https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/LICENSE
language:
- en
pipeline_tag: text-generation
base_model: Qwen/Qwen2.5-0.5B
tags:
- chat
library_name: transformers
---

# Qwen2.5-0.5B-Instruct
"""
CARD_ADAPTER = """---
base_model:
- meta-llama/Llama-2-7b-hf
- https://huggingface.co/mistralai/Mistral-7B-v0.1
library_name: peft
license: [mit, apache-2.0]
tags: ['lora', "sft", trl]
model-index:
- name: my-adapter
  results: []
datasets: HuggingFaceH4/no_robots
language: en
---
"""
# PEFT's own card for an adapter trained on a local base (an absolute path as base_model: the
# organization comes out empty, and gguf-py writes no key for an empty string).
CARD_PEFT = """---
base_model: /home/user/models/tiny
library_name: peft
tags:
- base_model:adapter:/home/user/models/tiny
- lora
- transformers
---

# Model Card for Model ID
"""
FILES = [
    ("TinyLlama-1.1B-Chat-v1.0", None, {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "max_length": 2048}, CARD_TINYLLAMA),
    ("tiny", "meta-llama/Llama-2-7b-chat-hf", None, None),
    ("Qwen2.5-0.5B-Instruct", "/home/user/models/Qwen2.5-0.5B-Instruct", {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}, CARD_QWEN),
    ("llama-2-7b-sft-lora-v2", None, None, CARD_ADAPTER),
    ("my-adapter", None, None, CARD_PEFT),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(a.llama_cpp, "gguf-py"))
    import gguf
    from gguf.metadata import Metadata
    out = {"components": []}
    for model_id in IDS:
        for total in [0, 1_100_048_384, 7_000_000_000, 135_000]:
            c = Metadata.get_model_id_components(model_id, total)
            out["components"].append({"id": model_id, "total_params": total, "full_name": c[0], "org": c[1], "basename": c[2], "finetune": c[3],
                                      "version": c[4], "size_label": c[5], "title": Metadata.id_to_title(c[0]) if c[0] else None})
    out["files"] = []
    for directory, name_or_path, generation, card in FILES:
        with tempfile.TemporaryDirectory() as t:
            d = os.path.join(t, directory)
            os.makedirs(d)
            with open(os.path.join(HERE, "llama", "tiny", "config.json")) as f:
                config = json.load(f)
            if name_or_path:
                config["_name_or_path"] = name_or_path
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            if generation:
                with open(os.path.join(d, "generation_config.json"), "w") as f:
                    json.dump(generation, f)
            if card:
                with open(os.path.join(d, "README.md"), "w") as f:
                    f.write(card)
            shutil.copy(os.path.join(HERE, "gguf", "llama-tiny", "tokenizer.model"), d)
            path = os.path.join(t, "v.gguf")
            subprocess.run([sys.executable, os.path.join(a.llama_cpp, "convert_hf_to_gguf.py"), d, "--vocab-only", "--outfile", path], check=True,
                           capture_output=True)
            r = gguf.GGUFReader(path)
            keys = [[k, gguf.GGUFValueType(f.types[0]).name, f.contents()] for k, f in r.fields.items() if k.startswith("general.")]
            out["files"].append({"directory": directory, "name_or_path": name_or_path, "generation_config": generation, "readme": card, "general": keys})
    with open(os.path.join(HERE, "gguf", "names.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote Vectors/gguf/names.json: {len(out['components'])} ids, {len(out['files'])} files")


if __name__ == "__main__":
    main()
