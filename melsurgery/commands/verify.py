"""`melsurgery verify BASE PATCHED`."""

from __future__ import annotations

from pathlib import Path

import click

from melsurgery.commands.shared import (
    complete_model,
    device_option,
    dtype_option,
    examples,
    finite_float,
    json_option,
    plot_option,
    preflight,
    quiet_option,
    quiet_transformers,
    torch_dtype,
    write_outputs,
)
from melsurgery.errors import BudgetNotMet, UserError


@click.command(
    epilog=examples(
        "melsurgery verify default out/damp --json verify.json --plot verify.png",
        "melsurgery verify default out/damp --windows 2 --max-kl 0.05 --min-sink-reduction 5   # exit 4 on a gate",
        "melsurgery verify model.Q4_1.gguf out/model-damp.gguf   # GGUF files, by their dequantised weights",
        "melsurgery verify default out/damp --tasks ifeval --limit 50   # instruction following, paired",
    )
)
@click.argument("base", shell_complete=complete_model)
@click.argument("patched", type=click.Path(path_type=Path, exists=True))
@click.option("--text", type=click.Path(path_type=Path), help="Held-out text file (default: embedded Hamlet excerpt).")
@click.option("--max-tokens", type=click.IntRange(min=8), default=512, show_default=True, help="Window length.")
@click.option("--windows", "max_windows", type=click.IntRange(min=1), default=None, help="Evaluate at most N windows.")
@click.option("--prefix", type=click.Choice(["tokenizer", "chat"]), default=None,
              help="What each window opens with: the tokenizer's own prefix (BOS where it adds one) or a chat's "
                   "opening (the chat template up to the user's text). Default: what the patch assumes "
                   "(provenance.json), else tokenizer.")
@click.option("--generations", type=click.IntRange(min=0, max=3), default=3, show_default=True,
              help="Greedy generations shown side by side.")
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              help="vllm: also serve both models with vLLM on the same windows (perplexity, top-1 agreement, "
                   "generations as vLLM computes them, and their gap to transformers').")
@click.option("--payoff/--no-payoff", default=True, show_default=True,
              help="Payoff figures: perplexity change with a streaming window (first token evicted or kept) and with "
                   "int8 activations (per tensor, per token), base against patched, in the same pass.")
@click.option("--payoff-window", type=click.IntRange(min=1), default=64, show_default=True,
              help="Streaming window of the payoff figures (keys each query sees; scored on positions >= it).")
@click.option("--tasks", default=None, metavar="TASKS",
              help="Comma-separated tasks both models answer greedily on the same prompts (ifeval, ifbench; data "
                   "from PyPI packages), reported as paired differences with bootstrap intervals.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="--tasks: the first N prompts of each task.")
@click.option("--tasks-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="--tasks: folder of the resumable answer files (default: melsurgery's cache folder).")
@device_option
@dtype_option
@json_option("Write every figure as JSON.")
@plot_option("PNG: sink and ratio per layer.")
@click.option("--max-kl", type=float, callback=finite_float, default=None, help="Gate: fail when mean KL exceeds this.")
@click.option("--max-ppl-increase", type=float, callback=finite_float, default=None,
              help="Gate: fail when perplexity rises more (percent).")
@click.option("--min-sink-reduction", type=float, callback=finite_float, default=None,
              help="Gate: fail when the sink drops less (percent).")
@quiet_option
def verify(base, patched, text, max_tokens, max_windows, prefix, generations, engine, payoff, payoff_window, tasks,
           limit, tasks_dir, device, dtype, json_path, plot_path, max_kl, max_ppl_increase, min_sink_reduction,
           quiet) -> None:
    """Compare BASE and PATCHED: massive activations, sinks, KL, perplexity, generations, weights.

    Either may be a .gguf file (compared through its dequantised weights).

    Exit status: 0 when every gate holds, 4 when a gate is violated, 5 when --engine vllm finds no vLLM or
    --tasks lacks a package it needs, 2 on other errors.
    """
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.checkpoint.source import resolve
    from melsurgery.checkpoint.validate import open_model
    from melsurgery.measure.served import require_vllm
    from melsurgery.measure.verify import run_verify
    from melsurgery.measure.verify_result import Gates, verify_report

    preflight((base, patched), (json_path, plot_path))
    if payoff and payoff_window >= max_tokens - 1:
        raise UserError(f"--payoff-window {payoff_window}: windows of --max-tokens {max_tokens} leave no position "
                        ">= it to score; use a smaller window (or --no-payoff)")
    if tasks is not None:
        from melsurgery.measure.tasks import check_tasks

        tasks = check_tasks([t.strip() for t in tasks.split(",") if t.strip()])
    if engine == "vllm":
        require_vllm()
    if patched.is_file():
        if patched.suffix.lower() != ".gguf":
            raise UserError(f"{patched}: PATCHED must be a model folder or a .gguf file")
        patched = resolve(str(patched)).folder  # dequantised through transformers, like a GGUF base
    base_folder = resolve(base).folder
    for folder in (base_folder, patched):  # safetensors only, config consistent with the weights: before loading
        open_model(folder)
        load_tokenizer(folder)
    if quiet:
        quiet_transformers()
    result = run_verify(base_folder, patched, text=text, max_tokens=max_tokens, max_windows=max_windows,
                        device=device, dtype=torch_dtype(dtype), generations=generations,
                        progress=not quiet, engine=engine, prefix=prefix,
                        payoff_window=payoff_window if payoff else None)
    if tasks:
        from melsurgery.checkpoint.guard import cache_folder
        from melsurgery.measure.tasks import run_tasks

        result.tasks = run_tasks(base_folder, patched, tasks, limit, tasks_dir or cache_folder("tasks"),
                                 device=device, dtype=torch_dtype(dtype), progress=not quiet)
    click.echo(verify_report(result))
    from functools import partial

    from melsurgery.report.plot import plot_verify

    names = partial(plot_verify, base=str(base), patched=str(patched))
    write_outputs(result.to_json(), json_path, plot_path, names)
    violations = Gates(max_kl, max_ppl_increase, min_sink_reduction).check(result)
    if violations:
        raise BudgetNotMet("gate violated: " + "; ".join(violations))
