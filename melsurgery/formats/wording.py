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


def spans(values) -> str:
    """Integers as prose, runs collapsed: [12, 14, 15, 16] -> "12, 14-16" (never a Python list)."""
    out: list[str] = []
    for v in sorted(set(values)):
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


def layers_text(values) -> str:
    """ "layer 12", "layers 12, 14-16"."""
    values = sorted(set(values))
    return f"{'layer' if len(values) == 1 else 'layers'} {spans(values)}"


def dims_by_layer(per_layer: dict) -> str:
    """Dims per layer as prose, layers sharing the same dims named together: "dims 507, 247 of layers 15-20;
    dims 507, 14 of layer 21" (never a Python dict)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for layer, dims in per_layer.items():
        groups.setdefault(tuple(dims), []).append(int(layer))
    return "; ".join(f"dims {', '.join(map(str, dims))} of {layers_text(layers)}" for dims, layers in groups.items())
