"""`tune`: search recipe settings per model (Optuna): the sink cut after the ME Layer against KL.

Massive activations and sinks differ from model to model, so the right cut is searched, not guessed.
A driver of the search session (`search.session`): the study lives in the run folder (or any Optuna
storage), the choice and the best within a few KL budgets are made on held-out text, as the budgeted
patch makes them, and the run writes tune.json (`TuneResult`), tune.png and best.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from melsurgery.checkpoint.atomic import write_atomic
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.source import Source
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import NoMassiveActivations, UserError
from melsurgery.formats.jsonsafe import dumps
from melsurgery.formats.typed import JsonRecord, Need
from melsurgery.search.options import SearchOptions
from melsurgery.search.records import (
    OBJECTIVES,
    Budget,
    Figures,
    Measured,
    RecipeChoice,
    TrialRecord,
    pairs,
    pareto_front,
    payoff_text,
)
from melsurgery.search.session import SearchSession, Texts, read_texts
from melsurgery.search.space import setting_text
from melsurgery.search.storage import STUDY, check_run_dir, describe
from melsurgery.surgery.patch import check_scan_fits

BUDGETS = (0.02, 0.05, 0.1)  # KL budgets reported in tune.json (and the docs)
SCHEMA_VERSION = 2
SKIP = {"skip": True}


# --- tune.json, typed ---

@dataclass(frozen=True)
class TextInfo:
    """One text of the workload: where it came from, its windows and tokens."""

    text: str
    windows: int
    tokens: int
    file: str | None = field(default=None, metadata={"omit_none": True})


@dataclass(frozen=True)
class Workload:
    """What the trials ran over."""

    tuning: TextInfo
    heldout: TextInfo
    max_tokens: int
    dtype: str
    device: str


@dataclass(frozen=True, kw_only=True)
class TuneResult(JsonRecord):
    """A tune run: tune.json's content (`to_json`), plus what the command needs beside it (not written)."""

    schema_version: int = SCHEMA_VERSION
    model: dict[str, Any]
    study: dict[str, Any]
    objective: str
    budget: dict[str, Any]
    me_layer: int
    workload: Workload
    search_space: dict[str, Any]
    defaults: tuple[Measured, ...]
    trials: tuple[TrialRecord, ...]
    pareto_front: tuple[int, ...]
    by_budget: dict[str, Measured]
    chosen: Measured | None
    run_dir: Path | None = field(default=None, metadata=SKIP)
    ran: int = field(default=0, metadata=SKIP)  # trials this process ran
    manifest: Any = field(default=None, metadata=SKIP)  # the Manifest of the chosen trial
    scan: ScanResult | None = field(default=None, metadata=SKIP)

    json_fix = "rerun tune"

    @classmethod
    def json_check(cls, data: Any, need: Need | None, path: str) -> None:
        """Only this schema version is read (a tune.json of another layout is rerun, not guessed at)."""
        if need is not None:
            version = data.get("schema_version") if isinstance(data, dict) else data
            need(version == SCHEMA_VERSION, "schema_version", str(SCHEMA_VERSION), version)

    @classmethod
    def read(cls, path: Path) -> TuneResult:
        """A tune.json file."""
        from melsurgery.formats.jsonsafe import load_strict

        try:
            return cls.from_json(load_strict(Path(path), "tune.json"), str(path))
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _prepare_run_dir(run_dir: Path, source: Source, scan: ScanResult | None, opts: SearchOptions,
                     texts: Texts) -> None:
    """Checks that need no model run, then the run folder with the held-out text as verify reads it."""
    from melsurgery.search.space import make_space

    check_run_dir(run_dir, opts.storage, source.folder)
    if scan is not None:
        check_scan_fits(scan, Checkpoint(source.folder).config)
        if scan.me_layer is None:
            raise NoMassiveActivations(f"{source.id}: the scan found no ME Layer, so there is no sink to cut; "
                                       "nothing written")
        make_space(opts.searched, scan)  # a space without a layer to act on is refused before anything is written
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot create the run folder ({exc.strerror})") from None
    # so that `verify --text RUN_DIR/heldout.txt` reproduces the held-out figures
    write_atomic(run_dir / "heldout.txt", texts.held_raw)


def _result(session: SearchSession, run_dir: Path, trials: list[TrialRecord], measured: tuple) -> TuneResult:
    """tune.json's record of the run."""
    opts, texts, space, source = session.opts, session.texts, session.space, session.source
    defaults, by_budget, chosen = measured
    return TuneResult(
        model={"id": source.id, "folder": str(source.folder), "revision": source.revision},
        study={"name": STUDY, "storage": describe(opts.storage, run_dir), "trials": len(trials), "seed": opts.seed},
        objective=opts.objective, budget={"max_kl": opts.max_kl, "max_ppl_increase": opts.max_ppl_increase},
        me_layer=space.me_layer,
        workload=Workload(TextInfo(texts.tune_name, len(texts.tune.ids), texts.tune_tokens),
                          TextInfo(texts.held_name, len(texts.held.ids), texts.held_tokens, "heldout.txt"),
                          opts.max_tokens, str(session.dtype).removeprefix("torch."), session.device),
        search_space={"recipes": [r.name for r in space.recipes], "combos": space.combos},
        defaults=tuple(defaults), trials=tuple(trials), pareto_front=tuple(pareto_front(trials, opts.goal)),
        by_budget=by_budget, chosen=chosen)


def run_tune(source: Source, model_arg: str, run_dir: Path, opts: SearchOptions, *, scan: ScanResult | None = None,
             calibration=None, detection=None, text: Path | None = None, heldout: Path | None = None,
             device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = False) -> TuneResult:
    """Search, choose on held-out text, then write tune.json, tune.png and best.yaml into `run_dir`; see
    docs/commands/tune.md."""
    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.params import DetectParams
    from melsurgery.surgery.manifest import Manifest

    calibration = calibration or CalibrationSpec()
    detection = detection or DetectParams()
    texts = read_texts(source.folder, text, heldout, opts.max_tokens, opts.windows)
    run_dir = Path(run_dir)
    _prepare_run_dir(run_dir, source, scan, opts, texts)
    session = SearchSession(source, opts, texts, run_dir, calibration=calibration, detection=detection, scan=scan,
                            device=device, dtype=dtype, progress=progress, label="tune")
    session.run()
    with session.lock():
        trials = session.trials()
        defaults = [session.default(r.name) for r in session.space.recipes]
        by_budget = {str(b): c.chosen for b in BUDGETS
                     if (c := session.choose(Budget(b, opts.max_ppl_increase), trials)).chosen is not None}
        chosen = session.choose(trials=trials).chosen
        manifest = None
        if chosen is not None:
            chosen = replace(chosen, manifest="best.yaml")
            manifest = Manifest(model=model_arg, revision=source.revision, calibration=calibration,
                                detection=detection, recipes=pairs(chosen.recipes))
        result = _result(session, run_dir, trials, (defaults, by_budget, chosen))
        write_outputs(run_dir, result, manifest)
    return replace(result, run_dir=run_dir, ran=session.ran, manifest=manifest, scan=session.scan)

def write_outputs(run_dir: Path, result: TuneResult, manifest) -> None:
    """tune.json, tune.png and best.yaml, each replaced atomically (a stale best.yaml is removed)."""
    from melsurgery.report.plot import plot_tune

    data = result.to_json()
    write_atomic(run_dir / "tune.json", dumps(data, indent=1) + "\n")
    if manifest is not None:
        write_atomic(run_dir / "best.yaml", manifest.to_yaml())
    else:
        (run_dir / "best.yaml").unlink(missing_ok=True)
    plot_tune(data, run_dir / "tune.png")  # written atomically by the plot itself


# --- The report ---

def figures_row(label: str, fig: Figures, objective: str, recipes: tuple[RecipeChoice, ...]) -> str:
    """One line of figures: the objective base -> patched with its change worded honestly, KL, perplexity."""
    from melsurgery.formats.wording import change_text

    goal, what = OBJECTIVES[objective], setting_text(recipes)
    if goal.arrangement:
        return (f"  {label:<22} {payoff_text(fig, goal)}  KL {fig.kl_mean:.4f}  ppl {fig.ppl_base:.2f} -> "
                f"{fig.ppl_patched:.2f}  {what}")
    sink = objective == "sink"
    base, patched = (fig.sink_base, fig.sink_patched) if sink else (fig.ratio_base, fig.ratio_patched)
    change = change_text(goal.of(fig))
    return (f"  {label:<22} {base:>8.3f} -> {patched:<8.3f} {change:<16} KL {fig.kl_mean:.4f}  "
            f"ppl {fig.ppl_base:.2f} -> {fig.ppl_patched:.2f}  {what}")


def tune_report(result: TuneResult) -> str:
    """What the command prints: the workload, the defaults, the front at the reported budgets, the choice."""
    from melsurgery.formats.wording import count

    w = result.workload
    goal = OBJECTIVES[result.objective]
    what = goal.label
    n = result.scan.model.num_layers if result.scan else None
    layers = f"layers {result.me_layer + 1}-{n - 1}" if n else f"layers {result.me_layer + 1}+"
    lines = [f"study: {count(result.study['trials'], 'trial')} ({result.ran} run now) in {result.study['storage']}",
             f"tuning text: {w.tuning.text}, {count(w.tuning.windows, 'window')}, {w.tuning.tokens} tokens; "
             f"held-out: {w.heldout.text}, {count(w.heldout.windows, 'window')}, {w.heldout.tokens} tokens",
             f"ME Layer {result.me_layer}; {what} = mean over {layers} (after the ME Layer), on the held-out text "
             "(base -> patched, change), KL(base || patched) per token, perplexity:" if not goal.arrangement else
             f"ME Layer {result.me_layer}; {what} = perplexity change under {goal.arrangement} against the plain "
             "forward, on the held-out text (base -> patched, points removed), KL(base || patched) per token, "
             "perplexity:", ""]
    for m in result.defaults:
        name = m.recipes[0].name
        lines.append(f"  default {name}: {m.error}" if m.error else
                     figures_row(f"default {name}", m.heldout, result.objective, m.recipes))
    for b, m in result.by_budget.items():
        lines.append(figures_row(f"KL <= {b} (#{m.trial})", m.heldout, result.objective, m.recipes))
    lines.append("")
    if result.chosen:
        lines.append(f"chosen: trial #{result.chosen.trial} (largest held-out {what} "
                     f"{'removal' if goal.arrangement else 'cut'} within the budget) "
                     f"-> {(result.run_dir or Path('.')) / 'best.yaml'}")
    else:
        lines.append(f"no trial {'lowers the ' + what if goal.arrangement else 'cuts the sink'} within the budget: "
                     "loosen --max-kl / --max-ppl-increase or run more "
                     "--trials")
    return "\n".join(lines)
