"""The Python API (docs/api.md) for a measurement of one's own: the streaming engine, one layer in memory."""

import pytest

from melsurgery.architectures import family_for
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import load_tokenizer


@pytest.mark.slow
def test_streaming_engine_observes_each_layer(planted):
    # as in docs/api.md, on the planted model: its massive activation appears at layer 3
    ckpt = Checkpoint(planted)
    engine = StreamingModel(ckpt, family_for(ckpt.config))
    ids = load_tokenizer(planted)("the cat sat on the mat")["input_ids"]
    stream = Stream(engine.embed([ids]))
    peak: dict[int, float] = {}

    def observe(layer, stream_index, inputs, outputs, probe):
        peak[layer] = float(outputs[0].abs().max())

    run_layers(engine, [stream], observe=observe)
    assert sorted(peak) == list(range(engine.num_layers))
    assert peak[3] > 100 * peak[2]  # the planted ME Layer
    assert all(p.is_meta for p in engine.layers.parameters())  # every layer went back after its turn
