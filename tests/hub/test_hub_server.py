"""The loopback hub must satisfy the real huggingface_hub client, driven in subprocesses.

If these fail after a huggingface_hub upgrade, the client's protocol moved: look at
``hub_server.hub.unhandled`` and the client's source before touching melsurgery.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.hub_server import HubServer, emit_result_code, result_of

# Talk to the loopback server directly, whatever proxy variables the environment has.
urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open

BIG = 11 * 1024 * 1024  # above the 10 MiB limit for regular git files: must go through LFS


def client(hub: HubServer, body: str, **kwargs) -> object:
    """Run `body` (which may call emit(obj)) in a fresh interpreter pointed at `hub`; return emitted obj."""
    code = emit_result_code() + textwrap.dedent(body)
    return result_of(hub.run_python(code, **kwargs))


def make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "README.md": b"---\nlicense: apache-2.0\ntags:\n- test\n---\n# A card\n",
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
        "nested/dir/notes.txt": "small text \N{SNOWMAN}\n".encode(),
        "weights.bin": os.urandom(BIG),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


@pytest.mark.slow
def test_whoami_checks_the_token(hub_server: HubServer) -> None:
    out = client(
        hub_server,
        """
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        api = HfApi()
        me = api.whoami()
        try:
            api.whoami(token="hf_definitelyNotAValidToken")
            bad = None
        except HfHubHTTPError as exc:
            bad = exc.response.status_code
        emit({"name": me["name"], "role": me["auth"]["accessToken"]["role"], "bad": bad})
        """,
    )
    assert out == {"name": hub_server.user, "role": "write", "bad": 401}

    anonymous = client(
        hub_server,
        """
        from huggingface_hub import HfApi
        from huggingface_hub.errors import LocalTokenNotFoundError
        try:
            HfApi().whoami()
            emit("no error")
        except LocalTokenNotFoundError:
            emit("no token")
        """,
        token=None,
    )
    assert anonymous == "no token"

    # Without the client: a missing or wrong bearer token is a 401 at the HTTP level.
    for headers in ({}, {"Authorization": "Bearer hf_wrong"}):
        req = urllib.request.Request(f"{hub_server.endpoint}/api/whoami-v2", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urlopen(req, timeout=10)
        assert err.value.code == 401
    assert hub_server.hub.unhandled == []


@pytest.mark.slow
def test_create_repo_visibility_and_exist_ok(hub_server: HubServer) -> None:
    user = hub_server.user
    out = client(
        hub_server,
        f"""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
        api, anon = HfApi(), HfApi(token=False)
        public = api.create_repo("{user}/public-repo")
        private = api.create_repo("{user}/private-repo", private=True)
        again = api.create_repo("{user}/private-repo", exist_ok=True)
        try:
            api.create_repo("{user}/private-repo")
            conflict = None
        except HfHubHTTPError as exc:
            conflict = exc.response.status_code
        try:
            anon.model_info("{user}/private-repo")
            hidden = False
        except RepositoryNotFoundError:
            hidden = True
        org = api.create_repo("{hub_server.org}/org-repo")
        emit({{
            "public": [public, public.repo_id], "private": str(private), "again": str(again),
            "conflict": conflict, "hidden": hidden, "org": org.repo_id,
            "owner_sees_private": api.model_info("{user}/private-repo").private,
            "anon_sees_public": anon.model_info("{user}/public-repo").private,
            "anon_files": anon.list_repo_files("{user}/public-repo"),
        }})
        """,
    )
    ep = hub_server.endpoint
    assert out["public"] == [f"{ep}/{user}/public-repo", f"{user}/public-repo"]
    assert out["private"] == out["again"] == f"{ep}/{user}/private-repo"
    assert out["conflict"] == 409
    assert out["hidden"] is True
    assert out["org"] == f"{hub_server.org}/org-repo"
    assert out["owner_sees_private"] is True
    assert out["anon_sees_public"] is False
    assert out["anon_files"] == [".gitattributes"]  # the Hub's initial commit
    assert hub_server.hub.repos[f"{user}/private-repo"].private is True
    assert hub_server.hub.unhandled == []


@pytest.mark.slow
def test_upload_folder_lfs_download_roundtrip(hub_server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_folder(src)
    repo = f"{hub_server.user}/roundtrip"
    out = client(
        hub_server,
        f"""
        from huggingface_hub import HfApi, snapshot_download, hf_hub_download
        api = HfApi()
        api.create_repo("{repo}", private=True)
        info = api.upload_folder(repo_id="{repo}", folder_path=r"{src}", commit_message="Add everything")
        model = api.model_info("{repo}", files_metadata=True)
        emit({{
            "commit_url": info.commit_url, "oid": info.oid,
            "files": api.list_repo_files("{repo}"),
            "commits": [c.title for c in api.list_repo_commits("{repo}")],
            "sha": model.sha,
            "siblings": {{s.rfilename: [s.size, s.lfs.sha256 if s.lfs else None] for s in model.siblings}},
            "top": sorted((type(e).__name__, e.path) for e in api.list_repo_tree("{repo}")),
            "local_dir": snapshot_download("{repo}", local_dir=r"{tmp_path / "dl"}"),
            "cache_dir": snapshot_download("{repo}"),
            "one": hf_hub_download("{repo}", "nested/dir/notes.txt"),
        }})
        """,
    )
    assert out["files"] == sorted([".gitattributes", *files])
    assert out["commits"] == ["Add everything", "initial commit"]  # one commit for the whole folder
    assert out["sha"] == out["oid"] and out["commit_url"].endswith(f"/{repo}/commit/{out['oid']}")
    big_sha = hashlib.sha256(files["weights.bin"]).hexdigest()
    assert out["siblings"]["weights.bin"] == [BIG, big_sha]
    assert out["siblings"]["config.json"] == [len(files["config.json"]), None]
    assert (repo, big_sha, BIG) in hub_server.hub.lfs_uploads  # went through the LFS batch + PUT + verify
    assert ("RepoFolder", "nested") in [tuple(x) for x in out["top"]]

    for key in ("local_dir", "cache_dir"):
        got = read_tree(Path(out[key]))
        got.pop(".gitattributes")
        assert got == files, key
    assert Path(out["one"]).read_bytes() == files["nested/dir/notes.txt"]
    assert hub_server.hub.unhandled == []


@pytest.mark.slow
def test_create_pr_leaves_main_alone(hub_server: HubServer, tmp_path: Path) -> None:
    repo = f"{hub_server.user}/with-pr"
    (tmp_path / "a.txt").write_text("v1")
    out = client(
        hub_server,
        f"""
        from pathlib import Path
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        api.create_repo("{repo}")
        api.upload_folder(repo_id="{repo}", folder_path=r"{tmp_path}", commit_message="v1")
        Path(r"{tmp_path / "a.txt"}").write_text("v2")
        pr = api.upload_folder(repo_id="{repo}", folder_path=r"{tmp_path}", commit_message="v2", create_pr=True)
        refs = api.list_repo_refs("{repo}", include_pull_requests=True)
        emit({{
            "pr_url": pr.pr_url, "pr_revision": pr.pr_revision, "pr_num": pr.pr_num,
            "prs": [r.name for r in refs.pull_requests],
            "main": Path(hf_hub_download("{repo}", "a.txt")).read_text(),
            "pr": Path(hf_hub_download("{repo}", "a.txt", revision=pr.pr_revision)).read_text(),
        }})
        """,
    )
    assert out["pr_url"] == f"{hub_server.endpoint}/{repo}/discussions/1"
    assert (out["pr_revision"], out["pr_num"], out["prs"]) == ("refs/pr/1", 1, ["refs/pr/1"])
    assert (out["main"], out["pr"]) == ("v1", "v2")
    assert hub_server.hub.unhandled == []


@pytest.mark.slow
def test_read_token_cannot_write(hub_server: HubServer, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    out = client(
        hub_server,
        f"""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        try:
            HfApi().upload_folder(repo_id="{hub_server.user}/nope", folder_path=r"{tmp_path}")
        except HfHubHTTPError as exc:
            emit(exc.response.status_code)
        """,
        token=hub_server.read_token,
    )
    assert out == 404  # the repo does not exist; creating it would be 403 for a read token
    out = client(
        hub_server,
        f"""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        try:
            HfApi().create_repo("{hub_server.user}/nope")
        except HfHubHTTPError as exc:
            emit(exc.response.status_code)
        """,
        token=hub_server.read_token,
    )
    assert out == 403


@pytest.mark.slow
def test_resolve_headers_and_ranges(hub_server: HubServer, tmp_path: Path) -> None:
    """The headers hf_hub_download relies on, checked without the client."""
    repo = f"{hub_server.user}/raw"
    (tmp_path / "t.txt").write_bytes(b"0123456789")
    client(
        hub_server,
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("{repo}")
        api.upload_folder(repo_id="{repo}", folder_path=r"{tmp_path}")
        emit(None)
        """,
    )
    url = f"{hub_server.endpoint}/{repo}/resolve/main/t.txt"
    with urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as resp:
        head = resp.headers
    commit = hub_server.hub.repos[repo].branches["main"]
    assert head["X-Repo-Commit"] == commit
    assert head["ETag"].strip('"') == hashlib.sha1(b"blob 10\0" + b"0123456789").hexdigest()
    assert head["Content-Length"] == "10" and head.get("X-Linked-Etag") is None
    with urlopen(urllib.request.Request(url, headers={"Range": "bytes=3-"}), timeout=10) as resp:
        assert (resp.status, resp.read(), resp.headers["Content-Range"]) == (206, b"3456789", "bytes 3-9/10")
    with pytest.raises(urllib.error.HTTPError) as err:
        urlopen(f"{hub_server.endpoint}/{repo}/resolve/main/missing.txt", timeout=10)
    assert err.value.code == 404 and err.value.headers["X-Error-Code"] == "EntryNotFound"
    assert err.value.headers["X-Repo-Commit"] == commit


@pytest.mark.slow
def test_tree_pagination_and_expand(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client follows Link: rel="next" pages and parses lastCommit when expand=True."""
    from tests.support import hub_server as server_module

    monkeypatch.setattr(server_module, "TREE_PAGE_SIZE", 2)
    monkeypatch.setattr(server_module, "TREE_PAGE_SIZE_EXPAND", 2)
    repo = f"{hub_server.user}/paged"
    for name in ("a.txt", "b.txt", "d/c.txt", "d/e/f.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    out = client(
        hub_server,
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("{repo}")
        api.upload_folder(repo_id="{repo}", folder_path=r"{tmp_path}", commit_message="files")
        emit({{
            "all": api.list_repo_files("{repo}"),
            "sub": sorted(e.path for e in api.list_repo_tree("{repo}", "d")),
            "expanded": sorted([e.path, e.last_commit.title]
                               for e in api.list_repo_tree("{repo}", recursive=True, expand=True)),
        }})
        """,
    )
    assert out["all"] == [".gitattributes", "a.txt", "b.txt", "d/c.txt", "d/e/f.txt"]
    assert out["sub"] == ["d/c.txt", "d/e"]
    assert out["expanded"] == [
        [".gitattributes", "initial commit"],
        ["a.txt", "files"],
        ["b.txt", "files"],
        ["d", "files"],
        ["d/c.txt", "files"],
        ["d/e", "files"],
        ["d/e/f.txt", "files"],
    ]
    assert sum(1 for m, p, _ in hub_server.hub.log if m == "GET" and "/tree/" in p) >= 6  # really paged
    assert hub_server.hub.unhandled == []


def test_fail_answers_with_the_received_authorization(hub_server: HubServer) -> None:
    """A planned fault replaces only its route and echoes the Authorization header as received (what the
    token-scrubbing tests rely on); every answer is kept in `sent`."""
    fault = hub_server.fail("GET", r"/api/models/[^/]+/[^/]+", 400, "bad header: {authorization}")
    url = f"{hub_server.endpoint}/api/models/{hub_server.user}/x"
    for headers, echoed in (({"Authorization": f"Bearer {hub_server.token}"}, f"Bearer {hub_server.token}"),
                            ({}, "")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert err.value.code == 400
        assert json.loads(err.value.read())["error"] == f"bad header: {echoed}"
        assert err.value.headers["X-Error-Message"].strip() == f"bad header: {echoed}".strip()
    assert len(fault.sent) == 2
    whoami = urllib.request.Request(f"{hub_server.endpoint}/api/whoami-v2",
                                    headers={"Authorization": f"Bearer {hub_server.token}"})
    with urlopen(whoami, timeout=10) as ok:  # other routes are untouched
        assert json.loads(ok.read())["name"] == hub_server.user
    assert hub_server.hub.log[-1] == ("GET", "/api/whoami-v2", 200)
