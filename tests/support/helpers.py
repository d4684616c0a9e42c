"""What most tests share: the real console script, what a clean refusal looks like, and one patch helper.

Plain functions, not fixtures, so a test reads as the user's command line; the fixtures that build
shared models live in tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

QUICK_SCAN = ("--quiet", "--num-samples", "2", "--max-tokens", "16")


def run_cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess[str]:
    """Run the real console script in a subprocess: exit codes and stderr exactly as users see them."""
    return subprocess.run(["melsurgery", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, mtime and mode of every file below `folder` (what 'untouched' means)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st_ = p.stat()
            out[p.relative_to(folder).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), st_.st_mtime_ns,
                                                     st_.st_mode)
    return out


def assert_clean_failure(res, *needles: str, out: Path | None = None, code: int | None = None) -> None:
    """What a user must see on bad input: a non-zero exit (`code` when given), exactly one `melsurgery: error:`
    line on stderr, no traceback, and (for `out`) no output folder, not even a hidden temporary one."""
    if code is None:
        assert res.returncode not in (0, 3), res.stdout + res.stderr  # 3 is "nothing found", not a refusal
    else:
        assert res.returncode == code, (res.returncode, res.stdout + res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("melsurgery: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(".melsurgery-tmp-*"))


def patch(folder, out, recipes, scan=None, **kw):
    """The library's patch of a local folder with these (name, params) recipes: one helper for every test."""
    from melsurgery.checkpoint.source import resolve
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import run_patch

    return run_patch(resolve(str(folder)), out, Manifest(model=str(folder), recipes=recipes), scan=scan, **kw)


def json_round_trip(result):
    """`result.to_json()` as strict JSON text and back through `from_json`: asserts the document comes back the
    same and returns it (the typed result is its JSON, nothing lost, nothing added)."""
    import json

    doc = result.to_json()
    again = type(result).from_json(json.loads(json.dumps(doc, allow_nan=False)), "round trip")
    assert again.to_json() == doc
    return doc


def cli_returning(monkeypatch, entry: str, *args):
    """Run `melsurgery ARGS` in this process; returns what the library entry point `entry` ("module:function",
    the call the command makes) returned to the command, and click's result. So a test compares what the
    command wrote (--json) with the typed result it wrote it from, both from the same run."""
    import importlib

    from click.testing import CliRunner

    from melsurgery.cli import main

    module_name, name = entry.split(":")
    module = importlib.import_module(module_name)
    real, returned = getattr(module, name), []

    def recording(*a, **kw):
        returned.append(real(*a, **kw))
        return returned[-1]

    monkeypatch.setattr(module, name, recording)
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert len(returned) == 1, res.output
    return returned[0], res


def hub_cache_layout(src: Path, root: Path) -> Path:
    """huggingface_hub's cache: snapshots/<rev>/<file> are relative symlinks to blobs/<sha256>."""
    blobs = root / "blobs"
    snap = root / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in src.iterdir():
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copy(p, blobs / digest)
        (snap / p.name).symlink_to(Path("..", "..", "blobs", digest))
    return snap


def default_signals() -> None:
    """preexec_fn: the child starts with the default disposition of the signals under test, whatever the runner
    ignores (a CI job under nohup ignores SIGHUP, and the tool rightly leaves an ignored signal ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
