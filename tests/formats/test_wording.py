"""Counts agree with their nouns wherever melsurgery prints one: every f-string of the package that puts a value
before a plural noun goes through `formats.wording.count`, except the values listed here, which are never a count
of that noun or never 1."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import melsurgery
from melsurgery.formats.wording import count

ROOT = Path(melsurgery.__file__).parent
NOUNS = {"windows", "samples", "files", "entries", "tokens", "trials", "layers", "tensors", "dims", "settings",
         "candidates", "neurons", "values", "prompts", "generations", "shards", "blocks", "rows", "positions",
         "recipes", "steps", "edits", "experts", "lines", "weights"}
# (file, value) pairs that are not a count that can be 1
NOT_A_COUNT = {
    ("calibrate/streaming.py", "i"),  # "layer {i} weights": an index
    ("checkpoint/edits.py", "other"),  # a name
    ("formats/yamlsafe.py", "MAX_NODES"),  # a limit in the thousands
    ("checkpoint/gguf_file.py", "info.type_name"),  # "Q4_K tensors"
    ("recipes/base.py", "recipe"),  # "{recipe} edits attention inputs": a verb
    ("report/plot.py", "k"),  # the legend "top-{k} dims"
    ("hub/card.py", "ho['max_tokens']"),  # window lengths: 8 at least
    ("search/budget.py", "opts.max_tokens"),
    ("search/tune.py", "max_tokens"),
    ("search/budget.py", "c.tuning_tokens"),  # token totals of whole windows
    ("search/budget.py", "c.heldout_tokens"),
    ("search/tune.py", "w.tuning.tokens"),
    ("search/tune.py", "w.heldout.tokens"),
    ("checkpoint/validate.py", "MAX_LAYERS"),  # a limit in the thousands
    ("search/budget.py", "t.tune_tokens"),  # token totals of whole windows
    ("search/budget.py", "t.held_tokens"),
    ("search/budget.py", "s.opts.max_tokens"),  # window lengths: 8 at least
    ("search/session.py", "max_tokens"),
    ("search/options.py", "opts.max_tokens"),
}
PLURAL = re.compile(r"^ ([a-z]+)\b")


def _uncounted() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.JoinedStr):
                continue
            for value, text in zip(node.values, node.values[1:]):
                m = isinstance(text, ast.Constant) and isinstance(text.value, str) and PLURAL.match(text.value)
                if (m and m.group(1) in NOUNS and isinstance(value, ast.FormattedValue)
                        and (rel, ast.unparse(value.value)) not in NOT_A_COUNT):
                    found.append(f"{rel}:{node.lineno}: {{{ast.unparse(value.value)}}}{text.value[:20]}")
    return found


def test_every_printed_count_agrees_with_its_noun():
    assert _uncounted() == []


def test_count():
    assert [count(1, "window"), count(3, "window"), count(1, "entry", "entries"), count(0, "entry", "entries")] == [
        "1 window", "3 windows", "1 entry", "0 entries"]
