"""A search's options, declared once and validated once, for `tune`, the budgeted patch and the front script.

The same fields, defaults and messages serve every driver (the command-line flags are built from them in
`commands/search_flags.py`). The options validate themselves when made (`validate`), so a bad setting is
refused where it enters, before any model is read, and no later step checks it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from melsurgery.errors import UserError
from melsurgery.measure.definitions import Arrangement, arrangements
from melsurgery.recipes import registry
from melsurgery.search.records import Budget, Objective, objective

TRIALS = 40  # trials a study holds by default (a rerun with more continues it)
PAYOFF_WINDOW = 64  # the evict objective's streaming window (keys each query sees), as verify's default
CANDIDATES = 6  # settings re-measured on held-out text per budget
SEEDS = 2**32  # the samplers take seeds in [0, 2^32)


@dataclass(frozen=True)
class SearchOptions:
    """What a search varies, under which budget, over which text, for how long.

    `recipes`: the recipes composed (empty: every recipe the search can vary); `windows`: at most this many windows
    of `max_tokens` tokens of each text; `candidates`: the settings that cut the sink most within twice the budget on
    the tuning text, re-measured on the held-out text, where the choice is made; `storage`: an Optuna storage URL
    (None: the search folder's journal); `payoff_window`: the streaming window of the evict objective. No budget
    (both limits None) maps the whole trade-off (the front script)."""

    recipes: tuple[str, ...] = ()
    objective: str = "sink"
    max_kl: float | None = 0.05
    max_ppl_increase: float | None = None
    trials: int = TRIALS
    timeout: float | None = None
    seed: int = 0
    max_tokens: int = 512
    windows: int | None = None
    candidates: int = CANDIDATES
    storage: str | None = None
    payoff_window: int = PAYOFF_WINDOW

    def __post_init__(self) -> None:
        validate(self)

    @property
    def budget(self) -> Budget:
        """The budget as the engine checks it."""
        return Budget(self.max_kl, self.max_ppl_increase)

    @property
    def goal(self) -> Objective:
        """What the study maximises."""
        return objective(self.objective)

    @property
    def arrangement(self) -> Arrangement | None:
        """The arrangement whose payoff penalty the objective removes (None: the sink or the ratio)."""
        name = self.goal.arrangement
        return next(a for a in arrangements(self.payoff_window) if a.name == name) if name else None

    @property
    def searched(self) -> tuple[str, ...]:
        """The recipes searched: those named, else every one the search can vary."""
        return self.recipes or searchable()

    def describe(self) -> str:
        """The budget as a sentence fragment ("KL <= 0.05 and perplexity +3% at most")."""
        from melsurgery.formats.wording import budget_text

        return budget_text(self.max_kl, self.max_ppl_increase)


def searchable() -> tuple[str, ...]:
    """The registered recipes a search varies trial by trial: all but the fitted ones (first-token's row is fitted
    by `patch --recipe first-token`, a path of minutes, not a trial's setting)."""
    return tuple(n for n, r in registry().items() if not r.fitted)


def check_positive(flag: str, value: float | None) -> None:
    """A budget (or a time limit) must be a positive finite number."""
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise UserError(f"{flag} {value}: must be a positive finite number")


def check_recipes(names: tuple[str, ...], flag: str = "--recipe") -> None:
    """Recipe names to search: each known and searchable, none twice."""
    known = registry()
    for r in names:
        if r not in known:
            raise UserError(f"{flag}: unknown recipe {r!r}; available: {', '.join(known)}")
        if known[r].fitted:
            raise UserError(f"{flag}: {r} is fitted, not searched; `patch --recipe {r}` fits it")
    if len(set(names)) != len(names):
        raise UserError(f"{flag}: a recipe is named twice")


def validate(opts: SearchOptions) -> SearchOptions:
    """Refuse bad options (the one place they are checked; `SearchOptions` calls it when made)."""
    from melsurgery.search.storage import check_storage

    for flag, v in (("--max-kl", opts.max_kl), ("--max-ppl-increase", opts.max_ppl_increase),
                    ("--timeout", opts.timeout)):
        check_positive(flag, v)
    check_recipes(opts.recipes)
    opts.goal  # noqa: B018 - an unknown objective is refused here
    if opts.trials < 1:
        raise UserError(f"--trials {opts.trials}: must be at least 1")
    if opts.candidates < 1:
        raise UserError(f"candidates {opts.candidates}: must be at least 1")
    if not 0 <= opts.seed < SEEDS:
        raise UserError(f"--seed {opts.seed}: must lie in [0, {SEEDS - 1}]")
    if opts.max_tokens < 8:
        raise UserError(f"--max-tokens {opts.max_tokens}: must be at least 8")
    if opts.payoff_window < 1 or (opts.objective == "evict" and opts.payoff_window >= opts.max_tokens - 1):
        raise UserError(f"--payoff-window {opts.payoff_window}: windows of {opts.max_tokens} tokens leave no position "
                        ">= it to score; use a smaller window (or a larger --max-tokens)")
    if opts.windows is not None and opts.windows < 1:
        raise UserError(f"--windows {opts.windows}: must be at least 1")
    if opts.storage:
        check_storage(opts.storage)
    return opts
