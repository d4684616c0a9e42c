"""The skeleton-shape cache (checkpoint/validate.py): an entry is only ever a shortcut. A cache that cannot hold
entries, a wrong or empty entry, a link planted at the temporary name, concurrent writers: each costs at most a
build, never a verdict and never a write outside the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.helpers import QUICK_SCAN, assert_clean_failure, run_cli


def scan(folder: Path, cache: Path, tmp_path: Path):
    return run_cli("scan", folder, *QUICK_SCAN, "--json", tmp_path / "scan.json", env={"MELSURGERY_CACHE": str(cache)})


@pytest.mark.parametrize("where", ["shapes", "root"])
@pytest.mark.slow
def test_a_cache_that_cannot_hold_entries_costs_only_the_build(sharded, tmp_path, where):
    """$MELSURGERY_CACHE (or its shapes/) a regular file: the command failed with
    "melsurgery: error: '.../shapes/.<key>.json.<pid>': Not a directory" (exit 2)."""
    cache = tmp_path / "cache"
    if where == "shapes":
        cache.mkdir()
        (cache / "shapes").write_text("x")
    else:
        cache.write_text("x")
    res = scan(sharded[0], cache, tmp_path)
    assert res.returncode == 0, res.stderr


def entry(folder: Path, cache: Path) -> Path:
    os.environ["MELSURGERY_CACHE"] = str(cache)
    try:
        from melsurgery.checkpoint.validate import _shapes_cache

        return _shapes_cache(folder / "config.json")
    finally:
        os.environ.pop("MELSURGERY_CACHE")


@pytest.mark.slow
def test_a_wrong_cache_entry_never_refuses_a_good_model(sharded, tmp_path):
    """An entry with wrong shapes (a disk error, an older bug, a hand edit) refused a good checkpoint, telling the
    user to fix the config or re-download; the cache is only a shortcut: a disagreement is built again."""
    cache = tmp_path / "cache"
    assert scan(sharded[0], cache, tmp_path).returncode == 0
    path = entry(sharded[0], cache)
    shapes = json.loads(path.read_text())
    path.write_text(json.dumps({k: [d + 1 for d in v] for k, v in shapes.items()}))
    res = scan(sharded[0], cache, tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(path.read_text()) == shapes  # and the entry is corrected


@pytest.mark.slow
def test_an_empty_cache_entry_does_not_switch_the_shape_check_off(sharded, tmp_path):
    """`{}` parsed as a skeleton with no tensor: every shape check passed, and a config that disagrees with its
    weights reached the forward pass (exit 70, 'internal error (RuntimeError: ... size mismatch ...)')."""
    bad = shutil.copytree(sharded[0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"
    path = entry(bad, cache)
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    assert_clean_failure(scan(bad, cache, tmp_path), "disagrees with the weights", code=2)


def test_the_cache_never_writes_through_a_planted_link(sharded, tmp_path, monkeypatch):
    """The temporary entry was opened by name (`.<key>.json.<pid>`): a link there was followed."""
    from melsurgery.checkpoint import validate

    victim = tmp_path / "victim"
    victim.write_text("mine")
    path = tmp_path / "cache" / "shapes" / "k.json"
    path.parent.mkdir(parents=True)
    (path.parent / f".{path.name}.{os.getpid()}").symlink_to(victim)
    validate._write_shapes(path, {"a": (1, 2)})
    assert victim.read_text() == "mine"
    assert validate._read_shapes(path) == {"a": (1, 2)}


@pytest.mark.slow
def test_concurrent_scans_share_one_good_entry(sharded, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "MELSURGERY_CACHE": str(cache)}
    argv = ["melsurgery", "scan", str(sharded[0]), *QUICK_SCAN]
    procs = [subprocess.Popen([*argv, "--json", str(tmp_path / f"{i}.json")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    entries = list((cache / "shapes").iterdir())
    assert [e.name.startswith(".") for e in entries] == [False]
    assert json.loads(entries[0].read_text())
