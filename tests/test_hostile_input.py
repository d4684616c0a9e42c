"""Hostile input at the tool's edges: Hub identifiers, caches, a broken stderr, header bombs, third-party log lines.

Each class has one mechanism; these tests use variants of each class, not only the case that found it. What a user
must see on bad input is what tests/test_hostile.py checks: one `melsurgery: error:` line, the documented exit
status, nothing written, the source untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from melsurgery.errors import UserError

# --- Hub identifiers and revisions ----------------------------------------------------------------------

BAD_IDS = ["owner/..", "a/b.git", "tester/-model", "owner/.hidden", "owner/x--y", "-owner/x", "owner/x.",
           "o/" + "x" * 97, "owner/näme", "owner/a b", "owner/a\x1b[2Jb", "owner/"]
BAD_REVISIONS = ["../../etc", "a..b", "main~1", "v1:x", "a b", "a\rb", "refs/heads/", ".hidden", "x.lock", "a//b",
                 "@", "br@{1}", "x" * 300, "\udcff", ""]
GOOD_REVISIONS = ["main", "v1.0", "refs/pr/3", "0123456789abcdef0123456789abcdef01234567", "feature/x-y_z"]


@pytest.mark.parametrize("repo_id", BAD_IDS)
def test_a_hub_id_the_hub_refuses_is_bad_input_before_any_download(repo_id, tmp_path, monkeypatch):
    """`owner/..`, `a/b.git`, `tester/-model` passed the tool's own pattern and failed inside huggingface_hub
    ("internal error (HFValidationError ...)", exit 70)."""
    import huggingface_hub

    from melsurgery.checkpoint.source import resolve

    monkeypatch.chdir(tmp_path)  # no folder of that name
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    with pytest.raises(UserError, match="not a Hub repo id"):
        resolve(repo_id)


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_a_revision_git_refuses_is_bad_input_before_any_download(revision, monkeypatch):
    import huggingface_hub

    from melsurgery.checkpoint.source import resolve

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    with pytest.raises(UserError, match="invalid revision"):
        resolve("HuggingFaceTB/SmolLM2-135M", revision)


@pytest.mark.parametrize("revision", GOOD_REVISIONS)
def test_a_good_revision_reaches_the_hub_client(revision, monkeypatch):
    import huggingface_hub

    from melsurgery.checkpoint.source import resolve

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    with pytest.raises(AssertionError, match="download attempted"):
        resolve("HuggingFaceTB/SmolLM2-135M", revision)


def _no_download(*args, **kwargs):
    raise AssertionError("download attempted")


@pytest.mark.parametrize("repo_id,revision", [("owner/..", None), ("tester/-model", None), ("a/b.git", None),
                                              ("owner/name", "../x"), ("owner/name", "a\x1bb")])
def test_push_refuses_the_same_ids_and_revisions_before_reading_the_folder(repo_id, revision, tmp_path):
    from melsurgery.hub.push import push

    with pytest.raises(UserError, match="invalid re"):
        push(tmp_path / "absent", repo_id, revision=revision, dry_run=True)


@pytest.mark.parametrize("argv", [
    ("scan", "owner/..", "--quiet"),
    ("patch", "a/b.git", "-o", "{tmp}/out", "--recipe", "wemask"),
    ("verify", "tester/-model", "{tmp}"),
    ("tune", "owner/..", "-o", "{tmp}/run"),
    ("diff", "owner/x--y", "owner/y"),
    ("scan", "owner/name", "--revision", "../../x"),
    ("push", "{tmp}", "owner/..", "--dry-run"),
])
def test_every_command_names_a_bad_hub_id_in_one_line(argv, tmp_path, monkeypatch):
    """In process, through the CLI's error mapping: one line, exit 2, never the internal-error line."""
    from melsurgery.cli import main

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in argv])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and ("invalid re" in lines[0] or "not a Hub repo id" in lines[0]), res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


# --- a broken stderr -----------------------------------------------------------------------------------

def _closed_reader_pipe() -> int:
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("stderr", ["devfull", "closed", "pipe-reader-gone"])
def test_a_user_error_keeps_its_exit_status_when_stderr_is_broken(stderr, tmp_path):
    """Writing the error line failed (ENOSPC, EPIPE) and click turned that into its generic exit 1."""
    argv = ["melsurgery", "scan", str(tmp_path / "absent" / "x" / "y")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if stderr == "devfull":
        with open("/dev/full", "w") as full:
            res = subprocess.run(argv, stderr=full, stdout=subprocess.PIPE, env=env, timeout=120)
    elif stderr == "closed":
        res = subprocess.run(argv, stdout=subprocess.PIPE, env=env, timeout=120,
                             preexec_fn=lambda: os.close(2))
    else:
        fd = _closed_reader_pipe()
        try:
            res = subprocess.run(argv, stderr=fd, stdout=subprocess.PIPE, env=env, timeout=120)
        finally:
            os.close(fd)
    assert res.returncode == 2


def test_closed_standard_streams_are_reopened_on_dev_null():
    """With fd 2 closed, the first file a command opened took fd 2: a library's write to "stderr" landed in it."""
    code = ("import os; from melsurgery.commands.shared import _open_standard_fds; _open_standard_fds(); "
            "print(os.readlink('/proc/self/fd/2'), os.readlink('/proc/self/fd/0'))")
    res = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, timeout=120,
                         preexec_fn=lambda: (os.close(2), os.close(0)))
    assert res.stdout.split() == [os.devnull, os.devnull]
