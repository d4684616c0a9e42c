"""The search has one core: `tune`, the budgeted patch and the front script drive the session and never run a step
of it themselves (opening the study, the base passes, the trials, the held-out re-measure, the cache)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import melsurgery

ROOT = Path(melsurgery.__file__).parent
DRIVERS = [ROOT / "search" / "tune.py", ROOT / "search" / "budget.py", ROOT / "commands" / "tune.py",
           ROOT / "commands" / "patch.py", ROOT.parent / "benchmarks" / "pareto.py"]
# what a driver may import from the search: the session and the types and options it takes and returns
ALLOWED = {"melsurgery.search.session", "melsurgery.search.options", "melsurgery.search.records",
           "melsurgery.search.space", "melsurgery.search.storage", "melsurgery.search.tune",
           "melsurgery.search.budget"}
# the session's steps: a driver that names one of these reimplements part of the core
STEPS = {"open_study", "run_trials", "make_objective", "complete_trials", "Evaluator", "effect_key", "scan_once",
         "HeldOutCache", "base_pass", "enqueue_trial", "optimize", "create_study", "load_study", "candidates_for",
         "pick", "locked"}
HELD = {"study", "evaluator"}  # the session's primitives: reaching into them (session.study.X) runs a step


def reimplemented(source: str) -> list[str]:
    """What a driver's source does that only the session may: an import of a search module outside the session's
    API, or a use of one of the session's steps (a name, an attribute or an imported name)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("melsurgery.search"):
            if node.module not in ALLOWED:
                found.append(f"imports {node.module}")
            found += [f"imports {a.name}" for a in node.names if a.name in STEPS]
        elif isinstance(node, ast.Import):
            found += [f"imports {a.name}" for a in node.names
                      if a.name.startswith("melsurgery.search") and a.name not in ALLOWED]
        elif isinstance(node, ast.Attribute) and node.attr in STEPS:
            found.append(f"uses .{node.attr}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr in HELD:
            found.append(f"uses .{node.value.attr}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in STEPS:
            found.append(f"uses {node.id}")
    return found


@pytest.mark.parametrize("path", DRIVERS, ids=lambda p: p.name if p.parent.name != "commands" else f"commands/{p.name}")
def test_drivers_only_drive_the_session(path):
    assert path.exists(), path
    assert reimplemented(path.read_text()) == []


@pytest.mark.parametrize("snippet", [
    "from melsurgery.search.study import run_trials",
    "from melsurgery.search.engine import Evaluator",
    "from melsurgery.search.session import locked",
    "def f(session):\n    return session.study.optimize(lambda t: 0, n_trials=1)",
    "def f(session, texts):\n    return session.evaluator.base_pass('held', texts.held.ids, 1)",
    "def f(session):\n    return session.study.get_trials()",
])
def test_a_driver_that_runs_a_step_itself_is_caught(snippet):
    """The check above is not vacuous: each way of reimplementing a step is seen."""
    assert reimplemented(snippet)


def _figures(**change):
    """A plausible set of held-out figures (as JSON) of 512 tokens, with `change` applied."""
    from dataclasses import asdict

    from melsurgery.search.records import Figures

    fig = asdict(Figures(0.5, 0.4, 20.0, 10.0, 9.0, 10.0, 0.04, 40.0, 41.0, 2.5, 512, (0.03, 0.05)))
    return {**fig, **change}


@pytest.mark.parametrize("entry", [
    _figures(kl_mean=-1.0),  # a KL below zero
    _figures(sink_patched=-1.5, sink_reduction_pct=400.0),  # a 400% sink cut
    _figures(sink_reduction_pct=90.0),  # a cut its own base and patched sinks contradict
    _figures(kl_mean="0.01"),  # the wrong type
    _figures(kl_windows=[0.01, -2.0]),  # a negative window
    _figures(tokens=100),  # figures of another text
    {k: v for k, v in _figures().items() if k != "kl_mean"},  # incomplete
    [1, 2],
    None,
])
def test_a_cache_entry_is_used_only_when_it_can_be_true(tmp_path, entry):
    """The held-out cache: an edited, damaged or foreign entry is measured again, never reported."""
    from melsurgery.search.session import HeldOutCache

    (tmp_path / "heldout.json").write_text(json.dumps({"key": "k", "figures": {"s": entry}}))
    assert HeldOutCache(tmp_path, "k", 512).get("s") is None


def test_a_sound_entry_is_reused_only_for_its_own_input(tmp_path):
    from melsurgery.search.session import HeldOutCache

    (tmp_path / "heldout.json").write_text(json.dumps({"key": "k", "figures": {"s": _figures()}}))
    fig = HeldOutCache(tmp_path, "k", 512).get("s")
    assert fig is not None and fig.kl_mean == 0.04 and fig.kl_windows == (0.03, 0.05)
    assert HeldOutCache(tmp_path, "another model or text", 512).get("s") is None


@pytest.mark.parametrize("data", [b"\x00\xff{", b"[1, 2]", b'{"k": 3}', b'{"key": "k", "figures": [1]}'])
def test_a_damaged_cache_file_is_recomputed_not_trusted(tmp_path, data):
    from melsurgery.search.session import HeldOutCache

    (tmp_path / "heldout.json").write_bytes(data)
    assert HeldOutCache(tmp_path, "k", 512).data == {}


def test_a_fifo_in_place_of_the_cache_is_ignored(tmp_path):
    import os

    from melsurgery.search.session import HeldOutCache

    os.mkfifo(tmp_path / "heldout.json")
    assert HeldOutCache(tmp_path, "k", 512).data == {}


def _foreign_journal(path: Path, *, directions, attrs=None) -> None:
    """A journal holding another program's study under melsurgery's study name."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from melsurgery.search.storage import STUDY

    study = optuna.create_study(study_name=STUDY, directions=directions,
                                storage=JournalStorage(JournalFileBackend(str(path))))
    for k, v in (attrs or {}).items():
        study.set_user_attr(k, v)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) if len(directions) == 1 else (0.0, 0.0), n_trials=2)


@pytest.mark.parametrize("directions, attrs", [
    (["minimize"], None),  # a single-objective study
    (["maximize", "minimize"], {"owner": "someone else"}),  # our shape, not our mark
])
def test_a_journal_of_another_program_is_refused_before_any_work(tmp_path, directions, attrs):
    from tests.support.helpers import assert_clean_failure, run_cli

    run = tmp_path / "run"
    run.mkdir()
    _foreign_journal(run / "study.journal", directions=directions, attrs=attrs)
    before = (run / "study.journal").read_bytes()
    r = run_cli("tune", tmp_path / "nowhere", "-o", run, "--trials", 2)
    assert_clean_failure(r, "is not melsurgery's", code=2)
    assert (run / "study.journal").read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["study.journal"]


def test_the_held_out_kl_comes_with_its_per_window_spread():
    from dataclasses import replace

    from melsurgery.search.budget import record_figures, spread_text
    from melsurgery.search.records import Figures

    fig = Figures.cached(json.loads(json.dumps(_figures())), 512)
    low, high = fig.kl_interval()
    assert low < 0.04 < high and high - low == pytest.approx(2 * 1.96 * (0.02 ** 2 / 2) ** 0.5 / 2 ** 0.5)
    assert "0.0300-0.0500" in spread_text(fig) and "over 2 windows" in spread_text(fig)
    one = replace(fig, kl_windows=(0.04,))
    assert one.kl_interval() is None and "one window" in spread_text(one)
    assert record_figures(fig)["kl_interval_high"] == pytest.approx(high) and "kl_windows" not in record_figures(fig)
