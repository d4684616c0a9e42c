PYTHON ?= python3
export PYTHON

.PHONY: setup demo test lint

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
	melsurgery patch default -o out/smollm2-budget --scan out/scan.json --num-samples auto --max-kl 0.05 --trials $(DEMO_TRIALS) \
		--timeout $(DEMO_TIMEOUT) --windows 1 --plot out/search.png --overwrite
	melsurgery verify default out/smollm2-budget --generations 0 --json out/verify.json --plot out/verify.png \
		--quiet > out/verify.txt
	$(PYTHON) scripts/demo_summary.py out

# Installs everything and runs the whole test suite (CI runs exactly this).
test: setup
	$(PYTHON) -m ruff check melsurgery tests scripts benchmarks
	$(PYTHON) -m pytest -q
