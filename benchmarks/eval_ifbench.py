#!/usr/bin/env python
"""Instruction-following benchmark (IFBench or IFEval) for a base model and its patched variants.

    python benchmarks/eval_ifbench.py BASE PATCHED [MORE ...] [--suite ifbench] [--json results.json]

Each model answers every prompt greedily through its chat template; answers are appended to one JSONL file
per model in --out-dir, so an interrupted run resumes where it stopped. The report gives prompt- and
instruction-level strict/loose accuracy with 95% intervals (Wilson; instruction level uses a
design-effect-adjusted n because instructions of one prompt share a response) and, for every model after
the first, the paired difference against the first with a 95% paired-bootstrap interval over prompts.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

# Models are local folders and the benchmark data ships in packages: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import measured  # noqa: E402
from melsurgery.measure import tasks as ib  # noqa: E402

METRIC_LABELS = {
    "prompt_strict": "prompt strict",
    "prompt_loose": "prompt loose",
    "instruction_strict": "instr strict",
    "instruction_loose": "instr loose",
}


def _fallback_load(path: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """Plain transformers loading, used only while ``melsurgery.load`` does not exist."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    return model.to(device), tokenizer


def get_loader() -> tuple[Any, str]:
    """``melsurgery.load`` when the package provides it, else the transformers fallback (named in the report)."""
    try:
        from melsurgery import load
    except ImportError:
        return _fallback_load, "transformers AutoModelForCausalLM (fallback: melsurgery.load not importable)"
    return load, "melsurgery.load"


def resolve_device_dtype(device: str | None, dtype: str) -> tuple[str, Any]:
    """cuda when available; bfloat16 on a GPU that supports it, float32 on CPU (CPU half precision is slow)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, getattr(torch, dtype)


def _pct(x: float) -> str:
    return "  n/a" if x != x else f"{100 * x:5.1f}"


def _ci(a: ib.Accuracy) -> str:
    return f"{_pct(a.value)} [{_pct(a.lo).strip()}, {_pct(a.hi).strip()}]"


def _diff(d: ib.Difference) -> str:
    if d.n == 0:
        return "n/a"
    return f"{100 * d.value:+5.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"


def format_table(rows: list[dict[str, Any]], suite: str) -> str:
    """Plain-text table: one line per model, then one paired-difference line per model after the first."""
    keys = list(METRIC_LABELS)
    lines: list[list[str]] = [["model", "n", *METRIC_LABELS.values()]]
    for i, row in enumerate(rows):
        lines.append([row["name"], str(row["n_scored"]), *[_ci(row["acc"][k]) for k in keys]])
        if i > 0:
            diffs = row["diff"]
            n = diffs[keys[0]].n
            lines.append([f"  Δ vs {rows[0]['name']}", str(n), *[_diff(diffs[k]) for k in keys]])
    widths = [max(len(r[c]) for r in lines) for c in range(len(lines[0]))]
    out = []
    for j, r in enumerate(lines):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells))
        if j == 0:
            out.append("-" * len(out[0]))
    out.append(
        f"{suite}: accuracy % with 95% CI (Wilson; instruction level design-effect adjusted); "
        "Δ = paired difference in points, 95% paired bootstrap over prompts"
    )
    return "\n".join(out)


def _unique_names(paths: list[str]) -> list[str]:
    names = [Path(p.rstrip("/\\")).name or p for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, required=True)
@click.option("--suite", type=click.Choice(ib.SUITES), default="ifbench", show_default=True)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Prompt JSONL in the IFEval schema instead of the suite's shipped file.",
)
@click.option("--out-dir", type=click.Path(file_okay=False), default="out/ifbench", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N prompts (file order).")
@click.option("--device", default=None, help="Torch device; default cuda when available, else cpu.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
    help="auto: bfloat16 on a GPU that supports it, else float32.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write all figures here.")
@click.option("--n-boot", type=click.IntRange(100), default=10_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--score-only", is_flag=True, help="Load no model; score the responses already on disk.")
@click.option("--generate-only", is_flag=True,
              help="Generate and save responses, score nothing (e.g. on a GPU machine without the checkers).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def main(
    models: tuple[str, ...],
    suite: str,
    prompts_file: str | None,
    out_dir: str,
    max_new_tokens: int,
    batch_size: int,
    limit: int | None,
    device: str | None,
    dtype: str,
    json_path: str | None,
    n_boot: int,
    seed: int,
    score_only: bool,
    generate_only: bool,
    no_progress: bool,
) -> None:
    """Evaluate MODELS (the first is the baseline) on an instruction-following suite."""
    t_start = time.perf_counter()
    try:
        prompts = ib.load_prompts(suite, prompts_file, limit)
        if not generate_only:
            ib.instruction_registry(suite)  # fail on missing verifiers/NLTK data before any generation
    except ib.IFBenchSetupError as exc:
        raise click.ClickException(str(exc)) from exc
    device_name, torch_dtype = resolve_device_dtype(device, dtype)
    dtype_name = str(torch_dtype).replace("torch.", "")
    names = _unique_names(list(models))
    loader, loader_name = get_loader()
    settings = {"max_new_tokens": max_new_tokens, "dtype": dtype_name, "prompts_file": prompts_file}
    click.echo(
        f"{suite}: {len(prompts)} prompts, {len(models)} model(s), device={device_name}, dtype={dtype_name}, "
        f"max_new_tokens={max_new_tokens}, loader={loader_name}"
    )

    rows: list[dict[str, Any]] = []
    for path, name in zip(models, names):
        out_file = ib.responses_file(out_dir, suite, path, **settings)
        row: dict[str, Any] = {"name": name, "path": path, "responses_file": str(out_file)}
        todo = ib.pending_prompts(prompts, ib.read_responses(out_file))
        gen: dict[str, Any] = {"pending_before": len(todo)}
        if todo and not score_only:
            with measured("load") as loading:
                model, tokenizer = loader(path, device=device_name, dtype=torch_dtype)
            gen["load_s"] = loading.wall_s
            stats = ib.generate_responses(
                model,
                tokenizer,
                prompts,
                out_file,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=not no_progress,
                desc=name,
                extra_fields={"model": name},
            )
            gen.update(
                generated=stats.generated,
                new_tokens=stats.new_tokens,
                generate_s=stats.seconds,
                tokens_per_s=stats.new_tokens / stats.seconds if stats.seconds else None,
                final_batch_size=stats.batch_size,
                oom_retries=stats.oom_retries,
                chat_template=stats.chat_template,
            )
            if not stats.chat_template:
                click.echo(f"warning: {name} has no chat template; prompts were fed as plain text", err=True)
            del model, tokenizer
            gc.collect()
            _empty_cuda_cache()
        if generate_only:
            click.echo(f"{name}: {json.dumps(gen)} -> {out_file}")
            continue
        records = ib.read_responses(out_file)
        wanted = {p.key for p in prompts}
        records = {k: r for k, r in records.items() if k in wanted}
        if len(records) < len(prompts):
            click.echo(f"warning: {name}: only {len(records)}/{len(prompts)} prompts answered in {out_file}", err=True)
        with measured("score") as scoring:
            scores = ib.score_responses(prompts, {k: r["response"] for k, r in records.items()}, suite)
        gen["score_s"] = scoring.wall_s
        row.update(
            n_scored=len(scores),
            scores=scores,
            acc=ib.summarize(scores),
            generation=gen,
            truncated=sum(1 for r in records.values() if r.get("finished") is False),
            scoring_errors=sum(len(s.errors) for s in scores),
        )
        rows.append(row)
    if generate_only:
        click.echo(f"runtime: {time.perf_counter() - t_start:.1f}s (generation only; score later with --score-only)")
        return

    for row in rows[1:]:
        row["diff"] = {
            f"{lvl}_{mode}": ib.paired_difference(rows[0]["scores"], row["scores"], lvl, mode, n_boot, seed)
            for lvl, mode in ib.METRICS
        }

    click.echo("")
    click.echo(format_table(rows, suite))
    for row in rows:
        g = row["generation"]
        parts = [f"{row['name']}: {row['truncated']}/{row['n_scored']} responses hit max_new_tokens"]
        if "generate_s" in g:
            parts.append(f"load {g['load_s']:.1f}s, generate {g['generate_s']:.1f}s for {g['generated']} prompts")
            if g.get("tokens_per_s"):
                parts.append(f"{g['tokens_per_s']:.0f} new tok/s")
        parts.append(f"score {g['score_s']:.1f}s")
        if row["scoring_errors"]:
            parts.append(f"{row['scoring_errors']} checker errors counted as failures")
        click.echo("  " + "; ".join(parts))
    total = time.perf_counter() - t_start
    click.echo(f"runtime: {total:.1f}s")

    if json_path:
        doc = {
            "suite": suite,
            "prompts_file": prompts_file or str(ib.prompts_path(suite)),
            "n_prompts": len(prompts),
            "settings": {
                **settings,
                "device": device_name,
                "batch_size": batch_size,
                "limit": limit,
                "decoding": "greedy",
                "loader": loader_name,
            },
            "statistics": {
                "accuracy_ci": "95% Wilson score; instruction level uses n/deff (cluster-robust design effect >= 1)",
                "difference_ci": f"95% percentile paired bootstrap over prompts, {n_boot} resamples, seed {seed}",
            },
            "models": [
                {
                    "name": row["name"],
                    "path": row["path"],
                    "responses_file": row["responses_file"],
                    "n_scored": row["n_scored"],
                    "truncated": row["truncated"],
                    "scoring_errors": row["scoring_errors"],
                    "generation": row["generation"],
                    "metrics": {k: a.as_dict() for k, a in row["acc"].items()},
                    "vs_first": {k: d.as_dict() for k, d in row["diff"].items()} if "diff" in row else None,
                    "per_instruction": ib.per_instruction(row["scores"]),
                }
                for row in rows
            ],
            "runtime_s": total,
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=2))
        click.echo(f"wrote {json_path}")


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
