"""The `melsurgery` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import UserError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}


class Group(click.Group):
    """Turns UserError into one line on stderr and its exit code; never a traceback for user errors."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"melsurgery: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("melsurgery: interrupted", err=True)
            sys.exit(130)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    return device


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


device_option = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
dtype_option = click.option(
    "--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True, help="Compute dtype."
)
revision_option = click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")


def calibration_options(f):
    for opt in reversed([
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="Calibration text: .txt (blank-line separated samples) or .jsonl (text or messages)."),
        click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use this many samples."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=128, show_default=True,
                     help="Truncate each sample to this many tokens."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for sample selection."),
        click.option("--abs-threshold", type=float, default=100.0, show_default=True,
                     help="An entry is massive when |h| is at least this ..."),
        click.option("--ratio", type=float, default=1000.0, show_default=True,
                     help="... and at least this many times the layer's median |h|."),
        click.option("--persist-fraction", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                     help="A massive entry must stay massive for this fraction of the remaining layers."),
    ]):
        f = opt(f)
    return f


@click.group(cls=Group)
@click.version_option(__version__, prog_name="melsurgery")
def main() -> None:
    """Find and fix massive activations (the Massive Emergence Layer) in decoder checkpoints.

    MODEL is a local folder, a Hub repo id, a .gguf file, or `default` (SmolLM2-135M-Instruct).
    """


def _scan(model, revision, calib, num_samples, max_tokens, seed, abs_threshold, ratio, persist_fraction, device,
          dtype, quiet) -> dict:
    from .checkpoint.source import resolve
    from .detect import DetectParams
    from .scan import CalibrationSpec, run_scan

    source = resolve(model, revision)
    return run_scan(
        source,
        CalibrationSpec(calib, num_samples, max_tokens, seed),
        DetectParams(abs_threshold=abs_threshold, ratio=ratio, persist_fraction=persist_fraction),
        device=resolve_device(device),
        dtype=torch_dtype(dtype),
        progress=not quiet,
    )


@main.command()
@click.argument("model", required=False)
@revision_option
@calibration_options
@device_option
@dtype_option
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full result as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG of max |h| per layer.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def scan(model, revision, calib, num_samples, max_tokens, seed, abs_threshold, ratio, persist_fraction, device, dtype,
         json_path, plot_path, quiet) -> None:
    """Find and explain the ME Layer of MODEL by streaming calibration.

    Exit status: 0 when an ME Layer is found, 3 when no massive activation persists (the report and
    JSON are still written), 2 on errors.
    """
    from .errors import NoMassiveActivations
    from .report import scan_report
    from .scan import write_json

    result = _scan(model, revision, calib, num_samples, max_tokens, seed, abs_threshold, ratio, persist_fraction,
                   device, dtype, quiet)
    click.echo(scan_report(result))
    if json_path:
        write_json(result, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        from .plot import plot_scan

        plot_scan(result, plot_path)
        click.echo(f"wrote {plot_path}")
    if result["me_layer"] is None:
        raise NoMassiveActivations("no massive activations found in this model")


def _recipe_params(layers, top_k, dims, mask_ratio, strength, selector, norm_factor, dampen, neurons,
                   me_norm_factor) -> dict[str, dict]:
    """Map the recipe options to each recipe's parameter names (None: the recipe's default)."""
    attn = {"layers": layers, "top_k": top_k, "dims": dims, "mask_ratio": mask_ratio}
    return {
        "wemask": {**attn, "strength": strength, "selector": selector},
        "norm-rescale": {**attn, "factor": norm_factor},
        "ffn-dampen": {"factor": dampen, "neurons": neurons},
        "me-norm": {"factor": me_norm_factor},
    }


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("use comma-separated integers, e.g. 507,247") from None


def _neuron_list(ctx, param, value):
    """Neurons as J or, in a mixture of experts, E:J (expert E, neuron J)."""
    if value is None:
        return None
    if not all(part.strip().replace(":", "", 1).isdigit() for part in value.split(",") if part.strip()):
        raise click.BadParameter("use comma-separated neurons, e.g. 1229,1487 or 3:41 for expert 3")
    return [int(p) if ":" not in p else p.strip() for p in value.split(",") if p.strip()]


@main.command()
@click.argument("model", required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--recipe", "recipes", multiple=True,
              type=click.Choice(["wemask", "norm-rescale", "ffn-dampen", "me-norm"]),
              help="Recipe to apply (repeatable; they compose in order).")
@click.option("--manifest", type=click.Path(path_type=Path), help="YAML manifest (model, calibration, recipes).")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), help="Reuse a scan JSON instead of scanning.")
@click.option("--layers", default=None, help="wemask/norm-rescale layers: next (default), after-me, or 12,14-16.")
@click.option("--top-k", type=int, default=None, help="Act on the top-k dims of the massive tokens (default 3).")
@click.option("--dims", callback=_int_list, default=None, help="Explicit dims, e.g. 507,247.")
@click.option("--mask-ratio", type=float, default=None, help="Dims whose mean |h| is at least this share of the top.")
@click.option("--strength", type=click.FloatRange(0, 1), default=None, help="wemask: 1 zeroes the dims (default).")
@click.option("--selector", type=click.Choice(["magnitude", "first"]), default=None,
              help="wemask: which tokens are masked (default magnitude).")
@click.option("--norm-factor", type=float, default=None, help="norm-rescale: factor on the dims (default 0.5).")
@click.option("--dampen", type=float, default=None, help="ffn-dampen: factor on the neurons (default 0.2).")
@click.option("--neurons", callback=_neuron_list, default=None,
              help="ffn-dampen: explicit neurons (E:J for expert E of a mixture of experts).")
@click.option("--me-norm-factor", type=float, default=None, help="me-norm: shrink factor (default 0.5).")
@revision_option
@calibration_options
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--link", is_flag=True, help="Hard-link untouched shards instead of copying them.")
@click.option("--verify", "do_verify", is_flag=True,
              help="Measure the patch (as `melsurgery verify`) and write the figures into the card and provenance.")
@click.option("--verify-windows", type=click.IntRange(min=1), default=None,
              help="With --verify: evaluate at most N windows of 512 tokens.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def patch(model, out, recipes, manifest, scan_path, layers, top_k, dims, mask_ratio, strength, selector, norm_factor,
          dampen, neurons, me_norm_factor, revision, calib, num_samples, max_tokens, seed, abs_threshold, ratio,
          persist_fraction, overwrite, link, do_verify, verify_windows, device, quiet) -> None:
    """Fold a mitigation into MODEL's weights (plus a custom layer for wemask) and write OUT.

    Untouched tensors stay byte-identical; the output is written atomically with a model card,
    provenance.json and the resolved manifest.
    """
    from .checkpoint.source import resolve
    from .detect import DetectParams
    from .manifest import Manifest, load_manifest
    from .patch import run_patch
    from .scan import CalibrationSpec, read_json

    if manifest:
        if recipes:
            raise UserError("give recipes either with --recipe or in the --manifest, not both")
        man = load_manifest(manifest)
        if model and model != man.model:
            raise UserError(f"the manifest names model {man.model!r}; drop MODEL or edit the manifest")
    else:
        if not recipes:
            raise UserError("name at least one --recipe (wemask, norm-rescale, ffn-dampen, me-norm) or a --manifest")
        params = _recipe_params(layers, top_k, dims, mask_ratio, strength, selector, norm_factor, dampen, neurons,
                                me_norm_factor)
        man = Manifest(
            model=model or "default",
            revision=revision,
            calibration=CalibrationSpec(calib, num_samples, max_tokens, seed),
            detection=DetectParams(abs_threshold=abs_threshold, ratio=ratio, persist_fraction=persist_fraction),
            recipes=[(r, {k: v for k, v in params[r].items() if v is not None}) for r in recipes],
        )
    source = resolve(man.model, man.revision)
    scan = read_json(scan_path) if scan_path else None
    verify = {"max_windows": verify_windows} if do_verify else None
    result = run_patch(source, out, man, scan=scan, overwrite=overwrite, link=link, device=resolve_device(device),
                       progress=not quiet, verify=verify)
    click.echo(f"ME Layer {result.scan['me_layer']}, massive dims {result.scan['massive_dims']}")
    for p in result.plans:
        click.echo(f"  {p.summary}")
    for a in result.applied:
        click.echo(f"  edited {a.tensor}: {a.changed} entries, max |delta| {a.max_abs_delta:.4g}")
    how = "trust_remote_code=True or melsurgery.load()" if result.custom_layer else "stock transformers"
    if result.verified:
        from .verify import verify_report

        click.echo(verify_report(result.verified))
    click.echo(f"wrote {out} (loads with {how})")


def _register() -> None:
    """Commands kept in their own modules (they reuse the options above, hence the late import)."""
    from .commands.diff import diff
    from .commands.push import push
    from .commands.verify import verify

    for command in (verify, diff, push):
        main.add_command(command)


_register()
