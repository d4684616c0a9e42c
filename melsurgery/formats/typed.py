"""JSON data <-> dataclasses, driven by the declared field types: one reader and one writer for the typed
records melsurgery writes (the scan result, provenance, every library result), so each declares its fields once.

Types: int, float, str, bool, None; `X | Y`; tuple[T, ...] and list[T] (JSON lists); dict[str, T]; Path (a
string); nested dataclasses; Any, bare dict and bare list (passed through as they are).

Field metadata: `omit_none` leaves a None field out of the JSON; `none_as` writes None as that value (and reads
it back as None); `nonfinite_as_text` writes a NaN or infinite float as "nan", "inf" or "-inf" (and reads those
back); `nan` reads null back as NaN (where a JSON writer wrote a non-finite figure as null); `skip` keeps a field
out of the document altogether (run-time state beside the record); `inside` writes the field in the named object
of the document (`{"summary": {field: ...}}`) and reads it from there. Reading checks every JSON type and names
the first bad field in one line (UserError).

`JsonRecord` gives a result its `to_json`/`from_json`, the same pair for every result.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from melsurgery.errors import UserError

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


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


def join(path: str, key: str) -> str:
    """The path of `key` inside the object at `path` ("" is the document itself)."""
    return f"{path}.{key}" if path else key


_WANT = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", type(None): "null",
         Path: "a string (a path)", dict: "an object", list: "a list"}


def _want(tp: Any) -> str:
    """How a message says what a value of type `tp` must be."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType):
        return " or ".join(_want(a) for a in args)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
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
    if origin in (tuple, list):
        check(isinstance(value, list), path, "a list", value)
        (item,) = typing.get_args(tp)[:1]
        if item in (int, float, Any) and (need is None or all(_fits(item, v) for v in value)):
            return origin(value)
        return origin(load(item, v, f"{path}[{k}]", need) for k, v in enumerate(value))
    if origin is dict:
        _, item = typing.get_args(tp)
        check(isinstance(value, dict), path, "an object", value)
        return {str(k): load(item, v, f"{path}.{k}", need) for k, v in value.items()}
    if is_dataclass(tp):
        return _load_record(tp, value, path, need)
    if not _fits(tp, value):
        check(False, path, _want(tp), value)
    return Path(value) if tp is Path else value


def _load_record(tp: Any, value: Any, path: str, need: Need | None) -> Any:
    """A dataclass from its JSON object: each field by its type (a JsonRecord's own checks first)."""
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        tp.json_check(value, need, path)
    if need is not None:
        need(isinstance(value, dict), path or "the document", "an object", value)
    hints = typing.get_type_hints(tp)
    kwargs = {}
    for f in fields(tp):
        if "skip" in f.metadata:
            continue
        holder, sub = value, join(path, f.name)
        if "inside" in f.metadata:
            holder = value.get(f.metadata["inside"])
            if need is not None:
                need(isinstance(holder, dict), join(path, f.metadata["inside"]), "an object", holder)
            sub = join(join(path, f.metadata["inside"]), f.name)
        raw = holder.get(f.name, MISSING) if isinstance(holder, dict) else MISSING
        if raw is None and f.metadata.get("nan"):
            kwargs[f.name] = math.nan
        elif raw is not MISSING and not ("none_as" in f.metadata and raw == f.metadata["none_as"]):
            if "nonfinite_as_text" in f.metadata and isinstance(raw, str) and raw in _NONFINITE:
                kwargs[f.name] = _NONFINITE[raw]
            else:
                kwargs[f.name] = load(hints[f.name], raw, sub, need)
        elif f.default is MISSING and f.default_factory is MISSING and need is not None:
            need(False, sub, _want(hints[f.name]), None)
    return tp(**kwargs)


def _fits(tp: Any, value: Any) -> bool:
    """Whether a JSON value has the plain type `tp` (numbers finite; any list or object for containers)."""
    if tp is Any:
        return True
    if tp is int:
        return is_int(value)
    if tp is float:
        return is_num(value)
    if tp in (bool, str, dict, list):
        return isinstance(value, tp)
    if tp is Path:
        return isinstance(value, str)
    if typing.get_origin(tp) in (tuple, list):
        return isinstance(value, list)
    return isinstance(value, dict)


def dump(obj: Any) -> Any:
    """JSON data of a typed value: dataclasses as objects in field order (a JsonRecord as its document), tuples
    and lists as lists, paths as strings."""
    if is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if "skip" in f.metadata or (value is None and "omit_none" in f.metadata):
                continue
            if value is None and "none_as" in f.metadata:
                value = f.metadata["none_as"]
            elif "nonfinite_as_text" in f.metadata and isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            else:
                value = dump(value)
            (out.setdefault(f.metadata["inside"], {}) if "inside" in f.metadata else out)[f.name] = value
        return obj.json_document(out) if isinstance(obj, JsonRecord) else out
    if isinstance(obj, tuple | list):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """`to_json`/`from_json` for a result dataclass, by its field types: its JSON document is its fields
    (`dump`), read back with every type checked (`load`).

    Two hooks, for documents that are more than the fields: `json_document` adds figures derived from the
    fields (a summary, a verdict), which reading ignores and `to_json` recomputes, so a document cannot
    contradict itself; `json_check` checks what types cannot say (ranges, references between fields).
    """

    json_fix: ClassVar[str | None] = None  # what the error message tells the user to do (default: rewrite it)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (JSON types only; non-finite floats stay floats unless a field says otherwise)."""
        return dump(self)

    @classmethod
    def from_json(cls: type[R], data: object, where: str | None = None) -> R:
        """The record of a JSON document, every field checked first: a bad one is one UserError naming it
        (`where`: what the message calls the document, e.g. its path)."""
        fix = cls.json_fix or f"write it with {cls.__name__}.to_json()"
        return load(cls, data, "", Need(where or f"{cls.__name__} JSON", fix))

    def json_document(self, data: dict[str, Any]) -> dict[str, Any]:
        """The document from the fields' JSON `data`: derived figures added (default: the fields only)."""
        return data

    @classmethod
    def json_check(cls, data: Any, need: Need | None, path: str) -> None:
        """Checks beyond the field types on the JSON value at `path`, before its fields are read (`data` may not
        even be an object yet; `need` None: trusted data)."""
