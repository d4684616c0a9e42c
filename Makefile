PYTHON ?= python3
export PYTHON

.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

# The main job on the embedded default model (SmolLM2-135M-Instruct).
demo: setup
	mkdir -p out && melsurgery scan default --json out/scan.json --plot out/scan.png

# Installs everything and runs the whole test suite (CI runs exactly this).
test: setup
	$(PYTHON) -m ruff check melsurgery tests scripts
	$(PYTHON) -m pytest -q
