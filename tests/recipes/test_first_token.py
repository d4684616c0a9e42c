"""first-token: the fitted first-token embedding row, a token-selective edit folded into plain weights.

Planted models (tests/support/planted.py: BOS id 1 carries the massive activation, ME Layer 3) keep the fits
to seconds: two fitting windows of 48 tokens, two or three steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from melsurgery.architectures import family_for
from melsurgery.checkpoint.edits import Edit, apply_edit
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import load_tokenizer
from melsurgery.errors import UserError
from melsurgery.fit import FitContext, fit_recipes
from melsurgery.fit.first_token import Figures, PathPoint, RowObjective, choose
from melsurgery.measure.verify import eval_text, make_windows, run_verify, split_text
from melsurgery.outputs import MANIFEST
from melsurgery.params import DetectParams
from tests.support.helpers import QUICK_SCAN, assert_clean_failure, run_cli
from tests.support.planted import family_config, make_tokenizer, planted_folder

FAST = ("--first-token-steps", "3", "--first-token-lr", "0.3", "--first-token-windows", "2",
        "--first-token-window-tokens", "48", "--first-token-kl", "5")
BOS = 1


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A planted Gemma 3 folder: tied embeddings and an embedding scale, the case the head term exists for."""
    return planted_folder(tmp_path_factory.mktemp("ft") / "gemma3", config=family_config("gemma3_text"))


def _objective(folder: Path, dtype=torch.float32, windows: int = 2, size: int = 48):
    ckpt = Checkpoint(folder)
    tok = load_tokenizer(folder)
    win = make_windows(tok, split_text(eval_text(None)[0])[0], size, windows)
    obj = RowObjective(ckpt, family_for(ckpt.config), win.ids, win.first_target, BOS, DetectParams(), dtype=dtype)
    return obj, win


@pytest.mark.parametrize("which", ["llama", "gemma3"])
@pytest.mark.slow
def test_the_gradient_is_the_objectives(which, planted, gemma3) -> None:
    """The gradient of sink ratio + lambda KL, through layers and the (tied) head, matches central differences."""
    obj, _ = _objective(planted if which == "llama" else gemma3, dtype=torch.float64)
    torch.manual_seed(0)
    row = obj.row0 + 0.3 * obj.row0.norm() / math.sqrt(obj.row0.numel()) * torch.randn_like(obj.row0)
    lam = 3.0
    fig, grad = obj.evaluate(row, lam)
    assert grad is not None and fig.kl > 0 and grad.norm() > 0
    d = torch.randn_like(row)
    d *= 1e-3 * row.norm() / d.norm()

    def loss(r: torch.Tensor) -> float:
        f, _ = obj.evaluate(r)
        return f.sink_ratio + lam * f.kl

    fd = (loss(row + d) - loss(row - d)) / 2
    assert float(grad.double() @ d.double()) == pytest.approx(fd, rel=0.02, abs=1e-9)


@pytest.mark.slow
def test_a_streamed_fit_computes_what_a_resident_one_does(planted, monkeypatch) -> None:
    """Models too large to keep resident stream their layers and recompute them in the backward pass."""
    from melsurgery.fit import first_token as first_token_fit

    resident, _ = _objective(planted)
    monkeypatch.setattr(first_token_fit, "RESIDENT_BYTES", 0)
    streamed, _ = _objective(planted)
    assert resident.resident and not streamed.resident
    row = resident.row0 * 0.8
    (fr, gr), (fs, gs) = resident.evaluate(row, 2.0), streamed.evaluate(row, 2.0)
    assert fr == fs
    torch.testing.assert_close(gr, gs, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_the_row_changes_only_its_token_and_runs_in_plain_transformers(tmp_path, gemma3) -> None:
    """The written checkpoint loads without remote code and differs from the base in one row of one tensor (tied:
    the embedding is also the head); position 0's states change, later positions' only through attention to it."""
    out = tmp_path / "out"
    res = run_cli("patch", gemma3, "-o", out, "--recipe", "first-token", *FAST, *QUICK_SCAN)
    assert res.returncode == 0, res.stderr
    base, new = _tensors(gemma3), _tensors(out)
    changed = [k for k in base if not torch.equal(base[k], new[k])]
    assert changed == [family_for(json.loads((gemma3 / "config.json").read_text())).embed]
    rows = (base[changed[0]] != new[changed[0]]).any(1).nonzero().flatten().tolist()
    assert rows == [BOS]
    assert json.loads((out / "config.json").read_text()) == json.loads((gemma3 / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "## Input this patch assumes" in card and "token id 1" in card and "tied" in card

    mb = AutoModelForCausalLM.from_pretrained(gemma3, attn_implementation="eager").eval()
    mp = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()  # no trust_remote_code
    ids = torch.tensor([[BOS] + list(range(10, 30))])
    T = ids.shape[1]
    blocked = torch.zeros(1, 1, T, T)  # causal, and no query after position 0 may attend to it
    blocked.masked_fill_(torch.ones(T, T).triu(1).bool(), torch.finfo(torch.float32).min)
    blocked[0, 0, 1:, 0] = torch.finfo(torch.float32).min
    with torch.no_grad():
        ob, op = (m(ids, output_hidden_states=True) for m in (mb, mp))
        cb, cp = (m(ids, attention_mask=blocked, output_hidden_states=True) for m in (mb, mp))
    assert (ob.hidden_states[-1][0, 0] - op.hidden_states[-1][0, 0]).abs().max() > 1e-3  # position 0 moved
    assert (ob.hidden_states[-1][0, 1:] - op.hidden_states[-1][0, 1:]).abs().max() > 1e-4  # the rest, through it
    for hb, hp in zip(cb.hidden_states, cp.hidden_states):  # cut off from position 0, the rest is the base model
        torch.testing.assert_close(hb[0, 1:], hp[0, 1:], rtol=0, atol=1e-5)
    other = [v for v in range(cb.logits.shape[-1]) if v != BOS]  # tied: only the token's own logit moves
    torch.testing.assert_close(cb.logits[0, 1:, other], cp.logits[0, 1:, other], rtol=0, atol=1e-5)
    assert (cb.logits[0, 1:, BOS] - cp.logits[0, 1:, BOS]).abs().max() > 1e-4


@pytest.mark.slow
def test_verify_measures_the_written_row_with_the_fits_definitions(tmp_path, planted) -> None:
    """verify sees the written row move the sink, and the fit's figures for the row are verify's figures for the
    checkpoint that holds it (same windows, same definitions)."""
    out = tmp_path / "out"
    res = run_cli("patch", planted, "-o", out, "--recipe", "first-token", *FAST, *QUICK_SCAN)
    assert res.returncode == 0, res.stderr
    manifest = (out / MANIFEST).read_text()
    assert "row:" in manifest and "token_id: 1" in manifest
    text = tmp_path / "fit.txt"
    text.write_text(split_text(eval_text(None)[0])[0])
    r = run_verify(planted, out, text=text, max_tokens=48, max_windows=2, generations=0)
    assert r.weights.changed == ["model.embed_tokens.weight"] and r.weights.matches_provenance
    obj, _ = _objective(planted)
    row = _tensors(out)["model.embed_tokens.weight"][BOS].clone()
    fig, _ = obj.evaluate(row)
    assert abs(r.sink_reduction_pct) > 0.1  # the sink moved
    assert fig.sink_base == pytest.approx(r.sink_mean_base, rel=1e-5)
    assert fig.sink_patched == pytest.approx(r.sink_mean_patched, rel=1e-5)
    assert fig.kl == pytest.approx(r.kl_mean, rel=1e-3, abs=1e-6)
    assert math.exp(fig.nll_patched) == pytest.approx(r.ppl_patched, rel=1e-5)


@pytest.mark.slow
def test_a_manifest_with_the_fitted_row_reproduces_the_patch_without_fitting(tmp_path, planted, planted_scan) -> None:
    out = tmp_path / "out"
    res = run_cli("patch", planted, "-o", out, "--recipe", "first-token", *FAST, *QUICK_SCAN)
    assert res.returncode == 0, res.stderr
    again = tmp_path / "again"
    res = run_cli("patch", "--manifest", out / MANIFEST, "-o", again, "--quiet")
    assert res.returncode == 0, res.stderr
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # a given row is never refitted: the context below could not fit anything
    ckpt = Checkpoint(planted)
    ctx = FitContext(tmp_path / "absent", family_for(ckpt.config), ckpt.config, planted_scan, "")
    recipes = [("first-token", {"row": [0.5] * 64, "token_id": 1})]
    assert fit_recipes(ctx, recipes)[0][1]["row"] == [0.5] * 64


def _no_bos_folder(root: Path, template: str | None) -> Path:
    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = None  # the tokenizer adds nothing before the text
    tok.chat_template = template
    return planted_folder(root, tokenizer=tok)


# a chat template with a default system turn: its opening holds the first token twice, as SmolLM2's does
SYSTEM_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<s>system: be brief\n{% endif %}"
                   "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


@pytest.mark.slow
def test_a_tokenizer_without_a_first_token_is_refused_and_chat_is_offered(tmp_path) -> None:
    folder = _no_bos_folder(tmp_path / "nobos", SYSTEM_TEMPLATE)
    out = tmp_path / "out"
    res = run_cli("patch", folder, "-o", out, "--recipe", "first-token", *FAST, *QUICK_SCAN)
    assert_clean_failure(res, "adds no BOS", "--first-token-of chat", "'<s>'", out=out, code=2)
    res = run_cli("patch", folder, "-o", out, "--recipe", "first-token", "--first-token-of", "chat", *FAST,
                  *QUICK_SCAN, "--verify", "--verify-windows", "1")
    assert res.returncode == 0, res.stderr
    assert "every later occurrence" in (out / "README.md").read_text()
    measured = json.loads((out / "provenance.json").read_text())["measurements"]
    assert measured["window_prefix"][:2] == ["<s>", "s"]  # verify measured chat-formatted windows
    # every occurrence of the token (both in the opening) takes the row, in the fit as in the written model
    tok = load_tokenizer(folder)
    win = make_windows(tok, eval_text(None)[0], 512, 1, "chat")
    assert win.ids[0].count(BOS) == 2
    ckpt = Checkpoint(folder)
    obj = RowObjective(ckpt, family_for(ckpt.config), win.ids, win.first_target, BOS, DetectParams())
    fig, _ = obj.evaluate(_tensors(out)["model.embed_tokens.weight"][BOS].clone())
    assert fig.sink_patched == pytest.approx(measured["sink_mean_patched"], rel=1e-5)
    assert fig.kl == pytest.approx(measured["kl_mean"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("template, needle", [(None, "adds no BOS"),
                                              ("Q{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                               "ordinary token")])
@pytest.mark.slow
def test_no_fixed_special_first_token_is_refused(tmp_path, template, needle) -> None:
    folder = _no_bos_folder(tmp_path / "m", template)
    out = tmp_path / "out"
    of = ["--first-token-of", "chat"] if template else []
    res = run_cli("patch", folder, "-o", out, "--recipe", "first-token", *of, *FAST, *QUICK_SCAN)
    assert_clean_failure(res, needle, out=out, code=2)


def test_the_path_point_is_the_smallest_sink_within_the_budget() -> None:
    def point(step, sink, kl):
        return PathPoint(step, 1.0, Figures(1.0, sink, kl, 3.0, 3.0, 10), (float(step),))

    path = [point(0, 1.0, 0.0), point(1, 0.9, 0.01), point(2, 0.8, 0.04), point(3, 0.85, 0.02), point(4, 0.6, 0.2)]
    assert choose(path, 0.05).step == 2
    assert choose(path, 0.015).step == 1
    assert choose(path, 1.0).step == 4
    assert choose(path[1:], 0.001).step == 1  # none within: the start, unchanged


def test_a_vector_edit_sets_rows_or_columns_and_checks_its_length() -> None:
    w = torch.arange(12.0).reshape(3, 4)
    row = apply_edit(w, Edit("t", 0.0, axis=0, index=(1,), add=(9.0, 8.0, 7.0, 6.0)))
    assert row[1].tolist() == [9.0, 8.0, 7.0, 6.0] and torch.equal(row[[0, 2]], w[[0, 2]])
    col = apply_edit(w, Edit("t", 1.0, axis=1, index=(2,), add=(1.0, 1.0, 1.0)))
    assert col[:, 2].tolist() == [3.0, 7.0, 11.0] and torch.equal(col[:, [0, 1, 3]], w[:, [0, 1, 3]])
    with pytest.raises(UserError, match="4 values"):
        apply_edit(w, Edit("t", 0.0, axis=0, index=(1,), add=(1.0, 2.0)))


@pytest.mark.slow
def test_gguf_output_requantises_only_the_rows_blocks(tmp_path) -> None:
    """Folded means it runs in llama.cpp too: the GGUF output differs from its source only in token_embd's blocks
    of the edited row (Q8_0, requantised), every other byte kept."""
    from melsurgery.checkpoint.gguf_file import GGUFFile
    from tests.support.planted import build_model, llama_config
    from tests.support.planted_gguf import Q, write_gguf

    src = write_gguf(build_model(llama_config()), tmp_path / "planted.gguf", Q.Q8_0)
    out = tmp_path / "out.gguf"
    env = {"MELSURGERY_CACHE": str(tmp_path / "cache")}
    res = run_cli("patch", src, "-o", out, "--recipe", "first-token", *FAST, *QUICK_SCAN, env=env)
    assert res.returncode == 0, res.stderr
    a, b = GGUFFile(src), GGUFFile(out)
    changed = [n for n in a.tensors if a.raw(n).tobytes() != b.raw(n).tobytes()]
    assert changed == ["token_embd.weight"]
    info = a.tensors["token_embd.weight"]
    blocks_a = a.raw(changed[0]).reshape(-1, info.type_size)
    blocks_b = b.raw(changed[0]).reshape(-1, info.type_size)
    per_row = 64 // info.block_size  # hidden size 64
    hit = sorted({int(k) // per_row for k in (blocks_a != blocks_b).any(1).nonzero()[0]})
    assert hit == [BOS]
