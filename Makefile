# Two commands for a newcomer: `make demo` and `make test`. Both install into .venv/ first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Nothing in the demo or the tests reaches the network.
export WANDB_MODE := offline
export HF_HUB_OFFLINE := 1

.PHONY: install demo demo-vq demo-repa demo-mar test lint bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[demo,dev]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $(STAMP)

# Built-in digits -> WebDataset shards, train SiT on CPU, sample 1,000 digits, evaluate.
demo: install
	$(PY) -m visgen.data.builtin --out-dir data/digits
	$(PY) train.py experiment=demo_sit ckpt_path=last
	$(PY) evaluate.py ckpt=logs/demo_sit/checkpoints/last.ckpt num_samples=1000 out_dir=logs/demo_sit/eval/demo overwrite=true

# The digits demos' VQ tokenizer: train (~3 min on CPU), export logs/demo_vq/tokenizer.safetensors, report
# its reconstructions (PSNR, codebook usage, classifier accuracy / FID: the ceiling for demo_gpt / demo_maskgit).
demo-vq: install
	$(PY) -m visgen.data.builtin --out-dir data/digits
	$(PY) train.py experiment=demo_vq ckpt_path=last
	$(PY) -m visgen.tokenizers.reconstruction --tokenizer logs/demo_vq/tokenizer.safetensors --data-dir data/digits --out logs/demo_vq/reconstruction.json

# REPA on the digits: a label-free SimCLR encoder (trained once, cached in .cache/), then demo_repa, sampling and
# evaluation exactly as `make demo` (README "REPA on the digits" compares the two).
demo-repa: install
	$(PY) -m visgen.data.builtin --out-dir data/digits
	$(PY) -m visgen.encoders.digits --train-shards 'data/digits/digits-train-{000000..000009}.tar' --cache-dir .cache
	$(PY) train.py experiment=demo_repa ckpt_path=last
	$(PY) evaluate.py ckpt=logs/demo_repa/checkpoints/last.ckpt num_samples=1000 out_dir=logs/demo_repa/eval/demo overwrite=true

# LlamaGen on the digits: a small GPT on demo_vq's 8x8 codes (trains the tokenizer first if it is missing), sampled
# with the KV cache and scored as `make demo` (README "LlamaGen" has the numbers).
.PHONY: demo-gpt
demo-gpt: install
	$(PY) -m visgen.data.builtin --out-dir data/digits
	test -f logs/demo_vq/tokenizer.safetensors || $(MAKE) demo-vq
	$(PY) train.py experiment=demo_gpt ckpt_path=last
	$(PY) evaluate.py ckpt=logs/demo_gpt/checkpoints/last.ckpt num_samples=1000 precision=bf16 out_dir=logs/demo_gpt/eval/demo overwrite=true

# MaskGIT on the digits: demo_vq's codes (its tokenizer is trained first when logs/demo_vq has none), train
# demo_maskgit, decode 1,000 digits in 8 parallel steps, evaluate (README "MaskGIT on the digits").
.PHONY: demo-maskgit
demo-maskgit: install
	$(PY) -m visgen.data.builtin --out-dir data/digits
	test -f logs/demo_vq/tokenizer.safetensors || $(MAKE) demo-vq
	$(PY) train.py experiment=demo_maskgit ckpt_path=last
	$(PY) evaluate.py ckpt=logs/demo_maskgit/checkpoints/last.ckpt num_samples=1000 out_dir=logs/demo_maskgit/eval/demo overwrite=true

# MAR on the digits: 4x4 pixel patches as continuous tokens, masked AR with the per-token DiffLoss; then sampling and
# evaluation exactly as `make demo` (conf/experiment/demo_mar.yaml).
demo-mar: install
	$(PY) -m visgen.data.builtin --out-dir data/digits
	$(PY) train.py experiment=demo_mar ckpt_path=last
	$(PY) evaluate.py ckpt=logs/demo_mar/checkpoints/last.ckpt num_samples=1000 precision=bf16 out_dir=logs/demo_mar/eval/demo overwrite=true

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/train_step.py
	$(PY) bench/tokenizer_step.py
