"""`melsurgery.hub`: what validate_for_push refuses, and a push round trip through the loopback hub."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, emit_result_code, result_of
from safetensors.torch import save_file

from melsurgery.errors import UserError
from melsurgery.hub import default_commit_message, validate_for_push

pytest_plugins = ["conftest_hub"]

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The push under test, as a command line. Swap this for the CLI once it exists, e.g.
#   [sys.executable, "-m", "melsurgery", "push", *args]
# (the CLI must accept the same arguments and exit with UserError.exit_code on failure).
PUSH_SCRIPT = textwrap.dedent(
    """
    import argparse, dataclasses, json, sys
    from pathlib import Path
    from melsurgery.errors import UserError
    from melsurgery.hub import push
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--message")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    try:
        r = push(a.folder, a.repo_id, private=a.private, revision=a.revision, create_pr=a.create_pr,
                 commit_message=a.message, dry_run=a.dry_run)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(json.dumps(dataclasses.asdict(r)))
    """
)


def push_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", PUSH_SCRIPT, *args]


def run_push(hub: HubServer, *args: str, **kwargs):
    return hub.run(push_argv(*args), **kwargs)


def write_provenance(folder: Path, recipes=("wemask", "ffn-dampen")) -> None:
    """provenance.json listing every current file, as melsurgery's writer does."""
    outputs = {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "provenance.json"
    }
    prov = {
        "outputs": outputs,
        "recipes": [{"name": name, "params": {}} for name in recipes],
        "source": {"id": BASE, "revision": "0" * 40},
        "melsurgery": "0.1.0",
    }
    (folder / "provenance.json").write_text(json.dumps(prov, indent=1))


def make_output(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(8, 4, generator=gen), "b": torch.zeros(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (folder / "README.md").write_text(f"---\nbase_model: {BASE}\nlicense: apache-2.0\n---\n# Patched\n")
    write_provenance(folder)
    return folder


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------
# validate_for_push
# --------------------------------------------------------------------------------------------------


def test_valid_folder_and_default_message(tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    manifest = validate_for_push(folder)
    assert [f.path for f in manifest.files] == ["README.md", "config.json", "model.safetensors", "provenance.json"]
    assert all(f.size == (folder / f.path).stat().st_size for f in manifest.files)
    assert default_commit_message(manifest) == f"melsurgery: wemask+ffn-dampen patch of {BASE}"


def _missing_card(folder: Path) -> None:
    (folder / "README.md").unlink()
    write_provenance(folder)


def _hash_mismatch(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 5}))


def _unlisted_file(folder: Path) -> None:
    (folder / "notes.txt").write_text("scratch")


def _corrupt_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])  # header length past the end of the file
    write_provenance(folder)


def _offsets_outside_file(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-16])  # truncated: the last tensor now ends past the file
    write_provenance(folder)


def _header_not_json(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("!")
    path.write_bytes(bytes(data))
    write_provenance(folder)


def _missing_listed_file(folder: Path) -> None:
    prov = json.loads((folder / "provenance.json").read_text())
    prov["outputs"]["tokenizer.json"] = "0" * 64
    (folder / "provenance.json").write_text(json.dumps(prov))


def _bad_provenance_shape(folder: Path) -> None:
    prov = json.loads((folder / "provenance.json").read_text())
    del prov["source"]
    (folder / "provenance.json").write_text(json.dumps(prov))


def _config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")
    write_provenance(folder)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_missing_card, "missing README.md"),
        (_hash_mismatch, "config.json: sha256 differs from provenance.json"),
        (_unlisted_file, "notes.txt: not listed in provenance.json"),
        (_corrupt_header, "corrupt safetensors header"),
        (_offsets_outside_file, "lies outside the file"),
        (_header_not_json, "corrupt safetensors header (not JSON)"),
        (_missing_listed_file, "tokenizer.json: listed in provenance.json but missing"),
        (_bad_provenance_shape, "'source' must be an object"),
        (_config_not_json, "config.json: config is not valid JSON"),
    ],
)
def test_validate_refuses(tmp_path: Path, damage, needle: str) -> None:
    folder = make_output(tmp_path / "out")
    damage(folder)
    with pytest.raises(UserError) as err:
        validate_for_push(folder)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message and err.value.exit_code == 2


def test_validate_refuses_missing_provenance(tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    (folder / "provenance.json").unlink()
    with pytest.raises(UserError, match="missing provenance.json"):
        validate_for_push(folder)


# --------------------------------------------------------------------------------------------------
# push through the loopback hub
# --------------------------------------------------------------------------------------------------


def download(hub: HubServer, repo: str, dest: Path, revision: str = "main") -> dict:
    code = emit_result_code() + textwrap.dedent(
        f"""
        from huggingface_hub import HfApi, snapshot_download
        api = HfApi()
        path = snapshot_download("{repo}", revision="{revision}", local_dir=r"{dest}")
        emit({{
            "path": path,
            "private": api.model_info("{repo}").private,
            "commits": [c.title for c in api.list_repo_commits("{repo}", revision="{revision}")],
        }})
        """
    )
    proc = hub.run_python(code)
    out = result_of(proc)
    out["proc"] = proc
    return out


def test_push_round_trip(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    repo = f"{hub_server.user}/smollm2-mel-fixed"
    proc = run_push(hub_server, str(folder), repo, "--private")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dry_run"] is False
    assert result["repo_url"] == f"{hub_server.endpoint}/{repo}"
    assert result["commit_url"].startswith(f"{hub_server.endpoint}/{repo}/commit/")
    assert result["commit_message"] == f"melsurgery: wemask+ffn-dampen patch of {BASE}"
    assert {f["path"]: f["size"] for f in result["files"]} == {
        rel: len(data) for rel, data in all_bytes(folder).items()
    }

    dest = tmp_path / "dl"
    got = download(hub_server, repo, dest)
    assert got["private"] is True
    assert got["commits"] == [result["commit_message"], "initial commit"]  # one commit
    downloaded = {k: v for k, v in all_bytes(dest).items() if not k.startswith(".cache/")}
    assert downloaded.pop(".gitattributes")
    assert downloaded == all_bytes(folder)
    assert hub_server.hub.unhandled == []

    # The token must not leak: not in any output, not in any file we wrote or downloaded.
    token = hub_server.token.encode()
    for stream in (proc.stdout, proc.stderr, got["proc"].stdout, got["proc"].stderr):
        assert hub_server.token not in stream
    for root in (folder, dest, hub_server.root, hub_server.client_home):
        for path in root.rglob("*"):
            if path.is_file():
                assert token not in path.read_bytes(), path


def test_push_pr_and_branch(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    repo = f"{hub_server.user}/patched"
    assert run_push(hub_server, str(folder), repo, "--message", "first").returncode == 0

    make_output(folder, seed=1)  # new weights, new provenance
    proc = run_push(hub_server, str(folder), repo, "--create-pr")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pr_url"] == f"{hub_server.endpoint}/{repo}/discussions/1"
    branches = hub_server.hub.repos[repo].branches
    main_files = hub_server.hub.commits[branches["main"]].files
    pr_files = hub_server.hub.commits[branches["refs/pr/1"]].files
    assert main_files["model.safetensors"].sha256 != pr_files["model.safetensors"].sha256
    assert hub_server.hub.commits[branches["main"]].title == "first"

    proc = run_push(hub_server, str(folder), repo, "--revision", "experiments")
    assert proc.returncode == 0, proc.stderr
    assert hub_server.hub.commits[branches["experiments"]].files == pr_files

    # Pushing identical files again: the client sends no commit, and the result says so.
    proc = run_push(hub_server, str(folder), repo, "--revision", "experiments")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["no_changes"] is True
    assert len(hub_server.hub.history(hub_server.hub.commits[branches["experiments"]])) == 3
    assert hub_server.hub.unhandled == []


def test_dry_run_sends_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    proc = run_push(hub_server, str(folder), f"{hub_server.user}/x", "--dry-run", token=None)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dry_run"] is True and result["commit_url"] is None
    assert len(result["files"]) == 4
    assert hub_server.hub.log == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no-token", "no Hugging Face token found"),
        ("bad-token", "rejected the token (401)"),
        ("read-token", "cannot write to"),
        ("refused", "cannot reach the Hugging Face Hub"),
        ("bad-repo-id", "invalid repo id"),
        ("invalid-folder", "missing README.md"),
        ("public-exists", "already exists and is public"),
    ],
)
def test_push_failures_are_one_line_user_errors(hub_server: HubServer, tmp_path: Path, case: str, needle: str):
    folder = make_output(tmp_path / "out")
    repo = f"{hub_server.user}/target"
    args, kwargs = [str(folder), repo], {}
    if case == "no-token":
        kwargs["token"] = None
    elif case == "bad-token":
        kwargs["token"] = "hf_" + "x" * 34
    elif case == "read-token":
        kwargs["token"] = hub_server.read_token
    elif case == "refused":
        kwargs["extra_env"] = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    elif case == "bad-repo-id":
        args[1] = "not a/valid repo!"
    elif case == "invalid-folder":
        (folder / "README.md").unlink()
    elif case == "public-exists":
        assert run_push(hub_server, *args).returncode == 0
        args.append("--private")
    proc = run_push(hub_server, *args, **kwargs)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert needle in proc.stderr
    for secret in (hub_server.token, hub_server.read_token):
        assert secret not in proc.stdout + proc.stderr
    if case in ("no-token", "bad-repo-id", "invalid-folder"):
        assert hub_server.hub.log == []  # refused before anything was sent
