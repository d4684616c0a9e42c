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


def entry(cache: Path) -> Path:
    """The one skeleton entry a scan left in `cache`."""
    (path,) = (cache / "shapes").glob("*.json")
    return path


@pytest.mark.slow
def test_a_wrong_cache_entry_never_refuses_a_good_model(sharded, tmp_path):
    """An entry with wrong shapes (a disk error, an older bug, a hand edit) refused a good checkpoint, telling the
    user to fix the config or re-download; the cache is only a shortcut: a disagreement is built again."""
    cache = tmp_path / "cache"
    assert scan(sharded[0], cache, tmp_path).returncode == 0
    path = entry(cache)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "shapes": {k: [d + 1 for d in v] for k, v in data["shapes"].items()}}))
    res = scan(sharded[0], cache, tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(path.read_text()) == data  # and the entry is corrected


def bad_model(sharded, tmp_path: Path) -> Path:
    """A config that disagrees with its weights (intermediate_size off by 8)."""
    bad = shutil.copytree(sharded[0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    return bad


def partial(data: dict) -> dict:
    return {**data, "shapes": {k: v for k, v in data["shapes"].items() if "mlp" not in k}}


def emptied(data: dict) -> dict:
    return {**data, "shapes": {}}


@pytest.mark.parametrize("damage", [partial, emptied])
@pytest.mark.slow
def test_a_partial_cache_entry_does_not_switch_the_shape_check_off(sharded, tmp_path, damage):
    """An entry holding only some of the model's tensors (or none) was taken as proof: every tensor it lacked
    went unchecked, and a config that disagrees with its weights reached the forward pass (exit 70, a
    444-character 'internal error (RuntimeError: ... size mismatch ...)')."""
    bad, cache = bad_model(sharded, tmp_path), tmp_path / "cache"
    assert_clean_failure(scan(bad, cache, tmp_path), "disagrees with the weights", code=2)
    path = entry(cache)  # built and cached on the way to the refusal
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    assert_clean_failure(scan(bad, cache, tmp_path), "disagrees with the weights", code=2)


@pytest.mark.slow
def test_an_entry_of_another_config_is_not_proof(sharded, tmp_path):
    """The good model's skeleton, planted under the name of a config that disagrees with the same weights: the
    entry says what it was built for, and that is not this config."""
    cache = tmp_path / "cache"
    assert scan(sharded[0], cache, tmp_path).returncode == 0
    good = entry(cache).read_text()
    bad = bad_model(sharded, tmp_path)
    assert_clean_failure(scan(bad, cache, tmp_path), "disagrees with the weights", code=2)
    for path in (cache / "shapes").glob("*.json"):
        path.write_text(good)  # every entry now holds the good config's skeleton
    assert_clean_failure(scan(bad, cache, tmp_path), "disagrees with the weights", code=2)


def test_the_cache_never_writes_through_a_planted_link(sharded, tmp_path, monkeypatch):
    """The temporary entry was opened by name (`.<key>.json.<pid>`): a link there was followed."""
    from melsurgery.checkpoint import validate

    victim = tmp_path / "victim"
    victim.write_text("mine")
    path = tmp_path / "cache" / "shapes" / "k.json"
    path.parent.mkdir(parents=True)
    (path.parent / f".{path.name}.{os.getpid()}").symlink_to(victim)
    key = {"config": "c", "tensors": "t", "transformers": "x", "melsurgery": "y"}
    validate._write_shapes(path, key, {"a": (1, 2)})
    assert victim.read_text() == "mine"
    assert validate._read_shapes(path, key, {"a": (1, 2)}) == {"a": (1, 2)}


KEY = {"config": "c", "tensors": "t", "transformers": "4", "melsurgery": "0"}
ACTUAL = {"a": (2, 3), "b": (3,)}
GOOD = {"for": KEY, "shapes": {"a": [2, 3], "b": [3], "lm_head": [3, 2]}}
BAD_ENTRIES = {
    "not-json": "{",
    "a-list": [GOOD],
    "no-key": {"shapes": GOOD["shapes"]},
    "another-config": {**GOOD, "for": {**KEY, "config": "other"}},
    "other-tensors": {**GOOD, "for": {**KEY, "tensors": "other"}},
    "other-transformers": {**GOOD, "for": {**KEY, "transformers": "5"}},
    "partial": {**GOOD, "shapes": {"a": [2, 3]}},
    "empty": {**GOOD, "shapes": {}},
    "shapes-a-list": {**GOOD, "shapes": [["a", [2, 3]]]},
    "dim-a-string": {**GOOD, "shapes": {**GOOD["shapes"], "b": ["3"]}},
    "dim-a-bool": {**GOOD, "shapes": {**GOOD["shapes"], "b": [True]}},
    "dim-negative": {**GOOD, "shapes": {**GOOD["shapes"], "b": [-3]}},
    "dim-a-float": {**GOOD, "shapes": {**GOOD["shapes"], "b": [3.0]}},
    "shape-a-number": {**GOOD, "shapes": {**GOOD["shapes"], "b": 3}},
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_an_entry_is_used_only_when_complete_typed_and_for_this_input(tmp_path, case):
    from melsurgery.checkpoint.validate import _read_shapes

    path = tmp_path / "entry.json"
    bad = BAD_ENTRIES[case]
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    assert _read_shapes(path, KEY, ACTUAL) is None
    path.write_text(json.dumps(GOOD))
    assert _read_shapes(path, KEY, ACTUAL) == {"a": (2, 3), "b": (3,), "lm_head": (3, 2)}


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


def test_an_entry_written_for_a_model_is_used_for_it_and_only_it(tmp_path, monkeypatch):
    """The proof must not make the cache useless: the entry one open wrote answers the next open of the same
    weights and config; the same config beside other tensor names builds its own."""
    from melsurgery.checkpoint import validate
    from tests.support.planted import planted_folder

    monkeypatch.setenv("MELSURGERY_CACHE", str(tmp_path / "cache"))
    builds = []
    real = validate._build_shapes
    monkeypatch.setattr(validate, "_build_shapes", lambda ckpt: builds.append(ckpt.folder) or real(ckpt))
    model = planted_folder(tmp_path / "model")
    validate.open_model(model)
    validate.open_model(model)
    assert builds == [model]
    other = shutil.copytree(model, tmp_path / "other")
    validate.open_model(other)  # same config, same names: the same answer, no build
    assert builds == [model]
    from safetensors.torch import load_file, save_file

    (shard,) = other.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.extra.weight"] = tensors["model.norm.weight"].clone()  # a name the skeleton lacks
    save_file(tensors, shard, metadata={"format": "pt"})
    validate.open_model(other)
    validate.open_model(other)
    assert builds == [model, other, other]  # never complete for these weights: built each time, never trusted
