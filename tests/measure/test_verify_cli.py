"""`melsurgery verify` through its public surface (console script and JSON), so these checks hold whatever
verify's internals: figures recomputed independently, every gate, --text, --quiet."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from melsurgery.checkpoint.source import resolve
from melsurgery.surgery.manifest import Manifest
from melsurgery.surgery.patch import run_patch
from tests.support.helpers import assert_clean_failure, run_cli

HAMLET = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
          "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. To "
          "die, to sleep; no more; and by a sleep to say we end the heart-ache and the thousand natural shocks.")
WINDOW = 64


def independent_figures(base, patched, text: str, windows: int) -> dict:
    """KL(base || patched) per predicted token and both perplexities, from plain transformers forwards in
    float64 over the documented windows: each window is the tokenizer's special prefix (what it adds in front
    of any text) plus the next WINDOW - len(prefix) tokens of the text; the prefix itself is never scored."""
    tok = AutoTokenizer.from_pretrained(base)
    with_specials, plain = tok(text)["input_ids"], tok(text, add_special_tokens=False)["input_ids"]
    prefix = with_specials[: len(with_specials) - len(plain)]
    body = WINDOW - len(prefix)
    chunks = [prefix + plain[i : i + body] for i in range(0, len(plain), body)][:windows]
    first = max(len(prefix), 1)
    models = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float64).eval() for f in (base, patched)]
    kl = nll_b = nll_p = 0.0
    count = 0
    for chunk in chunks:
        x = torch.tensor([chunk])
        with torch.no_grad():
            lb, lp = (m(x).logits[0, first - 1 : -1].log_softmax(-1) for m in models)
        target = x[0, first:, None]
        kl += float((lb.exp() * (lb - lp)).sum())
        nll_b -= float(lb.gather(-1, target).sum())
        nll_p -= float(lp.gather(-1, target).sum())
        count += len(chunk) - first
    return {"windows": len(chunks), "kl_mean": kl / count, "ppl_base": math.exp(nll_b / count),
            "ppl_patched": math.exp(nll_p / count)}


@pytest.mark.slow
def test_verify_figures_gates_text_and_quiet(planted, planted_scan, tmp_path):
    out = tmp_path / "out"
    run_patch(resolve(str(planted)), out, Manifest(recipes=[("ffn-dampen", {"factor": 0.5})]), scan=planted_scan)
    text, js = tmp_path / "held-out.txt", tmp_path / "v.json"
    text.write_text(HAMLET)
    common = ("verify", planted, out, "--text", text, "--max-tokens", WINDOW, "--windows", "2", "--generations", "0",
              "--quiet")
    res = run_cli(*common, "--json", js, "--max-kl", "10", "--max-ppl-increase", "1000", "--min-sink-reduction",
                  "-1000")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # --quiet: no progress or loading bars, from us or from transformers
    r = json.loads(js.read_text())
    assert r["text"] == str(text)
    want = independent_figures(planted, out, HAMLET, 2)
    assert r["windows"] == want["windows"] == 2
    for key in ("kl_mean", "ppl_base", "ppl_patched"):
        assert r[key] == pytest.approx(want[key], rel=1e-4), key
    assert r["kl_mean"] > 1e-4  # the patch changed something to measure
    assert r["ppl_increase_pct"] == pytest.approx(100 * (want["ppl_patched"] / want["ppl_base"] - 1), abs=1e-3)
    # the two gates other than --max-kl, each set just past the measured figure, fail with exit 4
    res = run_cli(*common, "--max-ppl-increase", f"{r['ppl_increase_pct'] - 0.01:.4f}",
                  "--min-sink-reduction", f"{r['sink_reduction_pct'] + 1:.4f}")
    assert_clean_failure(res, "gate violated", "--max-ppl-increase", "--min-sink-reduction", code=4)
