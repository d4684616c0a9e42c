"""The search space, as data derived from the recipes' parameter declarations.

Every declared parameter with a default and a range is searched over that range, unless its declaration
says `search=False`; options that are off by default (explicit dim or neuron lists, alternatives to another
parameter) are not, except where they default to another parameter's value (a strength ramp's end). A
recipe added to the registry joins the space by itself. A trial composes any non-empty subset of the
searched recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.params import Param
from melsurgery.recipes import Recipe, parse_layers, registry, resolve_recipes

# Upper ends for declared integers without one, from the scan.
INT_HIGH = {"top_k": lambda scan: max(1, min(8, len(scan.top_dims or scan.massive_dims)))}


def searched(p: Param) -> bool:
    """Whether the search varies this declared parameter: not when its declaration says so, nor an option that is
    off by default (unless it defaults to another parameter's value)."""
    return p.search and (p.default is not None or p.same_as is not None)


@dataclass(frozen=True)
class Axis:
    """One coordinate of the space: an Optuna parameter and its range (layers: a run of `first`, `count`)."""

    key: str
    kind: str  # int, float, choice, layers
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The axis as the search settings record it (provenance, tune.json)."""
        out: dict = {"key": self.key, "kind": self.kind}
        if self.kind == "choice":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high)
        return out


@dataclass(frozen=True)
class Space:
    """What a trial may choose: which recipes compose, and each searched parameter over its declared range."""

    recipes: tuple[Recipe, ...]
    me_layer: int
    num_layers: int
    int_high: dict[str, int] = field(default_factory=dict)

    @property
    def combos(self) -> list[str]:
        """Every non-empty composition of the searched recipes, as Optuna categorical choices ('a+b')."""
        names = [r.name for r in self.recipes]
        return ["+".join(c) for k in range(1, len(names) + 1) for c in combinations(names, k)]

    def axes(self, recipe: Recipe) -> list[tuple[Param, Axis]]:
        """The searched parameters of `recipe` with their ranges in this model."""
        out = []
        for p in recipe.params:
            if not searched(p):
                continue
            key = f"{recipe.name}.{p.name}"
            if p.kind == "layers":  # a contiguous run of layers after the ME Layer
                out.append((p, Axis(key, "layers", self.me_layer + 1, self.num_layers - 1)))
            elif p.kind == "choice":
                out.append((p, Axis(key, "choice", choices=tuple(p.choices))))
            elif p.kind == "float" and p.low is not None and p.high is not None:
                out.append((p, Axis(key, "float", p.low, p.high)))
            elif p.kind == "int" and p.low is not None and (p.high is not None or p.name in self.int_high):
                high = int(p.high) if p.high is not None else self.int_high[p.name]
                out.append((p, Axis(key, "int", int(p.low), max(int(p.low), high))))
        return out

    def suggest(self, trial) -> list[tuple[str, dict]]:
        """(recipe, params) pairs for one trial, validated by the recipes' own declarations."""
        chosen = trial.suggest_categorical("recipes", self.combos).split("+")
        out = []
        for recipe in self.recipes:
            if recipe.name not in chosen:
                continue
            params = {}
            for p, axis in self.axes(recipe):
                if axis.kind == "layers":
                    lo, hi = int(axis.low), int(axis.high)
                    first = trial.suggest_int(f"{axis.key}.first", lo, hi)
                    count = trial.suggest_int(f"{axis.key}.count", 1, hi - lo + 1)
                    params[p.name] = f"{first}-{min(hi, first + count - 1)}"
                elif axis.kind == "choice":
                    params[p.name] = trial.suggest_categorical(axis.key, list(axis.choices))
                elif axis.kind == "float":
                    params[p.name] = trial.suggest_float(axis.key, axis.low, axis.high)
                else:
                    params[p.name] = trial.suggest_int(axis.key, int(axis.low), int(axis.high))
            out.append((recipe.name, params))
        return resolve_recipes(out)

    def defaults(self, recipe: Recipe) -> dict:
        """The trial parameters that reproduce `recipe`'s declared defaults (clipped into the space)."""
        out: dict = {"recipes": recipe.name}
        declared = {p.name: p for p in recipe.params}
        for p, axis in self.axes(recipe):
            if p.same_as is not None:  # a ramp's end: the default ramp is flat
                out[axis.key] = float(declared[p.same_as].default)
            elif axis.kind == "layers":
                layers = [i for i in parse_layers(p.default, self.me_layer, self.num_layers) if i > self.me_layer]
                first = layers[0] if layers else self.me_layer + 1
                out[f"{axis.key}.first"] = first
                out[f"{axis.key}.count"] = (layers[-1] - first + 1) if layers else 1
            elif axis.kind == "choice":
                out[axis.key] = p.default
            elif axis.kind == "float":
                out[axis.key] = float(p.default)
            else:
                out[axis.key] = min(max(int(p.default), int(axis.low)), int(axis.high))
        return out

    def starts(self) -> list[dict]:
        """Where a new study starts: each recipe's defaults, then each recipe that acts on a run of layers with its
        defaults on the last third of the layers after the ME Layer (late layers feed the fewest others, so a cut
        there costs least; the sampler takes it from there)."""
        out = [self.defaults(r) for r in self.recipes]
        lo, hi = self.me_layer + 1, self.num_layers - 1
        count = max(1, (hi - lo + 1) // 3)
        for r in self.recipes:
            late = self.defaults(r)
            runs = [k for k in late if k.endswith(".first")]
            for k in runs:
                late[k], late[k.removesuffix(".first") + ".count"] = hi - count + 1, count
            if runs and late not in out:
                out.append(late)
        return out

    def toward_neutral(self, params: dict, t: float) -> dict:
        """A trial's parameters (Optuna's) with every strength and factor moved toward its neutral value: t = 1
        keeps the setting, t = 0 leaves the model as it is (structure, such as layers and dims, unchanged)."""
        out = dict(params)
        chosen = str(params["recipes"]).split("+")
        for recipe in self.recipes:
            if recipe.name not in chosen:
                continue
            for p, axis in self.axes(recipe):
                if p.neutral is not None and axis.key in out:
                    value = p.neutral + t * (out[axis.key] - p.neutral)
                    out[axis.key] = min(max(value, axis.low), axis.high)
        return out

    def to_dict(self) -> dict:
        """The space as the search settings record it: recipes, their compositions and every axis."""
        return {"recipes": [r.name for r in self.recipes], "combos": self.combos,
                "axes": [a.to_dict() for r in self.recipes for _, a in self.axes(r)]}


def make_space(names: tuple[str, ...], scan: ScanResult) -> Space:
    """The search space of these recipes for this model, from their declared parameters."""
    if scan.me_layer is None:
        raise UserError("the scan found no ME Layer: there is nothing to search")
    me, n = scan.me_layer, scan.model.num_layers
    if me + 1 >= n:
        raise UserError(f"the ME Layer is the last layer ({me}): no layer after it to act on")
    known = registry()  # fitted recipes (first-token) are fitted by `patch`, not searched trial by trial
    return Space(tuple(known[r] for r in known if r in names and not known[r].fitted), me, n,
                 {k: f(scan) for k, f in INT_HIGH.items()})


def short_params(r) -> str:
    """A recipe choice's searched parameters, compactly (explicit lists and unset options left out)."""
    declared = {p.name: p for p in registry()[r.name].params}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
                     if v is not None and (k not in declared or searched(declared[k])))


def setting_text(chosen) -> str:
    """A setting (a tuple of recipe choices) in one phrase, for reports."""
    return "; ".join(f"{r.name} {short_params(r)}" for r in chosen)
