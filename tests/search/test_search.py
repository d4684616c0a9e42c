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
from melsurgery.search.session import text_windows
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
@pytest.mark.slow
def test_trials_that_edit_the_embedding_and_the_head_match_a_full_forward(family, tmp_path):
    """An edit of the first token's embedding row (the row every window starts with) and of LM-head rows: the
    engine's KL and perplexities equal those of whole models. Llama: untied head, and a column edit of the table;
    Gemma 3: tied head (the edited row is an output logit too); Gemma 2: tied and soft-capped logits (the base
    logits are recomputed per block)."""
    from melsurgery.checkpoint.safeload import load_tokenizer

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


def test_changes_are_worded_as_what_they_are():
    from melsurgery.formats.wording import change_text

    assert change_text(14.63) == "-14.6%"
    assert change_text(-2.9) == "+2.9% (worse)"
    assert change_text(0.01) == "unchanged"
    assert change_text(None) == change_text(math.nan) == "not measured"


def _fig(cut: float, kl: float, ppl: float = 1.0):
    from melsurgery.search.records import Figures

    return Figures(0.5, 0.5 * (1 - cut / 100), cut, 1.0, 1.0, 0.0, kl, 40.0, 40.0 * (1 + ppl / 100), ppl, 512)


def test_the_choice_is_the_largest_held_out_cut_within_the_budget():
    """The tuning text ranks (within twice the budget, largest cut first), the held-out text decides; a setting
    that raises the sink is never chosen, and a budget nothing meets chooses nothing."""
    from melsurgery.search.options import SearchOptions
    from melsurgery.search.records import Measured, TrialRecord
    from melsurgery.search.session import candidates_for, pick

    trials = [TrialRecord(n, "COMPLETE", (), {}, _fig(cut, kl), None) for n, cut, kl in
              ((0, 30.0, 0.2), (1, 20.0, 0.09), (2, 15.0, 0.04), (3, -5.0, 0.001), (4, 10.0, 0.01))]
    opts = SearchOptions(max_kl=0.05)
    assert [t.number for t in candidates_for(trials, opts.budget, opts.goal)] == [1, 2, 4]
    held = {1: _fig(19.0, 0.06), 2: _fig(14.0, 0.045), 4: _fig(9.0, 0.012)}
    found = [Measured(trial=n, recipes=(), tuning=_fig(0, 0), heldout=held[n]) for n in (1, 2, 4)]
    assert pick(found, opts.budget, opts.goal).trial == 2  # 1 cuts more but is over the budget on held-out text
    assert pick(found, SearchOptions(max_kl=0.05, max_ppl_increase=0.5).budget, opts.goal) is None
    assert pick([Measured(trial=3, recipes=(), tuning=_fig(0, 0), heldout=_fig(-5.0, 0.001))], opts.budget,
                opts.goal) is None


@pytest.mark.slow
def test_the_search_scales_promising_over_budget_settings_into_the_budget(tmp_path):
    """With a budget, the last trials of a search take the over-budget setting that promises the largest cut and
    scale its strengths toward no effect until it fits: here ffn-dampen's factor toward 1 (on this planted model
    only the full cut lowers the sink; the test is of the mechanism)."""
    import optuna

    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.recipes import resolve_recipes
    from melsurgery.search.records import OBJECTIVES, Budget, Figures
    from melsurgery.search.space import make_space
    from melsurgery.search.study import complete_trials, make_objective, run_trials

    folder = planted_folder(tmp_path / "m")
    source = resolve(str(folder))
    scan = run_scan(source)
    ev = Evaluator(source, scan)
    win = text_windows(load_tokenizer(folder), TEXT, 64, None)
    text = ev.base_pass("text", win.ids, win.first_target)
    strong = ev.run(text, ev.plans(resolve_recipes([("ffn-dampen", {"factor": 0.0})])))
    budget = Budget(max_kl=strong.kl_mean / 20)
    space = make_space(("ffn-dampen",), scan)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial({"recipes": "ffn-dampen", "ffn-dampen.factor": 0.0})
    goal = OBJECTIVES["sink"]
    run_trials(study, make_objective(ev, text, space, goal, budget), 9, timeout=None, goal=goal, budget=budget,
               progress=False, space=space)
    refined = [t for t in study.trials if "toward" in t.user_attrs]
    assert len(study.trials) == 9 and len(refined) == 3
    origin = study.trials[refined[0].user_attrs["toward"]]
    assert budget.over(Figures(**origin.user_attrs["figures"])) > 1
    for t in refined:  # the origin's factor, moved toward 1 by the recorded scale
        scale = t.user_attrs["scale"]
        assert 0 < scale < 1
        assert t.params["ffn-dampen.factor"] == pytest.approx(1 + scale * (origin.params["ffn-dampen.factor"] - 1))
    # the steps bracket the budget's edge: within it, and not far inside (a scale near 0 would fit trivially)
    kls = [t.figures.kl_mean for t in complete_trials(study) if t.number in {r.number for r in refined}]
    assert min(kls) <= budget.max_kl and max(k for k in kls if k <= budget.max_kl) > budget.max_kl / 3


def test_held_layers_measure_what_streamed_ones_do_without_rereading_the_checkpoint(tmp_path, monkeypatch):
    """An evaluator holding the layers from the ME Layer and the LM head in memory gives the figures of one that
    streams them from the checkpoint per trial (as verify does, for models over the memory budget), and its trials
    read no decoder layer from the checkpoint (the streamed one reads every layer it reruns)."""
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.recipes import resolve_recipes

    folder = planted_folder(tmp_path / "m")
    source = resolve(str(folder))
    scan = run_scan(source)
    win = text_windows(load_tokenizer(folder), TEXT, 64, None)
    figures, reads = {}, {}
    for resident in (True, False):
        ev = Evaluator(source, scan, resident=resident)
        text = ev.base_pass("text", win.ids, win.first_target)
        calls = []
        load_prefix = ev.ckpt.load_prefix
        monkeypatch.setattr(ev.ckpt, "load_prefix", lambda prefix, *a, seen=calls, read=load_prefix, **kw:
                            seen.append(prefix) or read(prefix, *a, **kw))
        plans = ev.plans(resolve_recipes([("wemask", {}), ("ffn-dampen", {"factor": 0.3})]))
        figures[resident], reads[resident] = ev.run(text, plans), len(calls)
    assert figures[True].kl_mean > 0 and figures[True].sink_reduction_pct != 0
    assert figures[True] == figures[False]
    assert reads[True] == 0 and reads[False] > 0
