"""Architecture coverage, proven on planted tiny models of every supported family.

For each family: the scan finds the planted layer, dim, token and neuron (and expert); the streaming
calibrator reproduces a full forward; every recipe's patched checkpoint, loaded fresh, matches an
independent hook reference; exactly the edited tensors change; source dtypes survive.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

import melsurgery
from melsurgery.architectures import FAMILIES, family_for
from melsurgery.calibrate.samples import read_records, tokenize
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safetensors_file import read_bytes
from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import CalibrationSpec, calibrate, read_json, run_scan, write_json
from melsurgery.errors import UserError
from tests.support import reference as ref
from tests.support.helpers import patch, run_cli
from tests.support.planted import FAMILY_CONFIGS, Plant, build_model, family_config, make_tokenizer, save_model

MODEL_TYPES = list(FAMILY_CONFIGS)
PLANT = Plant()
TEXTS = ["The quick brown fox jumps over the lazy dog.", "1 + 2 = 3, and 2 * 3 = 6!", "def f(x): return x * x"]


MOE = ("qwen3_moe", "qwen2_moe", "mixtral", "jamba")
HYBRID = ("bamba", "jamba", "lfm2")


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
            cache[model_type] = folder, run_scan(resolve(str(folder)), CalibrationSpec(num_samples=8, max_tokens=64))
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
@pytest.mark.slow
def test_scan_json_round_trips_exactly(planted_family, model_type, tmp_path):
    """Every family's scan (experts, hybrid mixers, null sinks) reads back to the same object and bytes."""
    _, r = planted_family(model_type)
    path = tmp_path / "scan.json"
    write_json(r, path)
    data = json.loads(path.read_text())
    assert ("expert" in data["ffn_neurons"][0]) == is_moe(model_type)
    again = read_json(path)
    assert again.to_json() == data
    again.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_scan_finds_the_plant(planted_family, model_type):
    _, r = planted_family(model_type)
    assert r.model.family == family_for({"model_type": model_type}).name
    assert r.me_layer == PLANT.layer and r.massive_dims == (PLANT.dim,)
    assert {t.pos for t in r.massive_tokens} == {0}
    assert len(r.massive_tokens) == r.calibration.num_samples
    (n,) = r.ffn_neurons
    assert n.neuron == PLANT.neuron and n.expert == (PLANT.expert if is_moe(model_type) else None)
    assert n.share > 0.95 and abs(n.activation_other_max) < 0.01 * abs(n.activation_massive)
    assert r.persist_until == 5


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.slow
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


DEFAULTS = {"norm-rescale": {"factor": 0.5}, "ffn-dampen": {"factor": 0.2}, "me-norm": {"factor": 0.5},
            "wemask": {"strength": 1.0}}  # the documented defaults (docs/recipes.md)


def reference_for(recipe, params, plan, model, scan, model_type):
    """Hooks aimed by the planted ground truth, after checking that the plan under test aims at the same
    targets (the scan is trusted only for the ranking of the incidental dims after the planted one)."""
    dims = tuple(d.dim for d in scan.top_dims)
    assert dims[0] == PLANT.dim
    neuron = [PLANT.expert, PLANT.neuron] if is_moe(model_type) else PLANT.neuron
    config = family_config(model_type)
    kinds = getattr(config, "layer_types", None)  # hybrids: which layers attend, from the config itself
    attention = tuple(i for i, k in enumerate(kinds) if "attention" in k and "linear" not in k) if kinds else None
    truth = ref.Truth(PLANT.layer, dims, (neuron,), config.num_hidden_layers, attention)
    want = ref.targets(recipe, params, truth)
    assert {k: plan.params[k] for k in want} == want, (plan.params, want)
    return ref.for_truth(recipe, params, model, truth, DEFAULTS[recipe])




def assert_only_edited_tensors_differ(src_folder, out_folder, edited: set[str]) -> None:
    src, out = Checkpoint(src_folder), Checkpoint(out_folder)
    assert set(src.names()) == set(out.names())
    for name in src.names():
        a, b = src.info(name), out.info(name)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert (read_bytes(a) == read_bytes(b)) == (name not in edited), name


@pytest.mark.parametrize("recipe,params", RECIPES, ids=RECIPE_IDS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.slow
def test_patched_checkpoint_matches_hook_reference(planted_family, tmp_path, model_type, recipe, params):
    folder, scan = planted_family(model_type)
    result = patch(folder, tmp_path / "out", [(recipe, params)], scan)
    (plan,) = result.plans
    ids = batch()
    base = load(folder)
    base_logits = logits(base, ids)
    handles = reference_for(recipe, params, plan, base, scan, model_type)
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
# Writing is family-independent (named tensors, fp32 edits cast back): of the MoE and hybrid families,
# Mixtral (per-expert tensors under renamed on-disk names) and Jamba (hybrid with experts) stand for
# the others, which keep their fp32 checks above; this keeps the suite's time in bounds.
DTYPE_TYPES = [t for t in MODEL_TYPES if t not in ("qwen2_moe", "bamba", "lfm2")]


@pytest.mark.parametrize("dtype", list(DTYPE_RECIPES), ids=str)
@pytest.mark.parametrize("model_type", DTYPE_TYPES)
@pytest.mark.slow
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


def test_mixtral_edits_address_the_checkpoint_names(planted_family):
    """Mixtral keeps `block_sparse_moe.experts.N.w1/w2/w3` on disk (transformers renames and fuses them
    in memory): the planted checkpoint is written the published way, and ffn-dampen edits that tensor."""
    folder, scan = planted_family("mixtral")
    names = set(Checkpoint(folder).names())
    assert "model.layers.3.block_sparse_moe.experts.1.w2.weight" in names
    assert not any(".mlp." in n for n in names)
    from melsurgery.recipes import plan_recipes

    config = json.loads((folder / "config.json").read_text())
    (plan,) = plan_recipes(scan, family_for(config), config, [("ffn-dampen", {})])
    assert [(e.tensor, e.axis, e.index) for e in plan.edits] == [
        ("model.layers.3.block_sparse_moe.experts.1.w2.weight", 1, (PLANT.neuron,))]


@pytest.mark.slow
def test_qwen2_moe_shared_expert_is_its_own_entry(tmp_path):
    """A massive value written by Qwen2-MoE's shared expert is attributed to ("shared", neuron), with the
    sigmoid gate in its activation, and ffn-dampen edits the shared expert's down projection."""
    plant = Plant(expert="shared")
    folder = save_model(build_model(family_config("qwen2_moe"), plant), tmp_path / "model")
    scan = run_scan(resolve(str(folder)), CalibrationSpec(num_samples=4, max_tokens=48))
    assert scan.me_layer == plant.layer and scan.massive_dims == (plant.dim,)
    (n,) = scan.ffn_neurons
    assert (n.expert, n.neuron) == ("shared", plant.neuron) and n.share > 0.95
    result = patch(folder, tmp_path / "out", [("ffn-dampen", {})], scan)
    assert {a.tensor for a in result.applied} == {"model.layers.3.mlp.shared_expert.down_proj.weight"}
    base, ids = load(folder), batch()
    handles = ref.for_plan(result.plans[0], base, scan)
    expected = logits(base, ids)
    ref.remove(handles)
    torch.testing.assert_close(logits(load(tmp_path / "out"), ids), expected, rtol=1e-5, atol=1e-5)


MIXERS = {"bamba": "state-space", "jamba": "state-space", "lfm2": "conv"}


def expected_kinds(model_type: str) -> list[str]:
    """Each layer's mixer, asked of the built transformers model (not of melsurgery)."""
    model = build_model(family_config(model_type), None)
    return ["attention" if hasattr(layer, "self_attn") else MIXERS[model_type] for layer in model.model.layers]


@pytest.mark.parametrize("model_type", HYBRID)
def test_hybrid_scan_measures_every_layer_and_sinks_only_attention(planted_family, model_type):
    folder, r = planted_family(model_type)
    kinds = expected_kinds(model_type)
    config = json.loads((folder / "config.json").read_text())
    assert family_for(config).layer_kinds(config) == kinds  # what the recipes see, from config.json alone
    assert [layer.mixer for layer in r.layers[1:]] == kinds
    assert kinds[PLANT.layer] == MIXERS[model_type] and "attention" in kinds
    for i, kind in enumerate(kinds):  # every layer's residual is measured, the sink only where there is attention
        assert r.layers[i + 1].max_abs > 0
        assert (r.sink[i] is None) == (kind != "attention"), i
    (d,) = r.dims_attribution
    assert d.mixer == MIXERS[model_type] and abs(d.ffn_write) > 100 * abs(d.attn_write)
    from melsurgery.report.text import scan_report

    assert f"({MIXERS[model_type]}) <- ME Layer" in scan_report(r)


@pytest.mark.parametrize("model_type", HYBRID)
def test_hybrid_attention_recipes_refuse_non_attention_layers(planted_family, model_type):
    """wemask and norm-rescale edit attention inputs: "next" and "after-me" pick attention layers after the
    ME Layer; an explicit layer with another mixer is refused, naming the attention layers."""
    from melsurgery.recipes import plan_recipes

    folder, scan = planted_family(model_type)
    config = json.loads((folder / "config.json").read_text())
    kinds = expected_kinds(model_type)
    attending = [i for i, k in enumerate(kinds) if k == "attention" and i > PLANT.layer]
    other = next(i for i, k in enumerate(kinds) if k != "attention" and i > PLANT.layer)
    for recipe in ("wemask", "norm-rescale"):
        for layers, expected in (("next", attending[:1]), ("after-me", attending)):
            (plan,) = plan_recipes(scan, family_for(config), config, [(recipe, {"layers": layers})])
            assert plan.params["layers"] == expected
        with pytest.raises(UserError, match=rf"{recipe} edits attention inputs, and layer\(s\) \[{other}\] of this "
                                            rf"{model_type} model have a {MIXERS[model_type]} mixer instead"):
            plan_recipes(scan, family_for(config), config, [(recipe, {"layers": str(other)})])


@pytest.mark.slow
def test_hybrid_refusal_is_one_line_and_writes_nothing(planted_family, tmp_path):
    folder, scan = planted_family("lfm2")
    scan.write(tmp_path / "scan.json")
    res = run_cli("patch", folder, "-o", tmp_path / "out", "--recipe", "wemask", "--scan", tmp_path / "scan.json",
                  "--layers", 5)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("melsurgery: error: wemask edits attention inputs, and layer(s) [5] of this lfm2 "
                                 "model have a conv mixer instead; its attention layers are [1, 4]")
    assert not (tmp_path / "out").exists()


def test_ffn_dampen_refuses_a_value_the_mixer_wrote(planted_family):
    """Where the layer's mixer, not its FFN, writes the massive value there is nothing to dampen."""
    from melsurgery.recipes import plan_recipes

    _, scan = planted_family("lfm2")
    (d,) = scan.dims_attribution
    mixer_wrote = replace(scan, ffn_neurons=(), dims_attribution=(replace(d, attn_write=d.ffn_write, ffn_write=0.0),))
    with pytest.raises(UserError, match="the conv mixer of layer 3, not its FFN, writes the massive dims"):
        plan_recipes(mixer_wrote, family_for({"model_type": "lfm2"}), {"num_hidden_layers": 6},
                     [("ffn-dampen", {})])


@pytest.mark.slow
def test_hybrid_verify_measures_sinks_only_on_attention_layers(planted_family):
    """verify streams hybrids through the same layer-kind dispatch: the planted massive token is found,
    and the sink is measured on the attention layers only."""
    from melsurgery.measure.verify import run_verify
    from melsurgery.params import DetectParams

    folder, _ = planted_family("lfm2")
    r = run_verify(folder, folder, max_tokens=64, max_windows=1, generations=0, params=DetectParams(ratio=100.0))
    kinds = expected_kinds("lfm2")
    assert r.me_layer == PLANT.layer
    assert [s is None for s in r.sink_base] == [k != "attention" for k in kinds]
    assert r.kl_mean == 0 and r.max_abs_base[PLANT.layer] > 100
