import functools
import json
import math

import pytest
import torch

from melsurgery.architectures import family_for
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.measure.definitions import Arrangement, change_pct, fake_int8, paired_changes, streaming_keys
from melsurgery.measure.payoff import Scored, arranged_nll, arranged_stream, target_logprobs
from melsurgery.measure.verify_result import VerifyResult
from tests.support.helpers import patch, run_cli
from tests.support.planted import Plant, family_config, planted_folder

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3


def _tokens(n: int) -> list[int]:
    """A planted-vocabulary window: BOS, then the characters of TEXT."""
    from tests.support.planted import VOCAB

    return [1] + [VOCAB[c] for c in TEXT[: n - 1]]


def _final_states(folder, ids: list[list[int]], arrangements: list[Arrangement | None]):
    """The final pre-norm states of each window under each arrangement (None: the plain forward), streamed."""
    ckpt = Checkpoint(folder)
    model = StreamingModel(ckpt, family_for(ckpt.config))
    embeds = model.embed(ids)
    streams = [Stream(list(embeds)) if a is None else arranged_stream(a, embeds) for a in arrangements]
    run_layers(model, streams)
    return model, ckpt, [s.states for s in streams]


def _banded_mask(T: int, window: int, keep_first: bool, sliding: int | None = None) -> torch.Tensor:
    """An explicit additive 4D mask, written out entry by entry (independent of `streaming_keys`); `sliding`: a
    sliding-window layer's own window, which holds as well."""
    mask = torch.full((1, 1, T, T), torch.finfo(torch.float32).min)
    for q in range(T):
        for k in range(q + 1):
            if (q - k < window or (keep_first and k == 0)) and (sliding is None or q - k < sliding):
                mask[0, 0, q, k] = 0.0
    return mask


@pytest.mark.parametrize("keep_first", [False, True])
def test_streaming_window_equals_a_whole_model_forward_with_a_banded_mask(planted, keep_first):
    _equals_banded_forward(planted, keep_first)


@pytest.mark.slow
def test_streaming_window_equals_a_banded_forward_gemma2(tmp_path):
    """Sliding-window layers (window 8 in the planted config, inside the band) keep their own window: the first
    token kept by the arrangement stays out of their reach."""
    _equals_banded_forward(planted_folder(tmp_path / "m", family_config("gemma2")), keep_first=True)


def _equals_banded_forward(folder, keep_first: bool) -> None:
    from transformers import AutoModelForCausalLM

    T, W = 48, 16
    ids = [_tokens(T)]
    arr = Arrangement("keep-first" if keep_first else "evict", W, keep_first)
    model, ckpt, (plain, arranged) = _final_states(folder, ids, [None, arr])
    sliding = getattr(model.config, "sliding_window", None) if "sliding_attention" in model.layer_types else None
    mask = _banded_mask(T, W, keep_first)
    if sliding:  # per layer type, as the model's forward takes them (Gemma 2: sliding and full layers alternate)
        mask = {"full_attention": mask, "sliding_attention": _banded_mask(T, W, keep_first, sliding)}
    norm = model.final_norm(ckpt.load(model.family.final_norm))
    head = ckpt.load(model.head_tensor)
    with torch.no_grad():
        got = model.logits(norm(arranged[0]), head)
        whole = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        want = whole(torch.tensor(ids), attention_mask=mask).logits[0]
        full = whole(torch.tensor(ids)).logits[0]
    assert (got - want).abs().max() < 1e-4
    assert (want[:W] - full[:W]).abs().max() < 1e-4  # before the window fills, nothing is evicted
    assert (want[W:] - full[W:]).abs().max() > 1e-2  # after it, the band matters (the test is not vacuous)


def test_a_window_as_long_as_the_sequence_changes_nothing(planted):
    T = 40
    ids = [_tokens(T), _tokens(T - 7)]
    arrs = [Arrangement("evict", T), Arrangement("keep-first", T, keep_first=True)]
    model, ckpt, (plain, *arranged) = _final_states(planted, ids, [None, *arrs])
    for states in arranged:
        assert all(torch.equal(a, b) for a, b in zip(states, plain))  # bit for bit
    scored = Scored(ids, 1)
    start = Arrangement("evict", 4)  # score from position 4 on, as a shorter window would
    nll_plain = arranged_nll(model, ckpt, [plain], [start], scored)[0]
    nll = arranged_nll(model, ckpt, [arranged[0]], [start], scored)[0]
    counts = torch.tensor(scored.counts(4), dtype=torch.float64)
    assert change_pct(nll, nll_plain, counts).item() == 0.0


def _int8_disturbance(folder, T: int = 64) -> tuple[float, float]:
    """Mean |Δ log p(target)| of int8 activations, per tensor and per token, against the plain forward."""
    ids = [_tokens(T)]
    arrs = [Arrangement("int8-tensor", int8="tensor"), Arrangement("int8-token", int8="token")]
    model, ckpt, streams = _final_states(folder, ids, [None, *arrs])
    targets = torch.tensor(ids[0][1:])
    lp = [target_logprobs(model, ckpt, s[0][:-1], targets) for s in streams]
    return float((lp[1] - lp[0]).abs().mean()), float((lp[2] - lp[0]).abs().mean())


def test_per_tensor_int8_pays_for_a_massive_activation_per_token_does_not(tmp_path):
    massive = planted_folder(tmp_path / "massive", plant=Plant(strength=60.0))
    plain = planted_folder(tmp_path / "plain", plant=None)
    tensor, token = _int8_disturbance(massive)
    tensor0, token0 = _int8_disturbance(plain)
    assert tensor > 5 * token  # one huge input sets the scale that every other token is rounded with
    assert tensor > 5 * tensor0  # and it is the massive activation that does it


def test_fake_int8_scales():
    x = torch.tensor([[[1.0, -2.0], [100.0, 0.5]]])
    per_tensor = fake_int8(x, per_token=False)
    per_token = fake_int8(x, per_token=True)
    assert per_tensor[0, 1, 0] == 100 and per_tensor[0, 0, 0] == round(127 / 100) * 100 / 127
    assert torch.allclose(per_token[0, 0], torch.tensor([1.0, -2.0]), atol=2 / 127)
    assert torch.equal(fake_int8(torch.zeros(1, 3, 4), per_token=False), torch.zeros(1, 3, 4))
    assert streaming_keys(4, "cpu", 2).tolist()[3] == [False, False, True, True]
    assert streaming_keys(4, "cpu", 2, keep_first=True).tolist()[3] == [True, False, True, True]


def test_change_and_its_paired_interval_on_known_inputs():
    counts = torch.tensor([10.0, 10.0])
    plain = torch.tensor([20.0, 20.0])
    # window 0: +0.1 nats per token, window 1: +0.3; patched: +0.1 on both
    base = torch.tensor([21.0, 23.0])
    patched = torch.tensor([21.0, 21.0])
    b, p, d = paired_changes((base, plain), (patched, plain), counts)
    assert b.value == pytest.approx(100 * math.expm1(0.2))
    # resamples hold (0, 0) or (1, 1) with probability 1/4 each: the 2.5% and 97.5% quantiles are those extremes
    assert b.low == pytest.approx(100 * math.expm1(0.1)) and b.high == pytest.approx(100 * math.expm1(0.3))
    assert p.value == p.low == p.high == pytest.approx(100 * math.expm1(0.1))  # every resample says the same
    assert d.value == pytest.approx(p.value - b.value)
    assert d.low == pytest.approx(p.value - b.high) and d.high == pytest.approx(p.value - b.low)  # paired
    one = paired_changes((base[:1], plain[:1]), (patched[:1], plain[:1]), counts[:1])
    assert [(i.low, i.high) for i in one] == [(None, None)] * 3  # one window: no interval


def test_scored_positions_start_at_the_window():
    scored = Scored([[1, 2, 3, 4, 5, 6], [1, 2, 3]], first=1)
    assert list(scored.positions(0, 0)) == [0, 1, 2, 3, 4] and list(scored.positions(0, 3)) == [3, 4]
    assert scored.counts(3) == [2, 0]
    values = torch.arange(7, dtype=torch.float64)  # window 0: positions 0-4, window 1: positions 0-1
    assert scored.select(values, 3).tolist() == [3 + 4, 0]


@pytest.mark.slow
def test_cli_prints_the_payoff_and_its_json_round_trips(planted, planted_scan, tmp_path):
    patch(planted, tmp_path / "out", [("ffn-dampen", {"factor": 0.0})], planted_scan)
    out = tmp_path / "v.json"
    args = ["verify", str(planted), str(tmp_path / "out"), "--max-tokens", "64", "--windows", "3", "--generations",
            "0", "--quiet"]
    res = run_cli(*args, "--payoff-window", "16", "--json", str(out))
    assert res.returncode == 0, res.stderr
    for line in ("streaming, window 16, first token evicted  base", "streaming, window 16, first token kept",
                 "int8 activations, one scale per tensor", "int8 activations, one scale per token"):
        assert line in res.stdout
    data = json.loads(out.read_text())
    r = VerifyResult.from_json(data)
    assert r.to_json() == data
    assert [f.name for f in r.payoff] == ["evict", "keep-first", "int8-tensor", "int8-token"]
    evict = r.payoff[0]
    assert evict.window == 16 and evict.windows == 3 and evict.scored_tokens == 3 * (63 - 16)
    assert evict.base_interval[0] <= evict.base_pct <= evict.base_interval[1]
    assert math.isclose(evict.difference_pp, evict.patched_pct - evict.base_pct, abs_tol=1e-9)
    res = run_cli(*args, "--no-payoff")
    assert res.returncode == 0 and "payoff:" not in res.stdout
    res = run_cli(*args, "--payoff-window", "63")
    assert res.returncode == 2 and "--payoff-window 63" in res.stderr and "Traceback" not in res.stderr


def test_arranged_streams_share_one_loaded_copy_of_an_edited_layer(planted):
    ckpt = Checkpoint(planted)
    model = StreamingModel(ckpt, family_for(ckpt.config))
    loads = []
    original = model.load_layer
    model.load_layer = lambda i, state: loads.append(i) or original(i, state)
    edits: dict = {}

    def edit(i, base):
        if i not in edits:
            edits.clear()
            edits[i] = {"mlp.down_proj.weight": base["mlp.down_proj.weight"] * 0.5}
        return edits[i]

    embeds = model.embed([_tokens(16)])
    streams = [Stream(list(embeds)), Stream(list(embeds), edits=edit),
               arranged_stream(Arrangement("evict", 4), embeds, edit),
               Stream(list(embeds), edits=functools.partial(edit))]
    run_layers(model, streams)
    assert loads == [i for i in range(model.num_layers) for _ in range(2)]  # base, then one edited copy
    assert torch.equal(streams[1].states[0], streams[3].states[0])


def test_a_patched_stream_takes_its_twins_outputs_up_to_its_first_edited_layer(planted):
    """The patched model under an arrangement equals the base under it until the first edit: those layers are
    run once, for the base, and the outputs are exactly those of running them again."""
    ckpt = Checkpoint(planted)
    model = StreamingModel(ckpt, family_for(ckpt.config))
    first = model.num_layers - 2
    runs = []
    original = model.run_layer
    model.run_layer = lambda layer, h, keys=None: runs.append(len(runs)) or original(layer, h, keys)

    def edit(i, base):
        return {"mlp.down_proj.weight": base["mlp.down_proj.weight"] * 0.5} if i >= first else {}

    arr = Arrangement("int8-tensor", int8="tensor")
    embeds = model.embed([_tokens(16), _tokens(12)])
    base = arranged_stream(arr, embeds)
    twinned = arranged_stream(arr, embeds, edit, twin=base)
    alone = arranged_stream(arr, embeds, edit)
    run_layers(model, [base, twinned])
    assert len(runs) == 2 * (model.num_layers + (model.num_layers - first))  # 2 windows
    assert twinned.borrowed == first and twinned.twin is None
    run_layers(model, [alone])
    assert all(torch.equal(a, b) for a, b in zip(twinned.states, alone.states))
    assert not torch.equal(twinned.states[0], base.states[0])
    with pytest.raises(ValueError, match="twin must run before it"):
        run_layers(model, [arranged_stream(arr, embeds, edit, twin=base), base])
