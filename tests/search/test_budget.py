"""`patch --max-kl`: the budgeted patch finds the planted cut, says what it measured, reuses its study, and refuses
cleanly (nothing written) when the budget cannot be met or the input is bad."""

from __future__ import annotations

import json

import pytest

from melsurgery.checkpoint.provenance import Provenance
from tests.support.helpers import assert_clean_failure, run_cli
from tests.support.planted import planted_folder
from tests.support.planted_sink import SINK_LAYER


def _budgeted(root, folder, out, cache, *extra):
    """The CLI on the module's texts and scan, with its own search cache."""
    return run_cli("patch", folder, "-o", out, "--text", root / "tune.txt", "--heldout", root / "held.txt", "--scan",
                   root / "scan.json", "--quiet", *extra, env={"MELSURGERY_CACHE": str(cache)})


@pytest.mark.slow
def test_the_budgeted_patch_is_the_planted_cut_and_verify_reproduces_its_figures(sinkmodel, tmp_path):
    from melsurgery.measure.verify import run_verify

    root, folder = sinkmodel
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = _budgeted(root, folder, out, cache, "--max-kl", "1e-4", "--trials", 16)
    assert r.returncode == 0, r.stderr
    prov = Provenance.read(out)
    s = prov.search
    assert s is not None and s.budget == {"max_kl": 1e-4, "max_ppl_increase": None}
    assert s.study["trials"] == 16 and s.study["ran"] == 16 and s.sink_layers == f"4-{SINK_LAYER}"
    held = s.figures_heldout
    assert held["sink_reduction_pct"] > 50 and held["kl_mean"] <= 1e-4
    mask = next(r for r in prov.recipes if r.name == "wemask")
    assert mask.params["layers"] == [SINK_LAYER]
    card = (out / "README.md").read_text()
    assert "## How this patch was chosen" in card and f"mean over layers 4-{SINK_LAYER}" in card
    assert f"-{held['sink_reduction_pct']:.1f}%" in r.stdout and "held-out figures" in r.stdout
    # the written checkpoint, measured by verify on the same held-out text, gives the figures the search recorded
    v = run_verify(folder, out, text=root / "held.txt", generations=0)
    for ours, theirs in (("kl_mean", "kl_mean"), ("sink_base", "sink_mean_base"), ("sink_patched", "sink_mean_patched"),
                         ("ppl_patched", "ppl_patched")):
        assert getattr(v, theirs) == pytest.approx(held[ours], rel=1e-3, abs=1e-7), ours  # float32 logits, float64 sums
    # and the command measured the written folder on those windows itself, agreeing (no warning first)
    assert not r.stdout.startswith("WARNING") and f"same held-out windows: KL {v.kl_mean:.4f}" in r.stdout
    assert "per token (" in r.stdout  # the held-out KL is given with its per-window spread
    # a second identical run reuses every trial and measurement and writes the same patch
    again = _budgeted(root, folder, tmp_path / "again", cache, "--max-kl", "1e-4", "--trials", 16)
    assert again.returncode == 0, again.stderr
    assert "16 trials (0 run now)" in again.stdout
    assert Provenance.read(tmp_path / "again").recipes == prov.recipes


@pytest.mark.slow
def test_nothing_within_the_budget_writes_nothing_and_exits_4(sinkmodel, tmp_path):
    root, folder = sinkmodel
    out = tmp_path / "out"
    r = _budgeted(root, folder, out, tmp_path / "cache", "--max-kl", "1e-12", "--trials", 4)
    assert_clean_failure(r, "no setting of the search space", "nothing written", out=out, code=4)


@pytest.mark.parametrize("args, message", [
    (["--max-kl", "0"], "--max-kl 0.0: must be a positive finite number"),
    (["--max-kl", "-0.1"], "--max-kl -0.1: must be a positive finite number"),
    (["--max-kl", "nan"], "--max-kl nan: must be a finite number"),
    (["--max-kl", "inf"], "--max-kl inf: must be a finite number"),
    (["--max-ppl-increase", "0"], "--max-ppl-increase 0.0: must be a positive finite number"),
    (["--max-kl", "0.05", "--timeout", "0"], "--timeout 0.0: must be a positive finite number"),
    (["--max-kl", "0.05", "--recipe", "wemask", "--strength", "0.5"], "--strength sets what --max-kl searches"),
    (["--max-kl", "0.05", "--manifest", "m.yaml"], "--manifest names the recipes, --max-kl searches them"),
    (["--max-kl", "0.05", "-o", "out.gguf"], "--max-kl writes a safetensors folder"),
    (["--trials", "5", "--recipe", "wemask"], "--trials applies to a budgeted patch"),
])
@pytest.mark.slow
def test_bad_budgets_are_refused_before_any_work(tmp_path, args, message):
    """Checked before the model is even resolved: the model named here does not exist."""
    out = tmp_path / "out"
    argv = ["patch", tmp_path / "nowhere", *args]
    if "-o" not in args:
        argv += ["-o", out]
    r = run_cli(*argv, env={"MELSURGERY_CACHE": str(tmp_path / "cache")})
    assert_clean_failure(r, message, out=out, code=2)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_model_without_an_me_layer_is_refused_with_exit_3(tmp_path):
    folder = planted_folder(tmp_path / "plain", plant=None)
    out = tmp_path / "out"
    r = run_cli("patch", folder, "-o", out, "--max-kl", "0.05", "--trials", 2, "--quiet", "--num-samples", 2,
                env={"MELSURGERY_CACHE": str(tmp_path / "cache")})
    assert_clean_failure(r, "no ME Layer", "nothing written", out=out, code=3)


@pytest.mark.slow
def test_provenance_keeps_the_search_record_typed(sinkmodel, tmp_path):
    """The search record reads back through the typed provenance reader; a broken one is one line naming it."""
    from melsurgery.errors import UserError

    root, folder = sinkmodel
    out = tmp_path / "out"
    r = _budgeted(root, folder, out, tmp_path / "cache", "--max-kl", "0.5", "--trials", 4)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "provenance.json").read_text())
    assert Provenance.from_json(data, "p").search.trial == data["search"]["trial"]
    data["search"]["trial"] = "first"
    with pytest.raises(UserError, match="search.trial must be an integer"):
        Provenance.from_json(data, "p")
