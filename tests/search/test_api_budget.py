"""The main job in one Python call (`melsurgery.patch(model, out, max_kl=...)`), and the demo's summary of it:
the generations side by side and, last, the folder written and three lines that load and run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from melsurgery.checkpoint.provenance import Provenance
from tests.support.planted_sink import SINK_LAYER

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def budgeted(sinkmodel, tmp_path_factory):
    """melsurgery.patch with a budget, written where `make demo` writes its patch, and verify's JSON beside it."""
    import melsurgery
    from melsurgery.detect.scan import read_json

    root, folder = sinkmodel
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MELSURGERY_CACHE", str(out / "cache"))
        done = melsurgery.patch(str(folder), out / "smollm2-budget", max_kl=1e-4, trials=16, text=root / "tune.txt",
                                heldout=root / "held.txt", scan=read_json(root / "scan.json"))
    v = melsurgery.verify(folder, out / "smollm2-budget", text=root / "held.txt", generations=2, max_new_tokens=6)
    (out / "verify.json").write_text(json.dumps(v.to_json()))
    return done, out


@pytest.mark.slow
def test_one_call_writes_the_budgeted_patch(budgeted):
    done, out = budgeted
    prov = Provenance.read(out / "smollm2-budget")
    assert prov.search is not None and prov.search.budget == {"max_kl": 1e-4, "max_ppl_increase": None}
    assert prov.search.study["trials"] == 16 and done.patch.out == out / "smollm2-budget"
    held = prov.search.figures_heldout
    assert held["sink_reduction_pct"] > 50 and held["kl_mean"] <= 1e-4
    assert next(r for r in prov.recipes if r.name == "wemask").params["layers"] == [SINK_LAYER]


@pytest.mark.slow
def test_demo_summary_shows_generations_and_ends_with_how_to_load_it(budgeted, tmp_path):
    _, out = budgeted
    (out / "scan.png").touch()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_summary.py"), str(out)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    v = json.loads((out / "verify.json").read_text())
    start = lines.index("greedy generations, base vs patched (as verify printed them):")
    assert lines[start + 1] == f"  prompt:  {v['generations'][0]['prompt']}"
    assert lines[start + 2].startswith("  base:    ") and lines[start + 3].startswith("  patched: ")
    assert lines[-4] == f"wrote {out / 'smollm2-budget'}; load and run it with:"
    # the three lines run as printed: they load the patch written and generate
    snippet = "\n".join(line.strip() for line in lines[-3:])
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
