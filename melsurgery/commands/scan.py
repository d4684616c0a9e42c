"""`melsurgery scan [MODEL]`."""

from __future__ import annotations

import click

from melsurgery.commands.shared import (
    calibration_options,
    complete_model,
    device_option,
    dtype_option,
    examples,
    json_option,
    plot_option,
    preflight,
    revision_option,
    torch_dtype,
    write_outputs,
)


def _scan(model, revision, calib, num_samples, max_tokens, seed, abs_threshold, ratio, persist_fraction, device,
          dtype, quiet) -> dict:
    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import run_scan
    from melsurgery.params import DetectParams

    source = resolve(model, revision)
    return run_scan(
        source,
        CalibrationSpec(calib, num_samples, max_tokens, seed),
        DetectParams(abs_threshold=abs_threshold, ratio=ratio, persist_fraction=persist_fraction),
        device=device,
        dtype=torch_dtype(dtype),
        progress=not quiet,
    )


@click.command(
    epilog=examples(
        "melsurgery scan default --json scan.json --plot scan.png   # the embedded SmolLM2-135M-Instruct",
        "melsurgery scan HuggingFaceTB/SmolLM2-1.7B-Instruct --num-samples auto --dtype bfloat16",
        "melsurgery scan ./my-model --calib prompts.jsonl --max-tokens 256 --quiet",
    )
)
@click.argument("model", required=False, shell_complete=complete_model)
@revision_option
@calibration_options
@device_option
@dtype_option
@json_option("Write the full result as JSON.")
@plot_option("Write a PNG of max |h| per layer.")
@click.option("--quiet", is_flag=True, help="Print the one-line summary only (no report, no progress bar).")
def scan(model, revision, calib, num_samples, max_tokens, seed, abs_threshold, ratio, persist_fraction, device, dtype,
         json_path, plot_path, quiet) -> None:
    """Find and explain the ME Layer of MODEL by streaming calibration.

    Exit status: 0 when an ME Layer is found, 3 when no massive activation persists (the report and
    JSON are still written), 2 on errors.
    """
    from melsurgery.errors import NoMassiveActivations
    from melsurgery.report.text import scan_report, scan_summary

    preflight((model,), (json_path, plot_path))
    result = _scan(model, revision, calib, num_samples, max_tokens, seed, abs_threshold, ratio, persist_fraction,
                   device, dtype, quiet)
    click.echo(scan_summary(result) if quiet else scan_report(result))
    from melsurgery.report.plot import plot_scan

    write_outputs(result, json_path, plot_path, plot_scan)
    if result.me_layer is None:
        raise NoMassiveActivations("no massive activations found in this model")


