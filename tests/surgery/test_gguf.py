"""GGUF in, GGUF out: planted models written with gguf's GGUFWriter (matrices in F32, F16, BF16, Q8_0, Q4_0,
Q4_1, or a K-quant) and the embedded default model (Q4_1). Outputs are read back with gguf's own reader
(independent of melsurgery's header parser) and loaded with transformers' GGUF loader (independent of
melsurgery's name mapping)."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from melsurgery.architectures import family_for, gguf_target, rope_row_order
from melsurgery.checkpoint.gguf_file import GGUFFile
from melsurgery.errors import UserError
from melsurgery.surgery.gguf_patch import gguf_preflight, gguf_source_file, run_patch_gguf
from melsurgery.surgery.manifest import Manifest
from tests.support.helpers import run_cli
from tests.support.planted import build_model, llama_config
from tests.support.planted_gguf import Q, write_gguf

RECIPES = [("ffn-dampen", {"factor": 0.2}), ("me-norm", {"factor": 0.5}), ("norm-rescale", {"factor": 0.5})]
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


@contextmanager
def _cache(path: Path):
    """GGUF conversions of the planted files go to a temporary cache, not the user's."""
    old = os.environ.get("MELSURGERY_CACHE")
    os.environ["MELSURGERY_CACHE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MELSURGERY_CACHE", None)
        else:
            os.environ["MELSURGERY_CACHE"] = old


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory):
    """The planted Llama as GGUF in each type, plus one with Q4_K FFN down projections (FFN width 256)."""
    folder = tmp_path_factory.mktemp("gguf")
    model = build_model(llama_config())
    for t in TYPES:
        write_gguf(model, folder / f"planted-{t.name}.gguf", t)
    write_gguf(build_model(llama_config(intermediate_size=256)), folder / "planted-Q4_K.gguf", Q.Q8_0,
               kquant=("ffn_down", Q.Q4_K))
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("melsurgery-cache")


def _resolve(path: Path, cache: Path):
    from melsurgery.checkpoint.source import resolve

    with _cache(cache):
        return resolve(str(path))


@pytest.fixture(scope="session")
def patched(gguf_dir, cache_dir, planted_scan, tmp_path_factory):
    """Each planted type patched with the three folded recipes (the scan of the planted safetensors twin)."""
    out = tmp_path_factory.mktemp("patched")
    results = {}
    for t in TYPES:
        src = _resolve(gguf_dir / f"planted-{t.name}.gguf", cache_dir)
        results[t] = run_patch_gguf(src, out / f"{t.name}.gguf", Manifest(recipes=RECIPES), scan=planted_scan)
    return results


def test_overwrite_replaces_a_gguf_melsurgery_wrote(gguf_dir, patched):
    """A GGUF whose header holds melsurgery.* keys is an earlier output: --overwrite may replace it."""
    t = next(iter(patched))
    written = patched[t].file
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        gguf_preflight(gguf_dir / f"planted-{t.name}.gguf", written, [RECIPES[1]], folder=False, overwrite=False)
    gguf_preflight(gguf_dir / f"planted-{t.name}.gguf", written, [RECIPES[1]], folder=False, overwrite=True)


def _tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def test_rope_row_order_is_llamacpp_permute():
    """llama.cpp's convert_hf_to_gguf permute(): reshape(n_head, 2, d/2, ...).swapaxes(1, 2)."""
    w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for n_head in (1, 2, 3):
        llamacpp = w.reshape(n_head, 2, 48 // n_head // 2, 3).swapaxes(1, 2).reshape(w.shape)
        order = rope_row_order(48, n_head)
        assert np.array_equal(llamacpp[list(order)], w)


def test_gguf_names_and_permutation_match_transformers_loader(gguf_dir):
    """The F32 GGUF written from the architecture entry's names loads in transformers as the same model."""
    from transformers import AutoModelForCausalLM

    model = build_model(llama_config())
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="planted-F32.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 40, 41, 50, 60, 3, 70, 71, 72]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_header_parser_agrees_with_gguf_reader(gguf_dir):
    path = gguf_dir / "planted-Q4_1.gguf"
    mine, theirs = GGUFFile(path), GGUFReader(path)
    assert mine.metadata() == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert [(i.name, i.start, i.nbytes) for i in mine.tensors.values()] == [
        (t.name, t.data_offset, t.n_bytes) for t in theirs.tensors]
    assert mine.header({}) == path.read_bytes()[: mine.data_offset]  # re-emitted byte for byte


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.slow
def test_gguf_patch_contract(gguf_dir, patched, planted_scan, qtype):
    """Same metadata plus melsurgery.*, same tensors, untouched bytes identical, norms exact, quantised
    edits equal to dequantise-edit-requantise on exactly the blocks whose values the edit changes."""
    src_path, res = gguf_dir / f"planted-{qtype.name}.gguf", patched[qtype]
    src, out = _tensors(src_path), _tensors(res.file)
    assert [(n, t.tensor_type, list(t.shape)) for n, t in src.items()] == [
        (n, t.tensor_type, list(t.shape)) for n, t in out.items()]
    me = planted_scan.me_layer
    down, ffn_norm = f"blk.{me}.ffn_down.weight", f"blk.{me}.ffn_norm.weight"
    attn_norm = f"blk.{me + 1}.attn_norm.weight"
    assert {a.tensor for a in res.applied} == {down, ffn_norm, attn_norm}
    for name in src:
        if name not in (down, ffn_norm, attn_norm):
            assert bytes(src[name].data) == bytes(out[name].data), name
    # norms (F32): the exact float32 edit
    g = np.array(src[ffn_norm].data)
    mean = planted_scan.norm.ffn_norm_weight_mean
    assert np.allclose(np.array(out[ffn_norm].data), mean + 0.5 * (g - mean), rtol=0, atol=1e-6)
    dims = [d.dim for d in planted_scan.top_dims[:3]]
    expected = np.array(src[attn_norm].data).copy()
    expected[dims] *= np.float32(0.5)
    assert np.array_equal(np.array(out[attn_norm].data), expected)
    # the FFN down projection: reference requantisation of the changed blocks only
    neurons = [n.neuron for n in planted_scan.ffn_neurons]
    old = quants.dequantize(np.array(src[down].data), qtype)
    new = old.copy()
    new[:, neurons] *= np.float32(0.2)
    bs = quants.GGML_QUANT_SIZES[qtype][0]
    hit = (new != old).reshape(-1, bs).any(axis=1)
    ref = np.ascontiguousarray(quants.quantize(new, qtype)).view(np.uint8).reshape(len(hit), -1)
    expect = np.ascontiguousarray(np.array(src[down].data)).view(np.uint8).reshape(len(hit), -1).copy()
    expect[hit] = ref[hit]
    got = np.ascontiguousarray(np.array(out[down].data)).view(np.uint8).reshape(len(hit), -1)
    assert np.array_equal(got, expect)
    block_cols = {j // bs for j in neurons}
    assert {int(b) % (old.shape[1] // bs) for b in np.flatnonzero(hit)} <= block_cols
    edit = next(a for a in res.applied if a.tensor == down)
    assert edit.blocks_requantised == int(hit.sum()) and edit.type == qtype.name
    norm_edit = next(a for a in res.applied if a.tensor == attn_norm)
    assert norm_edit.changed == len(dims) and norm_edit.requant_max_abs_err == 0.0
    assert (edit.requant_max_abs_err == 0.0) == (qtype == Q.F32)
    # metadata: the source's, plus melsurgery's record
    meta_src, meta_out = GGUFReader(src_path).fields, GGUFReader(res.file).fields
    added = [k for k in meta_out if k not in meta_src]
    assert added and all(k.startswith("melsurgery.") for k in added)
    assert all(meta_out[k].contents() == f.contents() for k, f in meta_src.items() if not k.startswith("GGUF.kv"))
    assert meta_out["melsurgery.source.sha256"].contents() == hashlib.sha256(src_path.read_bytes()).hexdigest()
    assert [r["name"] for r in json.loads(meta_out["melsurgery.recipes"].contents())] == [r for r, _ in RECIPES]
    assert {e["tensor"] for e in json.loads(meta_out["melsurgery.edits"].contents())} == {down, ffn_norm, attn_norm}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda t: t.name)
@pytest.mark.slow
def test_patched_gguf_loads_in_transformers_like_the_safetensors_patch(gguf_dir, cache_dir, patched, planted_scan,
                                                                      tmp_path, qtype):
    """transformers' GGUF loader on the output gives the logits of the same recipe patched into safetensors
    (from the dequantised source), up to the requantisation of the edited blocks."""
    from transformers import AutoModelForCausalLM

    from melsurgery.surgery.patch import run_patch

    src = _resolve(gguf_dir / f"planted-{qtype.name}.gguf", cache_dir)
    run_patch(src, tmp_path / "st", Manifest(recipes=RECIPES), scan=planted_scan)
    res = patched[qtype]
    ids = torch.tensor([[1, 40, 41, 50, 60, 3, 70, 71, 72, 80, 81, 82]])
    with torch.no_grad():
        exact = build_model(llama_config())(ids).logits  # the unquantised planted model
        base = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32)(ids).logits
        st = AutoModelForCausalLM.from_pretrained(tmp_path / "st", dtype=torch.float32)(ids).logits
        gg = AutoModelForCausalLM.from_pretrained(res.file.parent, gguf_file=res.file.name,
                                                  dtype=torch.float32)(ids).logits
    effect, noise = (st - base).abs().max(), (base - exact).abs().max()
    assert effect > 0.1  # the patch matters ...
    # ... and the GGUF carries it: what requantising the edited blocks adds is small next to the patch's effect
    # and to the quantisation noise the source already had
    assert (gg - st).abs().max() < 0.25 * min(effect, noise)


@pytest.mark.slow
def test_norm_edits_keep_kquant_tensors(gguf_dir, cache_dir, planted_scan, tmp_path):
    path = gguf_dir / "planted-Q4_K.gguf"
    res = run_patch_gguf(_resolve(path, cache_dir), tmp_path / "norm.gguf", Manifest(recipes=[RECIPES[1]]),
                         scan=planted_scan)
    src, out = _tensors(path), _tensors(res.file)
    kq = [n for n, t in src.items() if t.tensor_type == GGMLQuantizationType.Q4_K]
    assert len(kq) == 6 and all(bytes(src[n].data) == bytes(out[n].data) for n in kq)
    assert [a.tensor for a in res.applied] == [f"blk.{planted_scan.me_layer}.ffn_norm.weight"]


@pytest.mark.slow
def test_wemask_and_bad_outputs_are_refused(gguf_dir, cache_dir, tmp_path):
    env = {"MELSURGERY_CACHE": str(cache_dir)}
    src = gguf_dir / "planted-Q8_0.gguf"
    r = run_cli("patch", src, "-o", tmp_path / "w.gguf", "--recipe", "wemask", env=env)
    assert r.returncode == 2 and "wemask" in r.stderr
    assert all(n in r.stderr for n in ("norm-rescale", "ffn-dampen", "me-norm")) and "llama.cpp" in r.stderr
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    r = run_cli("patch", src, "-o", tmp_path / "exists.gguf", "--recipe", "me-norm", env=env)
    assert r.returncode == 2 and "did not write" in r.stderr and (tmp_path / "exists.gguf").read_bytes() == b"keep"
    r = run_cli("patch", src, "-o", tmp_path / "exists.gguf", "--recipe", "me-norm", "--overwrite", env=env)
    assert r.returncode == 2 and (tmp_path / "exists.gguf").read_bytes() == b"keep"
    assert r.stderr == (f"melsurgery: error: '{tmp_path / 'exists.gguf'}': a file melsurgery did not write (no "
                        "melsurgery.* metadata); choose another -o or remove it\n")
    with pytest.raises(UserError, match="is the source model"):
        gguf_preflight(src, src, [RECIPES[1]], folder=False, overwrite=True)
    with pytest.raises(UserError, match="did not write"):  # a user's GGUF (no melsurgery.* keys) is never replaced
        gguf_preflight(src, gguf_dir / "planted-F32.gguf", [RECIPES[1]], folder=False, overwrite=True)
    with pytest.raises(UserError, match="needs a GGUF source"):
        gguf_source_file(str(tmp_path))
    with pytest.raises(UserError, match="not a readable GGUF"):
        GGUFFile(tmp_path / "exists.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]


def test_repatching_replaces_the_melsurgery_keys(patched, planted_scan, cache_dir, tmp_path):
    first = patched[Q.Q8_0].file
    res = run_patch_gguf(_resolve(first, cache_dir), tmp_path / "twice.gguf", Manifest(recipes=[RECIPES[1]]),
                         scan=planted_scan)
    keys = [k for k in GGUFReader(res.file).fields if k.startswith("melsurgery.")]
    assert len(keys) == len(set(keys)) == 7
    assert GGUFFile(res.file).value("melsurgery.source.file") == first.name


def test_folder_output_is_pushable_and_tamper_evident(gguf_dir, cache_dir, planted_scan, tmp_path):
    from melsurgery.hub.push import validate_for_push

    src = gguf_dir / "planted-Q4_0.gguf"
    out = tmp_path / "pub"
    res = run_patch_gguf(_resolve(src, cache_dir), out, Manifest(recipes=[RECIPES[0]]), folder=True,
                         scan=planted_scan)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [src.name, "README.md", "provenance.json", "melsurgery-manifest.yaml"])
    assert res.file == out / src.name
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["outputs"][src.name] == hashlib.sha256((out / src.name).read_bytes()).hexdigest()
    assert prov["edits"][0]["tensor"] == f"blk.{planted_scan.me_layer}.ffn_down.weight"
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and f"gguf_file=\"{src.name}\"" in card
    manifest = validate_for_push(out)
    assert {f.path for f in manifest.files} == {p.name for p in out.iterdir()}
    with open(out / src.name, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(UserError, match="sha256 differs"):
        validate_for_push(out)


@pytest.mark.slow
def test_diff_gguf_reports_blocks_rows_columns_and_keys(gguf_dir, patched, planted_scan, tmp_path):
    from melsurgery.compare.gguf import diff_gguf

    src, res = gguf_dir / "planted-Q4_1.gguf", patched[Q.Q4_1]
    r = diff_gguf(src, res.file)
    changed = {t.name: t for t in r.tensors if t.status != "identical"}
    assert set(changed) == {a.tensor for a in res.applied}
    down = changed[f"blk.{planted_scan.me_layer}.ffn_down.weight"]
    edit = next(a for a in res.applied if a.tensor == down.name)
    assert down.blocks_changed == edit.blocks_changed and down.changed == edit.changed
    assert set(down.cols) <= {c for n in planted_scan.ffn_neurons for c in range(n.neuron // 32 * 32,
                                                                                    n.neuron // 32 * 32 + 32)}
    assert down.max_abs_diff == pytest.approx(edit.max_abs_delta)
    assert set(r.metadata.added) == {k for k in GGUFFile(res.file).metadata() if k.startswith("melsurgery.")}
    assert not r.metadata.removed and not r.metadata.changed and not r.identical
    cli = run_cli("diff", src, res.file, "--only-changed", "--json", tmp_path / "d.json")
    assert cli.returncode == 1 and f"{down.name}  Q4_1" in cli.stdout and "key +    melsurgery.version" in cli.stdout
    assert json.loads((tmp_path / "d.json").read_text())["summary"]["changed"] == 3
    assert run_cli("diff", src, src).returncode == 0


@pytest.mark.slow
def test_verify_reads_patched_gguf_and_its_provenance(gguf_dir, cache_dir, patched, tmp_path):
    res = patched[Q.Q8_0]
    r = run_cli("verify", gguf_dir / "planted-Q8_0.gguf", res.file, "--windows", "1", "--max-tokens", "64",
                "--generations", "0", "--quiet", "--json", tmp_path / "v.json",
                env={"MELSURGERY_CACHE": str(cache_dir)})
    assert r.returncode == 0, r.stderr
    weights = json.loads((tmp_path / "v.json").read_text())["weights"]
    assert weights["matches_provenance"] is True and len(weights["changed"]) == 3


@pytest.fixture(scope="module")
def smollm2_patched(smollm2, smollm2_scan, tmp_path_factory):
    return run_patch_gguf(smollm2, tmp_path_factory.mktemp("smollm2") / "smollm2.gguf", Manifest(recipes=RECIPES),
                          scan=smollm2_scan)


@pytest.mark.slow
def test_default_model_gguf_patch(smollm2, smollm2_scan, smollm2_patched):
    """The embedded Q4_1 SmolLM2: the scan's layer, dims and neurons land on the right GGUF tensors; every
    other tensor byte-identical; the down projection requantised only in blocks of the dampened columns."""
    src, out = _tensors(smollm2.origin_file), _tensors(smollm2_patched.file)
    me, neurons = smollm2_scan.me_layer, [n.neuron for n in smollm2_scan.ffn_neurons]
    family = family_for({"model_type": "llama"})
    down = gguf_target(family, f"model.layers.{me}.mlp.down_proj.weight", {}).name
    edited = {a.tensor for a in smollm2_patched.applied}
    assert edited == {down, f"blk.{me}.ffn_norm.weight", f"blk.{me + 1}.attn_norm.weight"}
    assert all(bytes(src[n].data) == bytes(out[n].data) for n in src if n not in edited)
    # Q4_1 cannot carry x0.2 on the two columns (half of the edit is lost): the tensor is written in Q8_0
    a = next(a for a in smollm2_patched.applied if a.tensor == down)
    assert a.source_type_error > 0.3 and (a.type, a.written_type) == ("Q4_1", "Q8_0") and a.edit_error < 0.1
    assert out[down].tensor_type == GGMLQuantizationType.Q8_0 and len(neurons) == 2


@pytest.mark.slow
def test_default_model_gguf_norm_patch_loads_like_the_safetensors_patch(smollm2, smollm2_scan, tmp_path):
    """F32 norm edits are exact: transformers' GGUF loader on the patched default GGUF gives the logits of
    the same recipes patched into safetensors. (For ffn-dampen on Q4_1 it does not: see docs/gguf.md.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from melsurgery.surgery.patch import run_patch

    norms = Manifest(recipes=RECIPES[1:])
    res = run_patch_gguf(smollm2, tmp_path / "norms.gguf", norms, scan=smollm2_scan)
    assert all(a.type == "F32" and a.requant_max_abs_err == 0.0 for a in res.applied)
    run_patch(smollm2, tmp_path / "st", norms, scan=smollm2_scan)
    tok = AutoTokenizer.from_pretrained(smollm2.folder)
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32)(ids).logits
        st = AutoModelForCausalLM.from_pretrained(tmp_path / "st", dtype=torch.float32)(ids).logits
        gg = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="norms.gguf", dtype=torch.float32)(ids).logits
    assert (st - base).abs().max() > 0.5
    assert torch.allclose(gg, st, atol=1e-3, rtol=0)


DAMPEN_ORDINARY = ("ffn-dampen", {"factor": 0.9, "neurons": [5, 6, 7]})


def _down_edit(res, planted_scan):
    return next(a for a in res.applied if a.tensor == f"blk.{planted_scan.me_layer}.ffn_down.weight")


@pytest.mark.slow
def test_an_edit_a_4bit_grid_cannot_carry_is_written_in_a_wider_type(gguf_dir, cache_dir, planted_scan, tmp_path):
    """x0.9 on ordinary neurons' columns moves most entries by less than half a Q4_1 step, so requantising the
    blocks in Q4_1 gives back (nearly) the source: the tensor is written in the first wider type that carries the
    edit, and what gguf's own dequantiser reads from it is the intended fp32 edit within the tolerance; every
    other tensor keeps its type and bytes, and later tensors stay readable at their moved offsets. (The planted
    neuron's column is carried by Q4_1: its entries are their blocks' largest, which a block's scale follows.)"""
    from melsurgery.surgery.gguf_patch import TOLERANCE, WIDER, edit_error

    path = gguf_dir / "planted-Q4_1.gguf"
    res = run_patch_gguf(_resolve(path, cache_dir), tmp_path / "wide.gguf", Manifest(recipes=[DAMPEN_ORDINARY]),
                         scan=planted_scan)
    edit = _down_edit(res, planted_scan)
    src, out = _tensors(path), _tensors(res.file)
    old = quants.dequantize(np.array(src[edit.tensor].data), Q.Q4_1)
    asked = old.copy()
    asked[:, DAMPEN_ORDINARY[1]["neurons"]] *= np.float32(0.9)
    # Q4_1 in place (what the patch wrote before) misses the edit: the test fails without the mechanism
    hit = (asked != old).reshape(-1, 32).any(axis=1)
    inplace = old.reshape(-1, 32).copy()
    inplace[hit] = quants.dequantize(quants.quantize(asked.reshape(-1, 32)[hit], Q.Q4_1), Q.Q4_1)
    assert edit_error(inplace.reshape(old.shape), asked, old) > TOLERANCE
    assert edit.type == "Q4_1" and edit.written_type in WIDER and out[edit.tensor].tensor_type.name == edit.written_type
    written = Q[edit.written_type]
    for narrower in WIDER[: WIDER.index(edit.written_type)]:  # the first wider type that carries it, no wider
        again = quants.dequantize(quants.quantize(asked, Q[narrower]), Q[narrower]).reshape(old.shape)
        assert edit_error(again, asked, old) > TOLERANCE
    got = quants.dequantize(np.array(out[edit.tensor].data), written).reshape(asked.shape)
    assert edit_error(got, asked, old) == pytest.approx(edit.edit_error) and edit.edit_error <= TOLERANCE
    assert edit.source_type_error > TOLERANCE
    assert list(src) == list(out)
    for name in src:
        if name != edit.tensor:
            assert src[name].tensor_type == out[name].tensor_type and bytes(src[name].data) == bytes(out[name].data)
    assert edit.bytes_added == out[edit.tensor].n_bytes - src[edit.tensor].n_bytes > 0
    recorded = json.loads(GGUFFile(res.file).value("melsurgery.edits"))
    assert any(e["written_type"] == edit.written_type and e["type"] == "Q4_1" for e in recorded)


@pytest.mark.slow
def test_patch_says_first_which_tensors_were_widened_and_what_it_costs(gguf_dir, cache_dir, planted_scan, tmp_path):
    from melsurgery.detect.scan import write_json

    write_json(planted_scan, tmp_path / "scan.json")
    r = run_cli("patch", gguf_dir / "planted-Q4_1.gguf", "-o", tmp_path / "w.gguf", "--recipe", "ffn-dampen",
                "--dampen", "0.9", "--neurons", "5,6,7", "--scan", tmp_path / "scan.json", "--quiet",
                env={"MELSURGERY_CACHE": str(cache_dir)})
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert "ffn_down.weight written in " in first and ", not Q4_1" in first and "bytes" in first
    assert "llama.cpp" not in r.stdout


@pytest.mark.slow
def test_kquant_source_edits_are_written_in_a_type_gguf_can_quantise(gguf_dir, cache_dir, planted_scan, tmp_path):
    """gguf has no Q4_K quantiser: an edit of a Q4_K tensor is written in the first wider type that carries it."""
    path = gguf_dir / "planted-Q4_K.gguf"
    res = run_patch_gguf(_resolve(path, cache_dir), tmp_path / "k.gguf", Manifest(recipes=[RECIPES[0]]),
                         scan=planted_scan)
    edit = _down_edit(res, planted_scan)
    assert edit.type == "Q4_K" and edit.written_type != "Q4_K" and edit.source_type_error is None
    assert edit.edit_error <= 0.1 and _tensors(res.file)[edit.tensor].tensor_type.name == edit.written_type


def _bomb(path: Path, n_entries: int, *, body: bytes = b"", n_kv: int = 1, n_tensors: int = 0) -> Path:
    """A GGUF whose one metadata key claims an array of `n_entries` strings; `body` is what follows the claim."""
    import struct

    key = b"bomb.strings"
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + struct.pack("<Q", len(key)) + key
    path.write_bytes(head + struct.pack("<IIQ", 9, 8, n_entries) + body)
    return path


@pytest.mark.parametrize("case", ["file-size", "entries", "tensors", "keys"])
def test_a_header_that_claims_more_than_the_file_holds_is_refused_before_decoding(tmp_path, case):
    """Counts are checked against the file and the entry cap before a loop or an allocation runs for them."""
    import time
    import tracemalloc

    from melsurgery.checkpoint.gguf_file import MAX_ARRAY_ENTRIES

    if case == "file-size":
        path = _bomb(tmp_path / "b.gguf", 1 << 40, body=bytes(64))
    elif case == "entries":  # as many empty strings as the cap allows plus one: the file holds them all
        path = _bomb(tmp_path / "b.gguf", MAX_ARRAY_ENTRIES + 1, body=bytes(8 * (MAX_ARRAY_ENTRIES + 1)))
    elif case == "tensors":
        path = _bomb(tmp_path / "b.gguf", 0, n_tensors=1 << 50)
    else:
        path = _bomb(tmp_path / "b.gguf", 0, n_kv=1 << 50)
    tracemalloc.start()
    t0 = time.process_time()
    with pytest.raises(UserError, match="not a readable GGUF file.*(claims|more than)"):
        GGUFFile(path)
    used = time.process_time() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20 and used < 1.0


@pytest.mark.slow
def test_the_cli_refuses_a_metadata_bomb_in_one_line_and_leaves_no_cache(tmp_path):
    from melsurgery.checkpoint.gguf_file import MAX_ARRAY_ENTRIES

    n = MAX_ARRAY_ENTRIES + 1
    path = _bomb(tmp_path / "bomb.gguf", n, body=bytes(8 * n))
    r = run_cli("scan", path, env={"MELSURGERY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "array entries" in r.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


KILLED_CONVERSION = """
import os, signal, sys
import safetensors.torch
from melsurgery.checkpoint import source

real = safetensors.torch.save_file
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_then_die
source.resolve(sys.argv[1])
"""


@pytest.mark.slow
def test_a_conversion_killed_with_sigkill_is_cleaned_by_the_next_one(gguf_dir, tmp_path):
    """SIGKILL cannot be caught: the dead run's pid-stamped folder stays, and the next conversion removes it."""
    import signal
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = {**os.environ, "MELSURGERY_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[2])}
    path = gguf_dir / "planted-Q8_0.gguf"
    r = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(path)], env=env, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [p for p in (cache / "gguf").iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".melsurgery-tmp-") and (left[0] / "model.safetensors").exists()
    src = _resolve(path, cache)
    assert [p.name for p in (cache / "gguf").iterdir()] == [src.folder.name]
    assert (src.folder / "config.json").is_file()


def test_the_conversion_parses_the_header_once_and_loads_what_transformers_loads(gguf_dir, tmp_path, monkeypatch):
    """transformers parses a GGUF three times (config, tokenizer, weights) and builds gguf's name map once per
    module; the conversion shares one of each, and its weights are still exactly what transformers loads."""
    import gguf as gguf_lib
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    parses = []
    reader = gguf_lib.GGUFReader

    def counted(path, mode="r"):
        parses.append(str(path))
        return reader(path, mode)

    monkeypatch.setattr(gguf_lib, "GGUFReader", counted)
    src = _resolve(gguf_dir / "planted-Q8_0.gguf", tmp_path)
    assert parses == [str(gguf_dir / "planted-Q8_0.gguf")]
    assert gguf_lib.GGUFReader is counted  # put back after the conversion
    theirs = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="planted-Q8_0.gguf", dtype=torch.float32)
    assert len(parses) == 3  # transformers alone, model only: config and weights, two parses
    mine = load_file(src.folder / "model.safetensors")
    for name, t in theirs.state_dict().items():
        if name in mine:
            assert torch.equal(mine[name], t), name
