"""The study: Optuna's record of a search (stored, resumable, shared by workers), and the loop that fills it.

The study API (`open_study`, `complete_trials`) is apart from the optimisation loop (`run_trials`, with its
refinement of over-budget settings), as Optuna keeps them; the session (`search.session`) drives both. A study
carries `MARK` among its user attributes: a study without it is another program's and is refused.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from melsurgery.checkpoint.atomic import critical, interruptible
from melsurgery.errors import UserError, quote
from melsurgery.formats.typed import load
from melsurgery.search.options import SEEDS
from melsurgery.search.records import Budget, Figures, Objective, TrialRecord, best_within, setting
from melsurgery.search.storage import MARK, STUDY, describe, not_ours, open_storage, storage_errors


def open_study(storage: str | None, run_dir: Path, fingerprint: dict, seed: int, *, startup: int = 8):
    """Create or continue the study in `storage` (an Optuna storage URL; None: RUN_DIR's journal file).

    A study holds one model, text and search space: continuing it with others is refused, and so is a study that
    melsurgery did not make. Every failure of the storage is one line naming it, redacted (search/storage.py).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is recorded, not logged with its traceback
    with storage_errors(storage, run_dir, "open the study"):
        study = optuna.create_study(study_name=STUDY, storage=open_storage(storage, run_dir), load_if_exists=True,
                                    directions=["maximize", "minimize"])
        attrs, directions = study.user_attrs, [d.name for d in study.directions]
        done = len(study.get_trials(deepcopy=False))
    why = not_ours(attrs, directions, done)
    if why:
        raise UserError(f"{quote(describe(storage, run_dir), 300)}: {why}; move it away or choose another "
                        "RUN_DIR (or --storage)")
    held = attrs.get("fingerprint")
    if held is None:
        with storage_errors(storage, run_dir, "write to the study"):
            study.set_user_attr(MARK, True)
            study.set_user_attr("fingerprint", fingerprint)
    elif held != fingerprint:
        held = held if isinstance(held, dict) else {}
        diff = sorted(k for k in set(held) | set(fingerprint) if held.get(k) != fingerprint.get(k))
        raise UserError(f"the study in {quote(describe(storage, run_dir), 300)} was run with different "
                        f"{', '.join(diff)}; use a new run folder (or --storage) or the original settings")
    # a continued run must not replay the proposals of the first one
    study.sampler = optuna.samplers.TPESampler(seed=(seed + done) % SEEDS, n_startup_trials=startup)
    return study


def trial_record(t) -> TrialRecord:
    """One complete Optuna trial as a typed record."""
    return TrialRecord(t.number, t.state.name, setting([(x["name"], x["params"]) for x in t.user_attrs["recipes"]]),
                       dict(t.params), load(Figures, t.user_attrs["figures"], "", None), t.user_attrs.get("worker"))


def complete_trials(study) -> list[TrialRecord]:
    """The study's complete trials as records, in trial order."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [trial_record(t) for t in sorted(done, key=lambda t: t.number)]


def make_objective(evaluator, text, space, goal: Objective, budget: Budget):
    """The Optuna objective: a trial's setting measured on `text`; (objective, KL), the budget as constraints."""
    import optuna

    def run(trial) -> tuple[float, float]:
        recipes = space.suggest(trial)
        with interruptible():  # a signal cuts a trial's computation, never Optuna's records (its file lock included)
            fig = evaluator.run(text, evaluator.plans(recipes))
        trial.set_user_attr("recipes", [{"name": n, "params": p} for n, p in recipes])
        trial.set_user_attr("figures", asdict(fig))
        trial.set_user_attr("worker", os.getpid())
        if not fig.finite():  # before the constraints: Optuna refuses a NaN constraint
            raise optuna.TrialPruned("non-finite figures")
        for name, value in zip(("kl", "ppl"), budget.constraints(fig)):
            trial.set_constraint(name, value)
        return goal.of(fig), fig.kl_mean

    return run


REFINE_STEPS = 3  # trials spent bringing one over-budget setting within the budget


def refine_share(trials: int, budget: Budget) -> int:
    """Trials of a search of `trials` spent scaling its most promising over-budget settings into the budget: a third,
    at most three settings' worth; none without a budget."""
    if budget.max_kl is None and budget.max_ppl_increase is None:
        return 0
    return min(3 * REFINE_STEPS, trials // 3) // REFINE_STEPS * REFINE_STEPS


def _figures(t) -> Figures:
    return load(Figures, t.user_attrs["figures"], "", None)


def _promising(study, goal: Objective, budget: Budget):
    """The over-budget trial whose cut should be largest once scaled into the budget, not refined before.

    A setting's sink cut changes at first order in its strength, KL and perplexity at second order, so scaling a
    setting that is `over` times over the budget by t = 1/sqrt(over) keeps about cut/sqrt(over) of its cut."""
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    done = {t.user_attrs["toward"] for t in trials if "toward" in t.user_attrs}
    over = [(t, _figures(t)) for t in trials if t.number not in done and "toward" not in t.user_attrs]
    over = [(t, goal.of(f) / math.sqrt(o)) for t, f in over if goal.of(f) > 0 and (o := budget.over(f)) > 1]
    return max(over, key=lambda x: x[1], default=(None, 0.0))[0]


def _run(study, objective_fn, n: int, timeout: float | None, callbacks: list) -> None:
    """n trials of the study (fewer when `timeout` seconds pass); only the objective's computation is
    interruptible (see `make_objective`), so a signal never cuts Optuna's journal or its lock."""
    with critical():
        study.optimize(objective_fn, n_trials=n, timeout=timeout, callbacks=callbacks, catch=(UserError,))


def _refine(study, objective_fn, space, trials: int, deadline: float | None, goal: Objective, budget: Budget,
            callbacks: list) -> None:
    """Scale the most promising over-budget settings toward no effect (`Space.toward_neutral`) until they fit the
    budget: a first guess from the second-order rule, then REFINE_STEPS - 1 steps of the same rule within the
    bracket of scales known to be inside and outside the budget."""
    import optuna

    def finished() -> int:
        return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))

    def left() -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    while finished() < trials and (left() is None or left() > 0):
        origin = _promising(study, goal, budget)
        if origin is None:
            return
        lo, hi = 0.0, 1.0
        t = min(0.98, max(0.02, 0.95 / math.sqrt(budget.over(_figures(origin)))))
        for _ in range(REFINE_STEPS):
            if finished() >= trials or (left() is not None and left() <= 0):
                return
            study.enqueue_trial(space.toward_neutral(origin.params, t), user_attrs={"toward": origin.number,
                                                                                      "scale": t})
            _run(study, objective_fn, 1, left(), callbacks)
            last = study.get_trials(deepcopy=False)[-1]
            if last.state != optuna.trial.TrialState.COMPLETE:
                break
            over = budget.over(_figures(last))
            lo, hi = (t, hi) if over <= 1 else (lo, t)
            guess = t * 0.95 / math.sqrt(over) if over > 0 else hi
            t = guess if lo < guess < hi else (lo + hi) / 2


def run_trials(study, objective_fn, trials: int, *, timeout: float | None, goal: Objective, budget: Budget,
               progress: bool, space=None, label: str = "search") -> int:
    """The one search loop: run trials until the study holds `trials` finished ones (all workers together) or
    `timeout` seconds pass, and return how many this process ran.

    Sampled trials first (TPE); with a budget and a `space`, the last `refine_share` of them scale the most
    promising over-budget settings into the budget (`_refine`). With `progress`, a bar on stderr shows the largest
    cut within the budget so far."""
    import optuna

    from melsurgery.formats.wording import change_text

    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    remaining = max(0, trials - len(finished))
    if not remaining:
        return 0
    ran = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=remaining, desc=label, unit="trial", leave=False)

    def on_trial(study, trial) -> None:
        nonlocal ran
        ran += 1
        if bar is None:
            return
        bar.update(1)
        best = best_within(complete_trials(study), goal, budget)
        if best:
            f = best.figures
            within = "within the budget " if budget.max_kl or budget.max_ppl_increase else ""
            figure = f"{goal.of(f):+.1f} points removed" if goal.arrangement else change_text(goal.of(f))
            bar.set_postfix_str(f"largest {'removal' if goal.arrangement else 'cut'} {within}#{best.number}: "
                                f"{goal.label if goal.arrangement else goal.name} {figure}, KL {f.kl_mean:.4f}")

    states = tuple(s for s in optuna.trial.TrialState if s.is_finished())
    refine = refine_share(trials, budget) if space is not None else 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sampled = max(0, trials - refine - len(finished))
        if sampled:
            share = None if timeout is None else timeout * (trials - refine) / trials
            _run(study, objective_fn, sampled, share,
                 [on_trial, optuna.study.MaxTrialsCallback(trials - refine, states=states)])
        if refine:
            _refine(study, objective_fn, space, trials, deadline, goal, budget,
                    [on_trial, optuna.study.MaxTrialsCallback(trials, states=states)])
    finally:
        if bar is not None:
            bar.close()
    return ran
