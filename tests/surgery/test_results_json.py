"""PatchResult and GGUFPatchResult as JSON: the typed results of real patches of the planted model round-trip,
and a malformed document is one line naming the field."""

from __future__ import annotations

import json

import pytest

from melsurgery.errors import UserError
from melsurgery.surgery.gguf_patch import GGUFPatchResult, run_patch_gguf
from melsurgery.surgery.manifest import Manifest
from melsurgery.surgery.patch import PatchResult
from tests.support.helpers import json_round_trip, patch
from tests.support.planted import build_model, llama_config
from tests.support.planted_gguf import Q, write_gguf

FAST_VERIFY = {"max_windows": 1, "max_tokens": 64, "generations": 1, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def patched(planted, planted_scan, tmp_path_factory) -> PatchResult:
    """wemask (a custom-layer spec) and ffn-dampen (folded edits), measured by verify before it was committed."""
    out = tmp_path_factory.mktemp("typed-patch") / "out"
    return patch(planted, out, [("wemask", {}), ("ffn-dampen", {})], planted_scan, verify=FAST_VERIFY)


@pytest.mark.slow
def test_a_real_patch_round_trips(patched: PatchResult) -> None:
    doc = json_round_trip(patched)
    assert doc["out"] == str(patched.out) and doc["custom_layer"] is True
    assert [p["recipe"] for p in doc["plans"]] == ["wemask", "ffn-dampen"]
    assert doc["plans"][0]["wemask"]["per_layer"] and doc["plans"][1]["edits"][0]["index"]
    assert doc["applied"] and all(a["changed"] > 0 for a in doc["applied"])
    assert doc["scan"] == patched.scan.to_json() and doc["verified"]["kl_mean"] > 0
    again = PatchResult.from_json(doc)
    assert again.scan == patched.scan and again.applied == patched.applied and again.plans[1] == patched.plans[1]


PATCH_DAMAGE = {
    "applied-count-a-word": (lambda d: d["applied"][0].update(changed="many"), "applied[0].changed must be an integer"),
    "edit-index-a-string": (lambda d: d["plans"][1]["edits"][0].update(index="41"),
                            "plans[1].edits[0].index must be a list or null"),
    "scan-layer-too-deep": (lambda d: d["scan"].update(me_layer=99), "scan.me_layer must be null or a layer index 0-5"),
    "no-out": (lambda d: d.__delitem__("out"), "out must be a string (a path), got None"),
}


@pytest.mark.parametrize("case", sorted(PATCH_DAMAGE))
def test_a_malformed_patch_document_names_the_field(patched: PatchResult, case: str) -> None:
    damage, needle = PATCH_DAMAGE[case]
    data = json.loads(json.dumps(patched.to_json()))
    damage(data)
    with pytest.raises(UserError) as err:
        PatchResult.from_json(data, "patch.json")
    assert str(err.value).startswith("patch.json: ") and needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_real_gguf_patch_round_trips(planted_scan, tmp_path, monkeypatch) -> None:
    from melsurgery.checkpoint.source import resolve

    monkeypatch.setenv("MELSURGERY_CACHE", str(tmp_path / "cache"))  # the GGUF's conversion, not the user's cache
    src = write_gguf(build_model(llama_config()), tmp_path / "planted-Q8_0.gguf", Q.Q8_0)
    res = run_patch_gguf(resolve(str(src)), tmp_path / "out", Manifest(recipes=[("ffn-dampen", {"factor": 0.2})]),
                         folder=True, scan=planted_scan)
    doc = json_round_trip(res)
    assert doc["file"] == str(tmp_path / "out" / src.name) and len(doc["output_sha256"]) == 64
    assert [a["type"] for a in doc["applied"]] == ["Q8_0"] and doc["applied"][0]["blocks_requantised"] > 0
    assert GGUFPatchResult.from_json(doc).applied == res.applied
    bad = {**doc, "applied": [{**doc["applied"][0], "requant_rms_err": "small"}]}
    with pytest.raises(UserError, match=r"^GGUFPatchResult JSON: applied\[0\]\.requant_rms_err must be a finite "):
        GGUFPatchResult.from_json(bad)
