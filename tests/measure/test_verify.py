import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import melsurgery.measure.verify as verify_module
from melsurgery.checkpoint.safeload import load_tokenizer
from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import CalibrationSpec, run_scan
from melsurgery.measure.verify import make_windows, run_verify
from melsurgery.measure.verify_result import Gates, VerifyResult, verify_report
from tests.support import reference as ref
from tests.support.helpers import json_round_trip, patch, run_cli
from tests.support.planted import family_config, make_tokenizer, planted_folder

FAST = {"max_windows": 2, "max_tokens": 128, "generations": 1, "max_new_tokens": 8}
VERIFY_JSON_KEYS = [
    "text", "windows", "tokens", "window_prefix", "scored_tokens", "kl_mean", "kl_max", "top1_agreement", "ppl_base",
    "ppl_patched", "me_layer", "massive_positions", "sink_base", "sink_rate_base", "max_abs_base", "ratio_base",
    "similarity_base", "sink_patched", "sink_rate_patched", "max_abs_patched", "ratio_patched", "similarity_patched",
    "ppl_increase_pct", "sink_layers_from", "sink_mean_base", "sink_mean_patched", "sink_reduction_pct",
    "sink_rate_mean_base", "sink_rate_mean_patched", "similarity_mean_base", "similarity_mean_patched", "weights",
    "no_effect", "generations", "generations_note", "seconds", "payoff", "tasks"]




@pytest.mark.slow
def test_a_patch_that_changes_nothing_measures_nothing(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("wemask", {"strength": 0.0}), ("ffn-dampen", {"factor": 1.0})], planted_scan)
    r = run_verify(planted, tmp_path / "out", **FAST)
    assert r.kl_mean == 0 and r.kl_max == 0 and r.top1_agreement == 1
    assert r.ppl_base == r.ppl_patched
    assert r.sink_base == r.sink_patched and r.max_abs_base == r.max_abs_patched
    assert r.weights.changed == [] and r.weights.matches_provenance is True
    assert r.generations[0]["base"] == r.generations[0]["patched"]
    assert r.no_effect is True and "THIS PATCH CHANGED NOTHING" in verify_report(r)
    assert len(r.payoff) == 4 and all(f.difference_pp == 0 and f.base_pct == f.patched_pct for f in r.payoff)
    assert VerifyResult.from_json(json_round_trip(r)) == r  # the typed result is its JSON
    assert list(r.to_json()) == VERIFY_JSON_KEYS  # the schema `verify --json` has always written


@pytest.mark.slow
def test_removing_the_massive_activation_shows_in_the_right_layers(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("ffn-dampen", {"factor": 0.0})], planted_scan)
    r = run_verify(planted, tmp_path / "out", **FAST)
    me = planted_scan.me_layer
    assert r.max_abs_base[:me] == r.max_abs_patched[:me]  # before the ME Layer nothing changes
    for i in range(me, len(r.max_abs_base)):
        assert r.max_abs_patched[i] < 0.1 * r.max_abs_base[i]
    assert r.kl_mean > 0 and r.weights.changed == ["model.layers.3.mlp.down_proj.weight"]
    assert r.weights.matches_provenance is True
    assert r.no_effect is False and "CHANGED NOTHING" not in verify_report(r)



@pytest.mark.slow
def test_an_unreadable_provenance_is_said_not_skipped(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("ffn-dampen", {"factor": 0.0})], planted_scan)
    (tmp_path / "out" / "provenance.json").write_text('{"melsurgery": ')  # cut short
    r = run_verify(planted, tmp_path / "out", max_windows=1, max_tokens=64, generations=0)
    w = r.weights
    assert w.matches_provenance is None and w.provenance_edits is None
    assert "provenance.json" in w.provenance_unreadable
    assert "provenance.json is unreadable, so no claim was checked" in verify_report(r)
    readable = replace(r, weights=replace(w, provenance_unreadable=None))
    assert "provenance.json is unreadable" not in verify_report(readable)


def test_gates():
    r = SimpleNamespace(kl_mean=0.05, ppl_increase_pct=3.0, sink_reduction_pct=10.0)  # the figures gates read
    assert Gates().check(r) == []
    assert Gates(max_kl=0.1, max_ppl_increase=5, min_sink_reduction=5).check(r) == []
    assert len(Gates(max_kl=0.01, max_ppl_increase=1, min_sink_reduction=50).check(r)) == 3


@pytest.mark.parametrize("sink, said", [
    (3.86, "sink fell 3.86%, less than the 5% fall --min-sink-reduction 5 asks for"),
    (-2.1, "sink rose 2.1%, where --min-sink-reduction 5 asks for a fall of at least 5%"),
    (0.0, "sink unchanged, less than the 5% fall --min-sink-reduction 5 asks for")])
def test_gate_messages_read_true_whichever_way_the_figure_moved(sink, said):
    """A sink that fell too little is not said to have risen, nor one that rose to have been cut."""
    r = SimpleNamespace(kl_mean=0.2, ppl_increase_pct=-1.5, sink_reduction_pct=sink)
    assert Gates(min_sink_reduction=5).check(r) == [said]
    assert Gates(max_kl=0.1, max_ppl_increase=-2).check(r) == [
        "KL 0.2 > --max-kl 0.1", "perplexity fell 1.5%, where --max-ppl-increase -2 asks for a fall of at least 2%"]


@pytest.mark.slow
def test_cli_verify_json_plot_and_gate_exit(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("wemask", {"layers": "after-me"})], planted_scan)
    js, png = tmp_path / "v.json", tmp_path / "v.png"
    res = run_cli("verify", planted, tmp_path / "out", "--windows", "2", "--max-tokens", "64", "--generations", "1",
                  "--json", js, "--plot", png, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "perplexity" in res.stdout and "matches provenance.json edits" in res.stdout
    data = json.loads(js.read_text())
    for key in ("kl_mean", "kl_max", "ppl_base", "ppl_patched", "sink_base", "sink_patched", "top1_agreement",
                "sink_rate_base", "sink_rate_patched", "similarity_base", "similarity_patched", "no_effect"):
        assert key in data
    assert len(data["sink_base"]) == 6 and png.read_bytes()[:4] == b"\x89PNG"
    res = run_cli("verify", planted, tmp_path / "out", "--windows", "1", "--max-tokens", "64", "--generations", "0",
                  "--max-kl", "0", "--quiet")
    assert res.returncode == 4 and "gate violated" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_patch_verify_writes_figures_into_card_and_provenance(planted, planted_scan, tmp_path):
    result = patch(planted, tmp_path / "out", [("ffn-dampen", {})], planted_scan, verify=FAST)
    assert result.verified.kl_mean > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Measured effect" in card and "perplexity" in card
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["measurements"]["kl_mean"] == pytest.approx(result.verified.kl_mean)
    from melsurgery.checkpoint.hashing import sha256_file

    assert all(sha256_file(tmp_path / "out" / f) == h for f, h in prov["outputs"].items())


def _close(got, want, tol=1e-4):
    if isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w, tol)
    elif want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, rel=tol, abs=tol)


def _equals_whole_model_verify(base, patched, tok, max_tokens=64, windows=2):
    r = run_verify(base, patched, max_windows=windows, max_tokens=max_tokens, generations=0)
    win = make_windows(tok, verify_module.eval_text(None)[0], max_tokens, windows)
    massive = [(w, q) for w, qs in enumerate(r.massive_positions) for q in qs]
    assert massive, "the base has massive tokens on this text"
    want = ref.whole_verify(base, patched, win.ids, win.first_target, massive)
    for key, value in want.items():
        got = getattr(r, key)[:-1] if key.startswith("max_abs") else getattr(r, key)
        _close(got, value[:-1] if key.startswith("max_abs") else value)
    return r


@pytest.mark.parametrize("recipe", [("wemask", {"layers": "after-me"}), ("ffn-dampen", {"factor": 0.0})])
@pytest.mark.slow
def test_streaming_verify_equals_whole_model_verify(planted, planted_scan, recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(verify_module, "HEAD_ROWS", 10)  # the LM head in 10 blocks: the online softmax sums
    patch(planted, tmp_path / "out", [recipe], planted_scan)
    assert _equals_whole_model_verify(planted, tmp_path / "out", make_tokenizer()).kl_mean > 0


@pytest.mark.slow
def test_streaming_verify_equals_whole_model_verify_gemma2(tmp_path):
    """Tied LM head, logit soft-capping, post-FFN norms, sliding windows; an edited attention-input norm."""
    base = planted_folder(tmp_path / "m", family_config("gemma2"))
    scan = run_scan(resolve(str(base)), CalibrationSpec(num_samples=4, max_tokens=32))
    patch(base, tmp_path / "out", [("norm-rescale", {"factor": 0.5})], scan)
    assert _equals_whole_model_verify(base, tmp_path / "out", make_tokenizer()).kl_mean > 0


@pytest.mark.slow
def test_streaming_verify_equals_whole_model_verify_on_default_model(smollm2, smollm2_scan, tmp_path):
    patch(smollm2.folder, tmp_path / "out", [("wemask", {})], smollm2_scan)
    r = _equals_whole_model_verify(smollm2.folder, tmp_path / "out", load_tokenizer(smollm2.folder), windows=1)
    assert r.sink_mean_base > 0.3 and r.kl_mean > 0


def _scan_and_verify_sinks(folder, text, max_tokens):
    scan = run_scan(resolve(str(folder)), CalibrationSpec(path=text, max_tokens=max_tokens))
    r = run_verify(folder, folder, text=text, max_tokens=max_tokens, max_windows=1, generations=0)
    assert r.windows == 1 and scan.calibration.num_samples == 1
    assert r.me_layer == scan.me_layer is not None
    assert r.massive_positions[0] == sorted(t.pos for t in scan.massive_tokens)
    _close(r.sink_base, list(scan.sink), 1e-6)
    _close(r.sink_rate_base, list(scan.sink_rate), 1e-6)
    return scan


@pytest.mark.slow
def test_scan_and_verify_agree_on_the_sink_planted(planted, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(verify_module.eval_text(None)[0][:300].replace("\n\n", "\n").strip())
    _scan_and_verify_sinks(planted, text, 512)


@pytest.mark.slow
def test_scan_and_verify_agree_on_the_sink_default_model(smollm2, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(verify_module.eval_text(None)[0][:600].replace("\n\n", "\n").strip())
    scan = _scan_and_verify_sinks(smollm2.folder, text, 64)
    assert max(s for s in scan.sink if s is not None) > 0.3


@pytest.mark.slow
def test_windows_open_with_bos_and_perplexity_excludes_it(planted, tmp_path):
    """The planted model's massive activation comes from BOS alone: without BOS its outputs change."""
    tok = make_tokenizer()
    raw = verify_module.eval_text(None)[0]
    win = make_windows(tok, raw, 40, 3)
    assert win.prefix == [1] and win.first_target == 1
    assert all(w[0] == 1 and 1 not in w[1:] for w in win.ids) and [len(w) for w in win.ids] == [40] * 3
    text = tok(raw, add_special_tokens=False)["input_ids"]
    assert [w[1:] for w in win.ids] == [text[i * 39 : (i + 1) * 39] for i in range(3)]
    same = tmp_path / "same"
    shutil.copytree(planted, same)
    r = run_verify(planted, same, max_tokens=40, max_windows=3, generations=0)
    assert r.no_effect is True and r.massive_positions == [[0]] * 3 and r.scored_tokens == 3 * 39
    model, _ = __import__("melsurgery").load(planted)
    nll, nll_no_bos = [], []
    with torch.no_grad():
        for w in win.ids:
            logp = model(torch.tensor([w])).logits[0].double().log_softmax(-1)
            nll.append(-logp[:-1].gather(-1, torch.tensor(w[1:])[:, None]))
            logp = model(torch.tensor([w[1:]])).logits[0].double().log_softmax(-1)
            nll_no_bos.append(-logp[:-1].gather(-1, torch.tensor(w[2:])[:, None]))
    ppl = float(torch.cat(nll).mean().exp())
    assert r.ppl_base == pytest.approx(ppl, rel=1e-5)
    assert abs(float(torch.cat(nll_no_bos).mean().exp()) - ppl) > 1e-3 * ppl  # BOS matters to this model


def test_generations_are_skipped_when_whole_models_do_not_fit(planted, planted_scan, tmp_path, monkeypatch):
    patch(planted, tmp_path / "out", [("ffn-dampen", {})], planted_scan)
    monkeypatch.setattr(verify_module, "free_memory", lambda device: 1000)
    r = run_verify(planted, tmp_path / "out", max_windows=1, max_tokens=32, generations=2)
    assert r.generations == [] and r.generations_note.startswith("generations skipped")
    assert r.generations_note in verify_report(r)


@pytest.mark.slow
def test_a_checkpoint_of_another_shape_is_not_a_patch(planted, tmp_path):
    other = planted_folder(tmp_path / "o", family_config("llama", intermediate_size=96))
    res = run_cli("verify", planted, other, "--windows", "1", "--generations", "0", "--quiet")
    assert res.returncode == 2 and "not a patch of" in res.stderr and "Traceback" not in res.stderr
