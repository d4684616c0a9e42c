"""`melsurgery diff`: which tensors and side files differ, where, and the diff(1) exit status."""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from melsurgery.checkpoint.source import resolve
from melsurgery.compare.checkpoints import diff_checkpoints
from melsurgery.detect.scan import CalibrationSpec
from melsurgery.surgery.manifest import Manifest
from melsurgery.surgery.patch import run_patch
from tests.support.helpers import run_cli
from tests.support.hub_server import HubServer, emit_result_code, result_of
from tests.support.planted import planted_folder

DOWN2 = "model.layers.2.mlp.down_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
NORM = "model.norm.weight"
POST4 = "model.layers.4.post_attention_layernorm.weight"
K5 = "model.layers.5.self_attn.k_proj.weight"


def rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of `src` whose single weight file is re-saved after `edit(state)`."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _edit(state: dict) -> None:
    state[DOWN2][:, [3, 9]] *= 2  # whole columns
    state[Q1][[0, 5], :] += 1  # whole rows
    state[UP0][2, 7], state[UP0][4, 1] = 100.0, -100.0  # scattered entries
    state[NORM][[1, 2, 3]] = 0.0
    state[POST4] = state[POST4].to(torch.bfloat16)  # dtype change: values differ by rounding
    state[K5] = state[K5][:16].contiguous()  # shape change
    del state["lm_head.weight"]
    state["extra.bias"] = torch.ones(3)


@pytest.fixture(scope="module")
def models(tmp_path_factory, planted: Path) -> dict:
    root = tmp_path_factory.mktemp("diff")
    src = planted
    sharded = planted_folder(root / "sharded", shards=3)  # same seed: same tensors, other layout
    man = Manifest(model=str(src), calibration=CalibrationSpec(num_samples=4, max_tokens=32),
                   recipes=[("ffn-dampen", {}), ("norm-rescale", {})])
    patched = run_patch(resolve(str(src)), root / "patched", man)
    edited = rewrite(src, root / "edited", _edit)
    config = json.loads((edited / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500000.0
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    del config["pad_token_id"]
    (edited / "config.json").write_text(json.dumps(config, indent=2))
    with open(edited / "tokenizer.json", "a") as fh:
        fh.write("\n")
    (edited / "notes.txt").write_text("scratch\n")
    return {"src": src, "sharded": sharded, "patched": patched, "edited": edited, "root": root}


def by_name(result) -> dict:
    return {t.name: t for t in result.tensors}


@pytest.mark.slow
def test_identical_copy_and_sharded_layout_are_identical(models) -> None:
    copy = models["root"] / "copy"
    shutil.copytree(models["src"], copy)
    result = diff_checkpoints(models["src"], copy)
    assert result.identical and result.layout.same
    assert result.summary()["bytes_read"] >= 2 * sum(t.numel * 4 for t in result.tensors)

    proc = run_cli("diff", models["src"], models["sharded"])
    assert proc.returncode == 0, proc.stderr
    assert "layout   A: 1 weight file(s), B: 3 weight file(s)" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("identical: 57 tensors compared, 0 changed")
    assert all(line.startswith(("A: ", "B: ", "same ", "layout ", "identical: ")) for line in proc.stdout.splitlines())


def test_patched_checkpoint_lists_exactly_the_edited_tensors(models) -> None:
    patch = models["patched"]
    result = diff_checkpoints(models["src"], patch.out)
    changed = {t.name: t for t in result.tensors if t.status != "identical"}
    assert set(changed) == {a.tensor for a in patch.applied}
    assert all(t.status == "changed" for t in changed.values())
    assert {a.tensor: a.changed for a in patch.applied} == {n: t.changed for n, t in changed.items()}
    src = load_file(models["src"] / "model.safetensors")
    for plan in patch.plans:
        p = plan.params
        if plan.recipe == "norm-rescale":
            for layer in p["layers"]:
                t = changed[f"model.layers.{layer}.input_layernorm.weight"]
                assert t.pattern == "indices" and t.indices == sorted(p["dims"])
        else:  # ffn-dampen: the neurons' down_proj columns, where they are non-zero
            t = changed[f"model.layers.{p['layer']}.mlp.down_proj.weight"]
            column = src[f"model.layers.{p['layer']}.mlp.down_proj.weight"][:, p["neurons"]]
            assert t.cols == sorted(p["neurons"])
            assert t.rows == column.abs().amax(dim=1).nonzero().flatten().tolist()
    # side files: the card, manifest and provenance are new; everything else was copied verbatim
    assert {f.name: f.status for f in result.files if f.status != "identical"} == {
        "README.md": "only_b", "melsurgery-manifest.yaml": "only_b", "provenance.json": "only_b"}


@pytest.mark.slow
def test_edits_of_every_kind_text_json_and_stat(models, tmp_path) -> None:
    out = tmp_path / "diff.json"
    proc = run_cli("diff", models["src"], models["edited"], "--only-changed", "--json", out)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()

    def line(prefix: str) -> str:
        (hit,) = [x for x in lines if x.startswith(prefix)]
        return hit

    assert line(f"changed  {DOWN2}  128/8192 changed in columns [3, 9]  max|d|=")
    assert line(f"changed  {Q1}  128/4096 changed in rows [0, 5]  max|d|=1  rel=")
    assert line(f"changed  {UP0}  2/8192 changed in rows [2, 4] x columns [1, 7]  max|d|=")
    assert line(f"changed  {NORM}  3/64 changed at [1, 2, 3]  max|d|=")
    assert line(f"dtype    {POST4}  F32 -> BF16 [64]")
    assert line(f"shape    {K5}  F32 [32, 64] -> F32 [16, 64]")
    assert line("only A   lm_head.weight  F32 [99, 64]")
    assert line("only B   extra.bias  F32 [3]")
    config = line("changed  config.json  ")
    assert "rope_parameters.rope_theta: 10000.0 -> 500000.0" in config
    assert '+rope_scaling.type: "linear"' in config and "+rope_scaling.factor: 2.0" in config
    assert "-pad_token_id: 2" in config
    assert line("changed  tokenizer.json  sha256 ")
    assert line("only B   notes.txt")
    assert not any(x.startswith(("same ", "layout ")) for x in lines)
    assert lines[-1] == f"wrote {out}"
    assert lines[-2].startswith("different: 58 tensors compared, 4 changed, 2 shape/dtype changed, 1 only in A, "
                                "1 only in B; 3/5 side files differ; read ")

    data = json.loads(out.read_text())
    assert data["identical"] is False and data["layout"]["same"] is True
    tensors = {t["name"]: t for t in data["tensors"]}
    down = tensors[DOWN2]
    assert (down["status"], down["pattern"], down["cols"], down["n_rows"], down["layer"]) == (
        "changed", "columns", [3, 9], 64, 2)
    src = load_file(models["src"] / "model.safetensors")
    col = src[DOWN2][:, [3, 9]].double()
    assert down["max_abs_diff"] == pytest.approx(col.abs().max().item())
    assert down["rel_change"] == pytest.approx((col.norm() / src[DOWN2].double().norm()).item())
    post = src[POST4]
    rounded = (post.to(torch.bfloat16).float() != post).sum().item()
    assert tensors[POST4]["status"] == "dtype" and tensors[POST4]["changed"] == rounded > 0
    assert tensors[K5]["shape_b"] == [16, 64] and tensors["extra.bias"]["status"] == "only_b"
    assert tensors["model.embed_tokens.weight"]["status"] == "identical"  # JSON has every tensor
    files = {f["name"]: f for f in data["files"]}
    assert files["config.json"]["changed"] == {"rope_parameters.rope_theta": [10000.0, 500000.0]}
    assert files["config.json"]["removed"] == {"pad_token_id": 2}
    assert files["tokenizer.json"]["kind"] == "sha256" and files["tokenizer.json"]["status"] == "changed"
    assert files["chat_template.jinja"]["status"] == "identical"
    assert data["stat"] == {
        "layers": {"0": {"tensors": 1, "entries": 2}, "1": {"tensors": 1, "entries": 128},
                   "2": {"tensors": 1, "entries": 128}, "4": {"tensors": 1, "entries": rounded},
                   "5": {"tensors": 1, "entries": 0}},
        "other": {"tensors": 3, "entries": 3},
    }
    summary = data["summary"]
    assert (summary["tensors_compared"], summary["changed"], summary["only_a"], summary["only_b"],
            summary["files_differ"], summary["entries_changed"]) == (58, 4, 1, 1, 3, 2 + 128 + 128 + 3 + rounded)
    assert summary["bytes_read"] > 0 and summary["wall_s"] > 0

    stat = run_cli("diff", models["src"], models["edited"], "--stat")
    assert stat.returncode == 1
    table = stat.stdout.splitlines()
    start = table.index("layer  tensors    entries")
    assert [r.split() for r in table[start + 1 : start + 7]] == [
        ["0", "1", "2"], ["1", "1", "128"], ["2", "1", "128"], ["4", "1", str(rounded)], ["5", "1", "0"],
        ["other", "3", "3"]]
    assert not any(DOWN2 in r for r in table)


@pytest.mark.slow
def test_trouble_exits_2_with_one_line(models, tmp_path) -> None:
    proc = run_cli("diff", models["src"], tmp_path / "missing")
    assert proc.returncode == 2
    assert proc.stderr.startswith("melsurgery: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
def test_hub_repos_at_two_revisions(models, hub_server: HubServer) -> None:
    repo = f"{hub_server.user}/planted"
    code = emit_result_code() + textwrap.dedent(
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("{repo}")
        api.upload_folder(repo_id="{repo}", folder_path=r"{models['src']}")
        api.create_branch("{repo}", branch="patched")
        api.upload_folder(repo_id="{repo}", folder_path=r"{models['patched'].out}", revision="patched")
        emit(True)
        """
    )
    result_of(hub_server.run_python(code))
    proc = hub_server.run(["melsurgery", "diff", repo, repo, "--revision", "patched", "--only-changed"])
    assert proc.returncode == 1, proc.stderr
    listed = [x.split()[1] for x in proc.stdout.splitlines() if x.startswith("changed  model.")]
    assert listed == sorted((a.tensor for a in models["patched"].applied), key=lambda n: int(n.split(".")[2]))
    assert "only B   README.md" in proc.stdout
    assert hub_server.token not in proc.stdout + proc.stderr
    # --revision-a picks A's revision: patched against main is the same diff seen from the other side,
    # and patched against patched is no diff at all
    back = hub_server.run(["melsurgery", "diff", repo, repo, "--revision-a", "patched", "--only-changed"])
    assert back.returncode == 1 and "only A   README.md" in back.stdout, back.stderr
    assert [x.split()[1] for x in back.stdout.splitlines() if x.startswith("changed  model.")] == listed
    same = hub_server.run(["melsurgery", "diff", repo, repo, "--revision-a", "patched", "--revision", "patched"])
    assert same.returncode == 0, same.stdout + same.stderr


# --------------------------------------------------------------------------------------------------
# Property: the reported changed entries are exactly the true ones
# --------------------------------------------------------------------------------------------------

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@st.composite
def tensor_and_edits(draw):
    shape = draw(st.one_of(st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 12), st.integers(1, 12))))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    numel = shape[0] * (shape[1] if len(shape) == 2 else 1)
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["entries", "rows", "cols", "none"]))
    if kind == "entries":
        flat = draw(st.sets(st.integers(0, numel - 1), max_size=numel))
    elif len(shape) == 1:
        flat = set()
    else:
        axis = draw(st.sets(st.integers(0, shape[0 if kind == "rows" else 1] - 1), min_size=1))
        rows, cols = shape
        flat = {r * cols + c for r in range(rows) for c in range(cols) if (r if kind == "rows" else c) in axis}
    return shape, dtype, seed, sorted(flat)


def _folder(root: Path, name: str, tensor: torch.Tensor) -> Path:
    folder = root / name
    folder.mkdir()
    save_file({"w": tensor}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_and_edits())
def test_reported_changes_are_the_true_ones(case) -> None:
    shape, dtype, seed, flat = case
    a = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    b = a.clone()
    view = b.view(-1)
    if flat:
        old = view[flat].float()
        view[flat] = torch.where(old >= 0, 2 * old + 1, 2 * old - 1).to(dtype)  # never rounds back to old
    truth = (a.view(BITS[dtype]) != b.view(BITS[dtype])).flatten().nonzero().flatten().tolist()
    assert truth == flat
    with tempfile.TemporaryDirectory() as tmp:
        result = diff_checkpoints(_folder(Path(tmp), "a", a), _folder(Path(tmp), "b", b))
    (t,) = result.tensors
    assert result.identical == (not flat) == (t.status == "identical")
    if not flat:
        return
    assert t.status == "changed" and t.changed == len(flat)
    d = (b.double() - a.double()).abs()
    assert t.max_abs_diff == pytest.approx(d.max().item())
    if len(shape) == 1:
        assert t.indices == flat and t.pattern == "indices"
    else:
        rows = sorted({i // shape[1] for i in flat})
        cols = sorted({i % shape[1] for i in flat})
        assert (t.rows, t.cols) == (rows, cols)
        whole_cols = len(flat) == len(cols) * shape[0]
        whole_rows = len(flat) == len(rows) * shape[1]
        expected = ("all" if len(flat) == a.numel() else "columns" if whole_cols else "rows" if whole_rows
                    else "entries")
        assert t.pattern == expected
