# qlora: the two commands a newcomer needs are `make demo` and `make test`.
SWIFT ?= swift
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
QLORA := .build/release/qlora
DEMO := demo-out

.PHONY: deps build test demo docs bench fuzz vectors clean

# Debian's libopenblas-dev (the only BLAS) and pkg-config, installed when missing.
deps:
	@if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists openblas; then \
	  echo "installing libopenblas-dev and pkg-config with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libopenblas-dev pkg-config >/dev/null; \
	fi

build: deps
	$(SWIFT) build -c release --product qlora

test: deps
	$(SWIFT) test

# A short real job: a synthetic 2-layer Llama-shaped checkpoint (bf16, sharded), quantized to
# NF4 with double quantization, inspected, dequantized, and the round-trip error measured; its
# adapter merged; the report; and last, the NF4 model with the adapter merged exported to GGUF
# Q4_K_M for llama.cpp, with what each serving format keeps of the fine-tune.
demo: build
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(QLORA) sample $(DEMO)/model --layers 2 --hidden 1024 --intermediate 2816 --vocab 512 --max-shard-mib 16 --adapter-rank 16
	cp Vectors/demo/tokenizer.model $(DEMO)/model/   # SentencePiece BPE, 512 pieces with byte fallback (Vectors/generate_demo_tokenizer.py)
	$(QLORA) quantize $(DEMO)/model $(DEMO)/model-nf4
	$(QLORA) inspect $(DEMO)/model-nf4
	$(QLORA) dequantize $(DEMO)/model-nf4 $(DEMO)/model-roundtrip
	$(QLORA) compare $(DEMO)/model $(DEMO)/model-roundtrip
	$(QLORA) merge $(DEMO)/model-nf4 $(DEMO)/model-adapter $(DEMO)/model-merged --compare-original $(DEMO)/model
	$(QLORA) report --out $(DEMO)/report
	$(QLORA) export $(DEMO)/model-nf4 $(DEMO)/model-merged.Q4_K_M.gguf --type q4_k_m --adapter $(DEMO)/model-adapter --report

# The DocC documentation of the library products: one combined archive (the articles of
# Sources/QLoRA/QLoRA.docc and every module's API) in .build/docs/qlora.doccarchive. Any DocC
# warning (a broken ``Symbol`` or <doc:Article> link) fails it. Parameter and return-value
# validation is off until the public API has its doc comments.
DOCS_TARGETS := QLoRA SafeTensors GGUF CheckpointFormats CheckpointJobs Training Memory Claims Report
DOCS_OUT := .build/docs/qlora.doccarchive
docs: deps
	@rm -rf .build/docs && mkdir -p .build/docs
	$(SWIFT) package --disable-sandbox generate-documentation $(addprefix --target ,$(DOCS_TARGETS)) \
	  --enable-experimental-combined-documentation --output-path $(DOCS_OUT) \
	  --warnings-as-errors --disable-parameters-and-returns-validation
	@test -f $(DOCS_OUT)/data/documentation/qlora.json || { echo "make docs: $(DOCS_OUT) was not written" >&2; exit 1; }
	@echo "documentation: $(DOCS_OUT) (swift package --disable-sandbox preview-documentation --target QLoRA serves one module)"

bench: deps
	cd Benchmarks && $(SWIFT) package --disable-sandbox benchmark

# libFuzzer + ASan over the parsers (safetensors, bnb 4-bit quant state, PEFT adapter, config.json,
# training data), FUZZ_RUNS inputs per harness; FUZZ_HARNESS=peft (for example) runs one.
FUZZ_RUNS ?= 1000000
FUZZ_HARNESS ?=
fuzz:
	bash Fuzz/run.sh $(FUZZ_RUNS) $(FUZZ_HARNESS)

# Regenerate the golden vectors (needs torch + bitsandbytes; see Vectors/README.md).
vectors:
	python3 -m venv .venv && .venv/bin/pip install -q -r Vectors/requirements.txt
	.venv/bin/python Vectors/generate.py
	.venv/bin/python Vectors/generate_safetensors.py
	.venv/bin/python Vectors/generate_presets.py
	.venv/bin/python Vectors/generate_llama.py
	.venv/bin/python Vectors/generate_families.py
	.venv/bin/python Vectors/generate_adapter_training.py
	.venv/bin/python Vectors/generate_llama_ops.py
	.venv/bin/python Vectors/generate_bnb_variants.py
	.venv/bin/python Vectors/generate_interop.py
	.venv/bin/python Vectors/generate_peft_targets.py
	.venv/bin/python Vectors/generate_peft_kinds.py
	.venv/bin/python Vectors/generate_peaks.py
	.venv/bin/python Vectors/generate_gguf.py
	.venv/bin/python Vectors/generate_demo_tokenizer.py

clean:
	rm -rf .build $(DEMO)
