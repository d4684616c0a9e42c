"""What the Hugging Face Hub accepts in a model card's YAML front matter, checked before anything is sent.

The Hub validates a README.md's metadata (`POST /api/validate-yaml`, which huggingface_hub calls
before every commit that adds README.md) and refuses the whole commit on a bad field: a `base_model`
that is not a model id (a filesystem path, a free-text name), a licence it does not know, a tag that
is not a string. These rules are the subset of its validator that a melsurgery card can trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from melsurgery.checkpoint.basemodel import is_repo_id
from melsurgery.errors import quote

# Relations the Hub's model tree knows (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
# Fields the Hub takes as a string or a list of strings.
LIST_FIELDS = ("tags", "language", "metrics")
# Fields the Hub takes as one string.
STRING_FIELDS = ("library_name", "pipeline_tag", "license_name", "license_link")
LICENSE_FIX = "use a licence id the Hub knows (apache-2.0, mit, llama3.1, gemma, ...: melsurgery/data/hub_licenses.txt)"
BASE_MODEL_FIX = "name the base with `melsurgery patch --base-model OWNER/NAME`, or leave base_model out"


@cache
def hub_licenses() -> frozenset[str]:
    """The licence identifiers the Hub accepts (package data, one per line)."""
    text = resources.files("melsurgery.data").joinpath("hub_licenses.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


@dataclass(frozen=True)
class MetadataProblem:
    """One field the Hub would refuse: which field, what is wrong with it, and how to fix it."""

    field: str  # e.g. "base_model", "tags[2]"
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field} {self.message}; {self.fix}"


def _entries(meta: dict, key: str) -> list[tuple[str, object]]:
    """A field that may hold one value or a list, as (field name, value) pairs: 'base_model[1]', ..."""
    value = meta[key]
    return [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]


def _strings(meta: dict, key: str, fix: str) -> list[MetadataProblem]:
    value = meta[key]
    if isinstance(value, str):
        return []
    if not isinstance(value, list):
        return [MetadataProblem(key, f"is {quote(value)} ({type(value).__name__}), not a string or a list "
                                     f"of strings", fix)]
    return [MetadataProblem(f"{key}[{i}]", f"is {quote(v)} ({type(v).__name__}), not a string", fix)
            for i, v in enumerate(value) if not isinstance(v, str)]


def metadata_problems(meta: dict) -> list[MetadataProblem]:
    """Every field of a card's front matter that the Hub would refuse (empty: the Hub accepts it)."""
    problems: list[MetadataProblem] = []
    if "base_model" in meta:
        problems += [MetadataProblem(field, f"{quote(v)} is not a Hub model id (owner/name)", BASE_MODEL_FIX)
                     for field, v in _entries(meta, "base_model") if not is_repo_id(v)]
    if "base_model_relation" in meta and meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
        problems.append(MetadataProblem("base_model_relation", f"{quote(meta['base_model_relation'])} is "
                                                               "not a relation "
                                        "the Hub knows", f"use one of {', '.join(BASE_MODEL_RELATIONS)}"))
    if "license" in meta:
        problems += [MetadataProblem(field, f"{quote(v)} is not a licence id the Hub knows", LICENSE_FIX)
                     for field, v in _entries(meta, "license") if not (isinstance(v, str) and v in hub_licenses())]
    for key in LIST_FIELDS:
        if key in meta:
            problems += _strings(meta, key, f"write every {key} entry as a string")
    if "datasets" in meta:
        problems += [MetadataProblem(field, f"{quote(v)} is not a Hub dataset id (owner/name)",
                                     "name datasets by their Hub id, or leave them out")
                     for field, v in _entries(meta, "datasets") if not is_repo_id(v)]
    for key in STRING_FIELDS:
        if key in meta and not isinstance(meta[key], str):
            problems.append(MetadataProblem(key, f"is {quote(meta[key])} ({type(meta[key]).__name__}), not a string",
                                            f"write {key} as a string"))
    return problems
