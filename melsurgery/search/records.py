"""The search's currency, one type per thing: a recipe setting, a budget, an objective, figures, a trial.

A setting (`Setting`, a tuple of `RecipeChoice`) goes unchanged from the sampler to the study's trial
record, the held-out re-measure, the manifest and the provenance record. `Figures` is what a setting does
to one text. An objective names the figure a study maximises: a new one (a payoff measure, once `Figures`
carries it as an optional field) joins by one entry of `OBJECTIVES`.

The payoff objectives (`evict`, `int8`) maximise the *penalty removed*: the base model's payoff penalty minus the
patched one, in percentage points of perplexity change, each penalty the change of `measure.definitions` (the
arrangement's perplexity relative to the same model's plain forward on the same scored tokens). A base evict
penalty of +488% cut to +421% scores 67 points; a setting that worsens the penalty scores below zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from melsurgery.errors import UserError
from melsurgery.formats.typed import Need, load

NAN = {"nan": True}  # a figure written as null (not a number) reads back as NaN
PAYOFF = {"omit_none": True}  # a payoff figure: None unless the objective is a payoff


@dataclass(frozen=True)
class RecipeChoice:
    """A recipe of a setting with its resolved parameters."""

    name: str
    params: dict[str, Any]


Setting = tuple[RecipeChoice, ...]


def setting(recipes: list[tuple[str, dict]]) -> Setting:
    """(name, params) pairs, as the recipes resolve them, as a setting."""
    return tuple(RecipeChoice(n, dict(p)) for n, p in recipes)


def pairs(chosen: Setting) -> list[tuple[str, dict]]:
    """A setting as the (name, params) pairs the recipes and manifests take."""
    return [(r.name, dict(r.params)) for r in chosen]


@dataclass(frozen=True)
class Figures:
    """What one setting does to one text: sinks and ratios after the ME Layer, KL and perplexity.

    `sink_*`: the sink (measure.definitions) averaged over the layers after the ME Layer; `*_reduction_pct`: the
    cut in percent of the base (negative: the setting raised it); `kl_mean`: KL(base || patched) per scored token;
    `kl_windows`: the same per window (its spread says how far the mean can be trusted); `tokens`: the tokens the
    model ran over. `payoff_*` (None unless the search's objective is a payoff): the objective's penalty (percent
    perplexity change under its arrangement) of base and patched, the penalty removed (base minus patched,
    percentage points) and its paired 95% bootstrap interval over windows (None with one window)."""

    sink_base: float = field(metadata=NAN)
    sink_patched: float = field(metadata=NAN)
    sink_reduction_pct: float = field(metadata=NAN)
    ratio_base: float = field(metadata=NAN)
    ratio_patched: float = field(metadata=NAN)
    ratio_reduction_pct: float = field(metadata=NAN)
    kl_mean: float = field(metadata=NAN)
    ppl_base: float = field(metadata=NAN)
    ppl_patched: float = field(metadata=NAN)
    ppl_increase_pct: float = field(metadata=NAN)
    tokens: int
    kl_windows: tuple[float, ...] = ()
    payoff_base: float | None = field(default=None, metadata=PAYOFF)
    payoff_patched: float | None = field(default=None, metadata=PAYOFF)
    payoff_removed: float | None = field(default=None, metadata=PAYOFF)
    payoff_low: float | None = field(default=None, metadata=PAYOFF)
    payoff_high: float | None = field(default=None, metadata=PAYOFF)

    def finite(self) -> bool:
        """Whether every figure the search compares is a number (a broken trial is pruned, not ranked)."""
        return all(math.isfinite(x) for x in (self.sink_patched, self.kl_mean, self.ppl_patched, self.ratio_patched,
                                              self.sink_reduction_pct, self.ratio_reduction_pct, self.ppl_increase_pct,
                                              0.0 if self.payoff_removed is None else self.payoff_removed))

    def plausible(self, tokens: int) -> bool:
        """Whether figures read from a cache can be what a measurement of `tokens` tokens gave: every figure in its
        range and each cut consistent with its base and patched values (anything else is recomputed)."""
        def cut(base: float, patched: float) -> float:
            return 100 * (1 - patched / base) if base else 0.0

        return (self.finite() and self.tokens == tokens and self.kl_mean >= 0 and self.ppl_base > 0
                and self.ppl_patched > 0 and min(self.sink_base, self.sink_patched, self.ratio_base,
                                                 self.ratio_patched) >= 0
                and all(math.isfinite(k) and k >= 0 for k in self.kl_windows)
                and math.isclose(self.sink_reduction_pct, cut(self.sink_base, self.sink_patched), abs_tol=1e-6)
                and math.isclose(self.ratio_reduction_pct, cut(self.ratio_base, self.ratio_patched), abs_tol=1e-6)
                and math.isclose(self.ppl_increase_pct, 100 * (self.ppl_patched / self.ppl_base - 1), abs_tol=1e-6))

    @classmethod
    def cached(cls, data: Any, tokens: int) -> Figures | None:
        """Figures from a cache entry when it is complete, well-typed and plausible for `tokens` tokens; else None."""
        try:
            fig = load(cls, data, "", Need("the search cache", "it is recomputed"))
        except (UserError, TypeError, ValueError):
            return None
        return fig if fig.plausible(tokens) else None

    def kl_interval(self) -> tuple[float, float] | None:
        """A 95% interval of the mean KL over windows (normal approximation); None with fewer than two windows."""
        n = len(self.kl_windows)
        if n < 2:
            return None
        mean = sum(self.kl_windows) / n
        sd = math.sqrt(sum((k - mean) ** 2 for k in self.kl_windows) / (n - 1))
        half = 1.96 * sd / math.sqrt(n)
        return mean - half, mean + half


@dataclass(frozen=True)
class Objective:
    """What a study maximises: one figure of `Figures`, and how reports name it. `arrangement`: the payoff
    arrangement (`measure.definitions.arrangements`) whose penalty a payoff objective removes; None for the sink and
    the ratio."""

    name: str
    figure: str
    label: str
    arrangement: str | None = None

    def of(self, fig: Figures) -> float:
        """The figure maximised, in percent (a payoff: percentage points; NaN where the figures carry none)."""
        value = getattr(fig, self.figure)
        return math.nan if value is None else value


OBJECTIVES = {o.name: o for o in (Objective("sink", "sink_reduction_pct", "sink"),
                                  Objective("ratio", "ratio_reduction_pct", "max/median ratio"),
                                  Objective("evict", "payoff_removed", "evict penalty", "evict"),
                                  Objective("int8", "payoff_removed", "int8 penalty", "int8-tensor"))}


def payoff_text(fig: Figures, goal: Objective) -> str:
    """A payoff objective's figures as reports print them: the penalty of base and patched (perplexity change under
    the arrangement) and the points removed, with its 95% interval over windows where there is one."""
    span = "" if fig.payoff_low is None else f", 95% interval {fig.payoff_low:+.1f} to {fig.payoff_high:+.1f}"
    return (f"{goal.label} {fig.payoff_base:+.1f}% -> {fig.payoff_patched:+.1f}% ({fig.payoff_removed:+.1f} points "
            f"removed{span})")


def objective(name: str) -> Objective:
    """The objective of this name (refused in one line when unknown)."""
    if name not in OBJECTIVES:
        raise UserError(f"--objective {name!r}: use one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


@dataclass(frozen=True)
class Budget:
    """The quality budget: mean KL per token and perplexity increase (percent); None: no limit."""

    max_kl: float | None = 0.05
    max_ppl_increase: float | None = None

    def holds(self, fig: Figures) -> bool:
        """Whether figures are within the budget."""
        return ((self.max_kl is None or fig.kl_mean <= self.max_kl)
                and (self.max_ppl_increase is None or fig.ppl_increase_pct <= self.max_ppl_increase))

    def scaled(self, factor: float) -> Budget:
        """The budget `factor` times looser."""
        return Budget(self.max_kl * factor if self.max_kl else None,
                      self.max_ppl_increase * factor if self.max_ppl_increase else None)

    def constraints(self, fig: Figures) -> tuple[float, float]:
        """Optuna constraints (feasible at <= 0), so that the sampler favours settings within the budget."""
        return (fig.kl_mean - self.max_kl if self.max_kl else -1.0,
                fig.ppl_increase_pct - self.max_ppl_increase if self.max_ppl_increase else -1.0)

    def over(self, fig: Figures) -> float:
        """How many times over the budget figures are (at most 1: within it), by KL or perplexity, whichever is
        tighter."""
        ratios = [fig.kl_mean / self.max_kl] if self.max_kl else []
        if self.max_ppl_increase:
            ratios.append(max(fig.ppl_increase_pct, 0.0) / self.max_ppl_increase)
        return max(ratios)

    @property
    def limits(self) -> bool:
        """Whether the budget limits anything."""
        return self.max_kl is not None or self.max_ppl_increase is not None


@dataclass(frozen=True)
class TrialRecord:
    """One complete trial: its setting (recipes and Optuna parameters) and its figures on the tuning text."""

    number: int
    state: str
    recipes: Setting
    params: dict[str, Any]
    figures: Figures
    worker: int | None


@dataclass(frozen=True, kw_only=True)
class Measured:
    """A setting measured on the tuning and the held-out text (or why it does not apply to this model)."""

    trial: int | None = field(default=None, metadata={"omit_none": True})
    recipes: Setting
    tuning: Figures | None = field(default=None, metadata={"omit_none": True})
    heldout: Figures | None = field(default=None, metadata={"omit_none": True})
    error: str | None = field(default=None, metadata={"omit_none": True})
    manifest: str | None = field(default=None, metadata={"omit_none": True})


def pareto_front(trials: list[TrialRecord], goal: Objective) -> list[int]:
    """Numbers of the trials no other trial beats on both the objective and KL."""
    pts = [(t.number, goal.of(t.figures), t.figures.kl_mean) for t in trials]
    return [n for n, red, kl in pts
            if not any((r2 >= red and k2 <= kl) and (r2 > red or k2 < kl) for _, r2, k2 in pts)]


def best_within(trials: list[TrialRecord], goal: Objective, budget: Budget) -> TrialRecord | None:
    """The largest cut within the budget (ties: the smaller KL); None when no trial within it cuts at all (a setting
    that raises the sink is never "the best cut")."""
    ok = [t for t in trials if budget.holds(t.figures) and goal.of(t.figures) > 0]
    return max(ok, key=lambda t: (goal.of(t.figures), -t.figures.kl_mean), default=None)
