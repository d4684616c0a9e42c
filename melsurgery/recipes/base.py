"""What every recipe shares: the plan it returns (edits, custom-layer spec), layer and dim choices, the
Recipe record. Recipes import this module, never the package, so the registry can import them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from melsurgery.architectures import ATTENTION, Family
from melsurgery.checkpoint.edits import Edit
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError, quote
from melsurgery.formats.wording import count
from melsurgery.params import Param
from melsurgery.params import resolve as resolve_params


@dataclass(frozen=True)
class WeMaskLayer:
    """What the custom layer does in one layer: the dims of the selected tokens' attention input move
    towards `values` (None: zero) by `strength` (x <- (1 - strength) x + strength value)."""

    layer: int
    dims: tuple[int, ...]
    strength: float
    threshold: float | None = None  # magnitude selector: max |h| over the selector dims of the residual
    values: tuple[float, ...] | None = None


@dataclass(frozen=True)
class WeMaskSpec:
    """Token-selective masking of attention-input dims; stored in config.json as `melsurgery_wemask`.

    Where the custom layer hooks (module paths from the family entry): the output of `norm` of each
    listed layer, or, where the family has no attention-input norm (`norm` None), the input of `attn`.
    `install` (recipes/wemask.py) applies a spec to a model in memory.
    """

    per_layer: tuple[WeMaskLayer, ...]
    # where to hook, from the family entry (no default: a default would repeat one family's names)
    norm: str | None
    attn: str
    layers_module: str
    selector: str = "magnitude"  # or "first"
    selector_dims: tuple[int, ...] = ()
    replace: str = "zero"  # or "mean": the mean attention input of the ordinary tokens at that layer

    @classmethod
    def for_family(cls, family: Family, per_layer: tuple[WeMaskLayer, ...], **options: object) -> WeMaskSpec:
        """A spec hooking where this family's attention input is formed."""
        return cls(per_layer, family.attn_norm, family.attn, family.layers_module, **options)  # type: ignore[arg-type]

    @property
    def layers(self) -> tuple[int, ...]:
        """The masked layers, in order (each carries its own dims, strength and threshold)."""
        return tuple(m.layer for m in self.per_layer)

    def to_config(self) -> dict:
        """The `melsurgery_wemask` entry of config.json that the shipped custom layer reads (JSON types only)."""
        def plain(v):
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v

        return {"layers": list(self.layers), **plain(asdict(self))}


@dataclass
class RecipePlan:
    """A recipe's plan: resolved params, a one-line summary, folded edits and/or a WeMask spec, and what the
    patch assumes of its input (the model card says so; empty: nothing)."""

    recipe: str
    params: dict
    summary: str
    edits: list[Edit] = field(default_factory=list)
    wemask: WeMaskSpec | None = None
    folds: bool = True
    assumes: str = ""


def parse_layers(spec: str | list | tuple | None, me_layer: int, num_layers: int) -> tuple[int, ...]:
    """`None`/"next": the first layer after the ME Layer; "after-me": it and all deeper; or "12,14-16"."""
    if spec is None or spec == "next":
        layers: list[int] = [me_layer + 1]
    elif spec == "after-me":
        layers = list(range(me_layer + 1, num_layers))
    elif spec == "me":
        layers = [me_layer]
    elif isinstance(spec, list | tuple):
        layers = [int(x) for x in spec]
    else:
        layers = []
        for part in str(spec).split(","):
            part = part.strip()
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-"))
                    if hi >= num_layers:  # before the range is built: 3-99999999999 was a MemoryError (exit 5)
                        raise UserError(f"--layers {quote(spec)}: layers must lie in 0-{num_layers - 1} (got {hi})")
                    layers.extend(range(lo, hi + 1))
                else:
                    layers.append(int(part))
            except ValueError:
                raise UserError(f"--layers {quote(spec)}: use next, after-me, me, or indices like 12,14-16") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise UserError(f"--layers {quote(spec)}: layers must lie in 0-{num_layers - 1} (got {bad or 'none'})")
    return tuple(sorted(set(layers)))


def attention_layers(spec: str | list | tuple | None, me_layer: int, family: Family, config: dict,
                     recipe: str) -> tuple[int, ...]:
    """`parse_layers` for recipes that edit attention inputs, in hybrid families too.

    "next" is the first attention layer after the ME Layer and "after-me" every later attention layer;
    explicit layers whose mixer is not attention (convolution, state space) are refused, naming those
    that attend.
    """
    kinds = family.layer_kinds(config)
    attends = [i for i, k in enumerate(kinds) if k == ATTENTION]
    if spec in (None, "next", "after-me"):
        later = [i for i in attends if i > me_layer]
        if not later:
            raise UserError(f"{recipe} edits attention inputs, and this {family.name} model has no attention layer "
                            f"after the ME Layer ({me_layer})")
        return tuple(later[:1] if spec in (None, "next") else later)
    layers = parse_layers(spec, me_layer, len(kinds))
    bad = [i for i in layers if kinds[i] != ATTENTION]
    if bad:
        raise UserError(f"{recipe} edits attention inputs, and layer(s) {bad} of this {family.name} model have a "
                        f"{kinds[bad[0]]} mixer instead; its attention layers are {attends}")
    return layers


def pick_dims(scan: ScanResult, top_k: int | None = None, dims: list[int] | None = None,
              mask_ratio: float | None = None) -> tuple[int, ...]:
    """Dims to act on: explicit, the top-k dims of the massive tokens, or those above a share of the top."""
    if dims:
        return tuple(int(d) for d in dims)
    ranked = scan.top_dims
    if not ranked:
        return scan.massive_dims
    if mask_ratio is not None:
        top = ranked[0].mean_abs
        return tuple(d.dim for d in ranked if d.mean_abs >= mask_ratio * top)
    k = top_k if top_k is not None else 3
    return tuple(d.dim for d in ranked[:k])


def sink_dims(scan: ScanResult, layer: int, top_k: int, mask_ratio: float | None, recipe: str) -> tuple[int, ...]:
    """The attention-input dims of the massive tokens that drive the sink at `layer` (the scan's attribution)."""
    entry = {s.layer: s for s in scan.sink_dims}.get(layer)
    ranked = entry.dims if entry else ()
    if not ranked:
        raise UserError(f"{recipe} --dims-by sink: the scan has no sink attribution at layer {layer} (the massive "
                        "tokens do not stand out there); choose other --layers or --dims-by magnitude")
    if mask_ratio is not None:
        return tuple(d.dim for d in ranked if d.score >= mask_ratio * ranked[0].score)
    if top_k > len(ranked):
        raise UserError(f"{recipe} --dims-by sink: the scan ranks {count(len(ranked), 'dim')} per layer; use --top-k "
                        f"{len(ranked)} or less")
    return tuple(d.dim for d in ranked[:top_k])


def layer_dims(scan: ScanResult, params: dict, recipe: str) -> Callable[[int], tuple[int, ...]]:
    """Per layer, the dims a recipe acting on attention inputs acts on: the same magnitude-chosen (or explicit)
    dims for every layer, or, with dims_by "sink", each layer's own sink-driving dims."""
    if params["dims_by"] == "sink":
        if params["dims"]:
            raise UserError(f"{recipe}: --dims names the dims itself; drop --dims-by sink or --dims")
        return lambda layer: sink_dims(scan, layer, params["top_k"], params["mask_ratio"], recipe)
    fixed = pick_dims(scan, params["top_k"], params["dims"], params["mask_ratio"])
    return lambda layer: fixed


def require_me(scan: ScanResult) -> int:
    """The scan's ME Layer; a recipe without one has nothing to mitigate."""
    if scan.me_layer is None:
        raise UserError("the scan found no ME Layer: there is nothing for this recipe to mitigate")
    return scan.me_layer


PlanFn = Callable[[ScanResult, Family, dict, dict], RecipePlan]


@dataclass(frozen=True)
class Recipe:
    """A recipe: its name, its parameters (declared once, see `params`) and its planner; a recipe with fitted
    values also has `needs_fit` (whether the params lack them: `fit.fit_recipes` fills them in before planning;
    the recipe itself never reads weights)."""

    name: str
    plan: PlanFn
    params: tuple[Param, ...]
    folds: bool
    needs_fit: Callable[[dict], bool] | None = None

    @property
    def fitted(self) -> bool:
        """Whether some of its values are fitted on the model (by `patch`), not chosen."""
        return self.needs_fit is not None

    def resolve(self, given: dict | None, strict: bool = False) -> dict:
        """Validated parameters with defaults filled in (raises UserError before any work is done)."""
        return resolve_params(self.name, self.params, given, strict)
