"""How the diffs spell indices, shapes and values in text, and how much of each a result keeps."""

from __future__ import annotations

import json
from typing import Any

MAX_LIST = 1000  # indices / rows / cols kept per tensor in results (counts stay exact)
SHOW = 10  # indices shown in text before "... (+N more)"


def index_list(values: list[int], total: int, show: int = SHOW) -> str:
    """``[1, 2, 3]``, or the first `show` then ``... (+N more)``."""
    head = ", ".join(map(str, values[:show]))
    return f"[{head}, ... (+{total - show} more)]" if total > show else f"[{head}]"


def shape_text(shape: list[int] | None) -> str:
    """``[4096, 11008]``."""
    return "[" + ", ".join(map(str, shape or [])) + "]"


def value_text(v: Any, width: int = 60) -> str:
    """A JSON value on one line, cut to `width` characters."""
    text = json.dumps(v, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."
