"""Publish a surgery output folder to the Hugging Face Hub.

A pushed model is a claim ("this is base model X with recipes Y applied"), so before anything is sent
we check that the folder is exactly what melsurgery wrote: every file hashed in provenance.json and
untouched since, loadable headers, a model card. Then the whole folder goes up as one commit, so
the repo never shows a half-published model. An edited shard that patch recorded by its derivation (it
hashed only the bytes it wrote) gets its whole-file sha256 here, where every byte is read anyway: push
records it in the folder's provenance.json before the upload (`seal`).

The token comes from the usual huggingface_hub places (``HF_TOKEN``, ``hf auth login``) or the
``token`` argument. It is handed to the client and never printed, logged or written by this module;
error messages are scrubbed of it in case a server ever echoes it back.

``huggingface_hub`` reads ``HF_ENDPOINT`` when imported, so an endpoint override (tests, mirrors) must
be in the environment before this module is first imported.
"""

from __future__ import annotations

import importlib
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from melsurgery.checkpoint.atomic import write_atomic
from melsurgery.checkpoint.basemodel import check_hub_ref, is_repo_id
from melsurgery.checkpoint.gguf_file import GGUFFile
from melsurgery.checkpoint.network import ENV as TIMEOUT_ENV
from melsurgery.checkpoint.network import configure_hub
from melsurgery.checkpoint.provenance import Provenance
from melsurgery.checkpoint.reader import PICKLE_PATTERNS
from melsurgery.checkpoint.safetensors_file import load_tensor, read_header
from melsurgery.checkpoint.validate import check_finite
from melsurgery.errors import UserError, one_line, redact, register_secret
from melsurgery.formats.jsonsafe import dumps, load_strict
from melsurgery.formats.typed import JsonRecord
from melsurgery.hub.card import front_matter
from melsurgery.hub.metadata import metadata_problems
from melsurgery.outputs import MODEL_CARD, PROVENANCE

CONFIG = "config.json"


@dataclass(frozen=True)
class PushedFile:
    """One file of the commit: its path in the repo and its size in bytes."""

    path: str
    size: int


@dataclass(frozen=True)
class PushManifest:
    """What `validate_for_push` established: the exact file set to upload and what the folder claims."""

    folder: Path
    files: list[PushedFile]
    recipes: list[str]
    base_model: str
    provenance: Provenance  # with the sha256 of every file, derived ones included (computed by the validation)
    judged: dict[str, str]  # per derived file hashed here: untouched bytes compared with the "source", or on "mtime"
    recorded: Provenance | None = None  # the record as read, before the validation completed it

    @property
    def sealed(self) -> list[str]:
        """Derived files whose whole-file sha256 the validation computed, not yet in provenance.json."""
        return sorted(self.judged)


@dataclass(frozen=True)
class PushResult(JsonRecord):
    """Outcome of `push`. On a dry run nothing was sent, so `commit_url` and `pr_url` are None."""

    repo_url: str
    commit_url: str | None
    files: list[PushedFile]
    dry_run: bool
    commit_message: str
    pr_url: str | None = None
    no_changes: bool = False  # the repo already had exactly these files: the client made no commit
    sealed: list[str] = field(default_factory=list)  # edited files whose sha256 push recorded in provenance.json
    judged: dict[str, str] = field(default_factory=dict)  # how each one's untouched bytes were judged: source, mtime


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _is_ignored(rel: str) -> bool:
    """The paths `upload_folder` never uploads: git internals and huggingface_hub's local-dir metadata."""
    parts = rel.split("/")
    if ".git" in parts:
        return True
    return any(a == ".cache" and b == "huggingface" for a, b in zip(parts, parts[1:]))


def _list_files(folder: Path) -> dict[str, Path]:
    """Relative posix path -> file, for every file that would be uploaded, sorted for stable output."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if not _is_ignored(rel):
                files[rel] = path
    return files


def _base_label(source: dict[str, Any]) -> str:
    """How the commit message names the base: its Hub id, else its name; never a filesystem path."""
    for key in ("base_model", "name"):
        if isinstance(source.get(key), str) and source[key]:
            return source[key]
    return source["id"] if is_repo_id(source["id"]) else Path(source["id"]).name  # outputs of older versions


def check_card(path: Path) -> None:
    """Refuse a model card whose front matter the Hub would refuse, naming the field and the fix."""
    try:
        meta = front_matter(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: the model card is not UTF-8 text") from None
    except ValueError as exc:
        raise UserError(f"{path}: {exc}; the Hub refuses a card whose metadata does not parse") from None
    problems = metadata_problems(meta)
    if problems:
        raise UserError(f"{path}: the Hub would refuse this card: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def validate_for_push(folder: Path) -> PushManifest:
    """Check `folder` is a complete, untampered melsurgery output; return the exact files to upload.

    A folder holding a patched .gguf (`patch --format gguf`) needs no config.json: the GGUF carries it.
    Raises UserError (one line) on the first problem: missing model card / provenance / config,
    card metadata the Hub would refuse, invalid JSON, unreadable safetensors header, a file whose
    sha256 differs from provenance.json, a listed file that is missing, or a file that provenance.json
    does not list.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory")
    files = _list_files(folder)
    ggufs = [rel for rel in files if rel.lower().endswith(".gguf")]
    required = [(MODEL_CARD, "the model card"), (PROVENANCE, "the record of what was done")]
    if not ggufs:  # a GGUF carries its config in its own metadata
        required.append((CONFIG, "the model config"))
    for name, what in required:
        if name not in files:
            raise UserError(f"{folder}: missing {name} ({what}); push only complete melsurgery output folders")
    provenance = Provenance.read(files[PROVENANCE])
    provenance.check_publishable(str(files[PROVENANCE]))
    check_card(files[MODEL_CARD])
    if CONFIG in files:
        config = load_strict(files[CONFIG], "config")
        if not isinstance(config, dict):
            raise UserError(f"{files[CONFIG]}: expected a JSON object")
    for rel, path in files.items():
        if any(PurePosixPath(rel).match(pattern) for pattern in PICKLE_PATTERNS):
            raise UserError(f"{path}: pickled weights are never pushed; remove the file")
        if rel.endswith(".json"):
            load_strict(path, "JSON file")
    for rel, path in files.items():
        if rel.endswith(".safetensors"):
            header = read_header(path)  # truncated or clobbered shards fail here, with one line naming the file
            for info in header.tensors.values():  # one tensor in memory at a time
                check_finite(load_tensor(info), info.name, path)
        elif rel in ggufs:
            GGUFFile(path)  # likewise for a GGUF's header and tensor table
    complete, judged = provenance.verify(folder, files, _source_candidates(provenance))
    pushed = [PushedFile(rel, path.stat().st_size) for rel, path in files.items()]
    if judged and files[PROVENANCE].is_symlink():  # recording the digests would write wherever it points
        raise UserError(f"{files[PROVENANCE]}: a symlink; push records the sha256 of edited files in the folder's "
                        f"own {PROVENANCE}: replace the link by the file it names")
    return PushManifest(folder, pushed, [r.name for r in provenance.recipes], _base_label(provenance.source),
                        complete, judged, provenance)


def _source_candidates(provenance: Provenance) -> dict[str, list[Path]]:
    """Where each derived file's source may still be: the source folder as patch was given it, and for a Hub
    source the cache blob named by the source file's sha256. A candidate proves nothing unless its bytes hash
    to the recorded sha256 (`DerivedFile.compare` checks), so a wrong guess costs only a read."""
    source, found = provenance.source, {}
    for rel, d in (provenance.derived or {}).items():
        paths = []
        if source.get("kind") == "folder":
            paths.append(Path(source["id"]) / rel)
        elif source.get("kind") == "hub" and is_repo_id(source.get("id")) and d.deferred:  # the snapshot patch read
            paths.append(Path(constants.HF_HUB_CACHE) / f"models--{source['id'].replace('/', '--')}" / "snapshots"
                         / str(source.get("revision")) / rel)
        elif source.get("kind") == "hub" and is_repo_id(source.get("id")):
            paths.append(Path(constants.HF_HUB_CACHE) / f"models--{source['id'].replace('/', '--')}" / "blobs"
                         / d.source_sha256)
        found[rel] = [p for p in paths if p.is_file()]
    return found


def seal(manifest: PushManifest) -> PushManifest:
    """Record in the folder's provenance.json the sha256 the validation computed for files patch recorded by their
    derivation (atomically), and the sha256 of their sources where patch deferred it, so that the folder and what is
    pushed hold the same complete record. Only those digests are added: every other byte of the document (fields
    this version does not know included) and the file's mode are kept; a record that changed since the validation
    is refused."""
    if not manifest.sealed:
        return manifest
    path = manifest.folder / PROVENANCE
    complete = manifest.provenance
    raw = load_strict(path, "provenance")
    if not isinstance(raw, dict) or Provenance.from_json(raw, str(path)) != manifest.recorded:
        raise UserError(f"{path}: changed while push was checking the folder; nothing was sent: run push again")
    raw["outputs"] = {**raw.get("outputs", {}), **{rel: complete.outputs[rel] for rel in manifest.sealed}}
    deferred = {rel: d.source_sha256 for rel, d in (complete.derived or {}).items()
                if rel in manifest.sealed and raw["derived"][rel].get("source_sha256") is None}
    for rel, digest in deferred.items():  # the sources' digests patch left to push
        raw["derived"][rel]["source_sha256"] = digest
    if deferred:
        raw["source"]["files"] = {**(raw["source"].get("files") or {}), **deferred}
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise UserError(f"{path}: cannot record the sha256 of edited files ({exc.strerror or exc})") from None
    write_atomic(path, dumps(raw, indent=2, default=str) + "\n", mode=mode)
    files = [PushedFile(f.path, path.stat().st_size) if f.path == PROVENANCE else f for f in manifest.files]
    return replace(manifest, files=files)


def default_commit_message(manifest: PushManifest) -> str:
    """E.g. ``melsurgery: wemask+ffn-dampen patch of HuggingFaceTB/SmolLM2-135M-Instruct``."""
    names = list(dict.fromkeys(manifest.recipes))  # dedupe, keep order
    return f"melsurgery: {'+'.join(names)} patch of {manifest.base_model}"


# --------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP stack this huggingface_hub uses (httpx2, httpx or requests)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in names:
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


def _http_error(exc: HfHubHTTPError, repo_id: str, revision: str | None, token: str) -> UserError:
    status = exc.response.status_code if exc.response is not None else None
    detail = one_line(exc.server_message or "")
    suffix = f": {detail}" if detail else ""
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"branch {revision!r} not found in {repo_id}{suffix}")
    if status == 401 and "Invalid credentials" in (exc.server_message or ""):
        return UserError(
            "the Hugging Face Hub rejected the token (401); set HF_TOKEN to a valid token or run `hf auth login`"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"repo {repo_id} not found or not accessible with this token ({status})")
    if status == 401:
        return UserError(f"the Hugging Face Hub requires a valid token to push (401){suffix}")
    if status == 403:
        return UserError(
            f"this token cannot write to {repo_id} (403 Forbidden); use a token with write access "
            f"to the {repo_id.split('/')[0]!r} namespace"
        )
    return UserError(f"the Hugging Face Hub refused the push ({status}){suffix}")


def _hub_validates_card(path: Path, token: str) -> None:
    """Have the Hub validate the card (POST /api/validate-yaml, the call create_commit makes) before the repo
    is created, so a refused card leaves no empty repo behind; the Hub's verdict becomes one line."""
    response = get_session().post(f"{constants.ENDPOINT}/api/validate-yaml",
                                  json={"content": path.read_text(encoding="utf-8"), "repoType": "model"},
                                  headers=build_hf_headers(token=token))
    if response.status_code == 400:
        try:
            errors = [str(e.get("message")) for e in response.json().get("errors", [])]
        except (ValueError, AttributeError):
            errors = [response.text]
        raise UserError(f"{path}: the Hugging Face Hub refused the card's metadata: "
                        f"{one_line('; '.join(errors))}")
    hf_raise_for_status(response)


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
) -> PushResult:
    """Validate `folder`, then create `repo_id` if needed and upload every file in one commit.

    `revision` names a branch (created from main if missing) or an existing ``refs/pr/N``;
    `create_pr` opens a pull request against main instead of committing to it. `dry_run` validates
    and reports what would be sent without any network access. Every failure is a one-line UserError.
    """
    check_hub_ref(repo_id, revision, namespace=True)
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise UserError("a pull request always targets main; drop --revision when using --create-pr")
    manifest = validate_for_push(Path(folder))
    message = commit_message or default_commit_message(manifest)
    repo_url = f"{redact(constants.ENDPOINT)}/{repo_id}"
    if dry_run:
        return PushResult(repo_url, None, manifest.files, True, message, sealed=manifest.sealed,
                          judged=manifest.judged)

    try:
        token = token or get_token()
    except LocalTokenNotFoundError:
        token = None
    if not token:
        raise UserError("no Hugging Face token found; set HF_TOKEN or run `hf auth login` (a write token is needed)")
    register_secret(token)
    manifest = seal(manifest)  # local, and it can fail: before anything is created on the Hub
    configure_hub()
    api = HfApi(token=token)
    try:
        _hub_validates_card(manifest.folder / MODEL_CARD, token)
        # private=None (not False) lets the Hub apply the namespace's default visibility to a new repo.
        repo_url = redact(str(api.create_repo(repo_id, private=True if private else None, exist_ok=True)))
        if private and not api.model_info(repo_id).private:
            raise UserError(f"{repo_id} already exists and is public; refusing a --private push into it")
        if revision and revision != constants.DEFAULT_REVISION and not create_pr and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # create_commit, not upload_folder: with hf_xet installed upload_folder may split a large
        # folder into several commits, and we publish exactly the validated file list, nothing else.
        operations = [
            CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=manifest.folder / f.path) for f in manifest.files
        ]
        info = api.create_commit(
            repo_id, operations=operations, commit_message=message, revision=revision, create_pr=create_pr
        )
    except UserError:
        raise
    except HfHubHTTPError as exc:
        raise _http_error(exc, repo_id, revision, token) from None
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it and retry") from None
    except _TRANSPORT_ERRORS as exc:
        raise UserError(
            f"cannot reach the Hugging Face Hub at {redact(constants.ENDPOINT)} "
            f"({one_line(str(exc) or type(exc).__name__)}); check the network, HF_ENDPOINT or {TIMEOUT_ENV}"
        ) from None
    except HFValidationError as exc:
        raise UserError(one_line(str(exc))) from None
    except ValueError as exc:  # e.g. the Hub's verdict on invalid model card metadata
        raise UserError(f"the push was refused before upload: {one_line(str(exc))}") from None
    except OSError as exc:
        raise UserError(f"cannot read {exc.filename or folder}: {exc.strerror or exc}") from None
    # The client silently skips an empty commit (returning the current head); it marks operations as
    # committed only when it really sent one. Best effort: assume a commit if the marker ever goes away.
    no_changes = not all(getattr(op, "_is_committed", True) for op in operations)
    return PushResult(repo_url, info.commit_url, manifest.files, False, message, info.pr_url, no_changes,
                      manifest.sealed, manifest.judged)
