"""`melsurgery tune [MODEL] -o RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

import click

from melsurgery.commands.search_flags import search_flags, search_options
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
from melsurgery.errors import UserError
from melsurgery.search.options import searchable


@click.command(
    epilog=examples(
        "melsurgery tune default -o runs/smollm2 --trials 60 --max-kl 0.05",
        "melsurgery tune default -o runs/smollm2 --trials 80 --apply out/tuned   # continue, write the choice",
        "melsurgery tune ./my-model -o runs/m --recipe ffn-dampen --recipe norm-rescale --storage sqlite:///tune.db",
    )
)
@click.argument("model", required=False, shell_complete=complete_model)
@click.option("-o", "--out", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Run folder: the study (continued when rerun), tune.json, tune.png, best.yaml.")
@click.option("--recipe", "recipes", multiple=True, type=click.Choice(list(searchable())),
              help="Recipe to search (repeatable; default: every searchable recipe); trials compose any non-empty "
                   "subset.")
@click.option("--recipes", "recipes_csv", default=None, hidden=True,
              help="The recipes comma-separated (the older spelling of a repeated --recipe).")
@search_flags(budget_default=0.05)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed (give each worker its own).")
@click.option("--storage", default=None,
              help="Any Optuna storage URL (e.g. postgresql://..., sqlite:///study.db) instead of RUN_DIR's journal.")
@click.option("--max-tokens", type=click.IntRange(min=8), default=512, show_default=True, help="Window length.")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), help="Reuse a scan JSON instead of scanning.")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="Calibration text for the scan.")
@click.option("--apply", "apply_out", type=click.Path(path_type=Path), default=None,
              help="Also write the chosen patch to this folder (as `patch --manifest RUN_DIR/best.yaml`).")
@click.option("--overwrite", is_flag=True, help="With --apply: replace a non-empty output folder.")
@revision_option
@device_option
@dtype_option
@quiet_option
def tune(model, run_dir, recipes, recipes_csv, seed, storage, max_tokens, scan_path, calib, apply_out, overwrite,
         revision, device, dtype, quiet, **flags) -> None:
    """Search recipe settings for MODEL: the sink cut after the ME Layer against KL, under a budget.

    Trials are scored on a tuning text without writing checkpoints; the settings that cut most are
    re-measured on held-out text, and the choice (the largest held-out cut within the budget, as
    `patch --max-kl` chooses) is written as RUN_DIR/best.yaml, a manifest for `patch --manifest`.
    Exit status: 0, 3 when the model has no ME Layer, 4 when no setting meets the budget, 2 on errors.
    """
    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.checkpoint.atomic import check_output
    from melsurgery.checkpoint.guard import check_apart
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.errors import BudgetNotMet
    from melsurgery.search.storage import check_run_dir
    from melsurgery.search.tune import run_tune, tune_report

    preflight((model,))  # a local model is read-only before --storage and RUN_DIR are checked
    if recipes_csv is not None:
        if recipes:
            raise UserError("give the recipes with --recipe (repeatable) or --recipes a,b, not both")
        recipes = tuple(r.strip() for r in recipes_csv.split(",") if r.strip())
        if not recipes:
            raise UserError("--recipes: name at least one recipe")
    opts = search_options(flags, recipes, seed=seed, max_tokens=max_tokens, storage=storage)
    check_run_dir(run_dir, opts.storage)  # a foreign or damaged study is refused before the model is read
    if apply_out is not None:
        check_apart(apply_out, run_dir, "the run folder")  # else --apply fails only after the whole study
    model = model or "default"
    source = resolve(model, revision)
    if apply_out is not None:
        check_output(apply_out, overwrite, protect=source.folder)
    scan = read_json(scan_path) if scan_path else None
    model_arg = model if not Path(model).exists() else str(Path(model).resolve())
    result = run_tune(source, model_arg, run_dir, opts, scan=scan, calibration=CalibrationSpec(path=calib),
                      text=flags["text"], heldout=flags["heldout"], device=resolve_device(device),
                      dtype=torch_dtype(dtype), progress=not quiet)
    click.echo(tune_report(result))
    click.echo(f"wrote {run_dir / 'tune.json'}, {run_dir / 'tune.png'}")
    if result.manifest is None:
        raise BudgetNotMet("no setting cuts the sink within the budget on held-out text")
    if apply_out is not None:
        from melsurgery.surgery.patch import run_patch

        patched = run_patch(source, apply_out, result.manifest, scan=result.scan, overwrite=overwrite,
                            device=resolve_device(device), progress=not quiet)
        for p in patched.plans:
            click.echo(f"  {p.summary}")
        click.echo(f"wrote {apply_out}")
