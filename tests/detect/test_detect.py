"""Detection is a pure function of statistics: tested on hand-made numbers, no model."""

import math

import pytest
import torch

from melsurgery.calibrate.stats import Entry, LayerStats, Sample, Stats
from melsurgery.detect.me_layer import detect
from melsurgery.measure.definitions import required_persistence
from melsurgery.params import DetectParams


def layer(i, entries, median=1.0, attention=None):
    top = sorted((Entry(*e) for e in entries), key=lambda e: -abs(e.value))
    top.append(Entry(0, 3, 9, 2.0))  # the list's floor: everything else is below 2
    return LayerStats(i, max(abs(e.value) for e in top), median, top, key_attention=attention)


def stats(per_layer, n_samples=2):
    samples = [Sample([1, 5, 6, 7], ["<s>", "a", "b", "c"]) for _ in range(n_samples)]
    layers = [layer(-1, [(0, 0, 1, 1.0)])] + [layer(i, e) for i, e in enumerate(per_layer)]
    return Stats(layers=layers, samples=samples, num_layers=len(per_layer), hidden_size=16)


def massive(v=5000.0, dims=(7,), samples=(0, 1)):
    return [(s, 0, d, v) for s in samples for d in dims]


def test_first_persisting_layer_is_me_and_transients_are_precursors():
    # layers 1-2 hold a large transient entry (ratio 500, below 1000); layer 3 emerges and persists
    per = [[], [(0, 4, 2, 500.0)], [(0, 4, 2, 450.0)], massive(), massive(), massive(), massive(), []]
    det = detect(stats(per))
    assert det.me_layer == 3
    assert det.massive_dims == [7]
    assert [(t["sample"], t["pos"]) for t in det.massive_tokens] == [(0, 0), (1, 0)]
    assert det.token_summary == [{"pos": 0, "token": "<s>", "count": 2}]
    assert [p["layer"] for p in det.precursors] == [1, 2]
    assert det.persist_until == 6


def test_massive_but_not_persisting_is_not_the_me_layer():
    # layer 1 is massive in dim 3 for one layer only; the persisting emergence is at layer 4
    per = [[], massive(dims=(3,)), [], [], massive(), massive(), massive(), massive(), massive()]
    det = detect(stats(per))
    assert det.me_layer == 4
    assert [p["layer"] for p in det.precursors] == [1]


def test_persistence_fraction_is_configurable():
    per = [[], massive(), massive(), massive(), [], [], [], [], [], []]  # lasts 2 of 8 remaining layers
    assert detect(stats(per)).me_layer is None
    assert detect(stats(per), DetectParams(persist_fraction=0.25)).me_layer == 1
    assert required_persistence(1, 10, DetectParams(persist_fraction=0.25)) == 2
    assert detect(stats(per), DetectParams(persist_fraction=0.3)).me_layer is None


def test_thresholds_are_configurable():
    per = [[], massive(v=500.0), massive(v=500.0), massive(v=500.0), massive(v=500.0)]
    assert detect(stats(per)).me_layer is None
    assert detect(stats(per), DetectParams(ratio=100.0)).me_layer == 1
    assert detect(stats(per), DetectParams(ratio=100.0, abs_threshold=600.0)).me_layer is None


def test_same_token_and_dim_must_persist():
    # the massive dim moves from 7 to 8: no single entry persists
    per = [[], massive(dims=(7,)), massive(dims=(8,)), massive(dims=(7,)), massive(dims=(8,))]
    assert detect(stats(per)).me_layer is None


def test_sink_and_selector_threshold():
    per = [[], massive(), massive(), massive()]
    st = stats(per)
    for lay in st.layers[1:]:
        # two heads; the massive token (position 0) gets 0.6 / 0.2 of its later queries' attention in
        # sample 0 and 0.4 / 0.1 in sample 1: head means 0.5 and 0.15
        lay.key_attention = [torch.tensor([[0.6, 0.1, 0.2, math.nan], [0.2, 0.3, 0.2, math.nan]]),
                             torch.tensor([[0.4, 0.1, 0.2, math.nan], [0.1, 0.3, 0.2, math.nan]])]
    det = detect(st)
    assert det.sink == pytest.approx([0.325] * 4)
    assert det.sink_rate == [0.5] * 4  # one head of two above 0.3
    # geometric mean of the smallest massive value (5000) and the bound on the others (2.0)
    assert math.isclose(det.selector_threshold, math.sqrt(5000 * 2.0))


def test_no_massive_activation():
    det = detect(stats([[], [], []]))
    assert det.me_layer is None and det.massive_dims == [] and det.precursors == []
