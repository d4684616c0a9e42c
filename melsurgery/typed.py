"""JSON data <-> frozen dataclasses, driven by the declared field types: one reader and one writer for the
typed records melsurgery writes (the scan result, provenance), so each declares its fields once.

Field metadata: `omit_none` leaves a None field out of the JSON; `none_as` writes None as that value (and reads
it back as None); `nan` reads null back as NaN (JSON writes non-finite figures as null); `skip` keeps a field
out of the JSON altogether (run-time state beside the record). Reading checks every JSON type and names the
first bad field in one line (UserError).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from .errors import UserError


class Need:
    """Raises the one-line error that names a bad field, what it should be, and what to do about it."""

    def __init__(self, where: str, fix: str) -> None:
        self.where, self.fix = where, fix

    def __call__(self, ok: bool, path: str, want: str, value: object) -> None:
        """Raise unless `ok`: `path` names the field, `want` what it must be."""
        if not ok:
            raise UserError(f"{self.where}: {path} must be {want}, got {value!r:.60}; {self.fix}")


def is_int(x: object, low: int | None = None) -> bool:
    """An integer (not a bool), at least `low` when given."""
    return isinstance(x, int) and not isinstance(x, bool) and (low is None or x >= low)


def is_num(x: object) -> bool:
    """A finite number (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


_WANT = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", type(None): "null"}


def _want(tp: Any) -> str:
    """How a message says what a value of type `tp` must be."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType):
        return " or ".join(_want(a) for a in args)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "a list"
    if origin is dict or is_dataclass(tp):
        return "an object"
    return _WANT[tp]


def load(tp: Any, value: Any, path: str, need: Need | None) -> Any:
    """`value` (JSON data) as an instance of `tp`; `need` checks the JSON types (None: trusted data)."""
    check = need or (lambda ok, path, want, value: None)
    if tp is Any:
        return value
    if isinstance(tp, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is not type(None) and _fits(arg, value):
                return load(arg, value, path, need)
        check(False, path, _want(tp), value)
        return value
    origin = typing.get_origin(tp)
    if origin is tuple:
        check(isinstance(value, list), path, "a list", value)
        (item,) = typing.get_args(tp)[:1]
        if item in (int, float) and (need is None or all(_fits(item, v) for v in value)):
            return tuple(value)
        return tuple(load(item, v, f"{path}[{k}]", need) for k, v in enumerate(value))
    if origin is dict:
        _, item = typing.get_args(tp)
        check(isinstance(value, dict), path, "an object", value)
        return {str(k): load(item, v, f"{path}.{k}", need) for k, v in value.items()}
    if is_dataclass(tp):
        check(isinstance(value, dict), path, "an object", value)
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in fields(tp):
            sub = f"{path}.{f.name}" if path else f.name
            if "skip" in f.metadata:
                continue
            if f.metadata.get("nan") and f.name in value and value[f.name] is None:
                kwargs[f.name] = math.nan
            elif f.name in value and not ("none_as" in f.metadata and value[f.name] == f.metadata["none_as"]):
                kwargs[f.name] = load(hints[f.name], value[f.name], sub, need)
            elif f.default is MISSING and f.default_factory is MISSING:
                check(False, sub, _want(hints[f.name]), None)
        return tp(**kwargs)
    if not _fits(tp, value):
        check(False, path, _want(tp), value)
    return value


def _fits(tp: Any, value: Any) -> bool:
    """Whether a JSON value has the plain type `tp` (numbers finite; any list or object for containers)."""
    if tp is int:
        return is_int(value)
    if tp is float:
        return is_num(value)
    if tp is bool or tp is str:
        return isinstance(value, tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return isinstance(value, list)
    return isinstance(value, dict)


def dump(obj: Any) -> Any:
    """JSON data of a typed value: dataclasses as objects in field order, tuples as lists."""
    if is_dataclass(obj):
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if "skip" in f.metadata or (value is None and "omit_none" in f.metadata):
                continue
            out[f.name] = f.metadata["none_as"] if value is None and "none_as" in f.metadata else dump(value)
        return out
    if isinstance(obj, tuple):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    return obj
