"""Which Hub model a source is, for the card's `base_model`: from wherever it is known, or not at all.

The Hub refuses a card whose `base_model` is not a model id, so a local folder's path can never stand
in for it. The id comes from the Hub source itself, an explicit ``--base-model``, the layout of the
Hugging Face cache (``models--owner--name/snapshots/<rev>``), ``config.json``'s ``_name_or_path``, or
a GGUF's metadata; when none holds a valid id the card leaves `base_model` out. Each id carries where
it came from, so the card and provenance can say so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import read_text

_HUB_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([^/?#]+)/([^/?#]+)/?(?:$|[?#]|/tree/|/blob/)")
_NOT_MODELS = ("datasets", "spaces", "collections", "docs", "papers", "api")


def repo_id_problem(value: object, *, namespace: bool = False) -> str | None:
    """Why the Hub would refuse `value` as a model id (huggingface_hub's `validate_repo_id` rules, ASCII only), or
    None when it is one. `namespace`: require the 'owner/name' form (legacy single-name ids such as 'gpt2' are
    refused)."""
    if not isinstance(value, str):
        return "not a string"
    if not value.isascii():
        return "only ASCII letters, digits, '-', '_' and '.' are allowed"
    if namespace and "/" not in value:
        return f"include the namespace, e.g. 'your-username/{value[:40]}'"
    try:
        validate_repo_id(value)
    except HFValidationError as exc:  # its message ends by quoting the id, which the caller quotes safely
        return str(exc).rsplit(": '", 1)[0].rstrip(".")
    return None


def is_repo_id(value: object, *, namespace: bool = False) -> bool:
    """Whether the Hub accepts `value` as a model id (see `repo_id_problem`)."""
    return repo_id_problem(value, namespace=namespace) is None


# A branch, tag, commit or refs/pr/N as git (and so the Hub) accepts it: `git check-ref-format` rules.
_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\\ud800-\udfff]")
MAX_REVISION = 255


def revision_problem(revision: str) -> str | None:
    """Why a Hub revision cannot name a branch, tag or commit, or None: the rules of `git check-ref-format`
    (no control characters, spaces, ~^:?*[\\, '..', '@{', '//', no part starting with '.' or ending with
    '.lock', not ending with '/' or '.'); huggingface_hub checks none of them and would put it in a URL or a
    cache path as it is."""
    if not revision or len(revision) > MAX_REVISION:
        return f"must be 1 to {MAX_REVISION} characters"
    if _REF_CHARS.search(revision):
        return "spaces, control characters and ~^:?*[\\ are not allowed"
    if ".." in revision or "@{" in revision or "//" in revision or revision == "@":
        return "'..', '@{', '//' and a lone '@' are not allowed"
    if revision.startswith("/") or revision.endswith(("/", ".")) or any(
            part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        return "no part may start with '.' or end with '.lock', and it may not start or end with '/' or end with '.'"
    return None


def check_hub_ref(repo_id: str | None, revision: str | None, *, namespace: bool = False) -> None:
    """The one check of a Hub id and revision where they enter (a model argument, a manifest, push), before any
    work: a one-line UserError with the Hub's rule, instead of huggingface_hub's exception mid-command."""
    why = None if repo_id is None else repo_id_problem(repo_id, namespace=namespace)
    if why:
        raise UserError(f"invalid repo id {quote(repo_id)} ({why}): the Hub takes OWNER/NAME with letters, digits, "
                        "'-', '_' and '.'")
    why = None if revision is None else revision_problem(revision)
    if why:
        raise UserError(f"invalid revision {quote(revision)} ({why}): name a branch, tag, commit or refs/pr/N")


@dataclass(frozen=True)
class BaseModelId:
    """A Hub model id and where it was found, as a noun phrase for the card ("config.json's _name_or_path")."""

    id: str
    origin: str


@dataclass(frozen=True)
class Origin:
    """Exactly what a patch read, for the card's first sentence and metadata: the kind of source, the file or
    folder name (never a path), a GGUF's quantization type and how it became the weights melsurgery edited."""

    kind: str  # "gguf" | "hub" | "hf-cache" | "folder"
    name: str
    quantization: str | None = None  # the type of most weight matrices
    other_types: str | None = None  # the other matrices' types ("Q8_0")
    conversion: str | None = None
    revision: str | None = None

    def to_meta(self) -> dict[str, str]:
        """The card's `melsurgery_source` metadata: the fields that are known."""
        return {k: v for k, v in vars(self).items() if v}


def explicit(value: str, where: str) -> BaseModelId:
    """The id the user named (``--base-model`` or a manifest's ``base_model``), or a one-line error."""
    if not is_repo_id(value, namespace=True):
        raise UserError(f"{where} {quote(value)} is not a Hub model id: use OWNER/NAME (letters, digits, "
                        "'-', '_', '.'), "
                        "e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    return BaseModelId(value, "the user (--base-model or the manifest's base_model)")


def from_cache_path(folder: Path) -> BaseModelId | None:
    """The repo a Hugging Face cache snapshot folder (``.../models--owner--name/snapshots/<rev>``) belongs to."""
    parts = folder.parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    repo_id = "/".join(parts[-3].split("--")[1:])  # repo ids cannot contain '--', so the split is exact
    return BaseModelId(repo_id, "the Hugging Face cache path") if is_repo_id(repo_id) else None


def from_config(config: Mapping, folder: Path) -> BaseModelId | None:
    """``_name_or_path`` when it is an owner/name id and not a folder next to the model or in the cwd.

    Older transformers versions saved whatever ``from_pretrained`` was given there: a Hub id, or a path;
    a relative path can look like an id, so one that exists on disk is not taken."""
    name = config.get("_name_or_path")
    if not is_repo_id(name, namespace=True) or Path(name).exists() or (folder.parent / name).exists():
        return None
    return BaseModelId(name, "config.json's _name_or_path")


def hub_url_id(url: object) -> str | None:
    """``https://huggingface.co/owner/name`` (optionally /tree/..., /blob/...) -> 'owner/name'."""
    m = _HUB_URL.match(url) if isinstance(url, str) else None
    if m is None or m.group(1) in _NOT_MODELS:
        return None
    repo_id = f"{m.group(1)}/{m.group(2)}"
    return repo_id if is_repo_id(repo_id) else None


def for_folder(typed: Path, folder: Path) -> BaseModelId | None:
    """A local folder: its place in the Hugging Face cache (as typed or resolved), else its config.json."""
    found = from_cache_path(folder) or from_cache_path(typed.absolute())
    if found is None:
        try:
            config = json.loads(read_text(folder / "config.json", "config.json"))
        except (UserError, ValueError, RecursionError):  # the checkpoint reader reports it with its own message
            return None
        found = from_config(config, folder) if isinstance(config, dict) else None
    return found


def from_gguf_fields(fields: Mapping[str, object], gguf: Path) -> BaseModelId | None:
    """The model a GGUF was converted from, from its ``general.*`` metadata or its place in the Hub cache.

    In order: the conversion source (``general.source.repo_url`` / ``.url``, written by llama.cpp's
    converter from the source card), the GGUF's own repo (``general.repo_url`` / ``.url``),
    ``general.name`` when it is an owner/name id, the cache path of the file, and last the single
    base model of the source (``general.base_model.0.repo_url`` / ``.url``, only when there is one)."""
    for key in ("general.source.repo_url", "general.source.url", "general.repo_url", "general.url"):
        if repo_id := hub_url_id(fields.get(key)):
            return BaseModelId(repo_id, f"the GGUF metadata ({key})")
    name = fields.get("general.name")
    if is_repo_id(name, namespace=True):
        return BaseModelId(str(name), "the GGUF metadata (general.name)")
    if cached := from_cache_path(gguf.parent):
        return cached
    if fields.get("general.base_model.count") == 1:
        for key in ("general.base_model.0.repo_url", "general.base_model.0.url"):
            if repo_id := hub_url_id(fields.get(key)):
                return BaseModelId(repo_id, f"the GGUF metadata ({key})")
    return None


def gguf_fields(gguf: Path) -> dict[str, object]:
    """The scalar and string ``general.*`` metadata of a GGUF file ({} when it is not a readable GGUF:
    the conversion then says why). Only the header is read, arrays skipped (see checkpoint/gguf_file.py)."""
    from melsurgery.checkpoint.gguf_file import ARRAY, GGUFFile

    try:
        f = GGUFFile(gguf)
        return {k: f.value(k) for k, kv in f.kv.items() if k.startswith("general.") and kv.vtype != ARRAY}
    except (UserError, UnicodeDecodeError):
        return {}
