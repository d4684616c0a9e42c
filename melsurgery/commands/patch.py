"""`melsurgery patch [MODEL] -o OUT`."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .shared import calibration_options, device_option, int_list, neuron_list, resolve_device, revision_option


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


@click.command()
@click.argument("model", required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--recipe", "recipes", multiple=True,
              type=click.Choice(["wemask", "norm-rescale", "ffn-dampen", "me-norm"]),
              help="Recipe to apply (repeatable; they compose in order).")
@click.option("--manifest", type=click.Path(path_type=Path), help="YAML manifest (model, calibration, recipes).")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), help="Reuse a scan JSON instead of scanning.")
@click.option("--layers", default=None, help="wemask/norm-rescale layers: next (default), after-me, or 12,14-16.")
@click.option("--top-k", type=int, default=None, help="Act on the top-k dims of the massive tokens (default 3).")
@click.option("--dims", callback=int_list, default=None, help="Explicit dims, e.g. 507,247.")
@click.option("--mask-ratio", type=float, default=None, help="Dims whose mean |h| is at least this share of the top.")
@click.option("--strength", type=click.FloatRange(0, 1), default=None, help="wemask: 1 zeroes the dims (default).")
@click.option("--selector", type=click.Choice(["magnitude", "first"]), default=None,
              help="wemask: which tokens are masked (default magnitude).")
@click.option("--norm-factor", type=float, default=None, help="norm-rescale: factor on the dims (default 0.5).")
@click.option("--dampen", type=float, default=None, help="ffn-dampen: factor on the neurons (default 0.2).")
@click.option("--neurons", callback=neuron_list, default=None,
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
    from ..checkpoint.source import resolve
    from ..detect import DetectParams
    from ..manifest import Manifest, load_manifest
    from ..patch import run_patch
    from ..scan import CalibrationSpec, read_json

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
        from ..verify import verify_report

        click.echo(verify_report(result.verified))
    click.echo(f"wrote {out} (loads with {how})")


