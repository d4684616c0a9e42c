"""Regenerate the plots of the documentation (docs/img/) from real runs of the console script.

    python3 scripts/make_docs_plots.py            # runs `make demo`, then copies its plots
    python3 scripts/make_docs_plots.py --from out # copies the plots of a finished `make demo` run

The images are the ones `make demo` draws on the embedded default model (SmolLM2-135M-Instruct, fp32, CPU):
the scan profile (`scan --plot`), the budgeted patch's search (`patch --max-kl 0.05 --plot`) and base against
patched per layer (`verify --plot`); the demo's settings are in the Makefile. The Pareto fronts
(docs/img/pareto-*.png) come from benchmarks/pareto.py, which runs for longer.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLOTS = {"scan.png": "scan-default.png", "search.png": "search-default.png", "verify.png": "verify-default.png"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="the out/ folder of a finished `make demo` (default: run it now)")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    args = parser.parse_args()
    source = args.source
    if source is None:
        subprocess.run(["make", "demo"], check=True, cwd=ROOT)
        source = ROOT / "out"
    args.img.mkdir(parents=True, exist_ok=True)
    for name, target in PLOTS.items():
        shutil.copyfile(source / name, args.img / target)
        print(f"wrote {args.img / target} (from {source / name})")


if __name__ == "__main__":
    main()
