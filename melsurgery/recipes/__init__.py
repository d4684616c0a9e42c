"""Mitigation recipes: pure functions from a scan result to tensor edits and custom-layer specs.

A recipe never reads weights or touches files (tests/test_layers.py holds it; a value fitted on the model
comes from the `fit` stage as a parameter). It returns a `RecipePlan`: a list of `Edit`s (affine rescalings
of slices of named tensors, applied later by the writer in fp32) and, where folding is impossible, a
`WeMaskSpec` for the custom layer. Tensor names come from the architecture entry.
"""

from __future__ import annotations

from melsurgery.architectures import Family
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError, quote
from melsurgery.recipes.base import (
    Recipe,
    RecipePlan,
    WeMaskLayer,
    WeMaskSpec,
    attention_layers,
    layer_dims,
    parse_layers,
    pick_dims,
    require_me,
)

__all__ = [
    "Recipe",
    "RecipePlan",
    "WeMaskLayer",
    "WeMaskSpec",
    "attention_layers",
    "layer_dims",
    "parse_layers",
    "pick_dims",
    "require_me",
    "get_recipe",
    "plan_recipes",
    "registry",
    "resolve_recipes",
]


def registry() -> dict[str, Recipe]:
    """Every recipe by name, in the order they are documented."""
    from melsurgery.recipes import ffn_dampen, first_token, me_norm, norm_rescale, wemask

    return {m.NAME: Recipe(m.NAME, m.plan, m.PARAMS, m.FOLDS, getattr(m, "needs_fit", None))
            for m in (wemask, norm_rescale, ffn_dampen, me_norm, first_token)}


def get_recipe(name: str) -> Recipe:
    """The recipe of this name, or a one-line error naming the available ones."""
    known = registry()
    if name not in known:
        raise UserError(f"unknown recipe {quote(name)}; available: {', '.join(known)}")
    return known[name]


def resolve_recipes(recipes: list[tuple[str, dict]], strict: bool = False) -> list[tuple[str, dict]]:
    """Check names and parameters of (name, params) pairs up front; returns them with defaults filled."""
    resolved = [(name, get_recipe(name).resolve(params, strict)) for name, params in recipes]
    for once in ("wemask", "first-token"):
        if sum(name == once for name, _ in resolved) > 1:
            raise UserError(f"{once} can be applied once per patch")
    return resolved


def plan_recipes(scan: ScanResult, family: Family, config: dict, recipes: list[tuple[str, dict]]) -> list[RecipePlan]:
    """Plan each (name, params) in order; recipes compose (edits of one tensor apply in sequence)."""
    return [get_recipe(name).plan(scan, family, config, params) for name, params in resolve_recipes(recipes)]
