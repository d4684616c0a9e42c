"""How figures are worded wherever they are printed: a change is signed as what it is, counts agree with their
nouns, a budget reads as a sentence. Torch-free, so every stage's reports and the model card can use it."""

from __future__ import annotations

import math


def change_text(reduction_pct: float | None) -> str:
    """A reduction (percent of the base) worded as the change it is: a cut is negative, a rise says it is worse.

    "-14.6%" for a cut, "+2.9% (worse)" for an increase, "unchanged" within 0.05 points."""
    if reduction_pct is None or not math.isfinite(reduction_pct):
        return "not measured"
    if abs(reduction_pct) < 0.05:
        return "unchanged"
    return f"-{reduction_pct:.1f}%" if reduction_pct > 0 else f"+{-reduction_pct:.1f}% (worse)"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """ "1 window", "3 windows"; `plural` where adding an s is wrong ("1 entry", "2 entries")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def budget_text(max_kl: float | None, max_ppl_increase: float | None) -> str:
    """A quality budget as words: "KL <= 0.05", "perplexity +3% at most", or both."""
    parts = [f"KL <= {max_kl:g}"] if max_kl is not None else []
    if max_ppl_increase is not None:
        parts.append(f"perplexity +{max_ppl_increase:g}% at most")
    return " and ".join(parts)
