import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import melsurgery
from melsurgery.checkpoint.provenance import Provenance
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.errors import UserError
from melsurgery.hub.card import front_matter
from melsurgery.surgery.manifest import load_manifest
from tests.support import reference as ref
from tests.support.helpers import patch, run_cli
from tests.support.planted import Plant, build_model, llama_config, make_tokenizer, planted_folder, save_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "1 + 2 = 3, and 2 * 3 = 6!", "def f(x): return x"]




def batch(tokenizer=None, texts=TEXTS):
    tok = tokenizer or make_tokenizer()
    ids = [tok(t)["input_ids"] for t in texts]
    n = min(map(len, ids))
    return torch.tensor([i[:n] for i in ids])


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def load_base(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def tensor_bytes_equal(a, b, name):
    from melsurgery.checkpoint.safetensors_file import read_bytes

    return read_bytes(a.info(name)) == read_bytes(b.info(name))


# The documented defaults (docs/recipes.md), which the reference applies when a test gives no value.
DEFAULTS = {"norm-rescale": {"factor": 0.5}, "ffn-dampen": {"factor": 0.2}, "me-norm": {"factor": 0.5},
            "wemask": {"strength": 1.0}}
PLANT = Plant()


def planted_truth(scan) -> ref.Truth:
    """The planted model's ground truth; the scan is trusted only for the ranking of the incidental dims after
    the planted one (tests/detect/test_scan.py checks the scan itself)."""
    dims = tuple(d.dim for d in scan.top_dims)
    assert dims[0] == PLANT.dim
    return ref.Truth(PLANT.layer, dims, (PLANT.neuron,), llama_config().num_hidden_layers)


def reference_for(recipe, params, plan, model, truth):
    """Hooks aimed by the ground truth, after checking that the plan under test aims at the same targets."""
    want = ref.targets(recipe, params, truth)
    assert {k: plan.params[k] for k in want} == want, (plan.params, want)
    return ref.for_truth(recipe, params, model, truth, DEFAULTS[recipe])


RECIPES = [
    ("norm-rescale", {}),
    ("norm-rescale", {"factor": 0.0, "layers": "after-me", "top_k": 2}),
    ("ffn-dampen", {}),
    ("ffn-dampen", {"factor": 0.0}),
    ("me-norm", {}),
    ("me-norm", {"factor": 0.2, "dims": [5, 17]}),
    ("wemask", {}),
    ("wemask", {"layers": "after-me", "strength": 0.7}),
    ("wemask", {"selector": "first", "top_k": 1}),
]


@pytest.mark.parametrize("recipe,params", RECIPES)
@pytest.mark.slow
def test_patched_checkpoint_matches_hook_reference(planted, planted_scan, tmp_path, recipe, params):
    result = patch(planted, tmp_path / "out", [(recipe, params)], scan=planted_scan)
    (plan,) = result.plans
    ids = batch()
    base = load_base(planted)
    base_logits = logits(base, ids)
    handles = reference_for(recipe, params, plan, base, planted_truth(planted_scan))
    expected = logits(base, ids)
    ref.remove(handles)
    assert not torch.allclose(expected, base_logits, atol=1e-4), "the intervention must change something"
    if recipe == "wemask":
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
        torch.testing.assert_close(logits(remote, ids), expected, rtol=1e-5, atol=1e-5)
        model, _ = melsurgery.load(tmp_path / "out")
        assert "melsurgery_wemask" in json.loads((tmp_path / "out" / "config.json").read_text())
    else:
        model = load_base(tmp_path / "out")
        assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    # every tensor except the edited ones is byte-identical
    src, out = Checkpoint(planted), Checkpoint(tmp_path / "out")
    edited = {a.tensor for a in result.applied}
    assert set(src.names()) == set(out.names())
    for name in src.names():
        assert tensor_bytes_equal(src, out, name) == (name not in edited), name


@pytest.mark.slow
def test_recipes_compose(planted, planted_scan, tmp_path):
    recipes = [("ffn-dampen", {"factor": 0.5}), ("norm-rescale", {"factor": 0.5}), ("wemask", {"top_k": 1})]
    result = patch(planted, tmp_path / "out", recipes, scan=planted_scan)
    base, ids = load_base(planted), batch()
    truth = planted_truth(planted_scan)
    handles = [h for (recipe, params), plan in zip(recipes, result.plans)
               for h in reference_for(recipe, params, plan, base, truth)]
    expected = logits(base, ids)
    ref.remove(handles)
    model, _ = melsurgery.load(tmp_path / "out")
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe,params", [("norm-rescale", {"factor": 1.0}), ("ffn-dampen", {"factor": 1.0}),
                                           ("me-norm", {"factor": 1.0}), ("wemask", {"strength": 0.0})])
@pytest.mark.slow
def test_neutral_strength_reproduces_the_original_exactly(planted, planted_scan, tmp_path, recipe, params):
    patch(planted, tmp_path / "out", [(recipe, params)], scan=planted_scan)
    src, out = Checkpoint(planted), Checkpoint(tmp_path / "out")
    assert all(tensor_bytes_equal(src, out, n) for n in src.names())
    model, _ = melsurgery.load(tmp_path / "out")
    ids = batch()
    assert torch.equal(logits(model, ids), logits(melsurgery.load(planted)[0], ids))


# Largest |logit error| against the reference, per dtype: rounding of edited weights (patched) versus of
# scaled activations (reference), in a model whose logits are of order 1-10.
DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE), ids=str)
@pytest.mark.slow
def test_dtypes_are_preserved_and_values_match_the_reference(planted_scan, tmp_path, dtype):
    src = planted_folder(tmp_path / "src", dtype=dtype, shards=2)
    recipes = [("ffn-dampen", {}), ("wemask", {})]
    result = patch(src, tmp_path / "out", recipes, scan=planted_scan)  # the fp32 scan names the same targets
    a, b = Checkpoint(src), Checkpoint(tmp_path / "out")
    for name in a.names():
        assert a.info(name).dtype == b.info(name).dtype and a.info(name).shape == b.info(name).shape
    base = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="eager").eval()
    ids = batch()
    before = logits(base, ids)
    truth = planted_truth(planted_scan)
    handles = [h for (recipe, params), plan in zip(recipes, result.plans)
               for h in reference_for(recipe, params, plan, base, truth)]
    expected = logits(base, ids)
    ref.remove(handles)
    model, _ = melsurgery.load(tmp_path / "out", dtype=dtype)
    assert next(model.parameters()).dtype == dtype
    got = logits(model, ids)
    error, effect = float((got - expected).abs().max()), float((expected - before).abs().max())
    assert error <= DTYPE_TOLERANCE[dtype] and effect > 10 * DTYPE_TOLERANCE[dtype], (error, effect)


@pytest.mark.parametrize("selector", ["magnitude", "first"])
@pytest.mark.slow
def test_wemask_kv_cache_scores_equal_full_recomputation(planted, planted_scan, tmp_path, selector):
    """Each generation step's logits (KV cache, custom layer) equal the logits of the whole sequence recomputed,
    for one sequence and for a left-padded batch: a custom layer that masked generated tokens would differ."""
    patch(planted, tmp_path / "out", [("wemask", {"selector": selector, "layers": "after-me"})], scan=planted_scan)
    model, tok = melsurgery.load(tmp_path / "out")
    a, b = tok("ab cd")["input_ids"], tok("ab cd ef gh")["input_ids"]
    pad = len(b) - len(a)
    single = (torch.tensor([b]), torch.ones(1, len(b), dtype=torch.long))
    padded = (torch.tensor([[2] * pad + a, b]), torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)]))
    for ids, mask in (single, padded):
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=2,
                             output_logits=True, return_dict_in_generate=True)
        seq = gen.sequences
        for step, step_logits in enumerate(gen.logits):
            n = ids.shape[1] + step
            m = torch.cat([mask, torch.ones(len(seq), step, dtype=torch.long)], dim=1)
            full = logits(model, seq[:, :n], attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
            torch.testing.assert_close(step_logits.float(), full[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_first_selector_masks_only_the_real_first_token(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("wemask", {"selector": "first", "layers": "after-me"})], scan=planted_scan)
    model, tok = melsurgery.load(tmp_path / "out")
    spec = model.config.melsurgery_wemask
    dims = spec["per_layer"][0]["dims"]
    seen = {}

    def spy(i):
        def hook(module, args, out):
            seen[i] = (args[0].detach(), out.detach())
        return hook

    handles = [model.model.layers[i].input_layernorm.register_forward_hook(spy(i)) for i in spec["layers"]]
    # left padding: row 0 padded by 3, row 1 not
    a, b = tok("ab cd ef")["input_ids"], tok("ab cd ef gh i")["input_ids"]
    pad = len(b) - len(a)
    ids = torch.tensor([[2] * pad + a, b])
    mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for i in spec["layers"]:
        h, out = seen[i]
        zero = out[..., dims].abs().amax(-1) == 0
        assert zero[0].nonzero().flatten().tolist() == [pad]
        assert zero[1].nonzero().flatten().tolist() == [0]
    # during cached decoding, new tokens are never masked
    seen.clear()
    with torch.no_grad():
        o = model(ids[1:], attention_mask=mask[1:], use_cache=True)
        model(torch.tensor([[5]]), attention_mask=torch.ones(1, len(b) + 1, dtype=torch.long),
              cache=o.past_key_values, use_cache=True)
    for i in spec["layers"]:
        h, out = seen[i]
        assert out.shape[1] == 1 and out[0, 0, dims].abs().min() > 0
    ref.remove(handles)


@pytest.mark.slow
def test_batched_left_padding_matches_single_sequences(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("wemask", {"layers": "after-me"})], scan=planted_scan)
    model, tok = melsurgery.load(tmp_path / "out")
    a, b = tok("hello there")["input_ids"], tok("hello there, general")["input_ids"]
    pad = len(b) - len(a)
    ids = torch.tensor([[2] * pad + a, b])
    mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = logits(model, ids, attention_mask=mask, position_ids=pos)
    single = logits(model, torch.tensor([a]))
    torch.testing.assert_close(batched[0, pad:], single[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def _without_mtimes(record: dict) -> dict:
    """provenance.json without the output files' modification times (they differ between two runs)."""
    for derived in record.get("derived", {}).values():
        derived.pop("mtime_ns", None)
    return record


def test_manifest_reproduces_the_same_bytes(planted, tmp_path):
    man = tmp_path / "m.yaml"
    man.write_text(f"model: {planted}\ncalibration: {{num_samples: 6, max_tokens: 32}}\n"
                   "recipes:\n  - name: wemask\n    params: {top_k: 2}\n  - name: ffn-dampen\n")
    for out in ("a", "b"):
        res = run_cli("patch", "--manifest", man, "-o", tmp_path / out, "--quiet")
        assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "melsurgery-manifest.yaml" in files and "provenance.json" in files and "modeling_melsurgery.py" in files
    for f in files:
        a, b = ((tmp_path / d / f).read_bytes() for d in ("a", "b"))
        if f == "provenance.json":  # a derived file's own mtime is recorded (what vouches for it until push)
            a, b = (_without_mtimes(json.loads(x)) for x in (a, b))
        assert a == b, f
    # the carried resolved manifest reproduces it again
    again = load_manifest(tmp_path / "a" / "melsurgery-manifest.yaml")
    assert [r[0] for r in again.recipes] == ["wemask", "ffn-dampen"]


def test_output_contract_card_provenance_side_files(planted, planted_scan, tmp_path):
    import shutil

    planted = shutil.copytree(planted, tmp_path / "src")  # the shared folder must stay as built
    (planted / "LICENSE").write_text("Apache License 2.0\n")
    patch(planted, tmp_path / "out", [("ffn-dampen", {})], scan=planted_scan)
    out = tmp_path / "out"
    for side in ("tokenizer.json", "tokenizer_config.json", "LICENSE", "config.json"):
        assert (out / side).read_bytes() == (planted / side).read_bytes(), side
    card = (out / "README.md").read_text()
    meta = front_matter(card)  # a local folder with no known Hub id: no base_model, named by its name only
    assert meta["tags"][-1] == "ffn-dampen" and "base_model" not in meta and "local model folder `src`" in card
    assert str(tmp_path) not in card
    prov = json.loads((out / "provenance.json").read_text())
    from melsurgery.checkpoint.hashing import sha256_file

    for rel, digest in prov["outputs"].items():
        assert sha256_file(out / rel) == digest
    # a plain folder: the weights are recorded by their derivation, their source's sha256 left to push
    assert set(prov["outputs"]) | set(prov["derived"]) == {p.name for p in out.iterdir()} - {"provenance.json"}
    assert set(prov["derived"]) == {"model.safetensors"} and "model.safetensors" not in prov["source"]["files"]
    assert prov["recipes"][0]["name"] == "ffn-dampen" and prov["scan"]["me_layer"] == 3
    record = Provenance.read(out)  # the typed record is the file: same object, same bytes when written again
    assert record.to_json() == prov and record.edited_tensors == ["model.layers.3.mlp.down_proj.weight"]
    assert record.detect_params == planted_scan.params
    sealed, _ = record.verify(out, sources={"model.safetensors": [planted / "model.safetensors"]})
    assert sealed.source["files"]["model.safetensors"] == sha256_file(planted / "model.safetensors")
    text = (out / "provenance.json").read_text()
    record.write(out)
    assert (out / "provenance.json").read_text() == text
    (out / "LICENSE").write_text("changed\n")
    with pytest.raises(UserError, match="LICENSE: sha256 differs from provenance.json"):
        record.verify(out, sources={"model.safetensors": [planted / "model.safetensors"]})
    damaged = {**prov, "edits": [{"shard": "model.safetensors"}]}
    (out / "provenance.json").write_text(json.dumps(damaged))
    with pytest.raises(UserError, match=r"provenance.json: edits\[0\] must be an object naming its 'tensor'"):
        Provenance.read(out)


@pytest.mark.slow
def test_refuses_non_empty_output_and_keeps_it(planted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("patch", planted, "-o", out, "--recipe", "ffn-dampen", "--quiet")
    assert res.returncode == 2 and "holds 1 file melsurgery did not write ('keep.txt')" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_patch_each_recipe(sharded, tmp_path):
    res = run_cli("patch", sharded[0], "-o", tmp_path / "o", "--scan", sharded[1], "--recipe", "wemask", "--recipe",
                  "norm-rescale", "--top-k", "1", "--norm-factor", "0.3")
    assert res.returncode == 0, res.stderr
    assert "WeMask" in res.stdout and "edited model.layers.4.input_layernorm.weight: 1 entry" in res.stdout


RECIPE_DEFAULTS = ["wemask", "norm-rescale", "ffn-dampen", "me-norm"]


@pytest.mark.parametrize("recipe", RECIPE_DEFAULTS)
@pytest.mark.slow
def test_default_model_patch_matches_reference(smollm2, smollm2_scan, tmp_path, recipe):
    result = patch(smollm2.folder, tmp_path / "out", [(recipe, {})], scan=smollm2_scan)
    (plan,) = result.plans
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.folder)
    ids = torch.tensor([tok("To be, or not to be, that is the question:")["input_ids"]])
    base = load_base(smollm2.folder)
    # the documented measurements of SmolLM2-135M-Instruct (and the paper's): ME Layer 11 of 30, dims 507, 247
    # and 14, neurons 1229 and 1487, the massive token first in every sequence
    truth = ref.Truth(11, (507, 247, 14), (1229, 1487), 30)
    handles = reference_for(recipe, {}, plan, base, truth)
    expected = logits(base, ids)
    ref.remove(handles)
    del base
    model, _ = melsurgery.load(tmp_path / "out")
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_python_api_has_no_cli_dependency():
    code = "import melsurgery, melsurgery.surgery.patch, melsurgery.detect.scan; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.slow
def test_cli_overwrite_layer_lists_dims_and_expert_neurons(sharded, tmp_path):
    """--overwrite replaces a non-empty folder; --layers 4,5 and --dims 17,5 edit exactly those entries;
    --neurons E:J edits column J of expert E's down projection and nothing else."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.planted import family_config

    moe = save_model(build_model(family_config("qwen3_moe"), Plant()), tmp_path / "moe")
    out, moe_out = tmp_path / "out", tmp_path / "moe-out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")  # listed by an earlier run's provenance: replaceable
    (out / "provenance.json").write_text(json.dumps({"tool": "melsurgery 0.1.0", "outputs": {
        "stale.txt": hashlib.sha256(b"from an earlier run").hexdigest()}}))
    runs = [("patch", sharded[0], "-o", out, "--scan", sharded[1], "--recipe", "norm-rescale", "--layers", "4,5",
             "--dims", "17,5", "--norm-factor", "0.25", "--overwrite", "--quiet"),
            ("patch", moe, "-o", moe_out, "--scan", sharded[1], "--recipe", "ffn-dampen", "--neurons", "1:41",
             "--dampen", "0", "--quiet")]
    with ThreadPoolExecutor(2) as pool:
        for res in pool.map(lambda args: run_cli(*args), runs):
            assert res.returncode == 0, res.stderr
    assert not (out / "stale.txt").exists()
    src, got = Checkpoint(sharded[0]), Checkpoint(out)
    norms = {f"model.layers.{i}.input_layernorm.weight" for i in (4, 5)}
    for name in src.names():
        a, b = src.load(name), got.load(name)
        if name in norms:
            changed = (a != b).nonzero().flatten().tolist()
            assert changed == [5, 17] and torch.allclose(b[changed], 0.25 * a[changed]), name
        else:
            assert torch.equal(a, b), name
    src, got = Checkpoint(moe), Checkpoint(moe_out)
    expert = "model.layers.3.mlp.experts.1.down_proj.weight"
    for name in src.names():
        a, b = src.load(name), got.load(name)
        if name == expert:
            assert torch.equal(b[:, 41], torch.zeros(64)) and a[:, 41].abs().max() > 1
            assert torch.equal(torch.cat([a[:, :41], a[:, 42:]], 1), torch.cat([b[:, :41], b[:, 42:]], 1))
        else:
            assert torch.equal(a, b), name
