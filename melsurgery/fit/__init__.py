"""Fitted recipe values: the stage that reads weights for a recipe (first-token's row), between the pure
planners in `recipes/` and the `patch` that writes.

A recipe never reads weights or touches files; a recipe whose plan needs a fitted value declares `needs_fit`
and takes the value as a parameter. Here the value is fitted (streaming the model, gradient steps, a cache of
fitted paths) and handed to the recipe's plan as data: `fit_recipes` fills the params in before planning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from melsurgery.architectures import Family
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.recipes import RecipePlan, get_recipe, plan_recipes, resolve_recipes

__all__ = ["FitContext", "fit_recipes"]


@dataclass(frozen=True)
class FitContext:
    """What a recipe with fitted values (first-token) fits them on: the model folder and its scan, the fitting
    text (never the held-out text), where to run, and a folder where fitted paths are cached (None: no cache)."""

    folder: Path
    family: Family
    config: dict
    scan: ScanResult
    text: str
    device: str = "cpu"
    progress: bool = False
    cache: Path | None = None


def _fit_first_token(ctx: FitContext, params: dict, others: list[RecipePlan]) -> dict:
    """first-token's params with the fitted row and token filled in (see `fit.first_token.fit_params`)."""
    if any(p.wemask is not None for p in others):
        raise UserError("first-token fits on top of folded recipes; wemask's custom layer is not one")
    from melsurgery.fit.first_token import fit_params

    return fit_params(ctx, params, [e for p in others for e in p.edits])


# the fitter of each recipe that declares `needs_fit`: params and the other recipes' plans -> fitted params
FITTERS: dict[str, Callable[[FitContext, dict, list[RecipePlan]], dict]] = {"first-token": _fit_first_token}


def fit_recipes(ctx: FitContext, recipes: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The recipes with every fitted value filled in: each recipe that needs a fit is fitted on top of the
    others' plans (the recipes that need none); the others pass through unchanged."""
    resolved = resolve_recipes(recipes)
    needing = {k for k, (name, params) in enumerate(resolved)
               if (r := get_recipe(name)).needs_fit is not None and r.needs_fit(params)}
    if not needing:
        return resolved
    out = []
    for k, (name, params) in enumerate(resolved):
        if k in needing:
            others = [(n, p) for j, (n, p) in enumerate(resolved) if j not in needing]
            params = FITTERS[name](ctx, params, plan_recipes(ctx.scan, ctx.family, ctx.config, others))
        out.append((name, params))
    return out
