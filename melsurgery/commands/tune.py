"""`melsurgery tune [MODEL] -o RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

import click

from melsurgery.commands.shared import (
    complete_model,
    device_option,
    dtype_option,
    examples,
    preflight,
    quiet_option,
    resolve_device,
    revision_option,
    torch_dtype,
)
from melsurgery.recipes import registry


@click.command(
    epilog=examples(
        "melsurgery tune default -o runs/smollm2 --trials 60 --max-kl 0.05",
        "melsurgery tune default -o runs/smollm2 --trials 80 --apply out/tuned   # continue, write the choice",
        "melsurgery tune ./my-model -o runs/m --recipes ffn-dampen,norm-rescale --storage sqlite:///tune.db",
    )
)
@click.argument("model", required=False, shell_complete=complete_model)
@click.option("-o", "--out", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Run folder: the study (continued when rerun), tune.json, tune.png, best.yaml.")
@click.option("--trials", type=int, default=50, show_default=True,
              help="Trials the study should hold; rerunning continues up to this many (all workers together).")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after this many seconds.")
@click.option("--recipes", "recipes", default=",".join(n for n, r in registry().items() if r.fit is None),
              show_default=True,
              help="Recipes to search, comma-separated; trials compose any non-empty subset.")
@click.option("--objective", type=click.Choice(["sink", "ratio"]), default="sink", show_default=True,
              help="Reduction to maximise after the ME Layer: the sink score or the max/median ratio.")
@click.option("--max-kl", type=float, default=0.05, show_default=True,
              help="Budget: mean KL(base || patched) per token on the tuning text.")
@click.option("--max-ppl-increase", type=float, default=None, help="Budget: perplexity increase, percent.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed (give each worker its own).")
@click.option("--storage", default=None,
              help="Any Optuna storage URL (e.g. postgresql://..., sqlite:///study.db) instead of RUN_DIR's journal.")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Tuning text (default: the embedded held-out text, split in halves).")
@click.option("--heldout", type=click.Path(path_type=Path), default=None,
              help="Held-out text for re-measuring the choice (default: the second half of --text).")
@click.option("--max-tokens", type=click.IntRange(min=8), default=512, show_default=True, help="Window length.")
@click.option("--windows", type=click.IntRange(min=1), default=None, help="Use at most N windows of each text.")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), help="Reuse a scan JSON instead of scanning.")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="Calibration text for the scan.")
@click.option("--apply", "apply_out", type=click.Path(path_type=Path), default=None,
              help="Also write the chosen patch to this folder (as `patch --manifest RUN_DIR/best.yaml`).")
@click.option("--overwrite", is_flag=True, help="With --apply: replace a non-empty output folder.")
@revision_option
@device_option
@dtype_option
@quiet_option
def tune(model, run_dir, trials, timeout, recipes, objective, max_kl, max_ppl_increase, seed, storage, text, heldout,
         max_tokens, windows, scan_path, calib, apply_out, overwrite, revision, device, dtype, quiet) -> None:
    """Search recipe settings for MODEL: the sink cut after the ME Layer against KL, under a budget.

    Trials are scored on a tuning text without writing checkpoints; the choice (the largest cut
    within the budget) is re-measured on held-out text and written as RUN_DIR/best.yaml, a manifest
    for `patch --manifest`. Exit status: 0, 4 when no trial meets the budget, 2 on errors.
    """
    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.checkpoint.atomic import check_output
    from melsurgery.checkpoint.guard import check_apart
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.errors import BudgetNotMet
    from melsurgery.search.tune import TuneOptions, run_tune, tune_report, validate

    preflight((model,))  # a local model is read-only before --storage and RUN_DIR are checked
    opts = validate(TuneOptions(tuple(r.strip() for r in recipes.split(",") if r.strip()), objective, max_kl,
                                max_ppl_increase, trials, timeout, seed, max_tokens, windows, storage))
    if apply_out is not None:
        check_apart(apply_out, run_dir, "the run folder")  # else --apply fails only after the whole study
    model = model or "default"
    source = resolve(model, revision)
    if apply_out is not None:
        check_output(apply_out, overwrite, protect=source.folder)
    scan = read_json(scan_path) if scan_path else None
    model_arg = model if not Path(model).exists() else str(Path(model).resolve())
    result = run_tune(source, model_arg, run_dir, opts, scan=scan, calibration=CalibrationSpec(path=calib),
                      text=text, heldout=heldout, device=resolve_device(device), dtype=torch_dtype(dtype),
                      progress=not quiet)
    click.echo(tune_report(result))
    click.echo(f"wrote {run_dir / 'tune.json'}, {run_dir / 'tune.png'}")
    if result.manifest is None:
        raise BudgetNotMet("no trial cuts the sink within the budget")
    if apply_out is not None:
        from melsurgery.surgery.patch import run_patch

        patched = run_patch(source, apply_out, result.manifest, scan=result.scan, overwrite=overwrite,
                            device=resolve_device(device), progress=not quiet)
        for p in patched.plans:
            click.echo(f"  {p.summary}")
        click.echo(f"wrote {apply_out}")
