"""The budgeted patch (`patch --max-kl`): the largest sink cut whose KL on held-out text is within a budget.

A driver of the search session (`search.session`), which searches the space on a tuning text and chooses
on held-out text, as `tune` does. The chosen setting is written as an ordinary patch, with the figures and
the search settings in the card and provenance; the written folder is then measured again on the same
held-out windows (as `verify` measures it), and a disagreement with the search's figures is said first.
Nothing in the space within the budget: nothing is written (`BudgetNotMet`, exit 4).

The study, the scan and the held-out measurements live in the user cache (`cache_dir()/search/KEY`),
KEY a hash of the model's content and the search settings: an identical second run reuses every trial and
measurement, and a run with more `--trials` continues the study.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from melsurgery.checkpoint.provenance import SearchRecord
from melsurgery.checkpoint.source import Source
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import BudgetNotMet
from melsurgery.formats.wording import change_text, count
from melsurgery.search.options import SearchOptions
from melsurgery.search.records import Measured, pairs, payoff_text
from melsurgery.search.session import SLACK, Choice, SearchSession, cache_folder, fingerprint, read_texts, text_sha


@dataclass(frozen=True)
class BudgetChoice:
    """What the search found: the session (texts, space, study) and its choice on held-out text."""

    session: SearchSession
    choice: Choice
    trials: int  # complete trials in the study
    tried: list[dict]  # every complete trial: number, sink cut and KL on the tuning text

    @property
    def chosen(self) -> Measured | None:
        """The chosen setting (None: nothing within the budget)."""
        return self.choice.chosen

    def plot_data(self, model: str) -> dict:
        """What `plot.plot_search` draws."""
        s, t = self.session, self.session.texts
        return {"model": model, "max_kl": s.opts.max_kl, "trials": self.tried,
                "sink_layers": f"{s.space.me_layer + 1}-{s.space.num_layers - 1}",
                "texts": f"tuning {len(t.tune.ids)} x {s.opts.max_tokens} tokens, held-out {len(t.held.ids)} x "
                         f"{s.opts.max_tokens}",
                "candidates": [{"trial": c.trial, "tuning": asdict(c.tuning), "heldout": asdict(c.heldout)}
                               for c in self.choice.candidates],
                "chosen": None if self.chosen is None else {"trial": self.chosen.trial,
                                                            "heldout": asdict(self.chosen.heldout)}}

    def record(self) -> SearchRecord:
        """The search settings and the chosen setting's figures, as provenance and the card keep them."""
        c, s = self.chosen, self.session
        assert c is not None
        opts, n, t = s.opts, s.space.num_layers, s.texts
        return SearchRecord(
            budget={"max_kl": opts.max_kl, "max_ppl_increase": opts.max_ppl_increase},
            objective=opts.objective, sink_layers=f"{s.space.me_layer + 1}-{n - 1}",
            space=s.space.to_dict(),
            study={"storage": str(s.folder / "study.journal"), "trials": self.trials, "ran": s.ran,
                   "limit": opts.trials, "timeout": opts.timeout, "seed": opts.seed, "sampler": "TPE (optuna)",
                   "candidates": len(self.choice.candidates), "slack": SLACK,
                   **({"payoff_window": opts.payoff_window} if opts.objective == "evict" else {})},
            tuning={"text": t.tune_name, "windows": len(t.tune.ids), "tokens": t.tune_tokens,
                    "max_tokens": opts.max_tokens},
            heldout={"text": t.held_name, "windows": len(t.held.ids), "tokens": t.held_tokens,
                     "max_tokens": opts.max_tokens},
            compute={"device": s.device, "dtype": str(s.dtype).removeprefix("torch.")},
            trial=c.trial, figures_tuning=record_figures(c.tuning), figures_heldout=record_figures(c.heldout))


def record_figures(fig) -> dict[str, float | None]:
    """Figures as provenance keeps them: each figure, and in place of the per-window KL its 95% interval."""
    out: dict[str, float | None] = {k: v for k, v in asdict(fig).items() if k != "kl_windows"}
    interval = fig.kl_interval()
    if interval is not None:
        out["kl_interval_low"], out["kl_interval_high"] = max(interval[0], 0.0), interval[1]
    return out


def search_budget(source: Source, opts: SearchOptions, *, scan: ScanResult | None, calibration, detection,
                  text: Path | None = None, heldout: Path | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, progress: bool = False) -> BudgetChoice:
    """Search the space under the budget and choose on held-out text; writes nothing but the search cache."""
    texts = read_texts(source.folder, text, heldout, opts.max_tokens, opts.windows)
    key = {**fingerprint(source, opts, texts, calibration, detection, dtype), "heldout": text_sha(texts.held_raw)}
    session = SearchSession(source, opts, texts, cache_folder(source, key), calibration=calibration,
                            detection=detection, scan=scan, device=device, dtype=dtype, progress=progress)
    session.run()
    trials = session.trials()
    tried = [{"trial": t.number, "sink_reduction_pct": t.figures.sink_reduction_pct, "kl_mean": t.figures.kl_mean}
             for t in trials]
    return BudgetChoice(session, session.choose(trials=trials), len(trials), tried)


def refusal(found: BudgetChoice) -> BudgetNotMet:
    """The one line that says nothing in the space cuts the sink (or lowers the payoff penalty) within the budget
    (exit 4, nothing written)."""
    cands, s = found.choice.candidates, found.session
    goal = s.opts.goal
    best = max(cands, key=lambda c: goal.of(c.heldout), default=None)
    near = ""
    if best is not None:
        near = (f"; the largest held-out {'removal' if goal.arrangement else 'cut'} among the {len(cands)} "
                f"re-measured settings is {goal.of(best.heldout):.1f}{' points' if goal.arrangement else '%'} at KL "
                f"{best.heldout.kl_mean:.4f}")
    does = f"lowers the {goal.label}" if goal.arrangement else "cuts the sink"
    return BudgetNotMet(f"no setting of the search space ({count(found.trials, 'trial')} over "
                        f"{', '.join(r.name for r in s.space.recipes)}) {does} within {s.opts.describe()} "
                        f"on held-out text{near}; nothing written (raise the budget or --trials)")


@dataclass(frozen=True)
class Recheck:
    """The written checkpoint measured on the search's held-out windows, as `verify` measures it."""

    kl_mean: float
    sink_reduction_pct: float
    ppl_patched: float
    payoff_removed: float  # the objective's penalty removed (points; NaN unless the objective is a payoff)
    agrees: bool  # within REL_AGREE of the search's figures, and within the budget
    within: bool  # the written checkpoint's KL (and perplexity) within the budget


REL_AGREE = 0.02  # the written checkpoint's KL may differ this much (relative) from the search's before it is said


def recheck(found: BudgetChoice, out: Path) -> Recheck:
    """Measure the written folder on the same held-out windows the search chose on (`verify` on FOLDER/heldout.txt
    with the same window length and count) and compare with the search's held-out figures."""
    from melsurgery.checkpoint.atomic import write_atomic
    from melsurgery.measure.verify import run_verify

    s, h = found.session, found.chosen.heldout
    held = s.folder / "heldout.txt"
    write_atomic(held, s.texts.held_raw)
    arranged = s.opts.arrangement
    v = run_verify(s.source.folder, out, text=held, max_tokens=s.opts.max_tokens, max_windows=s.opts.windows,
                   device=s.device, dtype=s.dtype, generations=0,
                   payoff_window=s.opts.payoff_window if arranged else None)
    cut = (100 * (1 - v.sink_mean_patched / v.sink_mean_base) if v.sink_mean_base and v.sink_mean_patched is not None
           else math.nan)
    ppl_increase = 100 * (v.ppl_patched / v.ppl_base - 1)
    within = ((s.opts.max_kl is None or v.kl_mean <= s.opts.max_kl)
              and (s.opts.max_ppl_increase is None or ppl_increase <= s.opts.max_ppl_increase))
    agrees = within and abs(v.kl_mean - h.kl_mean) <= REL_AGREE * max(h.kl_mean, 1e-12)
    payoff = next((-p.difference_pp for p in v.payoff if arranged and p.name == arranged.name), math.nan)
    return Recheck(v.kl_mean, cut, v.ppl_patched, payoff, agrees, within)


@dataclass(frozen=True)
class BudgetedPatch:
    """A budgeted patch as written: the search's choice, the patch result, and the written folder re-measured."""

    found: BudgetChoice
    patch: object  # patch.PatchResult
    recheck: Recheck


def run_budgeted_patch(source: Source, out: Path, manifest, opts: SearchOptions, *, scan: ScanResult | None = None,
                       text: Path | None = None, heldout: Path | None = None, overwrite: bool = False,
                       link: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       progress: bool = False, verify: dict | None = None,
                       plot: Path | None = None) -> BudgetedPatch:
    """Search, choose on held-out text, write the chosen patch with the search record in card and provenance, and
    measure the written folder on the same held-out windows.

    `manifest` gives the model, calibration and detection (its recipes are what the search chooses); `plot`: a
    PNG of the search (written also when nothing is chosen). Raises `BudgetNotMet` (exit 4, no patch written) when
    no setting cuts the sink within the budget."""
    from dataclasses import replace

    from melsurgery.checkpoint.atomic import check_output
    from melsurgery.detect.scan import check_scan_params
    from melsurgery.surgery.patch import run_patch

    check_scan_params(manifest.calibration, manifest.detection)
    check_output(out, overwrite, protect=source.folder)
    found = search_budget(source, opts, scan=scan, calibration=manifest.calibration, detection=manifest.detection,
                          text=text, heldout=heldout, device=device, dtype=dtype, progress=progress)
    if plot is not None:
        from melsurgery.report.plot import plot_search

        plot_search(found.plot_data(source.id), plot)
    if found.chosen is None:
        raise refusal(found)
    chosen = replace(manifest, recipes=pairs(found.chosen.recipes))
    result = run_patch(source, out, chosen, scan=found.session.scan, overwrite=overwrite, link=link, device=device,
                       progress=progress, verify=verify, search=found.record())
    return BudgetedPatch(found, result, recheck(found, out))


def spread_text(fig) -> str:
    """The per-window spread of a held-out KL: the 95% interval of the mean, or why there is none."""
    interval = fig.kl_interval()
    if interval is None:
        return "one window: no per-window spread (give --windows 2 or more to bound it)"
    lo, hi = interval
    return (f"per window {min(fig.kl_windows):.4f}-{max(fig.kl_windows):.4f}, 95% interval of the mean "
            f"{max(lo, 0.0):.4f}-{hi:.4f} over {count(len(fig.kl_windows), 'window')}")


def budget_report(done: BudgetedPatch) -> str:
    """What `patch --max-kl` prints: first any disagreement of the written folder with the search, then the search,
    the texts, the chosen setting and its held-out figures, each figure with its definition."""

    from melsurgery.search.space import setting_text

    found, ch, r = done.found, done.found.chosen, done.recheck
    s, t, h = found.session, found.session.texts, ch.heldout
    goal = s.opts.goal
    lines = []
    if not r.agrees:
        lines.append(f"WARNING: the written checkpoint measures KL {r.kl_mean:.4f} on the held-out windows, where the "
                     f"search measured {h.kl_mean:.4f}"
                     + ("" if r.within else f": over the budget ({s.opts.describe()})")
                     + "; rerun with more --windows, or a tighter budget")
    lines += [
        f"search: {count(found.trials, 'trial')} ({s.ran} run now) over "
        f"{', '.join(x.name for x in s.space.recipes)} and their compositions; study in {s.folder}",
        f"tuning text: {t.tune_name}, {count(len(t.tune.ids), 'window')}, {t.tune_tokens} tokens; held-out: "
        f"{t.held_name}, {count(len(t.held.ids), 'window')}, {t.held_tokens} tokens (windows of up to "
        f"{s.opts.max_tokens} tokens)",
        f"budget: {s.opts.describe()} on the held-out text; {count(len(found.choice.candidates), 'setting')} "
        "re-measured there",
        f"chosen: trial #{ch.trial}: {setting_text(ch.recipes)}",
        f"held-out figures: sink (mean over layers {s.space.me_layer + 1}-{s.space.num_layers - 1}, after the ME "
        f"Layer {s.space.me_layer}) {h.sink_base:.3f} -> {h.sink_patched:.3f} ({change_text(h.sink_reduction_pct)}); "
        f"KL(base || patched) {h.kl_mean:.4f} per token ({spread_text(h)}); perplexity {h.ppl_base:.2f} -> "
        f"{h.ppl_patched:.2f} ({h.ppl_increase_pct:+.1f}%)",
        f"written checkpoint, re-measured on the same held-out windows: KL {r.kl_mean:.4f}, sink "
        f"{change_text(r.sink_reduction_pct)}, perplexity {r.ppl_patched:.2f}"
        + (f", {r.payoff_removed:+.1f} points of {goal.label} removed" if goal.arrangement else ""),
    ]
    if goal.arrangement:
        lines.insert(-2, f"objective: {goal.name}, the {goal.label} removed (perplexity change under "
                         f"{goal.arrangement} against the plain forward, base minus patched): {payoff_text(h, goal)}")
    return "\n".join(lines)
