"""--overwrite replaces only an output melsurgery wrote (a folder whose provenance.json lists its files, a GGUF
whose header holds melsurgery.* keys) or an empty folder; anything else is refused in one line that names what
is there, before any work, and nothing is touched."""

from __future__ import annotations

import json

import pytest

from melsurgery.checkpoint.atomic import check_output, foreign_files
from melsurgery.checkpoint.source import resolve
from melsurgery.errors import UserError
from melsurgery.surgery.manifest import Manifest
from melsurgery.surgery.patch import run_patch
from tests.support.helpers import run_cli, snapshot


@pytest.fixture(scope="module")
def earlier_output(planted, planted_scan, tmp_path_factory):
    """A real patch of the planted model: what --overwrite may replace."""
    out = tmp_path_factory.mktemp("overwrite") / "out"
    run_patch(resolve(str(planted)), out, Manifest(model=str(planted), recipes=[("ffn-dampen", {})]),
              scan=planted_scan)
    return out


def test_a_patch_output_is_replaced_and_an_empty_folder_taken(earlier_output, planted, planted_scan, tmp_path):
    assert foreign_files(earlier_output) == []
    with pytest.raises(UserError, match="holds an earlier melsurgery output; pass --overwrite"):
        check_output(earlier_output, overwrite=False)
    check_output(earlier_output, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty, overwrite=False)
    out = tmp_path / "again"
    man = Manifest(model=str(planted), recipes=[("ffn-dampen", {})])
    run_patch(resolve(str(planted)), out, man, scan=planted_scan)
    run_patch(resolve(str(planted)), out, man, scan=planted_scan, overwrite=True)
    assert (out / "provenance.json").is_file() and foreign_files(out) == []


def test_a_users_file_beside_an_output_is_never_deleted(earlier_output, planted, tmp_path):
    """The CLI refuses in one line, exit 2, before scanning; the folder is byte-for-byte as it was."""
    out = tmp_path / "out"
    out.mkdir()
    for f in earlier_output.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(out)
    res = run_cli("patch", planted, "-o", out, "--recipe", "ffn-dampen", "--overwrite", "--quiet")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == (f"melsurgery: error: '{out}': holds 1 file melsurgery did not write ('notes.txt'); "
                          "choose another -o or remove them\n")
    assert snapshot(out) == before


@pytest.mark.parametrize("provenance", [None, {"tool": "another-tool 1.0", "outputs": {}}, "not json"])
def test_a_folder_melsurgery_did_not_write_is_refused(provenance, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "sub/c.safetensors"):
        (out / name).write_text("x")
    if provenance is not None:
        (out / "provenance.json").write_text(provenance if isinstance(provenance, str) else json.dumps(provenance))
    with pytest.raises(UserError) as err:
        check_output(out, overwrite=True)
    n = 3 if provenance is None else 4
    assert f"holds {n} files melsurgery did not write ('a.txt', 'b.txt', " in str(err.value)
    assert str(err.value).endswith("; choose another -o or remove them")
    assert (out / "a.txt").read_text() == "x"
