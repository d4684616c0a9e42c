#!/usr/bin/env python
"""The payoff figures of `verify`: the table of base against patched models, and what they cost in time.

    python benchmarks/payoff.py table default out/budget out/damp --names "patch --max-kl 0.05,ffn-dampen"
    python benchmarks/payoff.py speed default out/budget --repeats 2
    python benchmarks/payoff.py crosscheck default out/budget --text heldout.txt --max-tokens 512

`table`: one `verify` per patched model against the base (held-out Hamlet, `--windows` windows of `--max-tokens`
tokens, fp32, no generations), printed as one row per model: perplexity, then the perplexity change under int8
activations (per tensor, per token) and under a streaming window with the first token evicted or kept, each with
its 95% bootstrap interval over windows (definitions in melsurgery/measure/definitions.py).

`speed`: the same verify with and without the payoff figures, alternated `--repeats` times in one process
(warm page cache, no generations), and the ratio of the fastest of each.

`crosscheck`: the same figures of one window recomputed without melsurgery's streaming engine: the whole model
in transformers, a 4D mask for the streaming window, forward pre-hooks for int8, under transformers' eager and
SDPA attention, beside `verify`'s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import measured, ratio, workload  # noqa: E402
from melsurgery.checkpoint.source import resolve  # noqa: E402
from melsurgery.measure.verify import run_verify  # noqa: E402
from melsurgery.measure.verify_result import PayoffFigure, VerifyResult  # noqa: E402

COLUMNS = ("int8-tensor", "int8-token", "evict", "keep-first")


def _cell(value: float, interval: list[float] | None, unit: str = "%") -> str:
    return f"{value:+.1f}{unit}" + (f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else "")


def table_rows(results: list[tuple[str, VerifyResult]]) -> list[list[str]]:
    """The base row (from the first result) and one row per patched model (with its difference to the base)."""
    def by_name(r: VerifyResult) -> dict[str, PayoffFigure]:
        return {f.name: f for f in r.payoff}

    first = by_name(results[0][1])
    rows = [["base", f"{results[0][1].ppl_base:.1f}",
             *(_cell(first[c].base_pct, first[c].base_interval) for c in COLUMNS)]]
    for name, r in results:
        figs = [by_name(r)[c] for c in COLUMNS]
        rows.append([name, f"{r.ppl_patched:.1f}",
                     *(f"{_cell(f.patched_pct, f.patched_interval)}; "
                       f"Δ {_cell(f.difference_pp, f.difference_interval, ' pp')}" for f in figs)])
    return rows


def markdown(rows: list[list[str]], window: int) -> str:
    head = ["model", "ppl", "int8 per tensor", "int8 per token", f"evict W={window}", f"keep-first W={window}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _verify(base: Path, patched: Path, windows: int, max_tokens: int, window: int | None) -> VerifyResult:
    return run_verify(base, patched, max_windows=windows, max_tokens=max_tokens, generations=0,
                      payoff_window=window)


@click.group()
def cli() -> None:
    """Payoff figures: the table, and the time they add to verify."""


@cli.command()
@click.argument("base")
@click.argument("patched", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--names", default=None, help="Comma-separated row names (default: the folder names).")
@click.option("--windows", default=4, show_default=True)
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--window", default=64, show_default=True, help="Streaming window.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Every verify result.")
def table(base, patched, names, windows, max_tokens, window, json_path) -> None:
    """One verify per PATCHED against BASE; the table of payoff figures."""
    names = names.split(",") if names else [p.name for p in patched]
    folder = resolve(base).folder
    results = [(n, _verify(folder, p, windows, max_tokens, window)) for n, p in zip(names, patched)]
    r0 = results[0][1]
    click.echo(f"workload: {r0.text}, {r0.windows} windows of {max_tokens} tokens ({r0.scored_tokens} scored), "
               f"float32 on the CPU; cells: change with 95% bootstrap interval over windows, and the difference "
               f"to the base in percentage points")
    click.echo(markdown(table_rows(results), window))
    if json_path:
        json_path.write_text(json.dumps({n: r.to_json() for n, r in results}, indent=1))


@cli.command()
@click.argument("base")
@click.argument("patched", type=click.Path(exists=True, path_type=Path))
@click.option("--windows", default=4, show_default=True)
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--window", default=64, show_default=True, help="Streaming window.")
@click.option("--repeats", default=2, show_default=True)
def speed(base, patched, windows, max_tokens, window, repeats) -> None:
    """Verify without and with the payoff figures, alternated; the ratio of the fastest runs (wall and CPU time:
    on a shared machine the CPU time of this process is the steadier measure)."""
    folder = resolve(base).folder
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "payoff": []}
    for _ in range(repeats):
        for key, w in (("plain", None), ("payoff", window)):
            with measured(key) as cost:
                _verify(folder, patched, windows, max_tokens, w)
            times[key].append((cost.wall_s, cost.cpu_s))
    click.echo(workload(f"{windows} windows of {max_tokens} tokens, float32, no generations",
                        f"{repeats} run(s) each (alternated), fastest of each"))
    for k, what in ((0, "wall"), (1, "CPU")):
        plain, payoff = min(t[k] for t in times["plain"]), min(t[k] for t in times["payoff"])
        click.echo(f"{what} time: verify {plain:.1f} s; with the payoff figures (window {window}) {payoff:.1f} s; "
                   f"ratio {ratio(payoff, plain)}")


def _whole_model(folder: Path, ids, window: int, attn: str) -> dict[str, float]:
    """Perplexity and the four changes (percent) of one window by transformers alone."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from melsurgery.measure.definitions import fake_int8, streaming_keys

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()

    def nll(mask=None, int8=None) -> torch.Tensor:
        """Per-position NLL [T-1] of the window's next tokens."""
        hooks = [m.register_forward_pre_hook(lambda _m, a: (fake_int8(a[0], int8 == "token"), *a[1:]))
                 for n, m in model.named_modules() if int8 and isinstance(m, torch.nn.Linear) and ".layers." in n]
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits[0, :-1].double()
        for h in hooks:
            h.remove()
        return -torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]

    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    plain = nll()
    out = {"perplexity": math.exp(plain.mean().item())}
    for name, keep in (("evict", False), ("keep-first", True)):
        allowed = causal & streaming_keys(T, "cpu", window, keep)
        arranged = nll(torch.where(allowed, 0.0, float("-inf"))[None, None])
        out[name] = 100 * math.expm1((arranged[window:].mean() - plain[window:].mean()).item())
    for name in ("tensor", "token"):
        out[f"int8-{name}"] = 100 * math.expm1((nll(int8=name).mean() - plain.mean()).item())
    return out


@cli.command()
@click.argument("base")
@click.argument("patched", type=click.Path(exists=True, path_type=Path))
@click.option("--text", type=click.Path(exists=True, path_type=Path), default=None,
              help="Text file (default: the embedded held-out text).")
@click.option("--max-tokens", default=512, show_default=True)
@click.option("--window", default=64, show_default=True, help="Streaming window.")
def crosscheck(base, patched, text, max_tokens, window) -> None:
    """The base model's figures on the first window: verify's against transformers' whole-model forward."""
    import torch

    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.measure.verify import eval_text, make_windows

    folder = resolve(base).folder
    r = run_verify(folder, patched, text=text, max_windows=1, max_tokens=max_tokens, generations=0,
                   payoff_window=window)
    ids = torch.tensor([make_windows(load_tokenizer(folder), eval_text(text)[0], max_tokens, 1).ids[0]])
    figs = {f.name: f.base_pct for f in r.payoff}
    rows = {"verify": {"perplexity": r.ppl_base, **figs}}
    for attn in ("eager", "sdpa"):
        rows[f"transformers {attn}"] = _whole_model(folder, ids, window, attn)
    click.echo(workload(f"{r.text}, the first window of {len(ids[0])} tokens, float32, window {window}"))
    keys = ["perplexity", *COLUMNS]
    click.echo("| figure | " + " | ".join(rows) + " |\n|" + "---|" * (len(rows) + 1))
    for k in keys:
        click.echo(f"| {k} | " + " | ".join(f"{row[k]:.3f}" for row in rows.values()) + " |")


if __name__ == "__main__":
    cli()
