"""The search engine: trials measure what a full forward of the edited model gives, whatever they edit."""

from __future__ import annotations

import math

import pytest
import torch

from melsurgery.checkpoint.edits import Edit, edited_tensor
from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import run_scan
from melsurgery.recipes import RecipePlan
from melsurgery.search.engine import Evaluator
from melsurgery.search.tune import text_windows
from tests.support.planted import family_config, planted_folder

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows of "
        "outrageous fortune, or to take arms against a sea of troubles.\n")


def _full_forward(folder, windows, first, edits):
    """KL(base || edited) per scored token and both perplexities, from whole models in transformers."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    edited = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for e in edits:  # a tied head is the same parameter as the embedding table, as in the checkpoint
            name = e.tensor if e.tensor in params else "lm_head.weight"
            params[name].copy_(edited_tensor(params[name].detach(), [e]))
    kl = nll_b = nll_p = 0.0
    n = 0
    with torch.no_grad():
        for ids in windows:
            x = torch.tensor([ids])
            lb = base(x).logits[0, first - 1 : -1].double().log_softmax(-1)
            lp = edited(x).logits[0, first - 1 : -1].double().log_softmax(-1)
            t = torch.tensor(ids[first:])[:, None]
            kl += float((lb.exp() * (lb - lp)).sum())
            nll_b -= float(lb.gather(1, t).sum())
            nll_p -= float(lp.gather(1, t).sum())
            n += len(ids) - first
    return kl / n, math.exp(nll_b / n), math.exp(nll_p / n)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2"])
def test_trials_that_edit_the_embedding_and_the_head_match_a_full_forward(family, tmp_path):
    """An edit of the first token's embedding row (the row every window starts with) and of LM-head rows: the
    engine's KL and perplexities equal those of whole models. Llama: untied head, and a column edit of the table;
    Gemma 3: tied head (the edited row is an output logit too); Gemma 2: tied and soft-capped logits (the base
    logits are recomputed per block)."""
    from melsurgery.checkpoint.tokenizer import load_tokenizer

    folder = planted_folder(tmp_path / family, family_config(family))
    source = resolve(str(folder))
    scan = run_scan(source)
    ev = Evaluator(source, scan)
    win = text_windows(load_tokenizer(folder), TEXT, 64, None)
    text = ev.base_pass("text", win.ids, win.first_target)
    assert ev.linear_head == (family != "gemma2")
    bos = win.ids[0][0]
    embed = ev.family.embed
    edits = [Edit(embed, 0.5, shift=0.01, axis=0, index=(bos,)), Edit(ev.model.head_tensor, 1.3, axis=0,
                                                                      index=(7, 40))]
    if family == "llama":
        edits.append(Edit(embed, 0.9, axis=1, index=(3, 17)))  # columns of the table: every row
    fig = ev.run(text, [RecipePlan("hand", {}, "hand-made", edits)])
    kl, ppl_b, ppl_p = _full_forward(folder, win.ids, win.first_target, edits)
    assert kl > 1e-4
    assert fig.kl_mean == pytest.approx(kl, rel=1e-4)
    assert fig.ppl_base == pytest.approx(ppl_b, rel=1e-5)
    assert fig.ppl_patched == pytest.approx(ppl_p, rel=1e-5)
    assert ev.run(text, []).kl_mean == 0.0
