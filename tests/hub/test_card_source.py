"""A card names exactly what was patched: its first sentence and its `melsurgery_source` metadata give the kind
of source (local folder, Hugging Face cache snapshot, GGUF file with its quantization type and conversion),
"byte-identical" says to what, and the prose holds no Python dict or list and no cut-off code span."""

from __future__ import annotations

import re
import shutil

import pytest

from melsurgery.checkpoint.source import resolve
from melsurgery.hub.card import front_matter
from melsurgery.hub.metadata import metadata_problems
from melsurgery.surgery.gguf_patch import run_patch_gguf
from melsurgery.surgery.manifest import Manifest
from melsurgery.surgery.patch import run_patch
from tests.support.hub_server import hub_metadata_errors
from tests.support.planted import build_model, llama_config
from tests.support.planted_gguf import Q, write_gguf

REV = "a" * 40
BASE = "acme/tiny-planted"
RECIPES = [("ffn-dampen", {}), ("wemask", {})]
pytestmark = pytest.mark.slow  # four real patches


@pytest.fixture(scope="module")
def cards(planted, planted_scan, tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("cards")
    monkeypatch_module.setenv("MELSURGERY_CACHE", str(root / "cache"))  # the planted GGUF's conversion
    folder = shutil.copytree(planted, root / "my-model")
    cache = shutil.copytree(planted, root / "hub" / f"models--{BASE.replace('/', '--')}" / "snapshots" / REV)
    gguf = write_gguf(build_model(llama_config()), root / "tiny.Q4_1.gguf", Q.Q4_1)
    found = {}
    for kind, spec, base in (("folder", folder, None), ("hf-cache", cache, None), ("gguf", gguf, BASE)):
        run_patch(resolve(str(spec)), root / kind, Manifest(model=str(spec), base_model=base, recipes=RECIPES),
                  scan=planted_scan)
        found[kind] = (root / kind / "README.md").read_text()
    run_patch_gguf(resolve(str(gguf)), root / "gguf-out", Manifest(model=str(gguf), base_model=BASE,
                                                                   recipes=RECIPES[:1]),
                   folder=True, scan=planted_scan)
    found["gguf-out"] = (root / "gguf-out" / "README.md").read_text()
    return found


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _first_sentence(card: str) -> str:
    body = card.split("\n---\n", 1)[1]
    intro = next(p for p in body.split("\n\n") if p.startswith("This checkpoint is"))
    return intro.split(". ", 1)[0]


EXPECTED = {
    "folder": ("This checkpoint is the local model folder `my-model`, with its massive activations mitigated",
               "byte-identical to the source's"),
    "hf-cache": (f"This checkpoint is [{BASE}](https://huggingface.co/{BASE}), its safetensors weights from the "
                 f"Hugging Face cache at revision `{REV}`, with", "byte-identical to the source's"),
    "gguf": (f"This checkpoint is the Q4_1 GGUF `tiny.Q4_1.gguf` of "
             f"[{BASE}](https://huggingface.co/{BASE}), dequantized to float32 by transformers, with",
             f"byte-identical to the float32 dequantization of `tiny.Q4_1.gguf` (not to the original weights of "
             f"{BASE})"),
    "gguf-out": (f"This checkpoint is the Q4_1 GGUF `tiny.Q4_1.gguf` of "
                 f"[{BASE}](https://huggingface.co/{BASE}), with", "byte-identical to `tiny.Q4_1.gguf`"),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_first_sentence_and_metadata_name_the_exact_source(cards, kind):
    card = cards[kind]
    first, identical = EXPECTED[kind]
    assert _first_sentence(card).startswith(first)
    assert f"Edited tensors (all others are {identical}):" in card
    meta = front_matter(card)
    assert metadata_problems(meta) == [] and hub_metadata_errors(meta) == []
    source = meta["melsurgery_source"]
    assert source["kind"] == kind.removesuffix("-out")
    if kind.startswith("gguf"):
        assert (source["name"], source["quantization"]) == ("tiny.Q4_1.gguf", "Q4_1")
        assert (source.get("conversion") == "dequantized to float32 by transformers")
    # the relation the Hub files it under: a GGUF output is a quantization of the base; an edit is no finetune
    assert meta.get("base_model_relation") == ("quantized" if kind == "gguf-out" else None)
    assert ("base_model" in meta) == (kind != "folder")


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_card_prose_is_for_people(cards, kind):
    card = cards[kind]
    assert "{'" not in card and "['" not in card and not re.search(r"\[\d", card), card
    in_code = False
    for line in card.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        assert in_code or line.count("`") % 2 == 0, f"an unclosed code span: {line!r}"
    assert not in_code
