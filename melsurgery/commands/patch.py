"""`melsurgery patch [MODEL] -o OUT`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from melsurgery.calibrate.samples import CalibrationSpec
from melsurgery.checkpoint.atomic import check_output
from melsurgery.commands.search_flags import search_flags, search_options
from melsurgery.commands.shared import (
    calibration_options,
    complete_model,
    device_option,
    examples,
    preflight,
    quiet_option,
    quiet_transformers,
    revision_option,
    verbose_option,
)
from melsurgery.errors import UserError
from melsurgery.formats.wording import count, spans
from melsurgery.params import DetectParams, Param
from melsurgery.recipes import registry, resolve_recipes
from melsurgery.search.options import SearchOptions

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


@dataclass(frozen=True)
class PatchOptions:
    """Everything `patch` is asked, declared once (the click parameters map onto these fields) and validated once
    (`check`) before any model is read; the steps below take this object, not loose arguments."""

    model: str | None
    out: Path
    fmt: str | None
    recipes: tuple[str, ...]
    manifest: Path | None
    scan_path: Path | None
    revision: str | None
    base_model: str | None
    calibration: CalibrationSpec
    detection: DetectParams
    overwrite: bool
    link: bool
    verify: bool
    verify_windows: int | None
    device: str
    quiet: bool
    recipe_values: dict[str, str | None]  # recipe-parameter flags as given ("--strength": "0.5")
    search: SearchOptions | None  # a budgeted patch's search (None: the recipes are given)
    plot: Path | None  # with a budget: the search's plot
    text: Path | None
    heldout: Path | None
    verbose: bool = False  # how the weight files were written, too

    @classmethod
    def from_click(cls, params: dict) -> PatchOptions:
        """The options of the click parameters of `patch`."""
        values = {"--" + k[len("recipe_"):].replace("_", "-"): v for k, v in params.items()
                  if k.startswith("recipe_")}
        budgeted = params["max_kl"] is not None or params["max_ppl_increase"] is not None
        search = search_options(params, params["recipes"]) if budgeted else None
        return cls(params["model"], params["out"], params["fmt"], params["recipes"], params["manifest"],
                   params["scan_path"], params["revision"], params["base_model"],
                   CalibrationSpec(params["calib"], params["num_samples"], params["max_tokens"], params["seed"]),
                   DetectParams(abs_threshold=params["abs_threshold"], ratio=params["ratio"],
                                persist_fraction=params["persist_fraction"]),
                   params["overwrite"], params["link"], params["do_verify"], params["verify_windows"],
                   params["device"], params["quiet"], values, search, params["plot_path"], params["text"],
                   params["heldout"], params["verbose"])

    @property
    def gguf(self) -> bool:
        """Whether the output is GGUF (--format gguf, or -o ending in .gguf)."""
        return self.fmt == "gguf" or (self.fmt is None and self.out.suffix.lower() == ".gguf")

    @property
    def verify_request(self) -> dict | None:
        """What `run_patch` takes for --verify."""
        return {"max_windows": self.verify_windows} if self.verify else None

    def check(self, ctx: click.Context) -> None:
        """Every check that needs no model, once: the budget and its flags, the recipe flags, the output kind."""
        from melsurgery.checkpoint.basemodel import explicit
        if self.search is not None:  # its own options were checked when made (SearchOptions)
            _check_budget_args(self)
        else:
            given = [f"--{name.replace('_path', '').replace('_', '-')}" for name in BUDGET_ONLY
                     if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
            if given:
                raise UserError(f"{given[0]} applies to a budgeted patch: add --max-kl or --max-ppl-increase")
        if self.base_model:
            explicit(self.base_model, "--base-model")
        if self.fmt == "safetensors" and self.out.suffix.lower() == ".gguf":
            raise UserError(f"{self.out}: --format safetensors writes a folder; name it without .gguf")


# options only a budgeted patch takes (their click parameter names)
BUDGET_ONLY = ("objective", "payoff_window", "trials", "timeout", "windows", "text", "heldout", "plot_path")


@click.command(
    epilog=examples(
        "melsurgery patch default -o out/budget --max-kl 0.05   # the largest sink cut within KL 0.05",
        "melsurgery patch default -o out/damp --recipe ffn-dampen --dampen 0.2 --verify",
        "melsurgery patch --manifest manifests/smollm2-wemask.yaml -o out/wemask   # bit for bit",
    )
)
@click.argument("model", required=False, shell_complete=complete_model)
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
@search_flags(budget_default=None)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="With a budget: PNG of the search (trials, held-out re-measurements, the choice).")
@revision_option
@click.option("--base-model", default=None, metavar="OWNER/NAME",
              help="Hub id of MODEL for the card's base_model (default: detected from the Hub source, the Hugging "
                   "Face cache path, config.json or GGUF metadata; left out when unknown).")
@calibration_options
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier melsurgery output (never a folder holding files melsurgery did not write).")
@click.option("--link", is_flag=True, help="Hard-link untouched shards instead of copying them.")
@click.option("--verify", "do_verify", is_flag=True,
              help="Measure the patch (as `melsurgery verify`) and write the figures into the card and provenance.")
@click.option("--verify-windows", type=click.IntRange(min=1), default=None,
              help="With --verify: evaluate at most N windows of 512 tokens.")
@device_option
@quiet_option
@verbose_option
def patch(**params) -> None:
    """Fold a mitigation into MODEL's weights (plus a custom layer for wemask) and write OUT.

    Untouched tensors stay byte-identical; the output is written atomically with a model card,
    provenance.json and the resolved manifest. With --max-kl (or --max-ppl-increase) and no recipe
    flags, the recipes and their settings are searched: the largest sink cut within the budget on
    held-out text is written, then measured again on the same held-out windows (exit status 4,
    nothing written, when no setting meets the budget).
    """
    ctx = click.get_current_context()
    opts = PatchOptions.from_click(params)
    opts.check(ctx)
    man = _from_manifest(ctx, opts) if opts.manifest else _from_flags(opts)
    preflight((man.model, *(f for f in (opts.text, opts.heldout) if f)), (opts.plot,))  # before any work
    if opts.quiet:
        quiet_transformers()
    if opts.search is not None:
        _patch_budgeted(man, opts)
    elif opts.gguf:
        _patch_gguf(man, opts)
    else:
        check_output(opts.out, opts.overwrite)
        _patch_folder(man, opts)


def _check_budget_args(opts: PatchOptions) -> None:
    """A budget searches recipe settings: flags that set them, a manifest that names them, or GGUF output
    (token-selective settings do not go to GGUF) contradict it."""
    given = [flag for flag, v in opts.recipe_values.items() if v is not None]
    if given:
        raise UserError(f"{given[0]} sets what --max-kl searches: drop it (keep --recipe to limit the search to "
                        "some recipes), or drop --max-kl / --max-ppl-increase and give the recipe in full")
    if opts.manifest:
        raise UserError("--manifest names the recipes, --max-kl searches them: give one of the two")
    if opts.gguf or opts.out.suffix.lower() == ".gguf":
        raise UserError("--max-kl writes a safetensors folder; patch the GGUF afterwards with the folder's "
                        "melsurgery-manifest.yaml (`patch --manifest ... -o OUT.gguf`, folded recipes only)")


def _from_manifest(ctx, opts: PatchOptions):
    """The manifest, with nothing on the command line that it would silently override."""
    from melsurgery.surgery.manifest import load_manifest

    given = [flag for flag, v in opts.recipe_values.items() if v is not None]
    if given:
        raise UserError(f"{given[0]} conflicts with --manifest: set recipe parameters in the manifest")
    if opts.recipes:
        raise UserError("give recipes either with --recipe or in the --manifest, not both")
    given = [f"--{name.replace('_', '-')}" for name in MANIFEST_SETS
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given:  # the manifest's value would silently win
        raise UserError(f"{given[0]} conflicts with --manifest: set it in the manifest")
    man = load_manifest(opts.manifest, opts.model)
    if opts.base_model and man.base_model and opts.base_model != man.base_model:
        raise UserError(f"the manifest names base_model {man.base_model!r}; drop --base-model or edit the manifest")
    man.base_model = opts.base_model or man.base_model
    return man


def _from_flags(opts: PatchOptions):
    """A manifest from the command line (with a budget, the recipes are left to the search)."""
    from melsurgery.surgery.manifest import Manifest

    budgeted = opts.search is not None
    if not opts.recipes and not budgeted:
        raise UserError(f"name at least one --recipe ({', '.join(registry())}), a --manifest, or a budget "
                        "(--max-kl) to search for the best one")
    return Manifest(model=opts.model or "default", revision=opts.revision, base_model=opts.base_model,
                    calibration=opts.calibration, detection=opts.detection,
                    recipes=[] if budgeted else resolve_recipes(_params_from_flags(opts.recipes, opts.recipe_values)))


def _patch_gguf(man, opts: PatchOptions) -> None:
    out, scan_path, overwrite, device, quiet = opts.out, opts.scan_path, opts.overwrite, opts.device, opts.quiet
    do_verify, link = opts.verify, opts.link
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
    click.echo(f"ME Layer {res.scan.me_layer}, massive dims {spans(res.scan.massive_dims)}")
    for p in res.plans:
        click.echo(f"  {p.summary}")
    for a in res.applied:
        click.echo(f"  edited {a.tensor} ({a.written_type}): {count(a.changed, 'entry', 'entries')} changed, max "
                   f"|delta| {a.max_abs_delta:.4g}; {a.blocks_requantised}/{count(a.blocks_total, 'block')} "
                   f"requantised ({a.blocks_changed} with new bytes); misses {a.edit_error:.1%} of the asked edit")
    click.echo(f"wrote {res.file} (sha256 {res.output_sha256[:12]}; read back: every tensor where and what it "
               f"should be); measure it with `melsurgery verify {man.model or 'default'} {res.file}`")


def _echo_written(result, opts: PatchOptions, model: str, measured: tuple[float, float, str] | None = None) -> None:
    """The plans, the edits, how the weights were written (--verbose), then the summary: where the patch went, how
    it loads, its measured figure (`measured`: sink cut, KL and on what); first, a measured sink that rose."""
    from melsurgery.measure.verify_result import sink_warning

    if result.verified and (warning := sink_warning(result.verified)):
        click.echo(warning)
    click.echo(f"ME Layer {result.scan.me_layer}, massive dims {spans(result.scan.massive_dims)}")
    for p in result.plans:
        click.echo(f"  {p.summary}")
    for a in result.applied:
        click.echo(f"  edited {a.tensor}: {count(a.changed, 'entry', 'entries')}, max |delta| {a.max_abs_delta:.4g}")
    if result.writer is not None and opts.verbose:
        click.echo(f"  weights: {result.writer.summary}")
    elif result.writer is not None and result.writer.deferred:
        click.echo(f"  keep the source {result.scan.model.folder} unchanged until you push: push hashes it to "
                   "prove what this patch was made from")
    if result.verified:
        from melsurgery.measure.verify_result import verify_report

        click.echo(verify_report(result.verified))
    how = ("trust_remote_code=True, melsurgery.load() or vLLM beside melsurgery" if result.custom_layer
           else "stock transformers")
    if not result.custom_layer and not any(a.changed for a in result.applied):
        click.echo("THIS PATCH CHANGES NOTHING: every tensor is byte-identical to the source (the edits leave every "
                   "entry as it was)")
    if measured is None and result.verified:
        measured = (result.verified.sink_reduction_pct, result.verified.kl_mean, "measured by --verify")
    from melsurgery.report.summary import patch_takeaway

    click.echo(patch_takeaway(str(opts.out), model, how, *(measured or (None, None, None))).render())


def _patch_folder(man, opts: PatchOptions) -> None:
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.surgery.patch import run_patch

    source = resolve(man.model, man.revision)
    scan = read_json(opts.scan_path) if opts.scan_path else None
    result = run_patch(source, opts.out, man, scan=scan, overwrite=opts.overwrite, link=opts.link, device=opts.device,
                       progress=not opts.quiet, verify=opts.verify_request)
    _echo_written(result, opts, man.model or "default")


def _patch_budgeted(man, opts: PatchOptions) -> None:
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.search.budget import budget_report, run_budgeted_patch

    source = resolve(man.model, man.revision)
    scan = read_json(opts.scan_path) if opts.scan_path else None
    done = run_budgeted_patch(source, opts.out, man, opts.search, scan=scan, text=opts.text, heldout=opts.heldout,
                              overwrite=opts.overwrite, link=opts.link, device=opts.device, progress=not opts.quiet,
                              verify=opts.verify_request, plot=opts.plot)
    click.echo(budget_report(done))
    if opts.plot is not None:
        click.echo(f"wrote {opts.plot}")
    r = done.recheck
    _echo_written(done.patch, opts, man.model or "default",
                  (r.sink_reduction_pct, r.kl_mean, "the written checkpoint, on the held-out windows"))
