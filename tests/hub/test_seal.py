"""A derivation push will trust (only an edited .safetensors file, with its edited ranges), and push's sealing of
it: the completed record is written before any network, keeps the file's mode and every field it does not know,
and a dry run changes nothing; a plain folder's deferred source digests, recorded by push from the source itself."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from melsurgery.checkpoint.hashing import sha256_file
from melsurgery.checkpoint.provenance import Provenance
from melsurgery.errors import UserError
from tests.support.helpers import assert_clean_failure, hub_cache_layout, run_cli

SHARD2 = "model-00002-of-00002.safetensors"


def patched(sharded, tmp_path: Path) -> Path:
    """A patch of a Hub-cache snapshot: SHARD2 is recorded in `derived`, not in `outputs`."""
    snap = hub_cache_layout(sharded[0], tmp_path / "models--org--tiny")
    out = tmp_path / "out"
    res = run_cli("patch", snap, "-o", out, "--scan", sharded[1], "--recipe", "ffn-dampen", "--quiet")
    assert res.returncode == 0, res.stderr
    assert SHARD2 in Provenance.read(out).derived
    return out


def push(hub, folder: Path, repo: str, *args: str):
    return hub.run(["melsurgery", "push", str(folder), repo, *args])


def chattr(flag: str, path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr (permissions do not stop root)")
    if subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode:
        pytest.skip("this filesystem has no immutable flag")


# --- what a derivation may name ------------------------------------------------------------------------------------


def doc_with(derived: dict) -> dict:
    return {"recipes": [{"name": "x"}], "source": {"id": "x"}, "outputs": {}, "derived": derived}


@pytest.mark.parametrize("name", ["config.json", "README.md", "sub/x.bin"])
def test_a_derived_entry_for_a_file_that_is_not_a_weight_file_is_refused(name):
    """patch only derives edited .safetensors shards; a record naming anything else is not one patch wrote."""
    good = {"source_sha256": "a" * 64, "size": 10, "mtime_ns": 1, "edits": [{"start": 2, "end": 4, "sha256": "b" * 64}]}
    with pytest.raises(UserError, match="^p: derived"):
        Provenance.from_json(doc_with({name: good}), "p")


def test_a_derived_entry_with_no_edited_range_is_refused():
    """A derivation without edits trusts the whole file on size and mtime alone: patch never writes one."""
    with pytest.raises(UserError, match="^p: derived"):
        Provenance.from_json(doc_with({"w.safetensors": {"source_sha256": "a" * 64, "size": 10, "mtime_ns": 1,
                                                        "edits": []}}), "p")


def test_a_derivation_without_edits_is_never_trusted_on_its_mtime(tmp_path):
    """A shard recorded as a copy of its source (no edited range): only the source can prove its bytes; without
    the source it is refused, whatever its size and mtime say."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 10)
    st = path.stat()
    copy = {"size": 10, "mtime_ns": st.st_mtime_ns, "edits": [], "source_file": {"size": 10, "mtime_ns": 1, "inode": 2}}
    for source in ({"source_sha256": None}, {"source_sha256": "a" * 64}):  # deferred, or as push sealed it
        record = Provenance.from_json(doc_with({"w.safetensors": {**copy, **source}}), "p")
        with pytest.raises(UserError, match="w.safetensors: its source .* cannot be read"):
            record.verify(tmp_path, {"w.safetensors": path})


@pytest.mark.slow
def test_config_recorded_as_derived_is_not_pushed_unhashed(sharded, tmp_path):
    """Moving config.json from outputs to derived (edits [], its size and mtime) made push accept any config."""
    out = patched(sharded, tmp_path)
    doc = json.loads((out / "provenance.json").read_text())
    st = (out / "config.json").stat()
    doc["outputs"].pop("config.json")
    doc["derived"]["config.json"] = {"source_sha256": "a" * 64, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                     "edits": []}
    (out / "provenance.json").write_text(json.dumps(doc))
    assert_clean_failure(run_cli("push", out, "u/x", "--dry-run"), "derived", code=2)


# --- push: sealing ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("what", ["folder", "provenance"])
@pytest.mark.slow
def test_push_that_cannot_record_the_digest_fails_before_any_network(sharded, tmp_path, hub_server, what):
    """An immutable folder or provenance.json: push cannot complete the record, so it must stop before creating
    the repo (today the repo is created, then push fails with 'cannot read ...: Operation not permitted')."""
    out = patched(sharded, tmp_path)
    before = (out / "provenance.json").read_bytes()
    target = out if what == "folder" else out / "provenance.json"
    chattr("+i", target)
    try:
        proc = push(hub_server, out, f"{hub_server.user}/ro-{what}")
        assert_clean_failure(proc, "provenance.json", code=2)
        assert "cannot read" not in proc.stderr  # it is a write that failed
        assert not hub_server.hub.repos, "a repo was created although nothing could be pushed"
        assert not hub_server.hub.log, hub_server.hub.log
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)
    assert (out / "provenance.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
@pytest.mark.slow
def test_push_keeps_provenance_json_permissions_and_unknown_fields(sharded, tmp_path, hub_server):
    """Sealing replaces provenance.json: it must keep the file's mode (0600 became 0644) and every field a newer
    melsurgery (or the user) wrote there (unknown fields were dropped)."""
    out = patched(sharded, tmp_path)
    doc = json.loads((out / "provenance.json").read_text())
    doc["note"] = {"from": "a newer melsurgery"}
    (out / "provenance.json").write_text(json.dumps(doc))
    os.chmod(out / "provenance.json", 0o600)
    proc = push(hub_server, out, f"{hub_server.user}/keep")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((out / "provenance.json").stat().st_mode) == 0o600
    sealed = json.loads((out / "provenance.json").read_text())
    assert sealed["outputs"][SHARD2] == sha256_file(out / SHARD2)
    assert sealed.get("note") == {"from": "a newer melsurgery"}


@pytest.mark.slow
def test_dry_run_modifies_nothing(sharded, tmp_path):
    out = patched(sharded, tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in out.iterdir()}
    res = run_cli("push", out, "u/x", "--dry-run")
    assert res.returncode == 0 and "would record" in res.stdout, res.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in out.iterdir()} == before


# --- push: a plain folder's deferred source digests ----------------------------------------------------------------


@pytest.mark.slow
def test_push_records_the_deferred_source_digests_and_refuses_a_changed_source(sharded, tmp_path, hub_server):
    """patch of a plain folder hashes no untouched byte; push compares each shard with its source (still the file
    patch read: same size, mtime and inode), records the sources' and the outputs' sha256 in provenance.json and
    uploads the completed record. A source written to between patch and push is refused before any network."""
    shard1 = "model-00001-of-00002.safetensors"
    src = Path(shutil.copytree(sharded[0], tmp_path / "src"))
    out, changed = tmp_path / "out", tmp_path / "changed"
    for folder in (out, changed):
        res = run_cli("patch", src, "-o", folder, "--scan", sharded[1], "--recipe", "ffn-dampen", "--quiet",
                      "--verbose")
        assert res.returncode == 0 and "sha256 of 2 source files and of their outputs is left to push" in res.stdout
    proc = push(hub_server, out, f"{hub_server.user}/plain")
    assert proc.returncode == 0, proc.stderr
    assert f"recorded in provenance.json the sha256 of 2 derived files ({shard1}, {SHARD2})" in proc.stdout
    assert "the source's sha256, deferred by patch, recorded" in proc.stdout
    prov = Provenance.read(out)
    for shard in (shard1, SHARD2):
        assert prov.source["files"][shard] == prov.derived[shard].source_sha256 == sha256_file(src / shard)
        assert prov.outputs[shard] == sha256_file(out / shard)
    again = push(hub_server, out, f"{hub_server.user}/plain", "--dry-run")
    assert again.returncode == 0 and "would record" not in again.stdout, again.stderr
    st = (src / shard1).stat()
    os.utime(src / shard1, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    before = (changed / "provenance.json").read_bytes()
    log = len(hub_server.hub.log)
    proc = push(hub_server, changed, f"{hub_server.user}/changed")
    assert_clean_failure(proc, shard1, "changed since the patch", code=2)
    assert (changed / "provenance.json").read_bytes() == before and len(hub_server.hub.log) == log
