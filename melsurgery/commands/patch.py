"""`melsurgery patch [MODEL] -o OUT`."""

from __future__ import annotations

from pathlib import Path

import click

from melsurgery.checkpoint.atomic import check_output
from melsurgery.commands.shared import (
    calibration_options,
    device_option,
    examples,
    finite_float,
    preflight,
    quiet_option,
    quiet_transformers,
    revision_option,
)
from melsurgery.errors import UserError
from melsurgery.params import Param
from melsurgery.recipes import registry, resolve_recipes

_METAVARS = {"float": "FLOAT", "int": "INT", "layers": "LAYERS", "int_list": "DIMS", "neurons": "NEURONS"}


def recipe_options(f):
    """One click option per recipe-parameter flag, derived from the recipes' declarations.

    Values arrive as raw strings and are validated by the declaration itself, so the command line and
    manifests accept and refuse the same things with the same messages.
    """
    from melsurgery.recipes import registry

    flags: dict[str, list[tuple[str, Param]]] = {}
    for recipe in registry().values():
        for param in recipe.params:
            if param.flag:
                flags.setdefault(param.flag, []).append((recipe.name, param))
    for flag, users in reversed(list(flags.items())):
        helps = dict.fromkeys(param.help.split(": ", 1)[-1] for _, param in users)
        default = users[0][1].default
        text = f"{'/'.join(name for name, _ in users)}: {' '.join(helps)}"
        if default is not None:
            text += f" (default {default})"
        param = users[0][1]
        metavar = "|".join(param.choices) if param.choices else _METAVARS[param.kind]
        f = click.option(flag, "recipe_" + flag[2:].replace("-", "_"), default=None, metavar=metavar, help=text)(f)
    return f


# options whose setting a manifest holds (calibration, detection, revision): not to be given beside one
MANIFEST_SETS = ("calib", "num_samples", "max_tokens", "seed", "abs_threshold", "ratio", "persist_fraction", "revision")


def _params_from_flags(recipes: tuple[str, ...], values: dict[str, str | None]) -> list[tuple[str, dict]]:
    """Each chosen recipe with the flags it declares; a flag that no chosen recipe uses is an error."""
    from melsurgery.recipes import get_recipe

    chosen = [get_recipe(r) for r in recipes]
    out, used = [], set()
    for recipe in chosen:
        params = {}
        for param in recipe.params:
            if param.flag and values.get(param.flag) is not None:
                params[param.name] = values[param.flag]
                used.add(param.flag)
        out.append((recipe.name, params))
    for flag, value in values.items():
        if value is not None and flag not in used:
            raise UserError(f"{flag} does not apply to {', '.join(recipes)}; see `melsurgery patch --help`")
    return out


def budget_options(f):
    """The budgeted patch's options: the budget, and how long and over what the search runs."""
    opts = [
        click.option("--max-kl", type=float, callback=finite_float, default=None,
                     help="Budget: search the recipes and write the largest sink cut whose mean KL(base || patched) "
                          "per token on held-out text is at most this (no recipe flags needed)."),
        click.option("--max-ppl-increase", type=float, callback=finite_float, default=None,
                     help="Budget: perplexity increase on held-out text, percent (alone or with --max-kl)."),
        click.option("--trials", type=click.IntRange(min=1), default=None,
                     help="With a budget: trials the search study should hold (default 40; a rerun continues it)."),
        click.option("--timeout", type=float, callback=finite_float, default=None,
                     help="With a budget: stop starting trials after this many seconds."),
        click.option("--windows", type=click.IntRange(min=1), default=None,
                     help="With a budget: at most N windows of 512 tokens of each text (tuning, held-out)."),
        click.option("--text", type=click.Path(path_type=Path), default=None,
                     help="With a budget: search text (default: the embedded held-out text, first half)."),
        click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
                     help="With a budget: PNG of the search (trials, held-out re-measurements, the choice)."),
        click.option("--heldout", type=click.Path(path_type=Path), default=None,
                     help="With a budget: held-out text the budget is checked on (default: the second half of "
                          "--text)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


BUDGET_ONLY = ("trials", "timeout", "windows", "text", "heldout", "plot")


@click.command(
    epilog=examples(
        "melsurgery patch default -o out/budget --max-kl 0.05   # the largest sink cut within KL 0.05",
        "melsurgery patch default -o out/damp --recipe ffn-dampen --dampen 0.2 --verify",
        "melsurgery patch --manifest manifests/smollm2-wemask.yaml -o out/wemask   # bit for bit",
    )
)
@click.argument("model", required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output folder, or a .gguf file (GGUF output from a GGUF source).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]), default=None,
              help="Output format (default: gguf when -o ends in .gguf, else safetensors). "
                   "gguf with a folder -o writes the .gguf with a model card and provenance.")
@click.option("--recipe", "recipes", multiple=True,
              type=click.Choice(list(registry())),
              help="Recipe to apply (repeatable; they compose in order). With --max-kl: the recipes to search.")
@click.option("--manifest", type=click.Path(path_type=Path), help="YAML manifest (model, calibration, recipes).")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), help="Reuse a scan JSON instead of scanning.")
@recipe_options
@budget_options
@revision_option
@click.option("--base-model", default=None, metavar="OWNER/NAME",
              help="Hub id of MODEL for the card's base_model (default: detected from the Hub source, the Hugging "
                   "Face cache path, config.json or GGUF metadata; left out when unknown).")
@calibration_options
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--link", is_flag=True, help="Hard-link untouched shards instead of copying them.")
@click.option("--verify", "do_verify", is_flag=True,
              help="Measure the patch (as `melsurgery verify`) and write the figures into the card and provenance.")
@click.option("--verify-windows", type=click.IntRange(min=1), default=None,
              help="With --verify: evaluate at most N windows of 512 tokens.")
@device_option
@quiet_option
def patch(model, out, fmt, recipes, manifest, scan_path, max_kl, max_ppl_increase, trials, timeout, windows, text,
          plot_path, heldout, revision, base_model, calib, num_samples, max_tokens, seed, abs_threshold, ratio,
          persist_fraction, overwrite, link, do_verify, verify_windows, device, quiet, **recipe_flags) -> None:
    """Fold a mitigation into MODEL's weights (plus a custom layer for wemask) and write OUT.

    Untouched tensors stay byte-identical; the output is written atomically with a model card,
    provenance.json and the resolved manifest. With --max-kl (or --max-ppl-increase) and no recipe
    flags, the recipes and their settings are searched: the largest sink cut within the budget on
    held-out text is written (exit status 4, nothing written, when no setting meets the budget).
    """
    from melsurgery.checkpoint.basemodel import explicit
    from melsurgery.search.budget import BudgetOptions, validate_budget

    values = {"--" + k[len("recipe_"):].replace("_", "-"): v for k, v in recipe_flags.items()}
    ctx = click.get_current_context()
    budgeted = max_kl is not None or max_ppl_increase is not None
    search = {"trials": trials, "timeout": timeout, "windows": windows, "text": text, "heldout": heldout,
              "plot": plot_path}
    if budgeted:
        opts = validate_budget(BudgetOptions(max_kl, max_ppl_increase, tuple(dict.fromkeys(recipes)),
                                             **{k: v for k, v in search.items() if k in ("trials", "timeout",
                                                                                        "windows") and v is not None}))
        _check_budget_args(values, manifest, fmt, out)
    else:
        given = [name for name in BUDGET_ONLY if search[name] is not None]
        if given:
            raise UserError(f"--{given[0]} applies to a budgeted patch: add --max-kl or --max-ppl-increase")
    if base_model:
        explicit(base_model, "--base-model")  # before any work
    if manifest:
        man = _from_manifest(ctx, manifest, model, base_model, recipes, values)
    else:
        man = _from_flags(model, revision, base_model, recipes, values, (calib, num_samples, max_tokens, seed),
                          (abs_threshold, ratio, persist_fraction), budgeted)
    preflight((man.model, *(f for f in (text, heldout) if f)), (plot_path,))  # read-only sources, before any work
    if quiet:
        quiet_transformers()
    verify = {"max_windows": verify_windows} if do_verify else None
    if budgeted:
        _patch_budgeted(man, out, opts, scan_path, (text, heldout, plot_path), overwrite, link, device, quiet, verify)
    elif fmt == "gguf" or (fmt is None and out.suffix.lower() == ".gguf"):
        _patch_gguf(man, out, scan_path, overwrite, device, quiet, do_verify, link)
    else:
        if fmt == "safetensors" and out.suffix.lower() == ".gguf":
            raise UserError(f"{out}: --format safetensors writes a folder; name it without .gguf")
        check_output(out, overwrite)
        _patch_folder(man, out, scan_path, overwrite, link, device, quiet, verify)


def _check_budget_args(values: dict, manifest, fmt, out: Path) -> None:
    """A budget searches recipe settings: flags that set them, a manifest that names them, or GGUF output
    (token-selective settings do not go to GGUF) contradict it."""
    given = [flag for flag, v in values.items() if v is not None]
    if given:
        raise UserError(f"{given[0]} sets what --max-kl searches: drop it (keep --recipe to limit the search to "
                        "some recipes), or drop --max-kl / --max-ppl-increase and give the recipe in full")
    if manifest:
        raise UserError("--manifest names the recipes, --max-kl searches them: give one of the two")
    if fmt == "gguf" or out.suffix.lower() == ".gguf":
        raise UserError("--max-kl writes a safetensors folder; patch the GGUF afterwards with the folder's "
                        "melsurgery-manifest.yaml (`patch --manifest ... -o OUT.gguf`, folded recipes only)")


def _from_manifest(ctx, manifest: Path, model, base_model, recipes, values):
    """The manifest, with nothing on the command line that it would silently override."""
    from melsurgery.surgery.manifest import load_manifest

    given = [flag for flag, v in values.items() if v is not None]
    if given:
        raise UserError(f"{given[0]} conflicts with --manifest: set recipe parameters in the manifest")
    if recipes:
        raise UserError("give recipes either with --recipe or in the --manifest, not both")
    given = [f"--{name.replace('_', '-')}" for name in MANIFEST_SETS
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given:  # the manifest's value would silently win
        raise UserError(f"{given[0]} conflicts with --manifest: set it in the manifest")
    man = load_manifest(manifest, model)
    if base_model and man.base_model and base_model != man.base_model:
        raise UserError(f"the manifest names base_model {man.base_model!r}; drop --base-model or edit the manifest")
    man.base_model = base_model or man.base_model
    return man


def _from_flags(model, revision, base_model, recipes, values, calibration: tuple, detection: tuple, budgeted: bool):
    """A manifest from the command line (with a budget, the recipes are left to the search)."""
    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.params import DetectParams
    from melsurgery.surgery.manifest import Manifest

    if not recipes and not budgeted:
        raise UserError(f"name at least one --recipe ({', '.join(registry())}), a --manifest, or a budget "
                        "(--max-kl) to search for the best one")
    return Manifest(model=model or "default", revision=revision, base_model=base_model,
                    calibration=CalibrationSpec(*calibration),
                    detection=DetectParams(abs_threshold=detection[0], ratio=detection[1],
                                           persist_fraction=detection[2]),
                    recipes=[] if budgeted else resolve_recipes(_params_from_flags(recipes, values)))


def _patch_gguf(man, out: Path, scan_path, overwrite: bool, device: str, quiet: bool, do_verify: bool,
                link: bool) -> None:
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.surgery.gguf_patch import gguf_preflight, gguf_source_file, retyped_lines, run_patch_gguf

    # before resolving, which converts a GGUF on first use
    gguf_preflight(gguf_source_file(man.model), out, man.recipes, folder=out.suffix.lower() != ".gguf",
                   overwrite=overwrite)
    if do_verify or link:
        raise UserError(f"{'--verify' if do_verify else '--link'} applies to safetensors output; for GGUF "
                        "output run `melsurgery verify BASE.gguf OUT.gguf` afterwards")
    source = resolve(man.model, man.revision)
    scan = read_json(scan_path) if scan_path else None
    res = run_patch_gguf(source, out, man, folder=out.suffix.lower() != ".gguf", scan=scan, overwrite=overwrite,
                         device=device, progress=not quiet)
    for line in retyped_lines(res):  # first: where the file differs from the source's types, and what it costs
        click.echo(line)
    click.echo(f"ME Layer {res.scan.me_layer}, massive dims {list(res.scan.massive_dims)}")
    for p in res.plans:
        click.echo(f"  {p.summary}")
    for a in res.applied:
        click.echo(f"  edited {a.tensor} ({a.written_type}): {a.changed} entries changed, max |delta| "
                   f"{a.max_abs_delta:.4g}; {a.blocks_requantised}/{a.blocks_total} blocks requantised "
                   f"({a.blocks_changed} with new bytes); misses {a.edit_error:.1%} of the asked edit")
    click.echo(f"wrote {res.file} (sha256 {res.output_sha256[:12]}; read back: every tensor where and what it "
               f"should be); measure it with `melsurgery verify {man.model or 'default'} {res.file}`")


def _echo_written(result, out: Path) -> None:
    """The plans, the edits and where the patch went (and how it loads)."""
    click.echo(f"ME Layer {result.scan.me_layer}, massive dims {list(result.scan.massive_dims)}")
    for p in result.plans:
        click.echo(f"  {p.summary}")
    for a in result.applied:
        click.echo(f"  edited {a.tensor}: {a.changed} entries, max |delta| {a.max_abs_delta:.4g}")
    if result.writer is not None:
        click.echo(f"  weights: {result.writer.summary}")
    if result.verified:
        from melsurgery.measure.verify_result import verify_report

        click.echo(verify_report(result.verified))
    how = ("trust_remote_code=True, melsurgery.load() or vLLM beside melsurgery" if result.custom_layer
           else "stock transformers")
    if not result.custom_layer and not any(a.changed for a in result.applied):
        click.echo("THIS PATCH CHANGES NOTHING: every tensor is byte-identical to the source (the edits leave every "
                   "entry as it was)")
    click.echo(f"wrote {out} (loads with {how})")


def _patch_folder(man, out: Path, scan_path, overwrite: bool, link: bool, device: str, quiet: bool, verify) -> None:
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.surgery.patch import run_patch

    source = resolve(man.model, man.revision)
    scan = read_json(scan_path) if scan_path else None
    result = run_patch(source, out, man, scan=scan, overwrite=overwrite, link=link, device=device,
                       progress=not quiet, verify=verify)
    _echo_written(result, out)


def _patch_budgeted(man, out: Path, opts, scan_path, files: tuple, overwrite: bool, link: bool, device: str,
                    quiet: bool, verify) -> None:
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.search.budget import budget_report, run_budgeted_patch

    source = resolve(man.model, man.revision)
    scan = read_json(scan_path) if scan_path else None
    text, heldout, plot = files
    done = run_budgeted_patch(source, out, man, opts, scan=scan, text=text, heldout=heldout, overwrite=overwrite,
                              link=link, device=device, progress=not quiet, verify=verify, plot=plot)
    click.echo(budget_report(done, opts))
    if plot is not None:
        click.echo(f"wrote {plot}")
    _echo_written(done.patch, out)
