"""Regenerate the plots of the documentation (docs/img/) from real runs of the console script.

    python3 scripts/make_docs_plots.py                      # scan, patch and verify the default model
    python3 scripts/make_docs_plots.py --tune runs/x/tune.json   # also the Pareto front of a tune run

Every image comes from the commands a user runs, on the embedded default model (SmolLM2-135M-Instruct,
fp32, CPU), with the settings printed as it goes:

- scan-default.png: `melsurgery scan default --plot` (the full embedded calibration set);
- verify-default.png: `melsurgery verify default PATCHED --plot` on the embedded held-out text, where
  PATCHED is `melsurgery patch default` with PATCH_ARGS (by default the setting `tune` chose within
  KL 0.05, see docs/commands/tune.md);
- pareto-default.png (hook): the sink cut against KL of every trial of a tune or budgeted-patch run,
  with its front, from that run's tune.json (`--tune`); the budgeted-patch work (issue 25) points it
  at its own run.

About 10 minutes on a 2-core CPU (the scan and the verify dominate).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tune's choice within KL 0.05 on the default model (docs/commands/tune.md, "On the default model")
PATCH_ARGS = "--recipe norm-rescale --recipe ffn-dampen --layers 25-29 --top-k 4 --norm-factor 0.485 --dampen 0.742"


def melsurgery(*args: object) -> None:
    """Run one melsurgery command as a user would (the console script's module), failing loudly."""
    cmd = [sys.executable, "-m", "melsurgery", *map(str, args)]
    print("$", shlex.join(["melsurgery", *map(str, args)]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def scan_plot(work: Path, img: Path) -> Path:
    """The scan profile of the default model; returns the scan JSON for the patch."""
    scan = work / "scan.json"
    melsurgery("scan", "default", "--json", scan, "--plot", img / "scan-default.png", "--quiet")
    return scan


def verify_plot(work: Path, img: Path, scan: Path, patch_args: str, windows: int) -> None:
    """Base against a patch of the default model, per layer, on the embedded held-out text."""
    out = work / "patched"
    melsurgery("patch", "default", "-o", out, "--scan", scan, *shlex.split(patch_args), "--overwrite", "--quiet")
    figures_json = work / "verify.json"
    plot = img / "verify-default.png"
    verify_args = ("--windows", windows, "--generations", 0, "--json", figures_json, "--plot", plot, "--quiet")
    melsurgery("verify", "default", out, *verify_args)
    figures = json.loads(figures_json.read_text())
    print(
        f"verify: sink after the ME Layer {figures['sink_mean_base']:.3f} -> {figures['sink_mean_patched']:.3f}, "
        f"KL {figures['kl_mean']:.4f}, {figures['windows']} windows / {figures['scored_tokens']} scored tokens"
    )


def pareto_plot(tune_json: Path | None, img: Path) -> None:
    """Hook for the Pareto front (sink cut against KL per trial) of a tune or budgeted-patch run."""
    if tune_json is None:
        print("pareto-default.png: skipped (give --tune RUN_DIR/tune.json)")
        return
    from melsurgery.plot import plot_tune

    plot_tune(json.loads(tune_json.read_text()), img / "pareto-default.png")
    print(f"wrote {img / 'pareto-default.png'} from {tune_json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--patch-args", default=PATCH_ARGS, help="recipe flags of the patch that verify measures")
    parser.add_argument("--windows", type=int, default=4, help="verify: windows of 512 tokens of held-out text")
    parser.add_argument("--tune", type=Path, default=None, help="a tune.json whose trials make the Pareto plot")
    parser.add_argument("--work", type=Path, default=None, help="keep the scan, patch and verify JSON here")
    args = parser.parse_args()
    args.img.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="melsurgery-docs-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        scan = scan_plot(work, args.img)
        verify_plot(work, args.img, scan, args.patch_args, args.windows)
        pareto_plot(args.tune, args.img)


if __name__ == "__main__":
    main()
