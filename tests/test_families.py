"""Architecture coverage, proven on planted tiny models of every supported family.

For each family: the scan finds the planted layer, dim, token and neuron (and expert); the streaming
calibrator reproduces a full forward; every recipe's patched checkpoint, loaded fresh, matches an
independent hook reference; exactly the edited tensors change; source dtypes survive.
"""

from __future__ import annotations

import json

import pytest
import reference as ref
import torch
from planted import FAMILY_CONFIGS, Plant, build_model, family_config, make_tokenizer, save_model
from transformers import AutoModelForCausalLM

import melsurgery
from melsurgery.architectures import FAMILIES, family_for
from melsurgery.calibrate import calibrate
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safetensors_file import read_bytes
from melsurgery.checkpoint.source import resolve
from melsurgery.errors import UserError
from melsurgery.manifest import Manifest
from melsurgery.patch import run_patch
from melsurgery.samples import read_records, tokenize
from melsurgery.scan import CalibrationSpec, run_scan

MODEL_TYPES = list(FAMILY_CONFIGS)
PLANT = Plant()
TEXTS = ["The quick brown fox jumps over the lazy dog.", "1 + 2 = 3, and 2 * 3 = 6!", "def f(x): return x * x"]


MOE = ("qwen3_moe", "qwen2_moe", "mixtral")
HYBRID = ("bamba", "lfm2")


def is_moe(model_type: str) -> bool:
    return model_type in MOE


@pytest.fixture(scope="module")
def planted_family(tmp_path_factory):
    """model_type -> (folder, scan) of an fp32 planted model, built and scanned once per module."""
    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type) / "model"
            save_model(build_model(family_config(model_type), PLANT), folder, shards=2)
            cache[model_type] = folder, run_scan(resolve(str(folder)), CalibrationSpec(num_samples=8))
        return cache[model_type]

    return get


def load(folder, dtype=torch.float32, **kw):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager", **kw).eval()


def batch():
    tok = make_tokenizer()
    ids = [tok(t)["input_ids"] for t in TEXTS]
    n = min(map(len, ids))  # > the sliding windows of 8, so local and global layers differ
    return torch.tensor([i[:n] for i in ids])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_every_family_is_covered():
    assert sorted(t for f in FAMILIES for t in f.model_types) == sorted(MODEL_TYPES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_scan_finds_the_plant(planted_family, model_type):
    _, r = planted_family(model_type)
    assert r["model"]["family"] == family_for({"model_type": model_type}).name
    assert r["me_layer"] == PLANT.layer and r["massive_dims"] == [PLANT.dim]
    assert {t["pos"] for t in r["massive_tokens"]} == {0}
    assert len(r["massive_tokens"]) == r["calibration"]["num_samples"]
    (n,) = r["ffn_neurons"]
    assert n["neuron"] == PLANT.neuron and n.get("expert") == (PLANT.expert if is_moe(model_type) else None)
    assert n["share"] > 0.95 and abs(n["activation_other_max"]) < 0.01 * abs(n["activation_massive"])
    assert r["persist_until"] == 5


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_streaming_statistics_equal_a_full_forward(planted_family, model_type):
    folder, _ = planted_family(model_type)
    ckpt = Checkpoint(folder)
    records, _ = read_records(None)
    samples = tokenize(records[:4], make_tokenizer(), num_samples=None, max_tokens=48, seed=0)
    stats = calibrate(ckpt, family_for(ckpt.config), samples)
    model = load(folder)
    outs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outs[i].append(out[0].detach()))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        full = [model(torch.tensor([s.ids]), output_hidden_states=True, output_attentions=True) for s in samples]
    ref.remove(handles)
    states = [[f.hidden_states[0][0] for f in full]] + outs  # embeddings (scaled, for Gemma), then each layer
    for got, layer_states in zip(stats.layers, states):
        flat = torch.cat([h.flatten() for h in layer_states]).abs()
        assert got.max_abs == pytest.approx(float(flat.max()), rel=1e-5), got.index
        assert got.median_abs == pytest.approx(float(flat.median()), rel=1e-5), got.index
    attending = [i for i in range(len(outs)) if stats.layers[i + 1].mixer == "attention"]
    assert len(attending) == len(full[0].attentions)  # hybrids: only attention layers have weights
    assert all(stats.layers[i + 1].key_attention is None for i in range(len(outs)) if i not in attending)
    for i, weights in zip(attending, full[0].attentions):  # attention weights (sliding windows included) agree
        a = weights[0].mean(0)
        expected = [float(a[k + 1 :, k].mean()) for k in range(a.shape[0] - 1)]
        got = stats.layers[i + 1].key_attention[0].mean(0)[:-1].tolist()
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), i


RECIPES = [("wemask", {"layers": "after-me"}), ("wemask", {"selector": "first", "top_k": 1}), ("norm-rescale", {}),
           ("ffn-dampen", {}), ("me-norm", {})]
RECIPE_IDS = ["wemask", "wemask-first", "norm-rescale", "ffn-dampen", "me-norm"]


def reference_for(plan, model, scan):
    return ref.for_plan(plan, model, scan)


def patch(folder, out, recipes, scan):
    return run_patch(resolve(str(folder)), out, Manifest(model=str(folder), recipes=recipes), scan=scan)


def assert_only_edited_tensors_differ(src_folder, out_folder, edited: set[str]) -> None:
    src, out = Checkpoint(src_folder), Checkpoint(out_folder)
    assert set(src.names()) == set(out.names())
    for name in src.names():
        a, b = src.info(name), out.info(name)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert (read_bytes(a) == read_bytes(b)) == (name not in edited), name


@pytest.mark.parametrize("recipe,params", RECIPES, ids=RECIPE_IDS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_checkpoint_matches_hook_reference(planted_family, tmp_path, model_type, recipe, params):
    folder, scan = planted_family(model_type)
    result = patch(folder, tmp_path / "out", [(recipe, params)], scan)
    (plan,) = result.plans
    ids = batch()
    base = load(folder)
    base_logits = logits(base, ids)
    handles = reference_for(plan, base, scan)
    expected = logits(base, ids)
    ref.remove(handles)
    assert not torch.allclose(expected, base_logits, atol=1e-4), "the intervention must change something"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if recipe == "wemask":
        remote = load(tmp_path / "out", trust_remote_code=True)
        torch.testing.assert_close(logits(remote, ids), expected, rtol=1e-5, atol=1e-5)
        model, _ = melsurgery.load(tmp_path / "out")
        assert "melsurgery_wemask" in config
    else:
        model = load(tmp_path / "out")
        assert "auto_map" not in config
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    edited = {a.tensor for a in result.applied}
    assert bool(edited) == (recipe != "wemask")
    assert_only_edited_tensors_differ(folder, tmp_path / "out", edited)


DTYPE_RECIPES = {
    torch.bfloat16: [("ffn-dampen", {}), ("wemask", {})],
    torch.float16: [("norm-rescale", {}), ("me-norm", {})],
}


@pytest.mark.parametrize("dtype", list(DTYPE_RECIPES), ids=str)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_dtypes_are_preserved(planted_family, tmp_path, model_type, dtype):
    """Half-precision sources keep their dtype; edits are computed in fp32 and cast back (fp32 sources
    are covered above)."""
    _, scan = planted_family(model_type)  # the fp32 scan names the same tensors
    src = save_model(build_model(family_config(model_type), PLANT), tmp_path / "src", dtype=dtype)
    result = patch(src, tmp_path / "out", DTYPE_RECIPES[dtype], scan)
    edited = {a.tensor for a in result.applied}
    assert edited
    assert_only_edited_tensors_differ(src, tmp_path / "out", edited)
    assert all(Checkpoint(tmp_path / "out").info(n).dtype == Checkpoint(src).info(n).dtype for n in edited)
    model, _ = melsurgery.load(tmp_path / "out", dtype=dtype)
    assert next(model.parameters()).dtype == dtype
    assert torch.isfinite(logits(model, batch())).all()


@pytest.mark.parametrize("config", ["GPT2Config", "GPTNeoXConfig", "BertConfig"])
def test_unsupported_architecture_is_refused_before_any_work(tmp_path, config):
    import transformers

    cfg = getattr(transformers, config)(vocab_size=len(make_tokenizer()), hidden_size=32, n_embd=32,
                                        num_attention_heads=2, n_head=2, num_hidden_layers=1, n_layer=1,
                                        intermediate_size=64, is_decoder=True)
    src = tmp_path / "src"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    for run in (lambda: run_scan(resolve(str(src))),
                lambda: patch(src, tmp_path / "out", [("ffn-dampen", {})], None)):
        with pytest.raises(UserError) as err:
            run()
        msg = str(err.value)
        assert f"unsupported architecture {cfg.model_type!r}" in msg
        assert all(t in msg for t in MODEL_TYPES)
    assert not (tmp_path / "out").exists()
