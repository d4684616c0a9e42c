import json

import pytest
import torch

import melsurgery
from melsurgery.architectures import family_for
from melsurgery.calibrate.samples import read_records, tokenize
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import calibrate, read_json, run_scan, write_json
from melsurgery.detect.scan_result import ScanResult
from tests.support.helpers import run_cli
from tests.support.planted import Plant, build_model, llama_config, make_tokenizer, planted_folder, save_model


@pytest.mark.slow
def test_scan_finds_the_planted_layer_dim_token_and_neuron(planted):
    r = run_scan(resolve(str(planted)))
    plant = Plant()
    assert r.me_layer == plant.layer
    assert r.massive_dims == (plant.dim,)
    assert {t.pos for t in r.massive_tokens} == {0}
    assert len(r.massive_tokens) == r.calibration.num_samples
    assert [n.neuron for n in r.ffn_neurons] == [plant.neuron]
    n = r.ffn_neurons[0]
    assert n.share > 0.95 and n.activation_other_max < 0.01 * n.activation_massive
    (d,) = r.dims_attribution
    assert d.ffn_write > 100 * abs(d.attn_write)
    assert r.persist_until == 5


@pytest.mark.parametrize("layer,dim,neuron", [(1, 40, 7), (4, 2, 100)])
@pytest.mark.slow
def test_scan_follows_the_plant(tmp_path, layer, dim, neuron):
    plant = Plant(layer=layer, dim=dim, neuron=neuron)
    folder = planted_folder(tmp_path / "m", plant=plant, shards=3)
    r = run_scan(resolve(str(folder)))
    assert (r.me_layer, r.massive_dims, r.ffn_neurons[0].neuron) == (layer, (dim,), neuron)


def test_streaming_statistics_equal_a_full_forward(tmp_path):
    model = build_model(llama_config())
    folder = save_model(model, tmp_path / "m", shards=2)
    ckpt = Checkpoint(folder)
    records, _ = read_records(None)
    samples = tokenize(records[:6], make_tokenizer(), num_samples=None, max_tokens=64, seed=0)
    stats = calibrate(ckpt, family_for(ckpt.config), samples)
    with torch.no_grad():
        full = [model(torch.tensor([s.ids]), output_hidden_states=True, output_attentions=True) for s in samples]
    n = model.config.num_hidden_layers
    for i in range(n):  # hidden_states[i + 1] is layer i's output (the last one is after the final norm)
        if i == n - 1:
            continue
        states = torch.cat([f.hidden_states[i + 1][0].flatten() for f in full]).abs()
        got = stats.layers[i + 1]
        assert got.max_abs == pytest.approx(float(states.max()), rel=1e-5)
        assert got.median_abs == pytest.approx(float(states.median()), rel=1e-5)
        top = got.top[0]
        assert abs(top.value) == pytest.approx(float(states.max()), rel=1e-5)
    for i in range(n):  # attention weights agree too (the sink score is computed from them)
        a = full[0].attentions[i][0].mean(0)
        expected = [float(a[k + 1 :, k].mean()) for k in range(a.shape[0] - 1)]
        assert stats.layers[i + 1].key_attention[0].mean(0)[:-1].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_scan_json_round_trips_exactly(planted_scan, tmp_path):
    """The typed result is the JSON: read back it equals the object scanned, and writes the same bytes."""
    assert planted_scan.sink_dims[0].dims and planted_scan.dims_attribution and planted_scan.norm  # all present
    path = tmp_path / "scan.json"
    write_json(planted_scan, path)
    text = path.read_text()
    data = json.loads(text)
    again = ScanResult.from_json(data, str(path))
    assert again.to_json() == data and again == planted_scan
    again.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text


@pytest.mark.slow
def test_unplanted_model_has_no_me_layer_and_exits_3(tmp_path):
    folder = save_model(build_model(llama_config(), plant=None), tmp_path / "m")
    out = tmp_path / "scan.json"
    res = run_cli("scan", folder, "--quiet", "--json", out)
    assert res.returncode == 3, res.stderr
    assert "no massive activations" in res.stderr
    assert json.loads(out.read_text())["me_layer"] is None


@pytest.mark.slow
def test_cli_scan_writes_json_and_plot(planted, tmp_path):
    out, png = tmp_path / "scan.json", tmp_path / "scan.png"
    res = run_cli("scan", planted, "--json", out, "--plot", png, "--num-samples", "8", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "<- ME Layer" in res.stdout and "neuron 41" in res.stdout
    quiet = run_cli("scan", planted, "--quiet", "--num-samples", "8", "--seed", "3")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert quiet.stdout == f"{planted}: ME Layer 3, massive dims 17 at position 0, persisting through layer 5\n"
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and data["me_layer"] == 3
    assert data["calibration"]["num_samples"] == 8
    assert {"me_layer", "massive_dims", "massive_tokens", "ffn_neurons", "layers"} <= set(data)
    assert len(data["layers"]) == 7 and data["layers"][0]["name"] == "embeddings"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_files(planted, tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first sample text here\n\nsecond sample, longer text\n\n\nthird one")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "plain text"}) + "\n" + json.dumps({"messages": [{"role": "user",
                                                                                        "content": "hi there"}]}))
    for path, n in ((txt, 3), (jl, 2)):
        r = run_scan(resolve(str(planted)), calib=melsurgery.CalibrationSpec(path))
        assert r.calibration.num_samples == n and r.me_layer == 3


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "no such folder"),
    (lambda d: (d.mkdir(), (d / "pytorch_model.bin").write_bytes(b"x"), (d / "config.json").write_text(
        '{"model_type": "llama"}')), "only pickled weights"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "invalid JSON"),
])
@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, make, message):
    d = tmp_path / "bad"
    make(d)
    res = run_cli("scan", d, "--quiet")
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_unsupported_architecture_is_refused_naming_the_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(make_tokenizer())))
    save_model(model, tmp_path / "gpt2")
    res = run_cli("scan", tmp_path / "gpt2", "--quiet")
    assert res.returncode == 2 and "unsupported architecture 'gpt2'" in res.stderr and "llama" in res.stderr


@pytest.mark.slow
def test_bad_calibration_file(planted, tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"nope": 1}\n')
    res = run_cli("scan", planted, "--quiet", "--calib", bad)
    assert res.returncode == 2 and "line 1" in res.stderr
    res = run_cli("scan", planted, "--quiet", "--calib", tmp_path / "missing.txt")
    assert res.returncode == 2 and "cannot read calibration file" in res.stderr


def test_smollm2_me_layer_dims_and_neurons(smollm2_scan):
    r = smollm2_scan
    assert r.me_layer == 11
    assert r.massive_dims[0] == 507
    assert [d.dim for d in r.top_dims[:3]] == [507, 247, 14]
    assert {t.pos for t in r.massive_tokens} == {0}
    assert [n.neuron for n in r.ffn_neurons[:2]] == [1229, 1487]
    assert r.ffn_neurons[0].activation_other_max < 5
    # the precursor in dim 507 (layers 1-9) is reported, and not mistaken for the ME Layer
    assert {p.layer for p in r.precursors} >= set(range(2, 9))
    assert all(507 in p.dims for p in r.precursors)
    assert 25 <= r.persist_until <= 28
    assert 0.3 < r.sink_after_me < 0.9


def test_default_model_is_cached(smollm2):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2.folder.iterdir()}
    again = resolve("smollm2")
    assert again.folder == smollm2.folder
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.folder.iterdir()} == before  # not converted again
    assert (smollm2.folder / "model.safetensors").is_file() and (smollm2.folder / "tokenizer.json").is_file()


@pytest.mark.slow
def test_unwritable_json_and_plot_paths_are_one_line_errors(planted, tmp_path):
    for opt in ("--json", "--plot"):
        res = run_cli("scan", planted, "--quiet", "--num-samples", "2", opt, tmp_path / "missing" / "x")
        assert res.returncode == 2 and "cannot write" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_adaptive_calibration_in_the_checkpoint_dtype(tmp_path):
    """--num-samples auto stops once two rounds agree; --dtype checkpoint computes in bf16 here."""
    folder = planted_folder(tmp_path / "m", dtype=torch.bfloat16)
    out = tmp_path / "scan.json"
    res = run_cli("scan", folder, "--num-samples", "auto", "--dtype", "checkpoint", "--max-tokens", "32",
                  "--json", out)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert read_json(out).to_json() == data  # the adaptive rounds are typed too
    cal = data["calibration"]
    assert cal["dtype"] == "bfloat16"
    rounds = cal["adaptive"]["rounds"]
    assert [r["samples"] for r in rounds] == [4, 8] and cal["num_samples"] == 8
    assert all(r["me_layer"] == 3 and r["massive_dims"] == [17] and r["tokens"] == ["[position 0]"] for r in rounds)
    assert "unchanged from 4 to 8 samples" in res.stdout
    res = run_cli("scan", folder, "--num-samples", "some", "--quiet")
    assert res.returncode == 2 and "expected an integer or 'auto'" in res.stderr


def test_adaptive_calibration_settles_without_a_bos_token():
    """Without BOS the first word of each sample is massive: a new sample's new word is not a new kind of
    massive token, but a delimiter massive at a later position is."""
    from melsurgery.calibrate.stats import Sample, Stats
    from melsurgery.detect.me_layer import Detection
    from melsurgery.detect.scan import _adaptive

    def measure(records, delimiter_from=None):
        tokens = [{"pos": 0, "token": r["text"].split()[0], "count": 1} for r in records]
        if delimiter_from is not None and len(records) >= delimiter_from:
            tokens.append({"pos": 7, "token": ".", "count": 1})
        stats = Stats(samples=[Sample([1, 2], ["a", "b"]) for _ in records])
        return stats, Detection(me_layer=2, massive_dims=[5], token_summary=tokens)

    records = [{"text": f"word{i} rest"} for i in range(20)]
    _, _, adaptive = _adaptive(records, 0, measure)
    assert [r["samples"] for r in adaptive["rounds"]] == [4, 8]
    assert adaptive["rounds"][-1]["tokens"] == ["[position 0]"]
    _, _, adaptive = _adaptive(records, 0, lambda recs: measure(recs, delimiter_from=8))
    assert [r["samples"] for r in adaptive["rounds"]] == [4, 8, 16]
    assert adaptive["rounds"][-1]["tokens"] == [".", "[position 0]"]
