"""A loopback stand-in for the Hugging Face Hub, speaking the HTTP protocol of the real client.

Why: push/download code must be tested against the *real* ``huggingface_hub`` client (2.4.x) without
touching huggingface.co. This server implements exactly the endpoints, headers and JSON fields that
client reads for model repos (see the notes on each route), stores everything under a temp dir, and
records every request so tests can assert what went over the wire (e.g. that a big file used LFS).

How to use it from tests: ``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` *when
it is imported*, and the pytest process may already have imported it. So drive the client in a
subprocess whose environment comes from :meth:`HubServer.env` (or use :meth:`HubServer.run` /
:meth:`HubServer.run_python`). That environment also isolates ``HF_HOME`` (no cached login, no shared
cache), drops proxy variables, and sets ``HF_TOKEN`` unless you pass ``token=None``.

Only the plain-HTTP paths exist: Xet must be disabled in the client (``HF_HUB_DISABLE_XET=1``), or
it would ask this server for Xet tokens it cannot give. Uploads use the LFS "basic" transfer.

Run standalone for manual poking: ``python -m tests.support.hub_server --port 8080``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

DEFAULT_USER = "melsurgery-tester"
DEFAULT_ORG = "melsurgery-org"
# The Hub refuses non-LFS files above 10 MiB; preupload answers "lfs" for them.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
TREE_PAGE_SIZE = 1000  # the Hub pages tree listings by 1000 (50 with expand)
TREE_PAGE_SIZE_EXPAND = 50
REPO_ROOT = Path(__file__).resolve().parents[2]

# A shortened version of the .gitattributes the Hub puts in the initial commit of every new repo.
DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""

_REPO_NAME_RE = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.\-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def _now_iso() -> str:
    """Timestamps in the one format ``huggingface_hub.utils.parse_datetime`` accepts."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id: the client compares it with its own for regular files to skip no-op uploads."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _looks_binary(sample: bytes) -> bool:
    # The Hub rejects binary files outside LFS; a NUL byte in the first 512 bytes is git's own heuristic.
    return b"\0" in sample


def _gitattributes_lfs_patterns(text: str) -> list[str]:
    patterns = []
    for line in text.splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches_any(path: str, patterns: Iterable[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def _parse_card_data(content: str) -> tuple[dict | None, str | None]:
    """Return (metadata, error) for a README's YAML front matter, like the Hub's card parser."""
    if not content.startswith("---"):
        return None, None
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
    if match is None:
        return None, "Invalid metadata: the YAML front matter is not closed by a '---' line"
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml ships with huggingface_hub
        return None, None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return None, f"Invalid YAML in the model card metadata: {exc}".splitlines()[0]
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return None, "Invalid metadata: the YAML front matter must be a mapping"
    return data, None


# The Hub's card metadata rules that a model card can trip, with its messages (as quoted from the Hub in
# huggingface_hub and transformers issues). Written apart from melsurgery.hubmeta on purpose: this is the
# server the client is tested against. Only the id's form is checked; the real Hub may also require a
# base_model to exist.
_HUB_ID_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID_RE = re.compile(rf"^(?:{_HUB_ID_PART}/)?{_HUB_ID_PART}$")
_LICENSE_FILE = REPO_ROOT / "melsurgery" / "data" / "hub_licenses.txt"
HUB_LICENSES = [x.strip() for x in _LICENSE_FILE.read_text().splitlines() if x.strip() and not x.startswith("#")]
_RELATIONS = ["adapter", "merge", "quantized", "finetune"]


def _is_hub_id(value: Any) -> bool:
    return (isinstance(value, str) and _HUB_ID_RE.fullmatch(value) is not None and "--" not in value
            and ".." not in value and not value.endswith(".git"))


def hub_metadata_errors(meta: dict) -> list[str]:
    """What the Hub's validator says about a card's metadata: [] when it accepts it."""
    errors: list[str] = []

    def items(key: str) -> list[tuple[str, Any]]:
        """A string-or-list field as (name, value) pairs; [] when absent or neither (an error)."""
        value = meta.get(key)
        if isinstance(value, list):
            return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, str):
            return [(key, value)]
        if key in meta:
            errors.append(f'"{key}" must be one of [string, array]')
        return []

    for key, kind, url in (("base_model", "a model id", "https://hf.co/models"),
                           ("datasets", "a dataset id", "https://hf.co/datasets")):
        for name, value in items(key):
            if not isinstance(value, str):
                errors.append(f'"{name}" must be a string')
            elif not _is_hub_id(value):
                hint = "Use" if key == "base_model" else "If possible, use"
                errors.append(f'"{name}" with value "{value}" is not valid. {hint} {kind} from {url}.')
    if "base_model_relation" in meta and meta["base_model_relation"] not in _RELATIONS:
        errors.append(f'"base_model_relation" must be one of [{", ".join(_RELATIONS)}]')
    for name, value in items("license"):
        if value not in HUB_LICENSES:
            errors.append(f'"{name}" must be one of [{", ".join(HUB_LICENSES)}, array]')
    for key in ("tags", "language", "metrics"):
        for name, value in items(key):
            if not isinstance(value, str):
                errors.append(f'"{name}" must be a string')
    for key in ("library_name", "pipeline_tag", "license_name", "license_link"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    return errors


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file in a commit's tree. Contents live in the repo's object store, keyed by sha256."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str  # blob id of the content (regular) or of the LFS pointer (lfs), as the Hub reports it

    @property
    def etag(self) -> str:
        # The Hub's resolve ETag: sha256 for LFS files, the git blob id for regular ones.
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # ref name ("main", "refs/pr/1") -> commit oid
    next_discussion: int = 1
    internal_id: str = field(default_factory=lambda: secrets.token_hex(12))

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class User:
    name: str
    role: str  # "write" or "read"
    orgs: tuple[str, ...]

    def can_write(self, namespace: str) -> bool:
        return self.role == "write" and namespace in (self.name, *self.orgs)

    def can_read_private(self, namespace: str) -> bool:
        return namespace in (self.name, *self.orgs)


@dataclass
class Request:
    method: str
    path: str  # still percent-encoded: revisions like "refs%2Fpr%2F1" must stay one segment
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    base_url: str

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from None


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # streamed instead of `body` (downloads)
    offset: int = 0
    length: int = 0


class HubError(Exception):
    """An HTTP error in the Hub's shape: JSON {"error": ...} plus X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def to_response(self) -> Response:
        headers = {"Content-Type": "application/json", "X-Error-Message": _header_safe(self.message), **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return Response(self.status, headers, json.dumps({"error": self.message}).encode())


@dataclass
class Fault:
    """A planned failure: requests matching `method` and `path` (a regex, full match) get `status` and
    `message` instead of their route, in the Hub's error shape (JSON body and X-Error-Message header).

    Why: error paths of the client need a server that fails on cue. ``{authorization}`` in the message is
    replaced by the request's Authorization header exactly as received, the way a careless server or
    proxy echoes credentials in its errors, so that tests can prove the client never shows the token.
    Every answer is kept in `sent` so that a test can check the echo really went over the wire.
    """

    method: str
    path: str
    status: int
    message: str
    sent: list[Response] = field(default_factory=list)

    def matches(self, req: Request) -> bool:
        """Whether this fault answers the request instead of its route."""
        return req.method == self.method and re.fullmatch(self.path, req.path) is not None

    def answer(self, req: Request) -> Response:
        """The error response, with the received Authorization header substituted, recorded in `sent`."""
        message = self.message.replace("{authorization}", req.headers.get("authorization", ""))
        resp = HubError(self.status, message).to_response()
        # validate-yaml answers {"errors": [{"message"}]}; the client reads both shapes (and deduplicates)
        resp.body = json.dumps({"error": message, "errors": [{"message": message}]}).encode()
        self.sent.append(resp)
        return resp


def _header_safe(text: str) -> str:
    return "".join(c if c in string.printable and c not in "\r\n" else " " for c in text)[:500]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode())


# --------------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------------

Handler = Callable[..., Response]


class Hub:
    """Protocol logic, independent of the HTTP plumbing so it stays readable."""

    def __init__(self, root: Path, users: dict[str, User]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._users = users  # token -> user; kept in memory only, never written anywhere
        self.repos: dict[str, Repo] = {}
        self.commits: dict[str, Commit] = {}
        self._uploads: dict[str, tuple[str, str, int]] = {}  # nonce -> (repo_id, sha256, size)
        self._lock = threading.RLock()
        self._counter = 0
        self.endpoint = ""  # set by HubServer once the port is known
        # What tests may assert on:
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) for every request
        self.unhandled: list[tuple[str, str]] = []  # requests no route matched: a protocol gap to fix
        self.errors: list[str] = []  # server-side exceptions (500s)
        self.lfs_uploads: list[tuple[str, str, int]] = []  # (repo_id, sha256, size) received by PUT
        self.faults: list[Fault] = []  # planned failures, checked before any route (see HubServer.fail)
        # A careless server that echoes the request's credentials in its *success* answers (the commit URL):
        # tests prove the client never prints them, whatever part of an answer carries them.
        self.echo_credentials = False
        self._routes: list[tuple[frozenset[str], re.Pattern[str], Handler]] = []
        self._add_routes()

    # ---- routing -------------------------------------------------------------------------------

    def _add_routes(self) -> None:
        repo = r"(?P<repo>[^/]+/[^/]+?)"
        api = rf"/api/models/{repo}"
        for methods, pattern, handler in [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("GET", r"/api/agent-harnesses", self.agent_harnesses),
            ("POST", r"/api/repos/create", self.create_repo),
            ("DELETE", r"/api/repos/delete", self.delete_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", rf"{api}", self.model_info),
            ("GET", rf"{api}/revision/(?P<rev>[^/]+)", self.model_info),
            ("GET", rf"{api}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
            ("POST", rf"{api}/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", rf"{api}/commit/(?P<rev>[^/]+)", self.commit),
            ("GET", rf"{api}/refs", self.refs),
            ("GET", rf"{api}/commits/(?P<rev>[^/]+)", self.list_commits),
            ("POST DELETE", rf"{api}/branch/(?P<branch>[^/]+)", self.branch),
            ("POST", rf"/{repo}\.git/info/lfs/objects/batch", self.lfs_batch),
            ("POST", rf"/{repo}\.git/info/lfs/objects/verify", self.lfs_verify),
            ("PUT", r"/_lfs_upload/(?P<nonce>[0-9a-f]+)", self.lfs_put),
            ("GET HEAD", rf"/{repo}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
        ]:
            self._routes.append((frozenset(methods.split()), re.compile(pattern), handler))

    def handle(self, req: Request) -> Response:
        try:
            resp = self._dispatch(req)
        except HubError as exc:
            resp = exc.to_response()
        except Exception as exc:  # a bug in this server: make it loud in the test that hit it
            self.errors.append(f"{req.method} {req.path}: {exc!r}")
            resp = HubError(500, f"test hub server crashed: {exc!r}").to_response()
        self.log.append((req.method, req.path, resp.status))
        return resp

    def _dispatch(self, req: Request) -> Response:
        for fault in self.faults:
            if fault.matches(req):
                return fault.answer(req)
        path_matched = False
        for methods, pattern, handler in self._routes:
            m = pattern.fullmatch(req.path)
            if m is None:
                continue
            path_matched = True
            if req.method not in methods:
                continue
            params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
            if handler == self.lfs_put:
                return handler(req, **params)  # pre-signed URL: the client sends no Authorization
            user = self._authenticate(req)
            with self._lock:
                return handler(req, user, **params)
        if path_matched:
            raise HubError(405, f"Method {req.method} not allowed")
        self.unhandled.append((req.method, req.path))
        raise HubError(404, f"Not implemented by the test hub server: {req.method} {req.path}")

    def _echoed(self, req: Request) -> str:
        """The request's Authorization header as a URL query, when `echo_credentials` is on."""
        return f"?debug={req.headers.get('authorization', '')}" if self.echo_credentials else ""

    # ---- auth ----------------------------------------------------------------------------------

    def _authenticate(self, req: Request) -> User | None:
        header = req.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        user = self._users.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            # The Hub rejects a bad token even on public reads; this exact message tells the client
            # it is an auth failure rather than a missing repo.
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo_for_read(self, repo_id: str, user: User | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is not None and (not repo.private or (user is not None and user.can_read_private(repo.namespace))):
            return repo
        # Missing and private-without-access look the same. X-Error-Code is what makes the client raise
        # RepositoryNotFoundError: its 401 fallback only recognises https:// endpoints.
        if user is None:
            raise HubError(401, "Repository not found", code="RepoNotFound")
        raise HubError(404, "Repository not found", code="RepoNotFound")

    def _repo_for_write(self, repo_id: str, user: User | None) -> Repo:
        repo = self._repo_for_read(repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        if not user.can_write(repo.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _require_user(self, user: User | None) -> User:
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return user

    # ---- storage helpers -----------------------------------------------------------------------

    def _objects_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id / "objects"

    def _object_path(self, repo_id: str, sha256: str) -> Path:
        return self._objects_dir(repo_id) / sha256

    def _store(self, repo_id: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._object_path(repo_id, sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def _has_object(self, repo_id: str, sha256: str, size: int | None = None) -> bool:
        path = self._object_path(repo_id, sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def _resolve_rev(self, repo: Repo, rev: str) -> Commit:
        oid = repo.branches.get(rev)
        if oid is None and rev.startswith("refs/heads/"):
            oid = repo.branches.get(rev[len("refs/heads/") :])
        if oid is None and _COMMIT_RE.fullmatch(rev) and rev in self.commits:
            if self._commit_in_repo(repo, rev):
                oid = rev
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return self.commits[oid]

    def _commit_in_repo(self, repo: Repo, oid: str) -> bool:
        return any(oid in self.history(self.commits[head]) for head in repo.branches.values())

    def history(self, commit: Commit) -> list[str]:
        oids = []
        cur: Commit | None = commit
        while cur is not None:
            oids.append(cur.oid)
            cur = self.commits.get(cur.parent) if cur.parent else None
        return oids

    def _new_commit(
        self, parent: Commit | None, files: dict[str, FileEntry], title: str, message: str, author: str
    ) -> Commit:
        self._counter += 1
        seed = json.dumps(
            [
                parent.oid if parent else None,
                sorted((p, e.git_oid) for p, e in files.items()),
                title,
                message,
                time.time_ns(),
                self._counter,
            ]
        )
        commit = Commit(
            hashlib.sha1(seed.encode()).hexdigest(),
            parent.oid if parent else None,
            files,
            title,
            message,
            author,
            _now_iso(),
        )
        self.commits[commit.oid] = commit
        return commit

    def _entry_for(self, repo_id: str, data: bytes, lfs: bool) -> FileEntry:
        sha = self._store(repo_id, data)
        git_oid = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return FileEntry(sha, len(data), lfs, git_oid)

    def _save_state(self) -> None:
        """Dump repos and commits (never tokens) to root/state.json, for humans debugging a test."""
        state = {
            "repos": {rid: {"private": r.private, "branches": r.branches} for rid, r in self.repos.items()},
            "commits": {
                oid: {
                    "parent": c.parent,
                    "title": c.title,
                    "files": {p: {"sha256": e.sha256, "size": e.size, "lfs": e.lfs} for p, e in c.files.items()},
                }
                for oid, c in self.commits.items()
            },
        }
        (self.root / "state.json").write_text(json.dumps(state, indent=1))

    def _readme_card(self, repo_id: str, commit: Commit) -> dict | None:
        entry = commit.files.get("README.md")
        if entry is None:
            return None
        text = self._object_path(repo_id, entry.sha256).read_text(encoding="utf-8", errors="replace")
        return _parse_card_data(text)[0]

    def _upload_mode(self, commit: Commit | None, repo_id: str, path: str, size: int, sample: bytes) -> str:
        patterns = _gitattributes_lfs_patterns(DEFAULT_GITATTRIBUTES)
        if commit is not None and ".gitattributes" in commit.files:
            ga = self._object_path(repo_id, commit.files[".gitattributes"].sha256).read_text(errors="replace")
            patterns = _gitattributes_lfs_patterns(ga)
        if size >= LFS_SIZE_THRESHOLD or _matches_any(path, patterns) or _looks_binary(sample):
            return "lfs"
        return "regular"

    # ---- account -------------------------------------------------------------------------------

    def whoami(self, req: Request, user: User | None) -> Response:
        """GET /api/whoami-v2. The client reads "name" (namespace default) and auth.accessToken.role."""
        user = self._require_user(user)
        return _json(
            {
                "type": "user",
                "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.name,
                "email": f"{user.name}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in user.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "melsurgery-tests", "role": user.role, "createdAt": _now_iso()},
                },
            }
        )

    def agent_harnesses(self, req: Request, user: User | None) -> Response:
        """GET /api/agent-harnesses: fetched by the client's user-agent builder unless telemetry is off."""
        return _json({"standardEnvVars": [], "harnesses": {}})

    # ---- repos ---------------------------------------------------------------------------------

    def create_repo(self, req: Request, user: User | None) -> Response:
        """POST /api/repos/create {name, organization, visibility?, type?}; 409 when it exists (exist_ok)."""
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = req.json() or {}
        name = payload.get("name")
        namespace = payload.get("organization") or user.name
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"The test hub server only supports model repos, not {repo_type!r}")
        if not isinstance(name, str) or not _REPO_NAME_RE.fullmatch(name) or not _REPO_NAME_RE.fullmatch(namespace):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        if not user.can_write(namespace):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            # The client's exist_ok path reads "url" from this 409 body.
            err = HubError(409, "You already created this model repo")
            resp = err.to_response()
            resp.body = json.dumps({"error": err.message, "url": url}).encode()
            return resp
        visibility = payload.get("visibility")
        private = visibility == "private" if visibility is not None else bool(payload.get("private", False))
        repo = Repo(repo_id, private, _now_iso())
        initial = self._new_commit(
            None,
            {".gitattributes": self._entry_for(repo_id, DEFAULT_GITATTRIBUTES.encode(), lfs=False)},
            "initial commit",
            "",
            user.name,
        )
        repo.branches["main"] = initial.oid
        self.repos[repo_id] = repo
        self._save_state()
        return _json({"url": url, "name": repo_id, "id": repo.internal_id})

    def delete_repo(self, req: Request, user: User | None) -> Response:
        """DELETE /api/repos/delete {name, organization, type?}."""
        user = self._require_user(user)
        payload = req.json() or {}
        repo_id = f"{payload.get('organization') or user.name}/{payload.get('name')}"
        self._repo_for_write(repo_id, user)
        del self.repos[repo_id]
        shutil.rmtree(self.root / "repos" / repo_id, ignore_errors=True)
        self._save_state()
        return _json({})

    def validate_yaml(self, req: Request, user: User | None) -> Response:
        """POST /api/validate-yaml {content, repoType}: called before any upload that includes README.md.

        HfApi.create_commit / upload_folder send JSON and read {"errors": [{"message"}], "warnings"}
        from a 400; ModelCard.validate asks for text/plain and raises the body as it is."""
        payload = req.json() or {}
        meta, error = _parse_card_data(str(payload.get("content", "")))
        errors = [error] if error else hub_metadata_errors(meta or {})
        if "text/plain" in (req.headers.get("accept") or ""):
            body = "\n".join(f"- {e}" for e in errors)
            return Response(400 if errors else 200, {"Content-Type": "text/plain"}, body.encode())
        return _json({"errors": [{"message": e} for e in errors], "warnings": []}, status=400 if errors else 200)

    def model_info(self, req: Request, user: User | None, repo: str, rev: str = "main") -> Response:
        """GET /api/models/{repo}[/revision/{rev}]: snapshot_download needs "sha"; model_info wants "siblings"."""
        r = self._repo_for_read(repo, user)
        commit = self._resolve_rev(r, rev)
        blobs = req.flag("blobs")
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sib["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sib)
        card = self._readme_card(repo, commit)
        info: dict[str, Any] = {
            "_id": r.internal_id,
            "id": repo,
            "modelId": repo,
            "author": r.namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": r.created_at,
            "private": r.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [t for t in (card or {}).get("tags") or [] if isinstance(t, str)],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        if req.flag("securityStatus"):
            info["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
        expand = req.query.get("expand") or req.query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        return _json(info)

    def refs(self, req: Request, user: User | None, repo: str) -> Response:
        """GET /api/models/{repo}/refs: branches, tags, converts, pullRequests."""
        r = self._repo_for_read(repo, user)
        branches, prs = [], []
        for name, oid in sorted(r.branches.items()):
            if name.startswith("refs/pr/"):
                prs.append({"name": name, "ref": name, "targetCommit": oid})
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def list_commits(self, req: Request, user: User | None, repo: str, rev: str) -> Response:
        """GET /api/models/{repo}/commits/{rev}: newest first."""
        r = self._repo_for_read(repo, user)
        commit = self._resolve_rev(r, rev)
        items = []
        for oid in self.history(commit):
            c = self.commits[oid]
            items.append(
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": ""}],
                    "date": c.date,
                }
            )
        return _json(items)

    def branch(self, req: Request, user: User | None, repo: str, branch: str) -> Response:
        """POST (create, 409 if it exists) or DELETE /api/models/{repo}/branch/{branch}."""
        r = self._repo_for_write(repo, user)
        if req.method == "DELETE":
            if branch not in r.branches:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del r.branches[branch]
            self._save_state()
            return _json({})
        if branch.startswith("refs/") or not re.fullmatch(r"[\w.\-/]+", branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        if branch in r.branches:
            raise HubError(409, "Reference already exists")
        start = (req.json() or {}).get("startingPoint") or "main"
        r.branches[branch] = self._resolve_rev(r, start).oid
        self._save_state()
        return _json({})

    # ---- listing -------------------------------------------------------------------------------

    def _last_commit_touching(self, head: Commit, path: str, is_dir: bool) -> Commit:
        def snapshot(c: Commit | None) -> Any:
            if c is None:
                return None
            if not is_dir:
                return c.files.get(path)
            prefix = path + "/"
            return sorted((p, e.git_oid) for p, e in c.files.items() if p.startswith(prefix))

        cur = head
        while True:
            parent = self.commits.get(cur.parent) if cur.parent else None
            if parent is None or snapshot(parent) != snapshot(cur):
                return cur
            cur = parent

    def tree(self, req: Request, user: User | None, repo: str, rev: str, path: str = "") -> Response:
        """GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=&cursor=; Link header pagination.

        The client quotes `path` with safe="" (so "a/b" arrives as "a%2Fb") and the revision likewise.
        """
        r = self._repo_for_read(repo, user)
        commit = self._resolve_rev(r, rev)
        path = path.strip("/")
        recursive, expand = req.flag("recursive"), req.flag("expand")
        prefix = f"{path}/" if path else ""
        files = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
        if path and not files:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        dirs: set[str] = set()
        for p in files:
            parts = p[len(prefix) :].split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add(prefix + "/".join(parts[:i]))
        entries: list[dict[str, Any]] = []
        for d in sorted(dirs):
            if not recursive and "/" in d[len(prefix) :]:
                continue
            oid = hashlib.sha1(
                json.dumps(sorted((p, e.git_oid) for p, e in files.items() if p.startswith(d + "/"))).encode()
            ).hexdigest()
            entries.append({"type": "directory", "oid": oid, "size": 0, "path": d, "_dir": True})
        for p in sorted(files):
            if not recursive and "/" in p[len(prefix) :]:
                continue
            e = files[p]
            item: dict[str, Any] = {"type": "file", "oid": e.git_oid, "size": e.size, "path": p}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
            entries.append(item)
        for item in entries:
            is_dir = bool(item.pop("_dir", False))
            if expand:
                last = self._last_commit_touching(commit, item["path"], is_dir)
                item["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        page = TREE_PAGE_SIZE_EXPAND if expand else TREE_PAGE_SIZE
        start = int(req.arg("cursor") or 0)
        chunk = entries[start : start + page]
        headers = {}
        if start + page < len(entries):
            query = {k: v[-1] for k, v in req.query.items() if k != "cursor"}
            query["cursor"] = str(start + page)
            headers["Link"] = f'<{req.base_url}{req.path}?{urlencode(query)}>; rel="next"'
        return _json(chunk, headers=headers)

    # ---- upload --------------------------------------------------------------------------------

    def preupload(self, req: Request, user: User | None, repo: str, rev: str) -> Response:
        """POST /api/models/{repo}/preupload/{rev}[?create_pr=1] {files: [{path, sample(b64), size}]}.

        Answers, per file, uploadMode ("lfs" | "regular"), shouldIgnore, and the oid of the file already
        at that path (sha256 for LFS, git blob id for regular), which the client uses to drop no-op files.
        """
        r = self._repo_for_write(repo, user)
        commit = self._resolve_rev(r, rev)
        out = []
        for f in (req.json() or {}).get("files", []):
            path, size = f.get("path"), f.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, "Invalid preupload payload")
            sample = base64.b64decode(f.get("sample") or "")
            mode = self._upload_mode(commit, repo, path, size, sample)
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": out, "commitOid": commit.oid})

    def lfs_batch(self, req: Request, user: User | None, repo: str) -> Response:
        """POST /{repo}.git/info/lfs/objects/batch (git-lfs batch API, "basic" transfer).

        Missing objects get an upload href (pre-signed: no auth needed, like the Hub's S3 URLs) and a
        verify href; objects already stored get no "actions", which the client treats as "skip".
        """
        self._repo_for_write(repo, user)
        payload = req.json() or {}
        if payload.get("operation") != "upload":
            raise HubError(422, "The test hub server only implements LFS uploads")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.fullmatch(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid object"},
                    }
                )
                continue
            if self._has_object(repo, oid, size):
                objects.append({"oid": oid, "size": size})
                continue
            nonce = secrets.token_hex(16)
            self._uploads[nonce] = (repo, oid, size)
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.endpoint}/_lfs_upload/{nonce}", "expires_in": 3600},
                        "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify"},
                    },
                }
            )
        return _json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_put(self, req: Request, nonce: str) -> Response:
        """PUT /_lfs_upload/{nonce}: the basic-transfer upload; the body must hash to the announced oid."""
        with self._lock:
            target = self._uploads.get(nonce)
        if target is None:
            raise HubError(403, "Upload URL expired or unknown")
        repo, oid, size = target
        if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match the announced oid/size")
        with self._lock:
            self._store(repo, req.body)
            self._uploads.pop(nonce, None)
            self.lfs_uploads.append((repo, oid, size))
        return Response(200)

    def lfs_verify(self, req: Request, user: User | None, repo: str) -> Response:
        """POST /{repo}.git/info/lfs/objects/verify {oid, size}."""
        self._repo_for_write(repo, user)
        payload = req.json() or {}
        if not self._has_object(repo, str(payload.get("oid")), payload.get("size")):
            raise HubError(404, "Object not found")
        return _json({"message": "ok"})

    def commit(self, req: Request, user: User | None, repo: str, rev: str) -> Response:
        """POST /api/models/{repo}/commit/{rev}[?create_pr=1], NDJSON body.

        Lines: {"key": "header", "value": {summary, description, parentCommit?}}, then "file"
        (base64 content), "lfsFile" ({path, algo, oid, size}), "deletedFile", "deletedFolder".
        Answers {commitUrl, commitOid[, pullRequestUrl]}; a PR is the new ref refs/pr/N.
        """
        r = self._repo_for_write(repo, user)
        assert user is not None
        base = self._resolve_rev(r, rev)
        create_pr = req.flag("create_pr")
        if not create_pr and rev not in r.branches:
            raise HubError(400, f"Cannot commit to {rev}: not a branch")
        lines = []
        for raw in req.body.splitlines():
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError as exc:
                    raise HubError(400, f"Invalid NDJSON line: {exc}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0].get("value") or {}
        summary = str(header.get("summary") or "").strip()
        if not summary:
            raise HubError(400, "Commit summary cannot be empty")
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != base.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = str(value.get("path", "")).strip("/")
            parts = path.split("/")
            if not path or any(p in ("", ".", "..") for p in parts) or ".git" in parts:
                raise HubError(400, f"Invalid path: {value.get('path')!r}")
            if key == "file":
                if value.get("encoding", "base64") == "base64":
                    data = base64.b64decode(value.get("content", ""))
                else:
                    data = str(value.get("content", "")).encode()
                if self._upload_mode(base, repo, path, len(data), data[:512]) == "lfs" and data:
                    raise HubError(
                        400,
                        f"Your push was rejected: {path} must be stored with LFS "
                        "(binary, over 10 MiB, or matched by .gitattributes)",
                    )
                files[path] = self._entry_for(repo, data, lfs=False)
            elif key == "lfsFile":
                oid = str(value.get("oid", ""))
                if value.get("algo", "sha256") != "sha256" or not self._has_object(repo, oid):
                    raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
                size = self._object_path(repo, oid).stat().st_size
                if value.get("size") is not None and value["size"] != size:
                    raise HubError(400, f"LFS object {oid}: size mismatch for {path}")
                files[path] = FileEntry(oid, size, True, git_blob_sha1(lfs_pointer(oid, size)))
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown NDJSON key: {key!r}")
        description = str(header.get("description") or "")
        commit = self._new_commit(base, files, summary, description, user.name)
        body: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.endpoint}/{repo}/commit/{commit.oid}{self._echoed(req)}",
        }
        if create_pr:
            num = r.next_discussion
            r.next_discussion += 1
            r.branches[f"refs/pr/{num}"] = commit.oid
            body["pullRequestUrl"] = f"{self.endpoint}/{repo}/discussions/{num}"
        else:
            r.branches[rev] = commit.oid
        self._save_state()
        return _json(body)

    # ---- download ------------------------------------------------------------------------------

    def resolve(self, req: Request, user: User | None, repo: str, rev: str, path: str) -> Response:
        """GET/HEAD /{repo}/resolve/{rev}/{path}, served directly (no CDN redirect).

        The client needs X-Repo-Commit, an ETag (X-Linked-Etag wins; sha256 for LFS, git blob id
        otherwise) and a size (X-Linked-Size or Content-Length). A 404 carries X-Error-Code
        EntryNotFound plus X-Repo-Commit so the client can cache the absence.
        """
        r = self._repo_for_read(repo, user)
        commit = self._resolve_rev(r, rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"',
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        start, length, status = 0, entry.size, 200
        range_header = req.headers.get("range")
        if range_header:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else entry.size - 1
                else:
                    start = max(entry.size - int(m.group(2)), 0)
                    end = entry.size - 1
                end = min(end, entry.size - 1)
                if start >= entry.size or end < start:
                    raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{entry.size}"})
                length, status = end - start + 1, 206
                headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        return Response(status, headers, file=self._object_path(repo, entry.sha256), offset=start, length=length)


# --------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the Hub object keeps a structured log instead

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._read_body()  # always drain it, even on errors, to keep the connection in sync
        split = urlsplit(self.path)
        host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        req = Request(
            self.command,
            split.path,
            parse_qs(split.query, keep_blank_values=True),
            {k.lower(): v for k, v in self.headers.items()},
            body,
            f"http://{host}",
        )
        resp = self.server.hub.handle(req)
        self.send_response(resp.status)
        for key, value in resp.headers.items():
            self.send_header(key, value)
        length = resp.length if resp.file is not None else len(resp.body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        if resp.file is None:
            self.wfile.write(resp.body)
            return
        with open(resp.file, "rb") as fh:
            fh.seek(resp.offset)
            remaining = resp.length
            while remaining > 0:
                chunk = fh.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: Hub) -> None:
        super().__init__(address, _Handler)
        self.hub = hub


_DEFAULT = object()


class HubServer:
    """Owns the Hub state and the listening socket; what the `hub_server` fixture yields.

    Attributes: ``endpoint`` (``http://127.0.0.1:PORT``), ``token`` (write token of ``user``),
    ``read_token`` (read-only token of the same user), ``user``, ``org`` (an org the user can write
    to), ``root`` (server storage), ``client_home`` (the isolated HF_HOME of client subprocesses) and
    ``hub`` (state and request log, for assertions: ``hub.unhandled``, ``hub.lfs_uploads``...).
    """

    def __init__(
        self,
        root: Path,
        *,
        client_home: Path | None = None,
        user: str = DEFAULT_USER,
        org: str = DEFAULT_ORG,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.root = Path(root)
        self.client_home = Path(client_home) if client_home else self.root.with_name(self.root.name + "-client")
        self.user, self.org = user, org
        self.token = "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))
        self.read_token = "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))
        users = {self.token: User(user, "write", (org,)), self.read_token: User(user, "read", (org,))}
        self.hub = Hub(self.root, users)
        self._host, self._port = host, port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def start(self) -> HubServer:
        self._httpd = _HTTPServer((self._host, self._port), self.hub)
        host, port = self._httpd.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self.hub.endpoint = self.endpoint
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail(self, method: str, path: str, status: int, message: str) -> Fault:
        """From now on, answer `method` requests whose path fully matches the regex `path` with this error
        (``{authorization}`` in `message`: the request's Authorization header as received); see :class:`Fault`."""
        fault = Fault(method, path, status, message)
        self.hub.faults.append(fault)
        return fault

    def env(self, token: Any = _DEFAULT, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a client subprocess: this endpoint, Xet off, isolated HF_HOME, no proxies.

        ``token`` defaults to the write token; pass None for an anonymous client, or any string.
        """
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.upper().startswith(("HF_", "HUGGING_FACE_", "HUGGINGFACE_"))
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        }
        token = self.token if token is _DEFAULT else token
        self.client_home.mkdir(parents=True, exist_ok=True)
        env.update(
            {
                "HF_ENDPOINT": self.endpoint,
                "HF_HUB_DISABLE_XET": "1",
                "HF_HOME": str(self.client_home),
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_UPDATE_CHECK": "1",
                "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if token is not None:
            env["HF_TOKEN"] = str(token)
        env.update(extra or {})
        return env

    def run(
        self,
        argv: Sequence[str],
        *,
        token: Any = _DEFAULT,
        extra_env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (e.g. ``[sys.executable, "-m", "melsurgery", "push", ...]``) against this hub."""
        return subprocess.run(
            list(argv),
            env=self.env(token, extra_env),
            cwd=cwd or REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_python(
        self,
        code: str,
        *,
        token: Any = _DEFAULT,
        extra_env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code`` against this hub (the usual way to drive the real client)."""
        return self.run([sys.executable, "-c", code], token=token, extra_env=extra_env, cwd=cwd, timeout=timeout)


RESULT_PREFIX = "RESULT "


def emit_result_code() -> str:
    """Python source defining ``emit(obj)``, which prints the line that :func:`result_of` parses."""
    return f"import json as _json\ndef emit(obj):\n    print({RESULT_PREFIX!r} + _json.dumps(obj), flush=True)\n"


def result_of(proc: subprocess.CompletedProcess[str]) -> Any:
    """The object a client script passed to ``emit``; fails with the script's output if it crashed."""
    assert proc.returncode == 0, f"client script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert lines, f"client script emitted no result:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="hub-server-"))
    server = HubServer(root, port=args.port).start()
    print(f"HF_ENDPOINT={server.endpoint} HF_HUB_DISABLE_XET=1 HF_TOKEN={server.token}  (storage: {root})")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
