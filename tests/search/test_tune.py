"""`melsurgery tune`: the search finds a planted cut, its manifest reproduces under verify, studies resume and share."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import read_json
from melsurgery.params import Param
from melsurgery.recipes import plan_recipes, registry, resolve_recipes
from melsurgery.search.engine import Evaluator
from melsurgery.search.session import text_windows
from melsurgery.search.space import Space, make_space
from melsurgery.search.tune import TuneResult
from tests.support.helpers import run_cli
from tests.support.planted_sink import HELD_TEXT, SINK_LAYER


def _tune(root, folder, run, *extra):
    """The CLI on the tuning and held-out texts, reusing the module's scan (the workers test scans in-run)."""
    return run_cli("tune", folder, "-o", run, "--text", root / "tune.txt", "--heldout", root / "held.txt",
                   "--max-tokens", 256, "--scan", root / "scan.json", "--quiet", *extra)


@pytest.mark.slow
def test_tune_finds_the_planted_cut_and_best_yaml_reproduces_under_verify(sinkmodel, tmp_path):
    root, folder = sinkmodel
    run, out = tmp_path / "run", tmp_path / "patched"
    r = _tune(root, folder, run, "--recipe", "wemask", "--recipe", "ffn-dampen", "--trials", 16, "--max-kl", "1e-4",
              "--apply", out)
    assert r.returncode == 0, r.stderr
    data = json.loads((run / "tune.json").read_text())
    assert len(data["trials"]) == 16 and data["pareto_front"]
    assert TuneResult.read(run / "tune.json").to_json() == data  # typed, and the schema as written
    chosen = data["chosen"]
    mask = next(x["params"] for x in chosen["recipes"] if x["name"] == "wemask")
    assert mask["layers"] == f"{SINK_LAYER}-{SINK_LAYER}"
    assert all(x["params"]["factor"] > 0.8 for x in chosen["recipes"] if x["name"] == "ffn-dampen")
    held = chosen["heldout"]
    assert held["sink_reduction_pct"] > 50 and held["kl_mean"] < 1e-4
    # the costly ways to the same sink exist in the study and were not chosen
    dampen = [t for t in data["trials"] if [x["name"] for x in t["recipes"]] == ["ffn-dampen"]]
    assert all(t["figures"]["kl_mean"] > 1e-4 or t["figures"]["sink_reduction_pct"] < 20 for t in dampen)
    assert (run / "tune.png").stat().st_size > 0
    manifest = yaml.safe_load((run / "best.yaml").read_text())
    assert manifest["recipes"] == chosen["recipes"]
    # --apply wrote the checkpoint; verify on the held-out text reproduces the held-out figures within 10%
    v = run_cli("verify", folder, out, "--text", run / "heldout.txt", "--max-tokens", 256, "--generations", 0,
                "--json", tmp_path / "v.json", "--quiet")
    assert v.returncode == 0, v.stderr
    measured = json.loads((tmp_path / "v.json").read_text())
    for ours, theirs in (("kl_mean", "kl_mean"), ("sink_base", "sink_mean_base"),
                         ("sink_patched", "sink_mean_patched"), ("ppl_patched", "ppl_patched")):
        assert measured[theirs] == pytest.approx(held[ours], rel=0.1), ours
    # and `patch --manifest best.yaml` writes the same weights and custom layer
    p = run_cli("patch", "--manifest", run / "best.yaml", "-o", tmp_path / "again", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "again" / "config.json").read_text())["melsurgery_wemask"] == \
        json.loads((out / "config.json").read_text())["melsurgery_wemask"]


def test_trials_match_a_written_and_verified_checkpoint(sinkmodel, tmp_path):
    """A folded edit (ffn-dampen) applied in memory gives the figures verify gives for the written checkpoint."""
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.measure.verify import run_verify
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import run_patch

    root, folder = sinkmodel
    source = resolve(str(folder))
    scan = read_json(root / "scan.json")
    ev = Evaluator(source, scan)
    win = text_windows(load_tokenizer(folder), HELD_TEXT, 256, None)
    text = ev.base_pass("held", win.ids, win.first_target)
    recipes = resolve_recipes([("ffn-dampen", {"factor": 0.0}), ("me-norm", {"factor": 0.5})])
    plans = plan_recipes(scan, ev.family, ev.ckpt.config, recipes)
    first = ev.run(text, plans)
    assert ev.run(text, plans) == first
    assert ev.run(text, []).kl_mean == 0.0
    run_patch(source, tmp_path / "p", Manifest(model=str(folder), recipes=recipes), scan=scan)
    (tmp_path / "held.txt").write_text(HELD_TEXT)
    v = run_verify(folder, tmp_path / "p", text=tmp_path / "held.txt", max_tokens=256, generations=0)
    assert first.kl_mean > 1e-4
    assert v.kl_mean == pytest.approx(first.kl_mean, rel=1e-3, abs=1e-7)  # float32 logits, float64 sums
    assert v.sink_mean_patched == pytest.approx(first.sink_patched, rel=1e-3)
    assert v.ppl_patched == pytest.approx(first.ppl_patched, rel=1e-4)


@pytest.mark.slow
def test_rerun_continues_the_study_without_losing_trials(sinkmodel, tmp_path):
    root, folder = sinkmodel
    run = tmp_path / "run"
    r = _tune(root, folder, run, "--recipes", "wemask", "--trials", 3, "--max-kl", 1)
    assert r.returncode == 0, r.stderr
    before = json.loads((run / "tune.json").read_text())["trials"]
    assert [t["number"] for t in before] == [0, 1, 2]
    r = _tune(root, folder, run, "--recipes", "wemask", "--trials", 5, "--max-kl", 1)
    assert r.returncode == 0, r.stderr
    after = json.loads((run / "tune.json").read_text())["trials"]
    assert [t["number"] for t in after] == [0, 1, 2, 3, 4]
    assert after[:3] == before
    assert {json.dumps(t["params"], sort_keys=True) for t in after[3:]}.isdisjoint(
        json.dumps(t["params"], sort_keys=True) for t in before)  # a continued run does not replay proposals
    r = _tune(root, folder, run, "--recipes", "wemask", "--trials", 5, "--max-kl", 1)
    assert "(0 run now)" in r.stdout
    # another search space in the same run folder is refused, before any trial
    r = _tune(root, folder, run, "--recipes", "ffn-dampen", "--trials", 6)
    assert r.returncode == 2 and r.stderr.startswith("melsurgery: error:") and "recipes" in r.stderr
    assert len(json.loads((run / "tune.json").read_text())["trials"]) == 5


@pytest.mark.slow
def test_two_workers_share_one_study(sinkmodel, tmp_path):
    root, folder = sinkmodel
    run = tmp_path / "run"
    args = ["tune", folder, "-o", run, "--text", root / "tune.txt", "--heldout", root / "held.txt", "--max-tokens",
            256, "--recipes", "wemask", "--trials", 8, "--max-kl", 1, "--quiet"]
    workers = [subprocess.Popen(["melsurgery", *map(str, args), "--seed", str(seed)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="melsurgery-tune",
                              storage=JournalStorage(JournalFileBackend(str(run / "study.journal"))))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 8 <= len(done) <= 9  # each worker stops once the study holds 8; one may be mid-trial then
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))
    recorded = json.loads((run / "tune.json").read_text())["trials"]
    assert [t["number"] for t in recorded] == [t.number for t in done]


def test_space_derives_from_the_declarations(planted_scan, monkeypatch):
    """Every declared parameter with a range is searched within it; a newly declared option joins by itself."""
    import optuna

    from melsurgery.recipes import wemask

    monkeypatch.setattr(wemask, "PARAMS", (*wemask.PARAMS, Param("replace", "choice", "zero", "wemask: ...",
                                                                 choices=("zero", "mean"))))
    space = make_space(tuple(registry()), planted_scan)
    assert isinstance(space, Space) and len(space.combos) == 15
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    seen, ends = set(), set()
    for _ in range(40):
        trial = study.ask()
        for name, params in space.suggest(trial):
            recipe = registry()[name]
            for p in recipe.params:
                if p.kind in ("float", "int") and params[p.name] is not None and p.low is not None:
                    assert params[p.name] >= p.low and (p.high is None or params[p.name] <= p.high)
            if name == "wemask":
                seen.add(params["replace"])
                ends.add(params["strength_end"])
                first, last = map(int, params["layers"].split("-"))
                assert planted_scan.me_layer < first <= last < planted_scan.model.num_layers
        study.tell(trial, [0.0, 0.0])
    assert seen == {"zero", "mean"}
    # a ramp's end (off by default: None = the start's value) is searched, and its default is a flat ramp
    assert None not in ends and len(ends) > 10 and all(0.0 <= e <= 1.0 for e in ends)
    defaults = space.defaults(registry()["wemask"])
    assert defaults["wemask.strength_end"] == defaults["wemask.strength"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--max-kl", "nan"], "--max-kl"),
    (["--recipes", "wemask,nosuch"], "nosuch"),
    (["--trials", "0"], "--trials"),
    (["--objective", "x"], "objective"),
])
@pytest.mark.slow
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    r = run_cli("tune", tmp_path / "nowhere", "-o", tmp_path / "run", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_lists_tune():
    r = subprocess.run([sys.executable, "-m", "melsurgery", "tune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max-kl" in r.stdout


@pytest.mark.slow
def test_unreadable_text_is_refused_before_anything_is_written(sinkmodel, tmp_path):
    root, folder = sinkmodel
    r = run_cli("tune", folder, "-o", tmp_path / "run", "--text", tmp_path / "missing.txt", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("melsurgery: error:") and "missing.txt" in r.stderr
    assert not (tmp_path / "run").exists()
