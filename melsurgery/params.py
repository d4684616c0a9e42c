"""Recipe parameters, declared once: name, CLI flag, kind, default, range and help.

The `patch` options, manifest validation, error texts and defaults are all derived from these
declarations, so a parameter is added or changed in exactly one place. Parameters are validated when
a manifest is read or the command line is parsed, before any calibration runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from melsurgery.architectures import SHARED
from melsurgery.errors import UserError, quote

_LAYERS_RE = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")
LAYER_WORDS = ("next", "after-me", "me")


@dataclass(frozen=True)
class Param:
    """One recipe parameter.

    `kind` is one of float, int, choice, layers, int_list, float_list, neurons; `low`/`high` bound
    numbers (inclusive); `flag` is the `patch` option (None: manifest only). Recipes that share a flag
    share its meaning (e.g. --layers for wemask and norm-rescale). `search` False keeps a search (tune,
    budgeted patch) from varying it: settings of how a recipe is fitted, and values a fit fills in.
    `neutral`, for a strength or a factor, is the value that leaves the model as it is: a search scales a
    setting toward it to bring the setting within a budget.
    """

    name: str
    kind: str
    default: object
    help: str
    flag: str | None = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    auto: bool = False  # the word "auto" is also accepted (adaptive calibration)
    same_as: str | None = None  # default None means "the value of this other parameter" (a ramp's end)
    search: bool = True
    neutral: float | None = None  # the value at which it has no effect (a strength 0, a factor 1)

    @property
    def where(self) -> str:
        """How error messages name the parameter: its CLI flag, or its manifest name where it has none."""
        return self.flag or self.name

    def parse(self, value: object, recipe: str, strict: bool = False) -> object:
        """The value, coerced and checked; None means the default. Raises UserError naming the parameter.

        `strict` (manifests): numbers must be written as numbers, not as quoted strings.
        """
        if value is None:
            return self.default
        where = f"{recipe}: {self.name if strict else self.where}"
        if self.auto and value == "auto":
            return value
        if self.kind in ("float", "int"):
            if strict and isinstance(value, str):
                want = "an integer" if self.kind == "int" else "a number"
                raise UserError(f"{where} {quote(value)}: expected {want}, got a string (write it without quotes)")
            return self._number(value, where)
        if self.kind == "choice":
            if value not in self.choices:
                raise UserError(f"{where} {quote(value)}: use one of {', '.join(self.choices)}")
            return value
        if self.kind == "layers":
            return _layers(value, where)
        if self.kind == "int_list":
            return _int_list(value, where, self.low)
        if self.kind == "float_list":
            return _float_list(value, where)
        if self.kind == "neurons":
            return _neurons(value, where)
        raise AssertionError(self.kind)

    def _number(self, value: object, where: str) -> float | int:
        want = ("an integer" if self.kind == "int" else "a number") + (" or 'auto'" if self.auto else "")
        if isinstance(value, bool):
            raise UserError(f"{where} {quote(value)}: expected {want}")
        try:
            x = int(value) if self.kind == "int" else float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UserError(f"{where} {quote(value)}: expected {want}") from None
        if self.kind == "int" and isinstance(value, float) and value != x:
            raise UserError(f"{where} {quote(value)}: expected {want}")
        if isinstance(x, float) and not math.isfinite(x):
            raise UserError(f"{where} {quote(value)}: must be a finite number")
        if (self.low is not None and x < self.low) or (self.high is not None and x > self.high):
            raise UserError(f"{where} {quote(value)}: must lie in {self.range_text()}")
        return x

    def range_text(self) -> str:
        """The declared range as error messages show it, e.g. [0, 1]."""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"[{lo}, {hi}]"


def _layers(value: object, where: str) -> str | list[int]:
    if isinstance(value, list | tuple):
        return _int_list(value, where, 0)
    text = str(value).strip()
    if text in LAYER_WORDS:
        return text
    if not _LAYERS_RE.match(text):
        raise UserError(f"{where} {quote(value)}: use next, after-me, me, or indices like 12,14-16")
    for lo, hi in re.findall(r"(\d+)\s*-\s*(\d+)", text):
        if int(lo) > int(hi):
            raise UserError(f"{where} {quote(value)}: the range {lo}-{hi} is empty; write it low-high, e.g. {hi}-{lo}")
    return text


def _int_list(value: object, where: str, low: float | None) -> list[int]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise UserError(f"{where} {quote(value)}: expected a list of integers, e.g. 507,247")
    out = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                raise ValueError
            n = int(item)
        except (TypeError, ValueError):
            raise UserError(f"{where} {quote(value)}: expected integers, e.g. 507,247") from None
        if low is not None and n < low:
            raise UserError(f"{where} {quote(value)}: {n} is negative; indices start at 0")
        out.append(n)
    if not out:
        raise UserError(f"{where} {quote(value)}: the list is empty")
    return out


def _float_list(value: object, where: str) -> list[float]:
    """Finite numbers (a fitted vector); in a manifest a YAML list, on the command line comma-separated."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise UserError(f"{where}: expected a non-empty list of numbers")
    out = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            x = float(item)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {item!r} is not a number") from None
        if not math.isfinite(x):
            raise UserError(f"{where}: {item!r} is not a finite number")
        out.append(x)
    return out


def expert_id(e: object) -> int | str:
    """An expert index, or "shared" (Qwen2-MoE's shared expert)."""
    return SHARED if isinstance(e, str) and e.strip() == SHARED else int(e)  # type: ignore[call-overload]


def _neurons(value: object, where: str) -> list[int | list]:
    """Neurons as J or, in a mixture of experts, E:J (expert E, neuron J) or shared:J (the shared expert)."""
    usage = "use neurons like 1229,1487, or 3:41 for expert 3, or shared:41 for a shared expert"
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise UserError(f"{where} {quote(value)}: {usage}")
    out: list[int | list] = []
    for item in items:
        try:
            if isinstance(item, str) and ":" in item:
                e, j = item.split(":")
                out.append([expert_id(e), int(j)])
            elif isinstance(item, list | tuple) and len(item) == 2:
                out.append([expert_id(item[0]), int(item[1])])
            elif isinstance(item, str) and not item.strip():
                continue
            elif isinstance(item, bool):
                raise ValueError
            else:
                out.append(int(item))
        except (TypeError, ValueError):
            raise UserError(f"{where} {quote(value)}: {usage}") from None
    flat = [n for x in out for n in (x if isinstance(x, list) else [x]) if not isinstance(n, str)]
    if any(n < 0 for n in flat):
        raise UserError(f"{where} {quote(value)}: neuron and expert indices start at 0")
    if not out:
        raise UserError(f"{where} {quote(value)}: the list is empty")
    return out


# Shared by the recipes that act on attention-input dims: one declaration, one meaning.
LAYERS = Param("layers", "layers", "next", "Layers: next (first after the ME Layer; in hybrids the first attention "
               "layer), after-me, me, or 12,14-16.",
               flag="--layers")
TOP_K = Param("top_k", "int", 3, "Act on the top-k dims of the massive tokens.", flag="--top-k", low=1)
DIMS = Param("dims", "int_list", None, "Explicit dims, e.g. 507,247 (overrides --top-k).", flag="--dims", low=0)
MASK_RATIO = Param("mask_ratio", "float", None, "Dims whose mean |h| is at least this share of the top dim's.",
                   flag="--mask-ratio", low=0.0, high=1.0)
DIMS_BY = Param("dims_by", "choice", "magnitude", "Choose dims by magnitude at the ME Layer (the same for every layer) "
                "or by the scan's sink attribution (per layer).", flag="--dims-by", choices=("magnitude", "sink"))
ATTN_DIMS = (LAYERS, TOP_K, DIMS, MASK_RATIO, DIMS_BY)


# The scan's parameters, declared the same way: `scan`/`patch` options, manifest sections and the Python
# API all check them here, before any calibration.
DETECTION = (
    Param("abs_threshold", "float", 100.0, "An entry is massive when |h| is at least this ...", flag="--abs-threshold",
          low=0.0),
    Param("ratio", "float", 1000.0, "... and at least this many times the layer's median |h|.", flag="--ratio",
          low=1.0),
    Param("persist_fraction", "float", 0.5, "A massive entry must stay massive for this fraction of the remaining "
          "layers.", flag="--persist-fraction", low=0.0, high=1.0),
    Param("precursor_ratio", "float", 100.0, "Precursors: entries this many times the median.", low=1.0),
    Param("min_neuron_share", "float", 0.05, "Neurons writing at least this share of a massive value.", low=0.0,
          high=1.0),
)


@dataclass(frozen=True)
class DetectParams:
    """The thresholds of the massive-activation definition (measure/definitions.py), as declared in DETECTION."""

    abs_threshold: float = 100.0
    ratio: float = 1000.0
    persist_fraction: float = 0.5
    precursor_ratio: float = 100.0
    min_neuron_share: float = 0.05


CALIBRATION = (
    Param("num_samples", "int", None, "Use this many samples (default: all), or 'auto': start with 4 and double "
          "while the ME Layer, its dims or its tokens still change.", flag="--num-samples", low=1, auto=True),
    Param("max_tokens", "int", 128, "Truncate each sample to this many tokens.", flag="--max-tokens", low=2),
    Param("seed", "int", 0, "Seed for sample selection.", flag="--seed"),
)


def resolve(recipe: str, params: tuple[Param, ...], given: dict | None, strict: bool = False) -> dict:
    """Every parameter of `recipe`, validated, with defaults for those not given; unknown names refused."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise UserError(f"{recipe}: params must be a mapping of parameter names to values, got {given!r:.60}")
    known = {p.name: p for p in params}
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        raise UserError(f"{recipe}: unknown parameter {quote(unknown[0])}; known: {', '.join(known)}")
    return {p.name: p.parse(given.get(p.name), recipe, strict) for p in params}
