"""Measure each recipe on a model (default: the embedded SmolLM2): sink, KL and perplexity on held-out text.

Produces the recipe table of docs/recipes.md. Usage: python benchmarks/measure_recipes.py [MODEL] [--json out.json]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
from harness import measured

from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import read_json, run_scan
from melsurgery.measure.verify import run_verify
from melsurgery.surgery.manifest import Manifest
from melsurgery.surgery.patch import run_patch

VARIANTS: list[tuple[str, list[tuple[str, dict]]]] = [
    ("wemask (default: layer ME+1, top-3 dims, magnitude selector)", [("wemask", {})]),
    ("wemask, layers after-me", [("wemask", {"layers": "after-me"})]),
    ("wemask, layers after-me, strength 0.5", [("wemask", {"layers": "after-me", "strength": 0.5})]),
    ("wemask, layers after-me, selector first", [("wemask", {"layers": "after-me", "selector": "first"})]),
    ("wemask, layers after-me, dims by sink", [("wemask", {"layers": "after-me", "dims_by": "sink"})]),
    ("wemask, layers after-me, replace mean", [("wemask", {"layers": "after-me", "replace": "mean"})]),
    ("wemask, layers after-me, dims by sink, replace mean",
     [("wemask", {"layers": "after-me", "dims_by": "sink", "replace": "mean"})]),
    ("norm-rescale (default: layer ME+1, top-3 dims, x0.5)", [("norm-rescale", {})]),
    ("norm-rescale, layers after-me, x0 (all tokens)", [("norm-rescale", {"layers": "after-me", "factor": 0.0})]),
    ("ffn-dampen (default: x0.2)", [("ffn-dampen", {})]),
    ("ffn-dampen x0", [("ffn-dampen", {"factor": 0.0})]),
    ("me-norm (default: x0.5)", [("me-norm", {})]),
    ("me-norm x0", [("me-norm", {"factor": 0.0})]),
    ("ffn-dampen x0.2 + wemask after-me", [("ffn-dampen", {}), ("wemask", {"layers": "after-me"})]),
]


@click.command()
@click.argument("model", default="default")
@click.option("--json", "json_path", type=click.Path(path_type=Path))
@click.option("--windows", type=int, default=None, help="Evaluate at most N windows of 512 tokens.")
@click.option("--only", multiple=True, help="Measure only the rows whose label contains this text (repeatable).")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), help="Reuse a scan JSON of MODEL.")
def main(model: str, json_path: Path | None, windows: int | None, only: tuple[str, ...],
         scan_path: Path | None) -> None:
    source = resolve(model)
    scan = read_json(scan_path) if scan_path else run_scan(source)
    rows = []
    click.echo(f"ME Layer {scan.me_layer}, massive dims {list(scan.massive_dims)}, sink after ME "
               f"{scan.sink_after_me:.3f} (calibration)")
    click.echo("| recipe | folds | sink (layers ME+1..) | sink rate | similarity | KL mean | KL max | top-1 | ppl "
               "| Δppl | time |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, recipes in VARIANTS:
        if only and not any(text in label for text in only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            with measured(label) as cost:
                res = run_patch(source, Path(tmp) / "out", Manifest(model=model, recipes=recipes), scan=scan)
                r = run_verify(source.folder, Path(tmp) / "out", max_windows=windows, generations=0).to_json()
            secs = cost.wall_s
        row = {"label": label, "recipes": recipes, "folds": all(p.folds for p in res.plans),
               **{k: r[k] for k in ("sink_mean_base", "sink_mean_patched", "kl_mean", "kl_max", "top1_agreement",
                                    "ppl_base", "ppl_patched", "ppl_increase_pct", "sink_reduction_pct",
                                    "sink_rate_mean_base", "sink_rate_mean_patched", "similarity_mean_base",
                                    "similarity_mean_patched", "no_effect")}}
        rows.append(row)
        click.echo(f"| {label} | {'yes' if row['folds'] else 'no (custom layer)'} | {r['sink_mean_base']:.3f} → "
                   f"{r['sink_mean_patched']:.3f} | {r['sink_rate_mean_base']:.2f} → "
                   f"{r['sink_rate_mean_patched']:.2f} | {r['similarity_mean_base']:.3f} → "
                   f"{r['similarity_mean_patched']:.3f} | {r['kl_mean']:.3f} | {r['kl_max']:.2f} | "
                   f"{100 * r['top1_agreement']:.1f}% | {r['ppl_base']:.1f} → {r['ppl_patched']:.1f} | "
                   f"{r['ppl_increase_pct']:+.1f}% | {secs:.0f} s |" + (" (changed nothing)" if r["no_effect"] else ""))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
