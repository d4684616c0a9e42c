"""Per-layer wemask: selector thresholds, sink attribution, mean replacement and strength ramps."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

import melsurgery
from melsurgery.architectures import family_for
from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import CalibrationSpec, run_scan
from melsurgery.errors import UserError
from melsurgery.recipes import get_recipe
from melsurgery.report.text import scan_report
from tests.support import reference as ref
from tests.support.helpers import patch, run_cli
from tests.support.planted import make_tokenizer, save_model
from tests.support.planted_sink import PLANT, SINK_DIM, growth_model, sink_model

CALIB = CalibrationSpec(num_samples=8, max_tokens=96)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "1 + 2 = 3, and 2 * 3 = 6!", "def f(x): return x"]


@pytest.fixture(scope="module")
def growth(tmp_path_factory):
    folder = save_model(growth_model(), tmp_path_factory.mktemp("growth") / "m")
    return folder, run_scan(resolve(str(folder)), CALIB)


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    folder = save_model(sink_model(), tmp_path_factory.mktemp("sink") / "m")
    return folder, run_scan(resolve(str(folder)), CALIB)




def load_base(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def plan(scan, folder, params):
    cfg = json.loads((folder / "config.json").read_text())
    recipe = get_recipe("wemask")
    return recipe.plan(scan, family_for(cfg), cfg, recipe.resolve(params))


def left_padded(texts=TEXTS[:2]):
    tok = make_tokenizer()
    ids = [tok(t)["input_ids"] for t in texts]
    n = max(map(len, ids))
    batch = torch.tensor([[2] * (n - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids])
    return batch, mask, [n - len(i) for i in ids]


def forward(model, ids, mask, **kw):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kw)


@pytest.mark.slow
def test_per_layer_selector_fires_where_one_global_threshold_cannot(growth, tmp_path):
    folder, scan = growth
    sel = {s.layer: s for s in scan.selector_layers}
    me = scan.me_layer
    assert me == PLANT.layer and sorted(sel) == [me + 1, me + 2]
    assert sel[me + 2].massive_min > 8 * sel[me + 1].massive_min  # the massive value grows ~10x
    # one threshold over all layers lies above the massive value entering layer ME+1: it would never fire
    assert scan.selector_threshold > sel[me + 1].massive_min
    for s in sel.values():
        assert s.others_max < s.threshold <= s.massive_min and s.selected == s.massive_tokens
    result = patch(folder, tmp_path / "out", [("wemask", {})], scan)  # default: layer ME+1, magnitude selector
    (layer,) = result.plans[0].wemask.per_layer
    assert (layer.layer, layer.threshold) == (me + 1, sel[me + 1].threshold)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["melsurgery_wemask"]
    assert config["per_layer"][0]["threshold"] == sel[me + 1].threshold
    ids = torch.tensor([make_tokenizer()(t)["input_ids"][:12] for t in TEXTS])
    base = load_base(folder)
    handles = ref.for_plan(result.plans[0], base, scan)
    with torch.no_grad():
        expected = base(ids).logits
    ref.remove(handles)
    model, _ = melsurgery.load(tmp_path / "out")
    seen = []
    norm = model.model.layers[me + 1].input_layernorm
    spy = norm.register_forward_hook(lambda m, a, out: seen.append(out[..., layer.dims].detach()))
    with torch.no_grad():
        got = model(ids).logits
    spy.remove()
    assert (seen[0][:, 0] == 0).all() and (seen[0][:, 1:] != 0).all(), "the patch fires on BOS, and only there"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_plan_that_selects_no_token_is_refused_in_one_line(growth, tmp_path):
    folder, scan = growth
    me = scan.me_layer
    blind = replace(scan, selector_layers=tuple(replace(s, threshold=None) if s.layer == me + 2 else s
                                                for s in scan.selector_layers))
    partial = plan(blind, folder, {"layers": "after-me"})  # one layer left: patched, and the summary says so
    assert [m.layer for m in partial.wemask.per_layer] == [me + 1]
    assert f"layer {me + 2} left alone" in partial.summary
    with pytest.raises(UserError, match="would select no token on the calibration set"):
        plan(blind, folder, {"layers": str(me + 2)})
    path = tmp_path / "scan.json"
    blind.write(path)
    res = run_cli("patch", folder, "-o", tmp_path / "out", "--scan", path, "--recipe", "wemask", "--layers",
                  str(me + 2), "--quiet")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("melsurgery: error: wemask: the magnitude selector")
    assert "--selector first" in res.stderr and not (tmp_path / "out").exists()


def sink_of(model, ids, layers):
    """Mean attention that later queries pay to position 0 (the massive token) at `layers`."""
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    return sum(float(att[i][:, :, 1:, 0].mean()) for i in layers) / len(layers)


@pytest.mark.slow
def test_sink_attribution_finds_the_dims_that_drive_the_sink(sink, tmp_path):
    folder, scan = sink
    me = scan.me_layer
    magnitude_top = scan.top_dims[0].dim
    assert (me, scan.massive_dims, magnitude_top) == (PLANT.layer, (PLANT.dim,), PLANT.dim)
    for s in scan.sink_dims:
        assert s.dims[0].dim == SINK_DIM and s.dims[0].share > 0.9
        assert all(d.dim != PLANT.dim for d in s.dims[:3])  # the keys ignore the massive dim
    assert [s.layer for s in scan.sink_dims] == [me + 1, me + 2]
    assert len(scan.ordinary_mean[0].mean) == scan.model.hidden_size
    report = scan_report(scan, verbose=True)
    assert f"layer {me + 1}: {SINK_DIM} (" in report and "QK-norm" not in report
    assert "QK-norm" in scan_report(replace(scan, qk_norm=True))
    ids = torch.tensor([make_tokenizer()(t)["input_ids"][:12] for t in TEXTS])
    layers = [me + 1, me + 2]
    base = sink_of(load_base(folder), ids, layers)
    assert base > 0.5
    measured = {}
    for dims_by in ("magnitude", "sink"):
        patch(folder, tmp_path / dims_by, [("wemask", {"layers": "after-me", "top_k": 1, "dims_by": dims_by})], scan)
        measured[dims_by] = sink_of(melsurgery.load(tmp_path / dims_by, attn_implementation="eager")[0], ids, layers)
    assert measured["magnitude"] == pytest.approx(base, rel=0.02)  # masking the massive dim misses the sink
    assert measured["sink"] < 0.2 * base  # the attributed dim removes it


def test_strength_ramp_and_mean_values_come_from_the_scan(sink):
    folder, scan = sink
    me = scan.me_layer
    p = plan(scan, folder, {"layers": "after-me", "dims_by": "sink", "top_k": 2, "replace": "mean",
                            "strength": 0.9, "strength_end": 0.5})
    spec = p.wemask
    means = {m.layer: m.mean for m in scan.ordinary_mean}
    ranks = {s.layer: [d.dim for d in s.dims] for s in scan.sink_dims}
    assert [m.strength for m in spec.per_layer] == pytest.approx([0.9, 0.5])
    for m in spec.per_layer:
        assert m.dims == tuple(ranks[m.layer][:2]) and m.values == pytest.approx([means[m.layer][d] for d in m.dims])
    assert spec.replace == "mean" and [m.layer for m in spec.per_layer] == [me + 1, me + 2]
    with pytest.raises(UserError, match="--dims names the dims"):
        plan(scan, folder, {"dims_by": "sink", "dims": [3]})


@pytest.mark.parametrize("selector", ["magnitude", "first"])
@pytest.mark.slow
def test_per_layer_dims_and_mean_replacement_equal_a_hook_reference_with_cache_and_left_padding(
        sink, tmp_path, selector):
    folder, scan = sink
    params = {"layers": "after-me", "dims_by": "sink", "top_k": 3, "replace": "mean", "strength": 0.9,
              "strength_end": 0.6, "selector": selector}
    result = patch(folder, tmp_path / "out", [("wemask", params)], scan)
    spec = result.plans[0].wemask
    assert len({m.dims for m in spec.per_layer}) > 1, "per-layer dims must differ for this test to mean much"
    ids, mask, pads = left_padded()
    base = load_base(folder)
    per_layer = [(m.layer, m.dims, m.strength, m.threshold, m.values) for m in spec.per_layer]
    handles = ref.wemask(base, per_layer, selector, scan.massive_dims, first_positions=pads)
    expected = forward(base, ids, mask).logits
    ref.remove(handles)
    model, _ = melsurgery.load(tmp_path / "out")
    got = forward(model, ids, mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[real], forward(base, ids, mask).logits[real], atol=1e-3)
    # KV cache: each generated step's logits equal the logits of the whole sequence recomputed
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=2)
    seq = gen.sequences
    full_mask = torch.cat([mask, torch.ones(len(seq), seq.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    full = forward(model, seq, full_mask).logits
    for step, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)
