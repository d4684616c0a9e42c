"""The payoff objectives (`--objective evict|int8`): what a trial records is what `verify` gives for the written
patch, and the int8 objective prefers removing the massive activation."""

from __future__ import annotations

import pytest

from melsurgery.checkpoint.safeload import load_tokenizer
from melsurgery.checkpoint.source import resolve
from melsurgery.recipes import resolve_recipes
from melsurgery.search.engine import Evaluator
from melsurgery.search.options import SearchOptions
from melsurgery.search.records import OBJECTIVES
from melsurgery.search.session import text_windows
from tests.support.helpers import patch, run_cli

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows of "
        "outrageous fortune, or to take arms against a sea of troubles.\n") * 2
MAX_TOKENS, WINDOWS, WINDOW = 64, 3, 16
TOL = 1e-3  # percentage points: the search's float32 stream against verify's (the same arithmetic, other batching)


def _trial(planted, planted_scan, objective: str, recipes: list[tuple[str, dict]]):
    """The figures a search of `objective` records for `recipes` on TEXT's windows."""
    opts = SearchOptions(objective=objective, payoff_window=WINDOW, max_tokens=MAX_TOKENS)
    ev = Evaluator(resolve(str(planted)), planted_scan, arrangement=opts.arrangement)
    win = text_windows(load_tokenizer(planted), TEXT, MAX_TOKENS, WINDOWS)
    text = ev.base_pass("text", win.ids, win.first_target)
    return ev.run(text, ev.plans(resolve_recipes(recipes)))


@pytest.mark.parametrize(("objective", "arrangement"), [("evict", "evict"), ("int8", "int8-tensor")])
def test_the_recorded_payoff_is_what_verify_gives_for_the_written_patch(planted, planted_scan, tmp_path, objective,
                                                                        arrangement):
    """A trial's payoff figures (base and patched penalty, penalty removed, its interval) equal verify's payoff
    figure of the checkpoint `patch` writes for the same setting, on the same windows."""
    from melsurgery.measure.verify import run_verify

    recipes = [("ffn-dampen", {"factor": 0.3})]
    fig = _trial(planted, planted_scan, objective, recipes)
    patch(planted, tmp_path / "out", recipes, scan=planted_scan)
    (tmp_path / "text.txt").write_text(TEXT)
    v = run_verify(planted, tmp_path / "out", text=tmp_path / "text.txt", max_tokens=MAX_TOKENS,
                   max_windows=WINDOWS, generations=0, payoff_window=WINDOW)
    ref = next(p for p in v.payoff if p.name == arrangement)
    assert abs(ref.difference_pp) > 0.01  # the setting moves the penalty: the comparison is not of two zeros
    assert fig.payoff_base == pytest.approx(ref.base_pct, abs=TOL)
    assert fig.payoff_patched == pytest.approx(ref.patched_pct, abs=TOL)
    assert OBJECTIVES[objective].of(fig) == pytest.approx(-ref.difference_pp, abs=TOL)
    low, high = ref.difference_interval
    assert (fig.payoff_low, fig.payoff_high) == pytest.approx((-high, -low), abs=TOL)


def test_the_int8_objective_prefers_removing_the_massive_activation(planted, planted_scan):
    """On the planted model the ME Layer's FFN writes the massive activation through one neuron, whose input to the
    down projection sets that layer's per-tensor int8 scale: dampening it fully (factor 0) takes it away, a light
    dampening (0.9) leaves it. The int8 objective scores the removal higher and the choice takes it; the sink
    objective carries no payoff figure. (The planted model's predictions hardly depend on the quantized
    activations, so its int8 penalty is small: the ranking, not its size, is what this model can show.)"""
    from melsurgery.search.records import Budget, TrialRecord, best_within

    removes = _trial(planted, planted_scan, "int8", [("ffn-dampen", {"factor": 0.0})])
    keeps = _trial(planted, planted_scan, "int8", [("ffn-dampen", {"factor": 0.9})])
    goal = OBJECTIVES["int8"]
    assert removes.payoff_base == keeps.payoff_base  # one base, computed once per text
    assert goal.of(removes) > goal.of(keeps) > 0
    trials = [TrialRecord(n, "COMPLETE", (), {}, f, None) for n, f in enumerate((keeps, removes))]
    assert best_within(trials, goal, Budget(max_kl=0.01)).number == 1
    assert _trial(planted, planted_scan, "sink", [("ffn-dampen", {"factor": 0.0})]).payoff_removed is None


def test_a_bad_objective_or_payoff_window_is_refused_in_one_line(planted, tmp_path):
    res = run_cli("patch", str(planted), "-o", str(tmp_path / "a"), "--max-kl", "0.05", "--objective", "evicted")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--objective" in res.stderr
    res = run_cli("tune", str(planted), "-o", str(tmp_path / "b"), "--objective", "evict", "--payoff-window", "600",
                  "--max-tokens", "64")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--payoff-window 600" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    res = run_cli("patch", str(planted), "-o", str(tmp_path / "c"), "--recipe", "ffn-dampen", "--payoff-window", "32")
    assert res.returncode == 2 and "--payoff-window applies to a budgeted patch" in res.stderr


@pytest.mark.slow
def test_a_budgeted_patch_for_the_payoff_says_what_it_optimised(planted, tmp_path):
    """`patch --max-kl --objective evict`: the summary, the card and provenance name the objective and give its
    held-out figure with its interval, and the written folder's re-measure (verify) agrees with the search's."""
    import json

    res = run_cli("patch", str(planted), "-o", str(tmp_path / "out"), "--max-kl", "0.05", "--objective", "evict",
                  "--payoff-window", "32", "--trials", "3", "--windows", "2")
    assert res.returncode == 0, res.stderr
    search = json.loads((tmp_path / "out" / "provenance.json").read_text())["search"]
    held = search["figures_heldout"]
    assert search["objective"] == "evict" and search["study"]["payoff_window"] == 32
    assert held["payoff_removed"] == pytest.approx(held["payoff_base"] - held["payoff_patched"])
    assert held["payoff_low"] <= held["payoff_removed"] <= held["payoff_high"]
    assert f"({held['payoff_removed']:+.1f} points removed" in res.stdout
    assert f"{held['payoff_removed']:+.1f} points of evict penalty removed" in res.stdout  # verify's re-measure
    card = (tmp_path / "out" / "README.md").read_text()
    assert "first token evicted from a 32-key window" in card and "largest evict penalty removal" in card
