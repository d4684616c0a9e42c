"""Bad input through the console script: each class of bad input is refused through the real console script.

What a user must see: one `melsurgery: error:` line on stderr, the documented exit status (2; 4 for a
violated gate), no output written and the source untouched. Each class is run through the console
script; its other examples are checked through the library, which is what the script calls.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from melsurgery.architectures import family_for
from melsurgery.checkpoint.edits import Edit
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safetensors_file import read_header
from melsurgery.checkpoint.source import resolve
from melsurgery.checkpoint.validate import open_model
from melsurgery.errors import UserError
from melsurgery.params import DetectParams
from melsurgery.recipes import RecipePlan, WeMaskLayer, WeMaskSpec
from melsurgery.surgery.manifest import Manifest, read_yaml
from tests.support.helpers import assert_clean_failure, run_cli, snapshot

INDEX = "model.safetensors.index.json"
DOWN = "model.layers.3.mlp.down_proj.weight"  # the planted ME Layer's down projection
FAST_VERIFY = ("--windows", "1", "--max-tokens", "32", "--generations", "0", "--quiet")


def cli_all(*runs: tuple) -> list:
    """Several console-script runs side by side (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: run_cli(*args), runs))


def copy_model(sharded, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(sharded[0], tmp_path / name))


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][name]


def replace_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` (any shape or values) in place of `name`, in the shard that holds it."""
    path = shard_of(folder, name)
    state = load_file(path)
    state[name] = tensor
    save_file(state, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def patched(sharded, tmp_path_factory) -> Path:
    """A real melsurgery output (ffn-dampen of the shared planted model), for verify and push."""
    from melsurgery.detect.scan import read_json
    from melsurgery.surgery.patch import run_patch

    out = tmp_path_factory.mktemp("patched") / "out"
    run_patch(resolve(str(sharded[0])), out, Manifest(model=str(sharded[0]), recipes=[("ffn-dampen", {})]),
              scan=read_json(sharded[1]))
    return out


# --- 1. configs that disagree with their weights -------------------------------------------------------

CONFIGS = {
    "hidden-size": (lambda f: edit_config(f, hidden_size=32), "model.embed_tokens.weight has shape [99, 64]"),
    "head-count": (lambda f: edit_config(f, num_attention_heads=8), "o_proj.weight has shape [64, 64]"),
    "kv-heads": (lambda f: edit_config(f, num_key_value_heads=4), "k_proj.weight has shape [32, 64]"),
    "heads-do-not-divide": (lambda f: edit_config(f, num_attention_heads=5), "not a multiple"),
    "layers-a-string": (lambda f: edit_config(f, num_hidden_layers="six"),
                        "num_hidden_layers must be a positive integer, got 'six'"),
    "layers-too-many": (lambda f: edit_config(f, num_hidden_layers=7), "num_hidden_layers is 7, but the weights hold"),
    "hidden-size-zero": (lambda f: edit_config(f, hidden_size=0), "hidden_size must be a positive integer"),
    "eps-not-a-number": (lambda f: edit_config(f, rms_norm_eps="tiny"), "rms_norm_eps must be"),
    "norm-of-shape-0": (lambda f: replace_tensor(f, "model.layers.2.input_layernorm.weight", torch.ones(0)),
                        "input_layernorm.weight has shape [0]"),
    "norm-of-shape-scalar": (lambda f: replace_tensor(f, "model.layers.2.input_layernorm.weight", torch.tensor(1.0)),
                             "input_layernorm.weight has shape []"),
    "zero-and-huge-dims": (lambda f: replace_tensor(f, "model.layers.1.mlp.up_proj.weight", torch.empty(0, 2**40)),
                           "up_proj.weight has shape [0, 1099511627776]"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_config_is_checked_against_the_weights(sharded, tmp_path, case):
    mutate, needle = CONFIGS[case]
    folder = copy_model(sharded, tmp_path)
    mutate(folder)
    with pytest.raises(UserError) as err:
        open_model(folder)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_config_errors_through_every_model_command(sharded, tmp_path):
    """scan, patch and verify (as BASE and as PATCHED) refuse before any work, and change nothing."""
    folders = {}
    for case in ("hidden-size", "layers-a-string", "norm-of-shape-0"):
        folders[case] = copy_model(sharded, tmp_path, case)
        CONFIGS[case][0](folders[case])
    before = {case: snapshot(f) for case, f in folders.items()}
    out = tmp_path / "out"
    runs = cli_all(("scan", folders["hidden-size"], "--quiet"),
                   ("patch", folders["layers-a-string"], "-o", out, "--recipe", "wemask", "--quiet"),
                   ("verify", sharded[0], folders["norm-of-shape-0"], *FAST_VERIFY),
                   ("verify", folders["hidden-size"], sharded[0], *FAST_VERIFY))
    for res, case in zip(runs, ("hidden-size", "layers-a-string", "norm-of-shape-0", "hidden-size")):
        assert_clean_failure(res, CONFIGS[case][1], out=out, code=2)
    assert {case: snapshot(f) for case, f in folders.items()} == before


# --- 1. calibration files, options, manifests, scan JSON ---------------------------------------------------

BAD_MESSAGES = ['"hi"', "[]", '[{"role": 1, "content": "x"}]', '[["user", "x"]]', '[{"role": "user"}]',
                '[{"role": "user", "content": null}]']


@pytest.mark.parametrize("messages", BAD_MESSAGES)
def test_calibration_messages_must_be_role_content_objects(tmp_path, messages):
    from melsurgery.calibrate.samples import read_records

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"messages": ' + messages + "}\n")
    with pytest.raises(UserError, match=r"line 2\b.*'messages'"):
        read_records(path)


OPTIONS = [
    (("scan", "{m}", "--device", "foo"), "--device 'foo': use cpu, cuda, cuda:N, mps or auto"),
    (("scan", "{m}", "--persist-fraction", "nan"), "--persist-fraction 'nan': must be a finite number"),
    (("scan", "{m}", "--abs-threshold", "-1"), "--abs-threshold '-1': must lie in [0, inf]"),
    (("scan", "{m}", "--ratio", "inf"), "--ratio 'inf': must be a finite number"),
    (("scan", "{m}", "--max-tokens", "abc"), "--max-tokens 'abc': expected an integer"),
    (("patch", "{m}", "-o", "{out}", "--recipe", "ffn-dampen", "--dampen", "nan"), "--dampen 'nan': must be a finite"),
    (("patch", "{m}", "-o", "{out}", "--recipe", "wemask", "--top-k", "0"), "--top-k '0': must lie in [1, inf]"),
    (("patch", "{m}", "-o", "{out}", "--recipe", "wemask", "--dims", "-1"), "-1 is negative"),
    (("patch", "{m}", "-o", "{out}", "--recipe", "wemask", "--layers", "5-3"), "the range 5-3 is empty"),
    (("patch", "{m}", "-o", "{out}", "--recipe", "wemask", "--dims", "64"), "--dims 64 is out of range: the model's "
                                                                            "hidden size is 64"),
    (("patch", "{m}", "-o", "{out}", "--recipe", "wemask", "--layers", "2,9"), "layers must lie in 0-5 (got [9])"),
    (("patch", "{m}", "-o", "{out}", "--recipe", "ffn-dampen", "--neurons", "9999", "--scan", "{scan}"),
     "index 9999 is out of range for model.layers.3.mlp.down_proj.weight"),
    (("verify", "{m}", "{m}", "--max-kl", "nan"), "--max-kl nan: must be a finite number"),
    (("scan", "{m}", "--bogus"), "No such option '--bogus'"),
]


@pytest.mark.slow
def test_bad_options_are_one_line_errors_before_any_work(sharded, tmp_path):
    """Non-finite or out-of-range numbers, unknown devices, dims and layers the model does not have (these
    are refused before any calibration: no --scan is given for them)."""
    out = tmp_path / "out"
    fill = {"m": str(sharded[0]), "out": str(out), "scan": str(sharded[1])}
    runs = cli_all(*[tuple(a.format(**fill) for a in args) for args, _ in OPTIONS])
    for res, (_, needle) in zip(runs, OPTIONS):
        assert_clean_failure(res, needle, out=out, code=2)


def bomb(levels: int = 9) -> str:
    """A billion-laughs YAML: 9 levels of 9 aliases each expand to 9^9 (387 million) strings."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\nrecipes: [wemask]\n"


MANIFESTS = {
    "calibration-a-string": ("recipes: [wemask]\ncalibration: lots\n", "calibration must be a mapping"),
    "params-a-string": ("recipes: [{name: wemask, params: strong}]\n", "wemask: params must be a mapping"),
    "max-tokens-quoted": ('recipes: [wemask]\ncalibration: {max_tokens: "32"}\n',
                          "max_tokens '32': expected an integer, got a string"),
    "threshold-nan": ("recipes: [wemask]\ndetection: {persist_fraction: .nan}\n",
                      "persist_fraction nan: must be a finite number"),
    "unknown-field": ("recipes: [wemask]\nmodle: default\n", "unknown field 'modle'"),
    "unknown-recipe": ("recipes: [wemask, nope]\n", "unknown recipe 'nope'"),
    "unknown-param": ("recipes: [{name: wemask, params: {strenght: 1}}]\n", "unknown parameter 'strenght'"),
    "recipe-not-a-name": ("recipes: [[wemask]]\n", "recipes[0] must be a recipe name"),
    "model-a-number": ("model: 3\nrecipes: [wemask]\n", "model must be a folder"),
    "revision-a-list": ("revision: [a]\nrecipes: [wemask]\n", "revision must be a string"),
    "billion-laughs": (bomb(), "expands to more than 100,000 values"),
    "recursive-alias": ("a: &a [*a]\nrecipes: [wemask]\n", "recursive YAML alias"),
    "deep-nesting": ("recipes: " + "[" * 5000 + "]" * 5000 + "\n", "cannot read manifest"),
    # a key given twice: the last one silently won (a manifest that says factor 0.5 and patches with 0.9)
    "twice-top-level": ("recipes: [wemask]\nrecipes: [ffn-dampen]\n", "gives the key 'recipes' twice (line 2)"),
    "twice-params": ("recipes: [{name: ffn-dampen, params: {factor: 0.5, factor: 0.9}}]\n",
                     "gives the key 'factor' twice"),
    "twice-calibration": ("recipes: [wemask]\ncalibration: {seed: 1, seed: 2}\n", "gives the key 'seed' twice"),
}
CLI_MANIFESTS = ("calibration-a-string", "params-a-string", "max-tokens-quoted", "billion-laughs")


@pytest.mark.parametrize("case", sorted(MANIFESTS))
@pytest.mark.slow
def test_manifest_fields_are_typed(tmp_path, case):
    from melsurgery.surgery.manifest import load_manifest

    text, needle = MANIFESTS[case]
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_manifest(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_bad_manifests_are_refused_before_the_model_is_opened(tmp_path):
    """The manifests name a model that does not exist: the field's error comes first, so nothing was opened."""
    runs = []
    for case in CLI_MANIFESTS:
        text, _ = MANIFESTS[case]
        path = tmp_path / f"{case}.yaml"
        path.write_text(f"model: {tmp_path / 'no-such-model'}\n" + text)
        runs.append(("patch", "--manifest", path, "-o", tmp_path / "out", "--quiet"))
    for res, case in zip(cli_all(*runs), CLI_MANIFESTS):
        assert_clean_failure(res, MANIFESTS[case][1], out=tmp_path / "out", code=2)


def test_manifest_size_is_limited(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("recipes: [wemask]\n" + "# padding\n" * 200_000)
    with pytest.raises(UserError, match="a manifest may be at most"):
        read_yaml(path)


SCAN_DAMAGE = {
    "me-layer-a-word": (lambda d: d.update(me_layer="eleven"), "me_layer must be null or a layer index 0-5"),
    "me-layer-too-deep": (lambda d: d.update(me_layer=6), "me_layer must be null or a layer index 0-5"),
    "no-model": (lambda d: d.pop("model"), "model must be an object"),
    "layers-a-string": (lambda d: d["model"].update(num_layers="6"), "model.num_layers must be a positive integer"),
    "dims-missing": (lambda d: d.pop("massive_dims"), "massive_dims must be non-empty"),
    "dims-out-of-range": (lambda d: d.update(massive_dims=[64]), "massive_dims must be a list of dims 0-63"),
    "top-dims-wrong": (lambda d: d.update(top_dims=[{"dim": 17}]), "top_dims[0].mean_abs must be a finite number"),
    "threshold-a-string": (lambda d: d.update(selector_threshold="high"), "selector_threshold must be null or a"),
    "neuron-negative": (lambda d: d["ffn_neurons"][0].update(neuron=-1), "ffn_neurons[0].neuron must be an index"),
    "norm-mean-nan": (lambda d: d["norm"].update(ffn_norm_weight_mean=float("nan")), "norm.ffn_norm_weight_mean"),
    "not-an-object": (lambda d: d.clear(), "not a melsurgery scan result"),
    "layer-value-a-word": (lambda d: d["layers"][2]["top"][0].update(value="big"),
                           "layers[2].top[0].value must be a finite number, got 'big'"),
    "sink-dims-not-a-list": (lambda d: d["sink_dims"][0].update(dims={}), "sink_dims[0].dims must be a list"),
}
CLI_SCANS = ("me-layer-a-word", "no-model")


def damaged_scan(sharded, tmp_path: Path, case: str) -> Path:
    data = json.loads(sharded[1].read_text())
    SCAN_DAMAGE[case][0](data)
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case", sorted(SCAN_DAMAGE))
def test_scan_json_is_read_with_a_typed_schema(sharded, tmp_path, case):
    from melsurgery.detect.scan import read_json

    with pytest.raises(UserError) as err:
        read_json(damaged_scan(sharded, tmp_path, case))
    assert SCAN_DAMAGE[case][1] in str(err.value)


@pytest.mark.slow
def test_bad_scan_json_through_patch(sharded, tmp_path):
    out = tmp_path / "out"
    runs = cli_all(*[("patch", sharded[0], "-o", out, "--scan", damaged_scan(sharded, tmp_path, case), "--recipe",
                      "wemask", "--quiet") for case in CLI_SCANS])
    for res, case in zip(runs, CLI_SCANS):
        assert_clean_failure(res, SCAN_DAMAGE[case][1], out=out, code=2)


def test_a_scan_of_another_model_is_refused(sharded, tmp_path):
    from melsurgery.detect.scan import read_json
    from melsurgery.surgery.patch import run_patch

    scan = read_json(sharded[1])
    scan = replace(scan, model=replace(scan.model, hidden_size=128))
    with pytest.raises(UserError, match="128 hidden size, this one has 64"):
        run_patch(resolve(str(sharded[0])), tmp_path / "out", Manifest(recipes=[("wemask", {})]), scan=scan)
    assert not (tmp_path / "out").exists()


# --- 1, 9. verify's folders go through the same source check ---------------------------------------------


def pickled_folder(sharded, tmp_path: Path) -> tuple[Path, Path]:
    """A folder with only a pickle whose unpickling would create a marker file; and that marker."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sharded[0] / name, folder / name)
    marker = tmp_path / "UNPICKLED"

    class Planter:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Planter()))
    return folder, marker


def truncated_folder(sharded, tmp_path: Path) -> Path:
    folder = copy_model(sharded, tmp_path, "truncated")
    shard = shard_of(folder, DOWN)
    shard.write_bytes(shard.read_bytes()[:-100])
    return folder


@pytest.mark.slow
def test_every_command_refuses_pickles_and_corrupt_weights(sharded, patched, tmp_path):
    """verify (either side), diff (either side) and push never unpickle, and refuse truncated shards in one
    line (scan and patch: tests/test_robustness.py)."""
    pickled, marker = pickled_folder(sharded, tmp_path)
    truncated = truncated_folder(sharded, tmp_path)
    (tmp_path / "empty").mkdir()
    no_tokenizer = copy_model(sharded, tmp_path, "no-tokenizer")
    for p in no_tokenizer.glob("tokenizer*"):
        p.unlink()
    push_pickle = Path(shutil.copytree(patched, tmp_path / "push-pickle"))
    (push_pickle / "pytorch_model.bin").write_bytes((pickled / "pytorch_model.bin").read_bytes())
    relist(push_pickle)
    push_truncated = Path(shutil.copytree(patched, tmp_path / "push-truncated"))
    shard = shard_of(push_truncated, DOWN)
    shard.write_bytes(shard.read_bytes()[:-100])
    relist(push_truncated)
    m = sharded[0]
    cases = [
        (("verify", m, pickled, *FAST_VERIFY), "only pickled weights"),
        (("verify", pickled, m, *FAST_VERIFY), "only pickled weights"),
        (("verify", m, truncated, *FAST_VERIFY), "truncated"),
        (("verify", m, tmp_path / "empty", *FAST_VERIFY), "no config.json"),
        (("verify", m, no_tokenizer, *FAST_VERIFY), "cannot load the tokenizer"),
        (("diff", pickled, m), "only pickled weights"),
        (("diff", m, truncated), "truncated"),
        (("push", push_pickle, "me/model", "--dry-run"), "pickled weights are never pushed"),
        (("push", push_truncated, "me/model", "--dry-run"), "truncated"),
    ]
    for res, (_, needle) in zip(cli_all(*[args for args, _ in cases]), cases):
        assert_clean_failure(res, needle, code=2)
    assert not marker.exists()


def relist(folder: Path) -> None:
    """Rewrite provenance.json's output hashes for the folder's current files (as a tamperer would)."""
    from melsurgery.checkpoint.hashing import sha256_file

    prov = json.loads((folder / "provenance.json").read_text())
    prov["outputs"] = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
                       if p.is_file() and p.name != "provenance.json"}
    (folder / "provenance.json").write_text(json.dumps(prov))


# --- 2. non-finite values -------------------------------------------------------------------------------


def nan_folder(sharded, tmp_path: Path) -> Path:
    folder = copy_model(sharded, tmp_path, "nan")
    w = load_file(shard_of(folder, DOWN))[DOWN]
    w[17, 41], w[0, 41], w[5, 0] = float("nan"), float("inf"), float("-inf")
    replace_tensor(folder, DOWN, w)
    return folder


@pytest.mark.slow
def test_non_finite_weights_are_reported_as_such(sharded, tmp_path):
    """scan names the tensor and counts (not 'no massive activations'); patch never writes an edit that
    leaves NaN behind (it checks the written checkpoint before committing it)."""
    folder = nan_folder(sharded, tmp_path)
    before = snapshot(folder)
    out, js = tmp_path / "out", tmp_path / "scan.json"
    scan, patch = cli_all(("scan", folder, "--quiet", "--json", js),
                          ("patch", folder, "-o", out, "--scan", sharded[1], "--recipe", "ffn-dampen", "--quiet"))
    assert_clean_failure(scan, f"tensor {DOWN} has 1 NaN and 2 infinite entries (of 8192)", code=2)
    assert not js.exists()
    assert_clean_failure(patch, f"{DOWN}: the edit leaves 3 non-finite entries", "the source tensor holds 3", out=out,
                         code=2)
    assert snapshot(folder) == before


def strict_json(text: str) -> object:
    """JSON as every other parser reads it: bare NaN / Infinity are errors."""
    def refuse(name):
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


def test_json_outputs_are_always_valid_json(sharded, tmp_path):
    from melsurgery.detect.scan import read_json, write_json
    from melsurgery.surgery.patch import write_provenance

    write_json({"ratio": float("inf"), "layers": [{"max_abs": float("nan")}]}, tmp_path / "s.json")
    assert strict_json((tmp_path / "s.json").read_text()) == {"ratio": None, "layers": [{"max_abs": None}]}
    (tmp_path / "out").mkdir()
    write_provenance(tmp_path / "out", resolve(str(sharded[0])), Manifest(), read_json(sharded[1]), [], [], {},
                     measurements={"kl_mean": float("nan"), "ppl_patched": float("inf")})
    prov = strict_json((tmp_path / "out" / "provenance.json").read_text())
    assert prov["measurements"] == {"kl_mean": None, "ppl_patched": None}


@pytest.mark.slow
def test_push_refuses_non_finite_weights_and_invalid_json(patched, tmp_path):
    from melsurgery.hub.push import validate_for_push

    nan = Path(shutil.copytree(patched, tmp_path / "nan"))
    replace_tensor(nan, DOWN, torch.full((64, 128), float("nan")))
    relist(nan)
    bare = Path(shutil.copytree(patched, tmp_path / "bare-nan"))
    prov = (bare / "provenance.json").read_text()
    (bare / "provenance.json").write_text(prov.replace('"measurements": {}', '"measurements": {"kl": NaN}'))
    assert "NaN" in (bare / "provenance.json").read_text()
    with pytest.raises(UserError, match="NaN is not JSON"):
        validate_for_push(bare)
    res = run_cli("push", nan, "me/model", "--dry-run")
    assert_clean_failure(res, f"tensor {DOWN} has 8192 NaN and 0 infinite entries", code=2)


# --- 3. gates a broken model cannot pass ------------------------------------------------------------------


@pytest.mark.slow
def test_gates_fail_on_non_finite_figures(sharded, tmp_path):
    """A model whose weights are finite but overflow (logits of +-inf): KL and perplexity are NaN, so every
    gate that compares them fails with exit 4, and the JSON says null, never a bare NaN."""
    broken = copy_model(sharded, tmp_path, "overflow")
    replace_tensor(broken, "lm_head.weight", load_file(shard_of(broken, "lm_head.weight"))["lm_head.weight"] * 3e38)
    js = tmp_path / "v.json"
    res = run_cli("verify", sharded[0], broken, *FAST_VERIFY, "--json", js, "--max-kl", "100",
                  "--max-ppl-increase", "1000")
    assert_clean_failure(res, "gate violated", "KL is nan (not a finite number), so --max-kl 100 cannot hold",
                         "perplexity is nan", code=4)
    data = strict_json(js.read_text())
    assert data["kl_mean"] is None and data["ppl_patched"] is None


# --- 4. parameters that would write a broken or empty patch -------------------------------------------------


def test_plans_that_edit_nothing_or_out_of_range_are_refused(sharded):
    from melsurgery.surgery.patch import check_plans

    ckpt = Checkpoint(sharded[0])
    norm = "model.layers.4.input_layernorm.weight"
    family = family_for(ckpt.config)
    spec = WeMaskSpec.for_family(family, (WeMaskLayer(4, (17,), 1.0, threshold=10.0),), selector_dims=(17,))

    def mask(layer: WeMaskLayer) -> WeMaskSpec:
        return WeMaskSpec.for_family(family, (layer,))

    cases = [
        (RecipePlan("norm-rescale", {}, "", [Edit(norm, 0.5, index=())]), "selects nothing to edit"),
        (RecipePlan("norm-rescale", {}, "", [Edit(norm, 0.5, index=(64,))]), "index 64 is out of range"),
        (RecipePlan("norm-rescale", {}, "", [Edit(norm, math.nan, index=(1,))]), "non-finite factor"),
        (RecipePlan("ffn-dampen", {}, "", [Edit(DOWN, 0.5, axis=2, index=(1,))]), "has no axis 2"),
        (RecipePlan("wemask", {}, "", wemask=mask(WeMaskLayer(4, (), 1.0, threshold=1.0))), "masks no dims"),
        (RecipePlan("wemask", {}, "", wemask=mask(WeMaskLayer(6, (17,), 1.0, threshold=1.0))), "layer 6"),
        (RecipePlan("wemask", {}, "", wemask=mask(WeMaskLayer(4, (70,), 1.0, threshold=1.0))), "dim 70"),
        (RecipePlan("wemask", {}, "", wemask=mask(WeMaskLayer(4, (1,), 1.0, threshold=math.inf))),
         "threshold of layer 4 is not a finite number"),
    ]
    check_plans([RecipePlan("wemask", {}, "", wemask=spec)], ckpt)  # a sound plan passes
    for plan, needle in cases:
        with pytest.raises(UserError, match=needle):
            check_plans([plan], ckpt)


# --- 5. paths -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_output_paths_that_would_touch_the_source_or_cannot_exist(sharded, tmp_path):
    src = copy_model(sharded, tmp_path, "src")
    before = snapshot(src)
    (tmp_path / "afile.txt").write_text("x")
    inside, under_file = src / "patched", tmp_path / "afile.txt" / "out"
    runs = cli_all(("patch", src, "-o", inside, "--scan", sharded[1], "--recipe", "wemask", "--quiet"),
                   ("patch", src, "-o", under_file, "--scan", sharded[1], "--recipe", "wemask", "--quiet"))
    assert_clean_failure(runs[0], "is inside the source model folder", code=2)
    assert_clean_failure(runs[1], "afile.txt' is a file, not a folder", code=2)
    assert snapshot(src) == before and not inside.exists()


@pytest.mark.slow
def test_special_files_are_refused_without_being_opened(sharded, tmp_path):
    """A FIFO would block any reader forever: a FIFO shard or tokenizer is refused at once (no timeout hit)."""
    fifo_shard = copy_model(sharded, tmp_path, "fifo-shard")
    shard = shard_of(fifo_shard, DOWN)
    shard.unlink()
    os.mkfifo(shard)
    fifo_tok = copy_model(sharded, tmp_path, "fifo-tokenizer")
    (fifo_tok / "tokenizer.json").unlink()
    os.mkfifo(fifo_tok / "tokenizer.json")
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda f: run_cli("scan", f, "--quiet", timeout=300), (fifo_shard, fifo_tok)))
    assert_clean_failure(runs[0], f"{shard.name}: not a regular file (a FIFO)", code=2)
    assert_clean_failure(runs[1], "tokenizer.json: not a regular file (a FIFO)", code=2)
    with pytest.raises(UserError, match="a character device"):
        read_header(Path("/dev/zero"))


SHAPES = [[0, 2**40], [2**40, 2**40, 0], [0, 2**63], [0, 2**63 - 1], [2**62, 0], [0, 2**64 - 1], [3, 0, 2**70],
          [2**32, 2**32, 0], [2**31, 2**31, 0], [2**61, 0]]


@pytest.mark.parametrize("dtype", ["F32", "F64", "U8"])
def test_reader_refuses_exactly_the_shapes_safetensors_refuses(tmp_path, dtype):
    """Zero-size tensors with huge dims: we accept a header iff the safetensors library loads it."""
    path = tmp_path / "t.safetensors"
    for shape in SHAPES:
        blob = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}).encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob)
        try:
            with safe_open(str(path), "pt") as f:
                f.get_tensor("t")
            theirs = True
        except Exception:  # noqa: BLE001 - whatever the library raises means "refused"
            theirs = False
        try:
            read_header(path)
            ours = True
        except UserError:
            ours = False
        assert ours == theirs, (shape, dtype, theirs)


# --- 7. late validation: nothing is calibrated before every parameter is known good ----------------------------


@pytest.mark.parametrize("manifest,needle", [
    (Manifest(recipes=[("wemask", {"strength": 2})]), "must lie in [0, 1]"),
    (Manifest(recipes=[("nope", {})]), "unknown recipe 'nope'"),
    (Manifest(recipes=[("wemask", {"dims": [64]})]), "--dims 64 is out of range"),
    (Manifest(recipes=[("norm-rescale", {"layers": "4,6"})]), "layers must lie in 0-5"),
    (Manifest(recipes=[("wemask", {})], detection=DetectParams(persist_fraction=math.nan)), "persist_fraction"),
    (Manifest(recipes=[("wemask", {})], detection=DetectParams(ratio=-1.0)), "ratio"),
], ids=["param", "recipe", "dims", "layers", "detection-nan", "detection-negative"])
def test_python_api_validates_before_calibrating(sharded, tmp_path, monkeypatch, manifest, needle):
    import melsurgery.surgery.patch as patch_module

    def no_scan(*args, **kwargs):
        raise AssertionError("calibration started before the parameters were checked")

    monkeypatch.setattr(patch_module, "run_scan", no_scan)
    with pytest.raises(UserError) as err:
        patch_module.run_patch(resolve(str(sharded[0])), tmp_path / "out", manifest)
    assert needle in str(err.value)
    assert not (tmp_path / "out").exists()
