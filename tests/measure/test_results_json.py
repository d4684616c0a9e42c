"""VerifyResult as JSON (`verify --json`): the typed result round-trips, figures that are not finite come back as
NaN (JSON writes them as null), `vllm` appears only when measured, and a malformed document is one line naming
the field."""

from __future__ import annotations

import json
import math
import re

import pytest

from melsurgery.errors import UserError
from melsurgery.formats.jsonsafe import dumps
from melsurgery.measure.verify_result import ServedFigures, VerifyResult, WeightCheck

LAYERS = 3


def result(**changes) -> VerifyResult:
    """A verify result as run_verify builds it (3 layers, ME Layer 1), with `changes` applied."""
    per_layer = [0.1, 0.5, 0.4]
    values = dict(
        text="hamlet", windows=2, tokens=256, window_prefix=["<s>"], scored_tokens=254, kl_mean=0.03, kl_max=0.4,
        top1_agreement=0.97, ppl_base=12.5, ppl_patched=12.9, me_layer=1, massive_positions=[[0], [0]],
        sink_base=per_layer, sink_rate_base=[None, 0.9, 0.8], max_abs_base=[3.0, 900.0, 901.0],
        ratio_base=[1.0, 800.0, 790.0], similarity_base=[None, 0.6, 0.5], sink_patched=[0.1, 0.4, 0.3],
        sink_rate_patched=[None, 0.7, 0.6], max_abs_patched=[3.0, 500.0, 510.0], ratio_patched=[1.0, 400.0, 420.0],
        similarity_patched=[None, 0.5, 0.4], ppl_increase_pct=3.2, sink_layers_from=2, sink_mean_base=0.4,
        sink_mean_patched=0.3, sink_reduction_pct=25.0, sink_rate_mean_base=0.8, sink_rate_mean_patched=0.6,
        similarity_mean_base=0.5, similarity_mean_patched=0.4,
        weights=WeightCheck.of(["model.layers.1.mlp.down_proj.weight"], ["model.layers.1.mlp.down_proj.weight"], None),
        no_effect=False, generations=[{"prompt": "Hi", "base": "Hello", "patched": "Hello"}], generations_note=None,
        seconds=4.5)
    return VerifyResult(**{**values, **changes})


def through_json(r: VerifyResult) -> VerifyResult:
    """As `verify --json` writes it (non-finite figures as null) and a reader reads it back."""
    return VerifyResult.from_json(json.loads(dumps(r.to_json())), "verify.json")


def test_a_result_round_trips_and_writes_vllm_only_when_measured() -> None:
    r = result()
    assert through_json(r) == r and "vllm" not in r.to_json()
    served = ServedFigures(engine="vllm 0.32.0", ppl_base=12.5, ppl_patched=12.9, ppl_increase_pct=3.2,
                           top1_agreement=0.97, logprob_gap_base=1e-5, logprob_gap_patched=1.2e-5)
    with_vllm = result(vllm=served)
    assert through_json(with_vllm) == with_vllm and with_vllm.to_json()["vllm"]["engine"] == "vllm 0.32.0"


def test_figures_that_are_not_finite_come_back_as_nan() -> None:
    back = through_json(result(kl_mean=math.nan, ppl_patched=math.inf, ppl_increase_pct=math.inf))
    assert math.isnan(back.kl_mean) and math.isnan(back.ppl_patched) and math.isnan(back.ppl_increase_pct)
    assert back.kl_max == 0.4  # the finite ones unchanged


DAMAGE = {
    "kl-a-string": (lambda d: d.update(kl_mean="0.03"), "kl_mean must be a finite number"),
    "weights-changed-not-a-list": (lambda d: d["weights"].update(changed="w"), "weights.changed must be a list"),
    "no-windows": (lambda d: d.__delitem__("windows"), "windows must be an integer, got None"),
    "sink-layer-a-word": (lambda d: d["sink_base"].__setitem__(1, "high"),
                          "sink_base[1] must be a finite number or null"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_malformed_document_names_the_field(case: str) -> None:
    doc = json.loads(dumps(result().to_json()))
    damage, message = DAMAGE[case]
    damage(doc)
    with pytest.raises(UserError, match=rf"^verify\.json: {re.escape(message)}.*rerun verify$"):
        VerifyResult.from_json(doc, "verify.json")


@pytest.mark.parametrize("cut, first", [
    (25.0, "held-out text: hamlet, 2 windows"),
    (-3.4, "THIS PATCH RAISES THE ATTENTION SINK it is meant to cut: +3.4% (worse) over layers 2-2 on this text "
           "(0.400 -> 0.414)"),
    (0.0, "THIS PATCH DOES NOT CUT THE ATTENTION SINK: unchanged over layers 2-2 on this text")])
def test_a_patch_that_raises_the_sink_says_so_first(cut, first):
    from melsurgery.measure.verify_result import verify_report

    r = result(sink_reduction_pct=cut, sink_mean_patched=0.4 * (1 - cut / 100))
    assert verify_report(r).splitlines()[0].startswith(first)
