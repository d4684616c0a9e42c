"""JSON that is always valid: NaN and infinities become null (JSON has no spelling for them).

Python's json writes them as bare `NaN`/`Infinity`, which other parsers reject; every JSON file
melsurgery writes (scan and verify results, provenance) goes through `dumps`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from melsurgery.errors import UserError, redact
from melsurgery.formats.textfile import read_text


def finite(obj: object) -> object:
    """`obj` with every non-finite float replaced by None (containers copied, other values kept)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: object, **kwargs) -> str:
    """json.dumps that writes non-finite numbers as null (our JSON files are always valid JSON) and no secret
    (a storage URL's password, a token a server echoed: see errors.redact)."""
    return redact(json.dumps(finite(obj), allow_nan=False, **kwargs))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_strict(path: Path, what: str) -> Any:
    """Strict JSON: Python's bare NaN/Infinity extension is refused, as every other JSON reader refuses it."""
    text = read_text(path, what)  # any JSON file of a folder (a tokenizer.json may be tens of MB)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc})") from None
