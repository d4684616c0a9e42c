import json

import pytest
from conftest import run_cli

from melsurgery.checkpoint.source import resolve
from melsurgery.manifest import Manifest
from melsurgery.patch import run_patch
from melsurgery.verify import Gates, run_verify

FAST = {"max_windows": 2, "max_tokens": 128, "generations": 1, "max_new_tokens": 8}


def patch(planted, out, recipes, scan, **kw):
    return run_patch(resolve(str(planted)), out, Manifest(model=str(planted), recipes=recipes), scan=scan, **kw)


def test_a_patch_that_changes_nothing_measures_nothing(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("wemask", {"strength": 0.0}), ("ffn-dampen", {"factor": 1.0})], planted_scan)
    r = run_verify(planted, tmp_path / "out", **FAST)
    assert r["kl_mean"] == 0 and r["kl_max"] == 0 and r["top1_agreement"] == 1
    assert r["ppl_base"] == r["ppl_patched"]
    assert r["sink_base"] == r["sink_patched"] and r["max_abs_base"] == r["max_abs_patched"]
    assert r["weights"]["changed"] == [] and r["weights"]["matches_provenance"] is True
    assert r["generations"][0]["base"] == r["generations"][0]["patched"]


def test_removing_the_massive_activation_shows_in_the_right_layers(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("ffn-dampen", {"factor": 0.0})], planted_scan)
    r = run_verify(planted, tmp_path / "out", **FAST)
    me = planted_scan["me_layer"]
    assert r["max_abs_base"][:me] == r["max_abs_patched"][:me]  # before the ME Layer nothing changes
    for i in range(me, len(r["max_abs_base"])):
        assert r["max_abs_patched"][i] < 0.1 * r["max_abs_base"][i]
    assert r["kl_mean"] > 0 and r["weights"]["changed"] == ["model.layers.3.mlp.down_proj.weight"]
    assert r["weights"]["matches_provenance"] is True


def test_gates():
    r = {"kl_mean": 0.05, "ppl_increase_pct": 3.0, "sink_reduction_pct": 10.0}
    assert Gates().check(r) == []
    assert Gates(max_kl=0.1, max_ppl_increase=5, min_sink_reduction=5).check(r) == []
    assert len(Gates(max_kl=0.01, max_ppl_increase=1, min_sink_reduction=50).check(r)) == 3


def test_cli_verify_json_plot_and_gate_exit(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("wemask", {"layers": "after-me"})], planted_scan)
    js, png = tmp_path / "v.json", tmp_path / "v.png"
    res = run_cli("verify", planted, tmp_path / "out", "--windows", "2", "--max-tokens", "64", "--generations", "1",
                  "--json", js, "--plot", png, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "perplexity" in res.stdout and "matches provenance.json edits" in res.stdout
    data = json.loads(js.read_text())
    for key in ("kl_mean", "kl_max", "ppl_base", "ppl_patched", "sink_base", "sink_patched", "top1_agreement"):
        assert key in data
    assert len(data["sink_base"]) == 6 and png.read_bytes()[:4] == b"\x89PNG"
    res = run_cli("verify", planted, tmp_path / "out", "--windows", "1", "--max-tokens", "64", "--generations", "0",
                  "--max-kl", "0", "--quiet")
    assert res.returncode == 4 and "gate violated" in res.stderr and "Traceback" not in res.stderr


def test_patch_verify_writes_figures_into_card_and_provenance(planted, planted_scan, tmp_path):
    result = patch(planted, tmp_path / "out", [("ffn-dampen", {})], planted_scan, verify=FAST)
    assert result.verified["kl_mean"] > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Measured effect" in card and "perplexity" in card
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["measurements"]["kl_mean"] == pytest.approx(result.verified["kl_mean"])
    from melsurgery.checkpoint.hashing import sha256_file

    assert all(sha256_file(tmp_path / "out" / f) == h for f, h in prov["outputs"].items())
