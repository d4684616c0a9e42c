"""The Python API (docs/api.md) for a measurement of one's own: the streaming engine, one layer in memory."""

from pathlib import Path

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


@pytest.fixture(scope="module")
def gguf_and_patch(planted_scan, tmp_path_factory):
    """A planted model as a .gguf file (converted into a private cache) and a patch of it."""
    import os

    import melsurgery
    from tests.support.planted import build_model, llama_config
    from tests.support.planted_gguf import Q, write_gguf

    root = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MELSURGERY_CACHE", str(root / "cache"))
        gguf = write_gguf(build_model(llama_config()), root / "tiny.Q8_0.gguf", Q.Q8_0)
        melsurgery.patch(str(gguf), root / "out", [("ffn-dampen", {"factor": 0.0})], scan=planted_scan)
        yield gguf, root / "out"
        assert os.environ["MELSURGERY_CACHE"] == str(root / "cache")


@pytest.mark.slow
def test_every_entry_point_takes_models_as_the_cli_does(gguf_and_patch, planted, planted_scan):
    """A .gguf file, a folder as text or Path, and a resolved Source: verify, diff and scan accept each alike
    (verify took only folders, and failed on what `melsurgery verify` and `melsurgery.diff` accept)."""
    import melsurgery

    gguf, out = gguf_and_patch
    src = melsurgery.resolve(str(gguf))
    fast = {"max_windows": 1, "max_tokens": 32, "generations": 0}
    results = [melsurgery.verify(base, patched, **fast) for base, patched in
               ((str(gguf), str(out)), (gguf, out), (src, melsurgery.resolve(str(out))), (src.folder, out))]
    assert len({(r.kl_mean, r.ppl_patched) for r in results}) == 1 and results[0].kl_mean > 0
    assert results[0].weights.changed == ["model.layers.3.mlp.down_proj.weight"]
    assert melsurgery.diff(str(gguf), out).summary()["changed"] == melsurgery.diff(src, str(out)).summary()["changed"]
    quick = melsurgery.CalibrationSpec(num_samples=4, max_tokens=32)
    assert melsurgery.scan(Path(planted), quick).me_layer == melsurgery.scan(str(gguf), quick).me_layer == 3


def test_patch_refuses_recipes_and_a_budget_together(planted, tmp_path):
    import melsurgery

    with pytest.raises(melsurgery.UserError, match="not both"):
        melsurgery.patch(str(planted), tmp_path / "out", [("ffn-dampen", {})], max_kl=0.05)
    assert not (tmp_path / "out").exists()
