"""formats/typed.py: JSON <-> dataclasses by the declared field types, and the JsonRecord pair every result uses.

The results themselves are round-tripped on real runs in tests/{detect,surgery,compare,hub}/test_results_json.py;
here each rule of the mapping is pinned on its own, with the message a bad document gets."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from melsurgery.errors import UserError
from melsurgery.formats.typed import JsonRecord, Need, dump, load


@dataclass(frozen=True)
class Item:
    path: Path
    sizes: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Part(JsonRecord):
    """A nested record with its own check: a negative `n` is refused by name, wherever the part sits."""

    n: int

    @classmethod
    def json_check(cls, data: object, need: Need | None, path: str) -> None:
        if need is not None and isinstance(data, dict):
            need(not isinstance(data.get("n"), int) or data["n"] >= 0, f"{path}.n", "an integer >= 0", data.get("n"))


@dataclass(frozen=True)
class Doc(JsonRecord):
    items: list[Item]
    pair: tuple[float, ...]
    part: Part
    anything: Any
    plain: dict
    ratio: float = field(default=0.0, metadata={"nonfinite_as_text": True})
    count: int = field(default=0, metadata={"inside": "summary"})
    note: str | None = field(default=None, metadata={"omit_none": True})

    json_fix: ClassVar[str] = "rebuild it"

    def json_document(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"total": sum(len(i.sizes) for i in self.items), **data,
                "summary": {**data["summary"], "double": 2 * self.count}}


def make(ratio: float = 0.5) -> Doc:
    return Doc(items=[Item(Path("/a/b.json"), [1, 2], {"k": [1, None]}), Item(Path("rel"), [])], pair=(1.5, 2),
               part=Part(3), anything={"x": [1, "y"]}, plain={"z": {"deep": True}}, ratio=ratio, count=7)


def test_a_record_round_trips_through_json_text_with_its_types() -> None:
    doc = make()
    data = doc.to_json()
    assert data == {"total": 2, "items": [{"path": "/a/b.json", "sizes": [1, 2], "extra": {"k": [1, None]}},
                                          {"path": "rel", "sizes": [], "extra": {}}],
                    "pair": [1.5, 2], "part": {"n": 3}, "anything": {"x": [1, "y"]}, "plain": {"z": {"deep": True}},
                    "ratio": 0.5, "summary": {"count": 7, "double": 14}}
    again = Doc.from_json(json.loads(json.dumps(data, allow_nan=False)))
    assert again == doc and again.to_json() == data
    assert isinstance(again.items, list) and isinstance(again.pair, tuple) and isinstance(again.items[0].path, Path)


@pytest.mark.parametrize("value,text", [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")])
def test_nonfinite_figures_are_written_as_text_and_read_back(value: float, text: str) -> None:
    data = make(value).to_json()
    assert data["ratio"] == text
    got = Doc.from_json(json.loads(json.dumps(data, allow_nan=False))).ratio
    assert (math.isnan(got) if math.isnan(value) else got == value)


def test_derived_keys_are_recomputed_not_read() -> None:
    data = make().to_json()
    lying = {**data, "total": 99, "summary": {**data["summary"], "double": -1}}
    assert Doc.from_json(lying).to_json() == data


BAD = {
    "not-an-object": (lambda d: [d], "the document must be an object, got [{"),
    "path-a-number": (lambda d: d["items"][1].update(path=3), "items[1].path must be a string (a path), got 3"),
    "list-item": (lambda d: d["items"][0]["sizes"].append("x"), "items[0].sizes[2] must be an integer, got 'x'"),
    "missing-required": (lambda d: d.__delitem__("pair"), "pair must be a list, got None"),
    "nonfinite-word": (lambda d: d.update(ratio="big"), "ratio must be a finite number, got 'big'"),
    "inside-missing": (lambda d: d.__delitem__("summary"), "summary must be an object, got None"),
    "inside-field": (lambda d: d["summary"].update(count=1.5), "summary.count must be an integer, got 1.5"),
    "bare-dict": (lambda d: d.update(plain=[1]), "plain must be an object, got [1]"),
    "nested-check": (lambda d: d["part"].update(n=-1), "part.n must be an integer >= 0, got -1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_document_is_one_line_naming_the_field(case: str) -> None:
    damage, needle = BAD[case]
    data = json.loads(json.dumps(make().to_json()))
    data = damage(data) or data
    with pytest.raises(UserError) as err:
        Doc.from_json(data, "doc.json")
    message = str(err.value)
    assert message.startswith("doc.json: ") and needle in message and message.endswith("; rebuild it"), message
    assert "\n" not in message


def test_the_default_message_names_the_record_and_how_to_rewrite_it() -> None:
    with pytest.raises(UserError, match=r"^Part JSON: n must be an integer, got 'x'; write it with Part.to_json\(\)$"):
        Part.from_json({"n": "x"})


def test_trusted_data_is_built_without_checks() -> None:
    """need=None: figures computed in this process (the scan's own build) skip every check, hooks included."""
    assert load(Part, {"n": -1}, "", None) == Part(-1)
    assert dump(Part(-1)) == {"n": -1}
