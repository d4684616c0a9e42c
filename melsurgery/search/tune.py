"""`tune`: search recipe settings per model (Optuna): the sink cut after the ME Layer against KL.

Massive activations and sinks differ from model to model, so the right cut is searched, not guessed.
The trials run on the search engine (`search.engine`): no checkpoint is written per trial. The study
lives in the run folder (or any Optuna storage), the chosen settings and the best within a few KL
budgets are re-measured on held-out text, and the run writes tune.json (`TuneResult`), tune.png and
best.yaml.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from melsurgery.checkpoint.atomic import write_atomic
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.source import Source
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.formats.jsonsafe import dumps
from melsurgery.formats.textfile import open_regular, read_text
from melsurgery.formats.typed import JsonRecord, Need, load
from melsurgery.recipes import get_recipe, registry, resolve_recipes
from melsurgery.search.engine import (
    SEEDS,
    Budget,
    Evaluator,
    Figures,
    TextCache,
    best_within,
    complete_records,
    effect_key,
    make_objective,
    open_study,
    pareto_front,
    run_trials,
)
from melsurgery.search.space import Space, make_space, searched
from melsurgery.search.storage import LOCK, STUDY, check_run_dir, check_storage, describe, storage_errors
from melsurgery.surgery.patch import check_scan_fits

OBJECTIVES = ("sink", "ratio")
BUDGETS = (0.02, 0.05, 0.1)  # KL budgets reported in tune.json (and the docs)
SCHEMA_VERSION = 1
SKIP = {"skip": True}


# --- Options ---

@dataclass(frozen=True)
class TuneOptions:
    """What a tune run searches and under which budget (validated before any work)."""

    recipes: tuple[str, ...]
    objective: str = "sink"
    max_kl: float | None = 0.05
    max_ppl_increase: float | None = None
    trials: int = 50
    timeout: float | None = None
    seed: int = 0
    max_tokens: int = 512
    windows: int | None = None
    storage: str | None = None

    @property
    def budget(self) -> Budget:
        """The quality budget the chosen trial must meet."""
        return Budget(self.max_kl, self.max_ppl_increase)


def check_budget(flag: str, value: float | None) -> None:
    """A budget (or a time limit) must be a positive finite number."""
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise UserError(f"{flag} {value}: must be a positive finite number")


def check_recipes(names: tuple[str, ...], flag: str = "--recipes") -> None:
    """Recipe names to search: at least one, each known, none twice."""
    if not names:
        raise UserError(f"{flag}: name at least one recipe")
    known = registry()
    for r in names:
        if r not in known:
            raise UserError(f"{flag}: unknown recipe {r!r}; available: {', '.join(known)}")
        if known[r].fit is not None:
            raise UserError(f"{flag}: {r} is fitted, not searched; `patch --recipe {r}` fits it")
    if len(set(names)) != len(names):
        raise UserError(f"{flag}: a recipe is named twice")


def validate(opts: TuneOptions) -> TuneOptions:
    """Refuse bad options before any model is read."""
    check_recipes(opts.recipes)
    if opts.objective not in OBJECTIVES:
        raise UserError(f"--objective {opts.objective!r}: use one of {', '.join(OBJECTIVES)}")
    for flag, v in (("--max-kl", opts.max_kl), ("--max-ppl-increase", opts.max_ppl_increase),
                    ("--timeout", opts.timeout)):
        check_budget(flag, v)
    if opts.trials < 1:
        raise UserError(f"--trials {opts.trials}: must be at least 1")
    if not 0 <= opts.seed < SEEDS:
        raise UserError(f"--seed {opts.seed}: must lie in [0, {SEEDS - 1}]")
    if opts.storage:
        check_storage(opts.storage)
    return opts


# --- tune.json, typed ---

@dataclass(frozen=True)
class RecipeChoice:
    """A recipe of a setting with its resolved parameters."""

    name: str
    params: dict[str, Any]


def choices(recipes: list[tuple[str, dict]]) -> tuple[RecipeChoice, ...]:
    """(name, params) pairs as typed records."""
    return tuple(RecipeChoice(n, dict(p)) for n, p in recipes)


def pairs(recipes: tuple[RecipeChoice, ...]) -> list[tuple[str, dict]]:
    """Typed records back to the (name, params) pairs the recipes take."""
    return [(r.name, dict(r.params)) for r in recipes]


@dataclass(frozen=True, kw_only=True)
class Measured:
    """A setting measured on the tuning and the held-out text (or why it does not apply to this model)."""

    trial: int | None = field(default=None, metadata={"omit_none": True})
    recipes: tuple[RecipeChoice, ...]
    tuning: Figures | None = field(default=None, metadata={"omit_none": True})
    heldout: Figures | None = field(default=None, metadata={"omit_none": True})
    error: str | None = field(default=None, metadata={"omit_none": True})
    manifest: str | None = field(default=None, metadata={"omit_none": True})


@dataclass(frozen=True)
class TrialRecord:
    """One complete trial: its setting (recipes and Optuna parameters) and its figures on the tuning text."""

    number: int
    state: str
    recipes: tuple[RecipeChoice, ...]
    params: dict[str, Any]
    figures: Figures
    worker: int | None


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


# --- Texts ---

def text_windows(tokenizer, raw: str, max_tokens: int, limit: int | None):
    """Windows exactly as `verify` cuts them from the same text (each starts with the special prefix)."""
    from melsurgery.measure.verify import make_windows

    return make_windows(tokenizer, raw, max_tokens, limit)


@dataclass(frozen=True)
class Texts:
    """The tuning and held-out texts of a search, as read and as windows."""

    tune_raw: str
    tune_name: str
    held_raw: str
    held_name: str
    tune: Any  # verify.Windows
    held: Any

    def info(self, which: str, cache: TextCache, file: str | None = None) -> TextInfo:
        """The workload record of one text."""
        name, win = (self.tune_name, self.tune) if which == "tuning" else (self.held_name, self.held)
        return TextInfo(name, len(win.ids), cache.size, file)


def read_texts(folder: Path, text: Path | None, heldout: Path | None, max_tokens: int, windows: int | None) -> Texts:
    """Tuning and held-out windows: `text` split in halves (default: the embedded held-out text), or `text`
    for tuning and `heldout` apart."""
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.measure.verify import eval_text, split_text

    raw, text_name = eval_text(text)
    if heldout is None:
        tune_raw, held_raw = split_text(raw)
        held_name = f"{text_name} (second half)"
        text_name += " (first half)"
    else:
        tune_raw, (held_raw, held_name) = raw, eval_text(heldout)
    tokenizer = load_tokenizer(folder)
    tune_w = text_windows(tokenizer, tune_raw, max_tokens, windows)
    held_w = text_windows(tokenizer, held_raw, max_tokens, windows)
    if not tune_w.ids or not held_w.ids:
        raise UserError(f"{text_name}: too short to split into tuning and held-out windows of {max_tokens} "
                        "tokens; give a longer --text or a --heldout file")
    return Texts(tune_raw, text_name, held_raw, held_name, tune_w, held_w)


def tuning_pass(evaluator: Evaluator, texts: Texts, source: Source) -> TextCache:
    """The base model over the tuning text; refused when there is nothing to compare or nothing to cut."""
    tuning = evaluator.base_pass("tuning", texts.tune.ids, texts.tune.first_target)
    if not math.isfinite(tuning.nll):
        raise UserError(f"{source.id}: the base model's perplexity on the tuning text is not a finite number "
                        "(its logits overflow or hold NaN); there is nothing to compare trials against")
    if not tuning.tokens:
        raise UserError(f"{texts.tune_name}: no massive activation persists on the tuning text, so it has no sink "
                        "to cut; give a longer --text or --max-tokens")
    return tuning


# --- The run, step by step ---

@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Workers sharing a folder write its outputs one at a time (the last one sees every trial)."""
    fd = open_regular(folder / LOCK, "the run folder's lock file", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def text_sha(text: str) -> str:
    """A short digest of a text, for study fingerprints."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _prepare_run_dir(run_dir: Path, source: Source, scan: ScanResult | None, opts: TuneOptions, texts: Texts) -> None:
    """Checks that need no model run, then the run folder with the held-out text as verify reads it."""
    check_run_dir(run_dir, opts.storage, source.folder)
    if scan is not None:
        check_scan_fits(scan, Checkpoint(source.folder).config)
        make_space(opts.recipes, scan)  # a scan without an ME Layer is refused before anything is written
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot create the run folder ({exc.strerror})") from None
    # so that `verify --text RUN_DIR/heldout.txt` reproduces the held-out figures
    write_atomic(run_dir / "heldout.txt", texts.held_raw)


def scan_once(folder: Path, source: Source, calibration, detection, *, device: str, dtype: torch.dtype,
              progress: bool) -> ScanResult:
    """The scan, computed once per folder (later runs and other workers reuse FOLDER/scan.json)."""
    from melsurgery.detect.scan import run_scan

    scan_path = folder / "scan.json"
    key = {"calibration": str(asdict(calibration)), "detection": asdict(detection), "folder": str(source.folder)}
    with locked(folder):
        cached = _cached_scan(scan_path, key)
        if cached is not None:
            return cached
        scan = run_scan(source, calibration, detection, device=device, dtype=dtype, progress=progress)
        write_atomic(scan_path, dumps({**scan.to_json(), "tune_key": key}, default=str))
    return scan


def _cached_scan(path: Path, key: dict) -> ScanResult | None:
    """The folder's scan when it was made with these settings; None when absent, stale or damaged (scanned again)."""
    if not path.exists():
        return None
    try:
        held = json.loads(read_text(path, "the run folder's scan"))
    except (UserError, ValueError, RecursionError):
        return None
    return ScanResult.read(path) if isinstance(held, dict) and held.get("tune_key") == key else None


def _open_tune_study(run_dir: Path, opts: TuneOptions, space: Space, source: Source, texts: Texts,
                     dtype: torch.dtype):
    """The run's study (created, or continued with the same settings); a new one starts from the defaults."""
    fingerprint = {"model": str(source.folder), "recipes": list(opts.recipes), "objective": opts.objective,
                   "text": text_sha(texts.tune_raw), "max_tokens": opts.max_tokens, "windows": opts.windows,
                   "me_layer": space.me_layer, "dtype": str(dtype)}
    with locked(run_dir):
        study = open_study(opts.storage, run_dir, fingerprint, opts.seed)
        with storage_errors(opts.storage, run_dir, "write to the study"):
            if not study.get_trials(deepcopy=False):
                for start in space.starts():
                    study.enqueue_trial(start)
    return study


class HeldOut:
    """Settings measured on both texts, each measured once (by what it does, not how it was named)."""

    def __init__(self, evaluator: Evaluator, tuning: TextCache, held: TextCache, records: list[dict]) -> None:
        self.evaluator, self.tuning, self.held = evaluator, tuning, held
        self.measured: dict[str, Measured] = {}
        self.tried = {effect_key(evaluator.plans([(x["name"], x["params"]) for x in r["recipes"]])): r
                      for r in records}

    def both(self, recipes: list[tuple[str, dict]], trial: int | None = None, manifest: str | None = None) -> Measured:
        """Tuning figures (from its trial where there is one) and held-out figures of a setting."""
        plans = self.evaluator.plans(recipes)
        key = effect_key(plans)
        if key not in self.measured:
            on_tuning = (Figures(**self.tried[key]["figures"]) if key in self.tried
                         else self.evaluator.run(self.tuning, plans))
            self.measured[key] = Measured(recipes=choices(recipes), tuning=on_tuning,
                                          heldout=self.evaluator.run(self.held, plans))
        m = self.measured[key]
        return Measured(trial=trial, recipes=m.recipes, tuning=m.tuning, heldout=m.heldout, manifest=manifest)

    def default(self, name: str) -> Measured:
        """A recipe's defaults measured, or why they do not apply to this model (e.g. it has no FFN neurons)."""
        recipes = resolve_recipes([(name, {})])
        try:
            return self.both(recipes)
        except UserError as exc:
            return Measured(recipes=choices(recipes), error=str(exc))


def _choose(held: HeldOut, records: list[dict], opts: TuneOptions) -> tuple[dict[str, Measured], Measured | None]:
    """The best trial within each reported KL budget and the chosen one, re-measured on held-out text."""
    by_budget = {}
    for b in BUDGETS:
        best = best_within(records, opts.objective, Budget(b, opts.max_ppl_increase))
        if best:
            by_budget[str(b)] = held.both([(x["name"], x["params"]) for x in best["recipes"]], trial=best["number"])
    chosen = best_within(records, opts.objective, opts.budget)
    if chosen is None:
        return by_budget, None
    recipes = resolve_recipes([(x["name"], x["params"]) for x in chosen["recipes"]])
    return by_budget, held.both(recipes, trial=chosen["number"], manifest="best.yaml")


def _result(source: Source, opts: TuneOptions, run_dir: Path, space: Space, texts: Texts, caches: tuple,
            measured: tuple, records: list[dict], device: str, dtype: torch.dtype) -> TuneResult:
    """tune.json's record of the run."""
    tuning, held = caches
    defaults, by_budget, chosen = measured
    return TuneResult(
        model={"id": source.id, "folder": str(source.folder), "revision": source.revision},
        study={"name": STUDY, "storage": describe(opts.storage, run_dir),
               "trials": len(records), "seed": opts.seed},
        objective=opts.objective, budget={"max_kl": opts.max_kl, "max_ppl_increase": opts.max_ppl_increase},
        me_layer=space.me_layer,
        workload=Workload(texts.info("tuning", tuning), texts.info("heldout", held, "heldout.txt"), opts.max_tokens,
                          str(dtype).removeprefix("torch."), device),
        search_space={"recipes": [r.name for r in space.recipes], "combos": space.combos},
        defaults=tuple(defaults), trials=tuple(load(TrialRecord, r, "", None) for r in records),
        pareto_front=tuple(pareto_front(records, opts.objective)), by_budget=by_budget, chosen=chosen)


def run_tune(source: Source, model_arg: str, run_dir: Path, opts: TuneOptions, *, scan: ScanResult | None = None,
             calibration=None, detection=None, text: Path | None = None, heldout: Path | None = None,
             device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = False) -> TuneResult:
    """Search, then write tune.json, tune.png and best.yaml into `run_dir`; see docs/budgeted-patch.md."""
    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.params import DetectParams
    from melsurgery.surgery.manifest import Manifest

    validate(opts)
    calibration = calibration or CalibrationSpec()
    detection = detection or DetectParams()
    texts = read_texts(source.folder, text, heldout, opts.max_tokens, opts.windows)
    run_dir = Path(run_dir)
    _prepare_run_dir(run_dir, source, scan, opts, texts)
    if scan is None:
        scan = scan_once(run_dir, source, calibration, detection, device=device, dtype=dtype, progress=progress)
    space = make_space(opts.recipes, scan)
    study = _open_tune_study(run_dir, opts, space, source, texts, dtype)
    evaluator = Evaluator(source, scan, device=device, dtype=dtype)
    tuning = tuning_pass(evaluator, texts, source)
    ran = run_trials(study, make_objective(evaluator, tuning, space.suggest, opts.objective, opts.budget),
                     opts.trials, timeout=opts.timeout, objective=opts.objective, budget=opts.budget,
                     progress=progress, space=space, label="tune")
    held_cache = evaluator.base_pass("held-out", texts.held.ids, texts.held.first_target)
    with locked(run_dir):
        records = complete_records(study)
        held = HeldOut(evaluator, tuning, held_cache, records)
        defaults = [held.default(r.name) for r in space.recipes]
        by_budget, chosen = _choose(held, records, opts)
        manifest = None
        if chosen is not None:
            manifest = Manifest(model=model_arg, revision=source.revision, calibration=calibration,
                                detection=detection, recipes=pairs(chosen.recipes))
        result = _result(source, opts, run_dir, space, texts, (tuning, held_cache), (defaults, by_budget, chosen),
                         records, device, dtype)
        write_outputs(run_dir, result, manifest)
    return replace(result, run_dir=run_dir, ran=ran, manifest=manifest, scan=scan)


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

    sink = objective == "sink"
    base, patched = (fig.sink_base, fig.sink_patched) if sink else (fig.ratio_base, fig.ratio_patched)
    change = change_text(fig.sink_reduction_pct if sink else fig.ratio_reduction_pct)
    what = "; ".join(f"{r.name} {short_params(r)}" for r in recipes)
    return (f"  {label:<22} {base:>8.3f} -> {patched:<8.3f} {change:<16} KL {fig.kl_mean:.4f}  "
            f"ppl {fig.ppl_base:.2f} -> {fig.ppl_patched:.2f}  {what}")


def tune_report(result: TuneResult) -> str:
    """What the command prints: the workload, the defaults, the front at the reported budgets, the choice."""
    from melsurgery.formats.wording import count

    w = result.workload
    what = "sink" if result.objective == "sink" else "max/median ratio"
    n = result.scan.model.num_layers if result.scan else None
    layers = f"layers {result.me_layer + 1}-{n - 1}" if n else f"layers {result.me_layer + 1}+"
    lines = [f"study: {count(result.study['trials'], 'trial')} ({result.ran} run now) in {result.study['storage']}",
             f"tuning text: {w.tuning.text}, {count(w.tuning.windows, 'window')}, {w.tuning.tokens} tokens; "
             f"held-out: {w.heldout.text}, {count(w.heldout.windows, 'window')}, {w.heldout.tokens} tokens",
             f"ME Layer {result.me_layer}; {what} = mean over {layers} (after the ME Layer), on the held-out text "
             "(base -> patched, change), KL(base || patched) per token, perplexity:", ""]
    for m in result.defaults:
        name = m.recipes[0].name
        lines.append(f"  default {name}: {m.error}" if m.error else
                     figures_row(f"default {name}", m.heldout, result.objective, m.recipes))
    for b, m in result.by_budget.items():
        lines.append(figures_row(f"KL <= {b} (#{m.trial})", m.heldout, result.objective, m.recipes))
    lines.append("")
    if result.chosen:
        lines.append(f"chosen: trial #{result.chosen.trial} (largest {what} cut within the budget on the tuning text) "
                     f"-> {(result.run_dir or Path('.')) / 'best.yaml'}")
    else:
        lines.append("no trial cuts the sink within the budget: loosen --max-kl / --max-ppl-increase or run more "
                     "--trials")
    return "\n".join(lines)


def short_params(r: RecipeChoice) -> str:
    """A recipe's searched parameters, compactly (explicit lists and unset options left out)."""
    declared = {p.name: p for p in get_recipe(r.name).params}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
                     if v is not None and (k not in declared or searched(declared[k])))
