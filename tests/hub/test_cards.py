"""Model cards the Hub accepts: base model ids from wherever they are known, and the Hub's metadata rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from melsurgery.checkpoint.basemodel import (
    Origin,
    explicit,
    for_folder,
    from_cache_path,
    from_config,
    from_gguf_fields,
    gguf_fields,
    hub_url_id,
)
from melsurgery.checkpoint.source import DEFAULT_BASE_ID, default_gguf
from melsurgery.detect.scan_result import ModelInfo, ScanResult
from melsurgery.errors import UserError
from melsurgery.hub.card import base_license, front_matter, render_card
from melsurgery.hub.metadata import hub_licenses, metadata_problems
from melsurgery.surgery.manifest import load_manifest
from tests.support.helpers import run_cli
from tests.support.hub_server import hub_metadata_errors

REV = "0123456789abcdef0123456789abcdef01234567"


def test_hf_cache_snapshot_folders_name_their_repo(tmp_path: Path) -> None:
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / REV
    assert from_cache_path(snap).id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert from_cache_path(tmp_path / "models--gpt2" / "snapshots" / REV).id == "gpt2"  # legacy id, no namespace
    assert from_cache_path(snap / "subfolder") is None  # a part of a repo is not the repo
    assert from_cache_path(tmp_path / "datasets--org--data" / "snapshots" / REV) is None
    assert from_cache_path(tmp_path / "my-model") is None
    # through a symlink named like anything: the resolved path still says where it lives
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(snap)
    assert for_folder(tmp_path / "link", (tmp_path / "link").resolve()).origin == "the Hugging Face cache path"


def test_config_name_or_path_only_when_it_is_an_id_and_not_a_path(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "models" / "mine"
    folder.mkdir(parents=True)
    assert from_config({"_name_or_path": "meta-llama/Llama-3.2-1B"}, folder).origin == "config.json's _name_or_path"
    for value in ("", "/fsx/ckpt/llama-sft", "./out", "checkpoint-500", "a/b/c", "org/na--me", "ünï/code", 7, None):
        assert from_config({"_name_or_path": value}, folder) is None, value
    (tmp_path / "models" / "ckpt" / "run1").mkdir(parents=True)  # a path that exists next to the model is a path
    assert from_config({"_name_or_path": "ckpt/run1"}, folder) is None
    monkeypatch.chdir(tmp_path)  # ... and so is one that exists from the working directory
    assert from_config({"_name_or_path": "models/ckpt"}, tmp_path / "elsewhere") is None
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/name"}))
    assert for_folder(folder, folder).id == "org/name"
    (folder / "config.json").write_text("{not json")
    assert for_folder(folder, folder) is None


def test_hub_urls() -> None:
    assert hub_url_id("https://huggingface.co/org/name") == "org/name"
    assert hub_url_id("https://hf.co/org/name/tree/main") == "org/name"
    assert hub_url_id("https://huggingface.co/datasets/org/name") is None
    assert hub_url_id("https://github.com/org/name") is None
    assert hub_url_id("https://huggingface.co/org") is None


def _write_gguf(path: Path, **meta: str) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        w.add_string(key.replace("__", "."), value)
    if "general__base_model__0__repo_url" in meta:
        w.add_uint32("general.base_model.count", 1)
    w.add_token_list(["<s>", "a", "bb"])  # a string array the header reader must skip
    w.add_array("general.tags", ["x", "y"])
    w.add_uint32("llama.block_count", 2)
    w.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_metadata_names_the_source(tmp_path: Path) -> None:
    full = _write_gguf(tmp_path / "a.gguf", general__name="Tiny Llama", general__source__repo_url=(
        "https://huggingface.co/org/tiny-src"), general__base_model__0__repo_url="https://huggingface.co/org/tiny-base")
    fields = gguf_fields(full)
    expected = {k: f.contents() for k, f in gguf.GGUFReader(full).fields.items()
                if k.startswith("general.") and len(f.types) == 1}
    assert fields == expected and fields["general.base_model.count"] == 1
    assert from_gguf_fields(fields, full).id == "org/tiny-src"  # the conversion source wins
    only_base = _write_gguf(tmp_path / "b.gguf", general__base_model__0__repo_url="https://huggingface.co/org/base")
    found = from_gguf_fields(gguf_fields(only_base), only_base)
    assert (found.id, found.origin) == ("org/base", "the GGUF metadata (general.base_model.0.repo_url)")
    named = _write_gguf(tmp_path / "c.gguf", general__name="org/named-model")
    assert from_gguf_fields(gguf_fields(named), named).id == "org/named-model"
    snap = tmp_path / "models--org--tiny-GGUF" / "snapshots" / REV
    snap.mkdir(parents=True)
    cached = _write_gguf(snap / "tiny.Q4_0.gguf", general__name="Tiny")
    assert from_gguf_fields(gguf_fields(cached), cached).id == "org/tiny-GGUF"
    bare = _write_gguf(tmp_path / "d.gguf", general__name="Tiny Llama 135M")
    assert from_gguf_fields(gguf_fields(bare), bare) is None
    (tmp_path / "broken.gguf").write_bytes(full.read_bytes()[:40])
    assert gguf_fields(tmp_path / "broken.gguf") == {}


def test_the_embedded_default_gguf_names_no_repo_so_the_alias_does(smollm2) -> None:
    fields = gguf_fields(default_gguf())
    assert fields["general.name"] == "Smollm2 135M 8k Lc100K Mix1 Ep2" and fields["general.license"] == "apache-2.0"
    assert not any(k.startswith(("general.source.", "general.base_model.")) for k in fields)
    assert from_gguf_fields(fields, default_gguf()) is None
    assert smollm2.base_model.id == DEFAULT_BASE_ID and smollm2.name == DEFAULT_BASE_ID


@pytest.mark.parametrize("value", ["/home/me/models/smollm2-f32", "smollm2", "a/b/c", "org/-x", "org/x..y", "o rg/x"])
def test_explicit_base_model_must_be_owner_name(value: str) -> None:
    with pytest.raises(UserError, match="is not a Hub model id: use OWNER/NAME") as err:
        explicit(value, "--base-model")
    assert "\n" not in str(err.value)


def test_manifest_base_model(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("model: ./mine\nbase_model: org/name\nrecipes: [ffn-dampen]\n")
    man = load_manifest(path)
    assert man.base_model == "org/name" and "base_model: org/name" in man.to_yaml()
    path.write_text("model: ./mine\nbase_model: /data/mine\nrecipes: [ffn-dampen]\n")
    with pytest.raises(UserError, match=re.escape(f"{path}: base_model '/data/mine' is not a Hub model id")):
        load_manifest(path)


@pytest.mark.slow
def test_patch_refuses_a_bad_base_model_before_any_work(planted: Path, tmp_path: Path) -> None:
    res = run_cli("patch", planted, "-o", tmp_path / "out", "--recipe", "ffn-dampen", "--base-model", str(planted))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"melsurgery: error: --base-model '{planted}' is not a Hub model id")
    assert not (tmp_path / "out").exists()


# Cards the Hub accepts or refuses, and the field it names: melsurgery's rules and the loopback Hub's agree.
CASES = [
    ({"base_model": "org/name", "base_model_relation": "finetune", "license": "llama3.1", "tags": ["a"]}, set()),
    ({"base_model": ["org/a", "org/b"], "base_model_relation": "merge", "license": ["mit", "apache-2.0"]}, set()),
    ({"library_name": "transformers", "pipeline_tag": "text-generation", "language": "en", "tags": "x"}, set()),
    ({"license": "other", "license_name": "my-licence", "license_link": "LICENSE"}, set()),
    ({"base_model": "/home/me/models/smollm2-f32"}, {"base_model"}),
    ({"base_model": "SmolLM2 135M"}, {"base_model"}),
    ({"base_model": ["org/a", "./local"]}, {"base_model[1]"}),
    ({"base_model": 3}, {"base_model"}),
    ({"base_model_relation": "patch"}, {"base_model_relation"}),
    ({"license": "Apache 2.0"}, {"license"}),
    ({"license": "gpl-2.0-or-later"}, {"license"}),
    ({"tags": ["melsurgery", 3, None]}, {"tags[1]", "tags[2]"}),
    ({"tags": {"a": 1}}, {"tags"}),
    ({"language": ["en", 1]}, {"language[1]"}),
    ({"datasets": ["/var/data/train"]}, {"datasets[0]"}),
    ({"library_name": 5, "pipeline_tag": ["text-generation"]}, {"library_name", "pipeline_tag"}),
]


@pytest.mark.parametrize(("meta", "fields"), CASES)
def test_metadata_rules_agree_with_the_loopback_hub(meta: dict, fields: set[str]) -> None:
    assert {p.field for p in metadata_problems(meta)} == fields
    assert {re.match(r'^"([^"]+)"', e).group(1) for e in hub_metadata_errors(meta)} == fields


def test_licence_list_is_the_hubs() -> None:
    assert len(hub_licenses()) == 82 and {"apache-2.0", "llama3.1", "gemma", "other"} <= hub_licenses()
    assert "array" not in hub_licenses()  # a word of the Hub's message ("or a list"), not a licence


def _base_card(folder: Path, front: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "README.md").write_text(f"---\n{front}---\n# Base\n")
    return folder


def test_base_licence_carried_only_when_the_hub_knows_it(tmp_path: Path) -> None:
    assert base_license(_base_card(tmp_path / "a", "license: llama3.1\n")) == ({"license": "llama3.1"}, None)
    other = _base_card(tmp_path / "b", "license: other\nlicense_name: acme\nlicense_link: LICENSE\n")
    assert base_license(other) == ({"license": "other", "license_name": "acme", "license_link": "LICENSE"}, None)
    assert base_license(_base_card(tmp_path / "c", "license: Apache 2.0\n")) == ({}, "Apache 2.0")
    assert base_license(_base_card(tmp_path / "d", "license: [unclosed\n")) == ({}, None)
    assert base_license(tmp_path / "none") == ({}, None)

    card = render_card(base=None, origin=Origin("folder", "my`model"), license={}, unknown_license="Apache 2.0",
                       plans=[],
                       scan=ScanResult(model=ModelInfo("m", "m", "folder", None, "llama", 6, 64), me_layer=3,
                                       massive_dims=(17,)),
                       applied=[], custom_layer=False)
    meta = front_matter(card)
    assert metadata_problems(meta) == [] and hub_metadata_errors(meta) == []
    assert "license" not in meta and "base_model" not in meta and "base_model_relation" not in meta
    assert "local model folder `my'model`" in card and "'Apache 2.0', which is not a licence id the Hub knows" in card
