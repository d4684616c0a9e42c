PYTHON ?= python3
export PYTHON

.PHONY: setup demo test test-fast docs lint

setup:
	bash scripts/setup.sh

# The main job on the embedded default model (SmolLM2-135M-Instruct): scan -> patch -> verify.
demo: setup
	mkdir -p out
	melsurgery scan default --json out/scan.json --plot out/scan.png
	melsurgery patch default -o out/smollm2-wemask --scan out/scan.json --recipe wemask --overwrite
	melsurgery verify default out/smollm2-wemask --json out/verify.json --plot out/verify.png

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
