"""`melsurgery patch [MODEL] -o OUT`."""

from __future__ import annotations

from pathlib import Path

import click

from melsurgery.checkpoint.atomic import check_output
from melsurgery.commands.shared import (
    calibration_options,
    device_option,
    examples,
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


@click.command(
    epilog=examples(
        "melsurgery patch default -o out/damp --recipe ffn-dampen --dampen 0.2 --verify",
        "melsurgery patch default -o out/wemask --scan scan.json --recipe wemask --layers after-me --strength 0.5",
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
              help="Recipe to apply (repeatable; they compose in order).")
@click.option("--manifest", type=click.Path(path_type=Path), help="YAML manifest (model, calibration, recipes).")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), help="Reuse a scan JSON instead of scanning.")
@recipe_options
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
def patch(model, out, fmt, recipes, manifest, scan_path, revision, base_model, calib, num_samples, max_tokens, seed,
          abs_threshold, ratio, persist_fraction, overwrite, link, do_verify, verify_windows, device, quiet,
          **recipe_flags) -> None:
    """Fold a mitigation into MODEL's weights (plus a custom layer for wemask) and write OUT.

    Untouched tensors stay byte-identical; the output is written atomically with a model card,
    provenance.json and the resolved manifest.
    """
    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.checkpoint.basemodel import explicit
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json
    from melsurgery.params import DetectParams
    from melsurgery.surgery.manifest import Manifest, load_manifest
    from melsurgery.surgery.patch import run_patch

    values = {"--" + k[len("recipe_"):].replace("_", "-"): v for k, v in recipe_flags.items()}
    if base_model:
        explicit(base_model, "--base-model")  # before any work
    if manifest:
        given = [flag for flag, v in values.items() if v is not None]
        if given:
            raise UserError(f"{given[0]} conflicts with --manifest: set recipe parameters in the manifest")
        if recipes:
            raise UserError("give recipes either with --recipe or in the --manifest, not both")
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in MANIFEST_SETS
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:  # the manifest's value would silently win
            raise UserError(f"{given[0]} conflicts with --manifest: set it in the manifest")
        man = load_manifest(manifest, model)
        if base_model and man.base_model and base_model != man.base_model:
            raise UserError(f"the manifest names base_model {man.base_model!r}; drop --base-model or edit the manifest")
        man.base_model = base_model or man.base_model
    else:
        if not recipes:
            raise UserError("name at least one --recipe (wemask, norm-rescale, ffn-dampen, me-norm) or a --manifest")
        man = Manifest(
            model=model or "default",
            revision=revision,
            base_model=base_model,
            calibration=CalibrationSpec(calib, num_samples, max_tokens, seed),
            detection=DetectParams(abs_threshold=abs_threshold, ratio=ratio, persist_fraction=persist_fraction),
            recipes=resolve_recipes(_params_from_flags(recipes, values)),
        )
    gguf_out = fmt == "gguf" or (fmt is None and out.suffix.lower() == ".gguf")
    preflight((man.model,))  # the model read-only before anything is checked or written
    if gguf_out:
        from melsurgery.surgery.gguf_patch import gguf_preflight, gguf_source_file

        # before resolving, which converts a GGUF on first use
        gguf_preflight(gguf_source_file(man.model), out, man.recipes, folder=out.suffix.lower() != ".gguf",
                  overwrite=overwrite)
        if do_verify or link:
            raise UserError(f"{'--verify' if do_verify else '--link'} applies to safetensors output; for GGUF "
                            "output run `melsurgery verify BASE.gguf OUT.gguf` afterwards")
    elif fmt == "safetensors" and out.suffix.lower() == ".gguf":
        raise UserError(f"{out}: --format safetensors writes a folder; name it without .gguf")
    else:
        check_output(out, overwrite)
    source = resolve(man.model, man.revision)
    scan = read_json(scan_path) if scan_path else None
    if quiet:
        quiet_transformers()
    if gguf_out:
        from melsurgery.surgery.gguf_patch import run_patch_gguf

        res = run_patch_gguf(source, out, man, folder=out.suffix.lower() != ".gguf", scan=scan, overwrite=overwrite,
                             device=device, progress=not quiet)
        click.echo(f"ME Layer {res.scan.me_layer}, massive dims {list(res.scan.massive_dims)}")
        for p in res.plans:
            click.echo(f"  {p.summary}")
        for a in res.applied:
            click.echo(f"  edited {a.tensor} ({a.type}): {a.changed} entries changed, max |delta| "
                       f"{a.max_abs_delta:.4g}; {a.blocks_requantised}/{a.blocks_total} blocks requantised "
                       f"({a.blocks_changed} with new bytes), "
                       f"requantisation error max {a.requant_max_abs_err:.3g}, rms {a.requant_rms_err:.3g}")
        click.echo(f"wrote {res.file} (sha256 {res.output_sha256[:12]}; loads with llama.cpp and transformers' "
                   "GGUF loader)")
        return
    verify = {"max_windows": verify_windows} if do_verify else None
    result = run_patch(source, out, man, scan=scan, overwrite=overwrite, link=link, device=device,
                       progress=not quiet, verify=verify)
    click.echo(f"ME Layer {result.scan.me_layer}, massive dims {list(result.scan.massive_dims)}")
    for p in result.plans:
        click.echo(f"  {p.summary}")
    for a in result.applied:
        click.echo(f"  edited {a.tensor}: {a.changed} entries, max |delta| {a.max_abs_delta:.4g}")
    if result.writer is not None:
        click.echo(f"  weights: {result.writer.summary}")
    how = "trust_remote_code=True or melsurgery.load()" if result.custom_layer else "stock transformers"
    if result.verified:
        from melsurgery.measure.verify import verify_report

        click.echo(verify_report(result.verified))
    click.echo(f"wrote {out} (loads with {how})")


