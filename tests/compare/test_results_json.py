"""DiffResult and GGUFDiffResult as JSON: `diff --json` writes exactly the result's to_json(), and from_json reads
that document back into the result (derived keys recomputed, not trusted), or names the bad field in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from melsurgery.compare.checkpoints import DiffResult, diff_checkpoints
from melsurgery.compare.gguf import GGUFDiffResult
from melsurgery.errors import UserError
from tests.support.helpers import cli_returning, json_round_trip
from tests.support.planted import build_model, llama_config
from tests.support.planted_gguf import Q, write_gguf

NORM = "model.norm.weight"
DOWN2 = "model.layers.2.mlp.down_proj.weight"
POST4 = "model.layers.4.post_attention_layernorm.weight"
K5 = "model.layers.5.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def edited(planted: Path, tmp_path_factory) -> Path:
    """The planted folder with a change of every kind: an all-zero tensor (its relative change to B is infinite),
    whole columns, a dtype, a shape, a tensor only here, one missing, a config key, a new side file."""
    dst = tmp_path_factory.mktemp("typed-diff") / "edited"
    shutil.copytree(planted, dst)
    state = load_file(dst / "model.safetensors")
    state[NORM] = torch.zeros_like(state[NORM])
    state[DOWN2][:, [3, 9]] *= 2
    state[POST4] = state[POST4].to(torch.bfloat16)
    state[K5] = state[K5][:16].contiguous()
    del state["lm_head.weight"]
    state["extra.bias"] = torch.ones(3)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "notes.txt").write_text("scratch\n")
    return dst


@pytest.mark.slow
def test_diff_json_is_the_to_json_of_the_result_and_reads_back(edited, planted, tmp_path, monkeypatch) -> None:
    path = tmp_path / "diff.json"
    result, res = cli_returning(monkeypatch, "melsurgery.compare.checkpoints:diff_checkpoints", "diff", edited,
                                planted, "--json", path)
    assert res.exit_code == 1, res.output
    written = json.loads(path.read_text())
    assert written == result.to_json()
    assert list(written) == ["identical", "a", "b", "tensors", "files", "layout", "stat", "summary"]
    statuses = {t["status"] for t in written["tensors"]}
    assert statuses == {"identical", "changed", "dtype", "shape", "only_a", "only_b"}
    norm = next(t for t in written["tensors"] if t["name"] == NORM)
    assert norm["rel_change"] == "inf" and norm["layer"] is None
    assert json_round_trip(result) == written
    again = DiffResult.from_json(written, str(path))
    assert again.a.folder == edited and again.b.shards == ["model.safetensors"]
    assert again.summary() == result.summary() and again.stat() == result.stat() and not again.identical


def test_derived_keys_of_a_diff_document_are_recomputed(edited, planted) -> None:
    doc = diff_checkpoints(edited, planted).to_json()
    lying = json.loads(json.dumps(doc))
    lying["identical"] = True
    lying["summary"]["changed"] = 0
    lying["stat"] = {"layers": {}, "other": {"tensors": 0, "entries": 0}}
    lying["tensors"][0]["layer"] = 99
    assert DiffResult.from_json(lying).to_json() == doc


DIFF_DAMAGE = {
    "numel-a-word": (lambda d: d["tensors"][0].update(numel="big"), "tensors[0].numel must be an integer, got 'big'"),
    "figure-a-word": (lambda d: d["tensors"][1].update(max_abs_diff="huge"),
                      "tensors[1].max_abs_diff must be a finite number, got 'huge'"),
    "no-summary": (lambda d: d.__delitem__("summary"), "summary must be an object, got None"),
    "bytes-read-missing": (lambda d: d["summary"].__delitem__("bytes_read"), "summary.bytes_read must be an integer"),
    "side-without-folder": (lambda d: d["b"].__delitem__("folder"), "b.folder must be a string (a path), got None"),
    "layout-shards": (lambda d: d["layout"].update(shards_a="model.safetensors"), "layout.shards_a must be a list"),
    "file-changes": (lambda d: d["files"][0].update(changed=[]), "files[0].changed must be an object, got []"),
}


@pytest.mark.parametrize("case", sorted(DIFF_DAMAGE))
def test_a_malformed_diff_document_names_the_field(edited, planted, case) -> None:
    damage, needle = DIFF_DAMAGE[case]
    data = json.loads(json.dumps(diff_checkpoints(edited, planted).to_json()))
    damage(data)
    with pytest.raises(UserError) as err:
        DiffResult.from_json(data, "diff.json")
    message = str(err.value)
    assert message.startswith("diff.json: ") and needle in message and "\n" not in message, message
    assert message.endswith("; rerun `melsurgery diff --json`")


@pytest.mark.slow
def test_gguf_diff_json_is_the_to_json_of_the_result_and_reads_back(planted_scan, tmp_path, monkeypatch) -> None:
    from melsurgery.checkpoint.source import resolve
    from melsurgery.surgery.gguf_patch import run_patch_gguf
    from melsurgery.surgery.manifest import Manifest

    monkeypatch.setenv("MELSURGERY_CACHE", str(tmp_path / "cache"))  # the GGUF's conversion, not the user's cache
    src = write_gguf(build_model(llama_config()), tmp_path / "planted-Q4_1.gguf", Q.Q4_1)
    out = run_patch_gguf(resolve(str(src)), tmp_path / "out.gguf", Manifest(recipes=[("ffn-dampen", {})]),
                         scan=planted_scan).file
    path = tmp_path / "diff.json"
    result, res = cli_returning(monkeypatch, "melsurgery.compare.gguf:diff_gguf", "diff", src, out, "--json", path)
    assert res.exit_code == 1, res.output
    written = json.loads(path.read_text())
    assert written == result.to_json()
    assert list(written) == ["identical", "a", "b", "order_same", "tensors", "metadata", "summary"]
    assert written["summary"]["changed"] == 1 and "melsurgery.edits" in written["metadata"]["added"]
    assert json_round_trip(result) == written
    lying = {**written, "identical": True, "summary": {**written["summary"], "keys_differ": 0}}
    again = GGUFDiffResult.from_json(lying, str(path))
    assert again.to_json() == written and again.a == src and again.summary() == result.summary()
    bad = {**written, "metadata": {**written["metadata"], "changed": [1]}}
    with pytest.raises(UserError, match=r"^d\.json: metadata\.changed must be an object, got \[1\]; rerun `melsurgery"):
        GGUFDiffResult.from_json(bad, "d.json")
