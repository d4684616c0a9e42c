PYTHON ?= python3
export PYTHON

.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

# The main job on the embedded default model (SmolLM2-135M-Instruct): scan -> patch -> verify.
demo: setup
	mkdir -p out
	melsurgery scan default --json out/scan.json --plot out/scan.png
	melsurgery patch default -o out/smollm2-wemask --scan out/scan.json --recipe wemask --overwrite
	melsurgery verify default out/smollm2-wemask --json out/verify.json --plot out/verify.png

# Installs everything and runs the whole test suite (CI runs exactly this).
test: setup
	$(PYTHON) -m ruff check melsurgery tests scripts benchmarks
	$(PYTHON) -m pytest -q
