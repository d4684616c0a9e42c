"""The budgeted patch (`patch --max-kl`): the largest sink cut whose KL on held-out text is within a budget.

The space (search.space) is searched on a tuning text with the engine `tune` uses (search.engine): the
study's trials are scored on the tuning text, with the budget as Optuna constraints. The settings that
cut the sink most within twice the budget on the tuning text are then re-measured on held-out text, the
largest held-out cut within the budget is chosen and written as an ordinary patch, with the figures and
the search settings in the card and provenance. Nothing in the space within the budget: nothing is
written (`BudgetNotMet`, exit 4).

The study, the scan and the held-out measurements live in the user cache (`cache_dir()/search/KEY`),
keyed by the model's fingerprint and the search settings: an identical second run reuses every trial and
measurement, and a run with more `--trials` continues the study.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch

from melsurgery.checkpoint.atomic import write_atomic
from melsurgery.checkpoint.provenance import SearchRecord
from melsurgery.checkpoint.source import Source
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import BudgetNotMet, NoMassiveActivations, UserError
from melsurgery.formats.jsonsafe import dumps
from melsurgery.formats.textfile import read_text
from melsurgery.outputs import cache_dir
from melsurgery.search.engine import (
    Budget,
    Evaluator,
    Figures,
    TextCache,
    complete_records,
    effect_key,
    make_objective,
    open_study,
)
from melsurgery.search.engine import run_trials as run_study
from melsurgery.search.space import Space, make_space, searchable
from melsurgery.search.tune import (
    Texts,
    check_budget,
    check_recipes,
    locked,
    read_texts,
    scan_once,
    text_sha,
    tuning_pass,
)

SLACK = 2.0  # tuning-text candidates reach up to this many times the budget (held-out KL decides)
FINGERPRINT_BYTES = 1 << 16


@dataclass(frozen=True)
class BudgetOptions:
    """A budgeted patch's budget and search settings (validated before any work)."""

    max_kl: float | None = None
    max_ppl_increase: float | None = None
    recipes: tuple[str, ...] = ()  # () : every recipe
    trials: int = 40
    timeout: float | None = None
    seed: int = 0
    max_tokens: int = 512
    windows: int | None = None
    candidates: int = 6  # settings re-measured on held-out text

    @property
    def budget(self) -> Budget:
        """The budget as the engine checks it."""
        return Budget(self.max_kl, self.max_ppl_increase)

    @property
    def searched(self) -> tuple[str, ...]:
        """The recipes searched: those named, else every one the search can vary (`searchable`)."""
        return self.recipes or searchable()

    def describe(self) -> str:
        """The budget as a sentence fragment ("KL <= 0.05 and perplexity +3% at most")."""
        from melsurgery.formats.wording import budget_text

        return budget_text(self.max_kl, self.max_ppl_increase)


def validate_budget(opts: BudgetOptions) -> BudgetOptions:
    """Refuse a bad budget or search setting before any model is read."""
    if opts.max_kl is None and opts.max_ppl_increase is None:
        raise UserError("a budgeted patch needs --max-kl or --max-ppl-increase")
    for flag, v in (("--max-kl", opts.max_kl), ("--max-ppl-increase", opts.max_ppl_increase),
                    ("--timeout", opts.timeout)):
        check_budget(flag, v)
    if opts.recipes:
        check_recipes(opts.recipes, "--recipe")
    if opts.trials < 1:
        raise UserError(f"--trials {opts.trials}: must be at least 1")
    return opts


def model_fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder for cache keys: config.json, and each weight file's name, size,
    modification time and first and last 64 KB (a changed or replaced file changes it; nothing is hashed whole)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.name != "config.json" and path.suffix != ".safetensors":
            continue
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            fh.seek(max(0, st.st_size - FINGERPRINT_BYTES))
            h.update(fh.read(FINGERPRINT_BYTES))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Candidate:
    """A setting re-measured on held-out text: its trial, recipes and figures on both texts."""

    trial: int
    recipes: list[tuple[str, dict]]
    tuning: Figures
    heldout: Figures


@dataclass(frozen=True)
class BudgetChoice:
    """What the search found: the chosen setting (None: nothing within the budget) and what it weighed."""

    chosen: Candidate | None
    candidates: list[Candidate]
    trials: int  # complete trials in the study
    ran: int  # trials this run added
    folder: Path  # the cache folder (study, scan, held-out measurements)
    space: Space
    texts: Texts
    tuning_tokens: int
    heldout_tokens: int
    tried: list[dict]  # every complete trial: number, sink cut and KL on the tuning text

    def plot_data(self, model: str, opts: BudgetOptions) -> dict:
        """What `plot.plot_search` draws."""
        t = self.texts
        return {"model": model, "max_kl": opts.max_kl, "trials": self.tried,
                "sink_layers": f"{self.space.me_layer + 1}-{self.space.num_layers - 1}",
                "texts": f"tuning {len(t.tune.ids)} x {opts.max_tokens} tokens, held-out {len(t.held.ids)} x "
                         f"{opts.max_tokens}",
                "candidates": [{"trial": c.trial, "tuning": asdict(c.tuning), "heldout": asdict(c.heldout)}
                               for c in self.candidates],
                "chosen": None if self.chosen is None else {"trial": self.chosen.trial,
                                                            "heldout": asdict(self.chosen.heldout)}}

    def record(self, opts: BudgetOptions, device: str, dtype: torch.dtype) -> SearchRecord:
        """The search settings and the chosen setting's figures, as provenance and the card keep them."""
        c = self.chosen
        assert c is not None
        n = self.space.num_layers
        return SearchRecord(
            budget={"max_kl": opts.max_kl, "max_ppl_increase": opts.max_ppl_increase},
            objective="sink", sink_layers=f"{self.space.me_layer + 1}-{n - 1}",
            space=self.space.to_dict(),
            study={"storage": str(self.folder / "study.journal"), "trials": self.trials, "ran": self.ran,
                   "limit": opts.trials, "timeout": opts.timeout, "seed": opts.seed, "sampler": "TPE (optuna)",
                   "candidates": len(self.candidates), "slack": SLACK},
            tuning={"text": self.texts.tune_name, "windows": len(self.texts.tune.ids), "tokens": self.tuning_tokens,
                    "max_tokens": opts.max_tokens},
            heldout={"text": self.texts.held_name, "windows": len(self.texts.held.ids),
                     "tokens": self.heldout_tokens, "max_tokens": opts.max_tokens},
            compute={"device": device, "dtype": str(dtype).removeprefix("torch.")},
            trial=c.trial, figures_tuning=asdict(c.tuning), figures_heldout=asdict(c.heldout))


def search_folder(source: Source, opts: BudgetOptions, texts: Texts, calibration, detection,
                  dtype: torch.dtype) -> tuple[Path, dict]:
    """The cache folder of this model and these settings, and the study's fingerprint."""
    fingerprint = {"model": model_fingerprint(source.folder), "recipes": list(opts.searched), "objective": "sink",
                   "text": text_sha(texts.tune_raw), "heldout": text_sha(texts.held_raw),
                   "max_tokens": opts.max_tokens, "windows": opts.windows, "dtype": str(dtype),
                   "calibration": str(asdict(calibration)), "detection": asdict(detection)}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "search" / f"{source.folder.name}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the search cache ({exc.strerror}); set MELSURGERY_CACHE") from None
    return folder, fingerprint


class HeldOutCache:
    """Held-out figures of settings, by what they do, kept in the search folder across runs."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "heldout.json"
        self.data: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(read_text(self.path, "the held-out cache"))
            except (UserError, ValueError, RecursionError):
                data = None
            fields = {f.name for f in dataclass_fields(Figures)}
            if isinstance(data, dict) and all(isinstance(v, dict) and set(v) == fields for v in data.values()):
                self.data = data  # anything else is a damaged cache: recomputed, never trusted

    def get(self, key: str) -> Figures | None:
        """The cached figures of a setting, if measured before."""
        got = self.data.get(key)
        return Figures(**{k: math.nan if v is None else v for k, v in got.items()}) if got else None

    def put(self, key: str, fig: Figures) -> None:
        """Remember a setting's held-out figures (written at once: an interrupted run keeps them)."""
        self.data[key] = asdict(fig)
        write_atomic(self.path, dumps(self.data) + "\n")


def candidates_for(records: list[dict], opts: BudgetOptions) -> list[dict]:
    """The trials worth re-measuring: a sink cut, within SLACK times the budget on the tuning text, the largest
    cuts first, one per distinct setting."""
    loose = Budget(opts.max_kl * SLACK if opts.max_kl else None,
                   opts.max_ppl_increase * SLACK if opts.max_ppl_increase else None)
    ok = [r for r in records if r["figures"]["sink_reduction_pct"] > 0 and loose.holds(r["figures"])]
    return sorted(ok, key=lambda r: (-r["figures"]["sink_reduction_pct"], r["figures"]["kl_mean"]))


def _measure_candidates(evaluator: Evaluator, held: Callable[[], TextCache], records: list[dict],
                        opts: BudgetOptions, cache: HeldOutCache, progress: bool) -> list[Candidate]:
    """Re-measure the best tuning-text candidates on held-out text (each distinct setting once); `held` runs the
    base model over the held-out text when a setting is not in the cache yet."""
    todo: list[tuple[dict, list, str]] = []
    for r in candidates_for(records, opts):  # distinct settings, the largest tuning cuts first
        recipes = [(x["name"], x["params"]) for x in r["recipes"]]
        key = effect_key(evaluator.plans(recipes))
        if len(todo) < opts.candidates and key not in {k for _, _, k in todo}:
            todo.append((r, recipes, key))
    out: list[Candidate] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="held-out", unit="setting", leave=False)
    try:
        for r, recipes, key in todo:
            fig = cache.get(key)
            if fig is None:
                fig = evaluator.run(held(), evaluator.plans(recipes))
                cache.put(key, fig)
            out.append(Candidate(r["number"], recipes, Figures(**r["figures"]), fig))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def pick(candidates: list[Candidate], budget: Budget) -> Candidate | None:
    """The largest held-out sink cut within the budget on held-out text (ties: the smaller KL); None when no
    candidate cuts the sink within it."""
    ok = [c for c in candidates if c.heldout.finite() and c.heldout.sink_reduction_pct > 0
          and budget.holds(asdict(c.heldout))]
    return max(ok, key=lambda c: (c.heldout.sink_reduction_pct, -c.heldout.kl_mean), default=None)


def search_budget(source: Source, opts: BudgetOptions, *, scan: ScanResult | None, calibration, detection,
                  text: Path | None = None, heldout: Path | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, progress: bool = False) -> tuple[BudgetChoice, ScanResult]:
    """Search the space under the budget and choose on held-out text; writes nothing but the search cache."""
    validate_budget(opts)
    texts = read_texts(source.folder, text, heldout, opts.max_tokens, opts.windows)
    folder, fingerprint = search_folder(source, opts, texts, calibration, detection, dtype)
    if scan is None:
        scan = scan_once(folder, source, calibration, detection, device=device, dtype=dtype, progress=progress)
    if scan.me_layer is None:
        raise NoMassiveActivations(f"{source.id}: no massive activation persists (no ME Layer), so there is no sink "
                                   "to cut; nothing written")
    space = make_space(opts.searched, scan)
    with locked(folder):
        study = open_study(None, folder, {**fingerprint, "me_layer": space.me_layer}, opts.seed)
        if not study.get_trials(deepcopy=False):  # new: from the defaults and late-layer variants
            for start in space.starts():
                study.enqueue_trial(start)
    evaluator = Evaluator(source, scan, device=device, dtype=dtype)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    ran = 0
    if len(finished) < opts.trials:  # the tuning pass only when trials are left to run
        tuning = tuning_pass(evaluator, texts, source)
        ran = run_study(study, make_objective(evaluator, tuning, space.suggest, "sink", opts.budget), opts.trials,
                        timeout=opts.timeout, objective="sink", budget=opts.budget, progress=progress,
                        space=space, label="search")
    records = complete_records(study)
    held: list[TextCache] = []

    def held_pass() -> TextCache:
        if not held:
            held.append(evaluator.base_pass("held-out", texts.held.ids, texts.held.first_target))
            if not held[0].tokens:
                raise UserError(f"{texts.held_name}: no massive activation persists on the held-out text, so the "
                                "sink cut cannot be measured there; give a longer --heldout text")
        return held[0]

    found = _measure_candidates(evaluator, held_pass, records, opts, HeldOutCache(folder), progress)
    tried = [{"trial": r["number"], "sink_reduction_pct": r["figures"]["sink_reduction_pct"],
              "kl_mean": r["figures"]["kl_mean"]} for r in records]
    choice = BudgetChoice(pick(found, opts.budget), found, len(records), ran, folder, space, texts,
                          sum(len(w) for w in texts.tune.ids), sum(len(w) for w in texts.held.ids), tried)
    return choice, scan


def refusal(choice: BudgetChoice, opts: BudgetOptions) -> BudgetNotMet:
    """The one line that says nothing in the space cuts the sink within the budget (exit 4, nothing written)."""
    from melsurgery.formats.wording import count

    best = max(choice.candidates, key=lambda c: c.heldout.sink_reduction_pct, default=None)
    near = ""
    if best is not None:
        near = (f"; the largest held-out cut among the {len(choice.candidates)} re-measured settings is "
                f"{best.heldout.sink_reduction_pct:.1f}% at KL {best.heldout.kl_mean:.4f}")
    return BudgetNotMet(f"no setting of the search space ({count(choice.trials, 'trial')} over "
                        f"{', '.join(r.name for r in choice.space.recipes)}) cuts the sink within {opts.describe()} "
                        f"on held-out text{near}; nothing written (raise the budget or --trials)")


@dataclass(frozen=True)
class BudgetedPatch:
    """A budgeted patch as written: the search's choice and the patch result."""

    choice: BudgetChoice
    patch: object  # patch.PatchResult


def run_budgeted_patch(source: Source, out: Path, manifest, opts: BudgetOptions, *, scan: ScanResult | None = None,
                       text: Path | None = None, heldout: Path | None = None, overwrite: bool = False,
                       link: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       progress: bool = False, verify: dict | None = None,
                       plot: Path | None = None) -> BudgetedPatch:
    """Search, choose on held-out text, and write the chosen patch with the search record in card and provenance.

    `manifest` gives the model, calibration and detection (its recipes are what the search chooses); `plot`: a
    PNG of the search (written also when nothing is chosen). Raises `BudgetNotMet` (exit 4, no patch written) when
    no setting cuts the sink within the budget."""
    from dataclasses import replace

    from melsurgery.checkpoint.atomic import check_output
    from melsurgery.detect.scan import check_scan_params
    from melsurgery.surgery.patch import run_patch

    validate_budget(opts)
    check_scan_params(manifest.calibration, manifest.detection)
    check_output(out, overwrite, protect=source.folder)
    choice, scan = search_budget(source, opts, scan=scan, calibration=manifest.calibration,
                                 detection=manifest.detection, text=text, heldout=heldout, device=device, dtype=dtype,
                                 progress=progress)
    if plot is not None:
        from melsurgery.report.plot import plot_search

        plot_search(choice.plot_data(source.id, opts), plot)
    if choice.chosen is None:
        raise refusal(choice, opts)
    chosen = replace(manifest, recipes=choice.chosen.recipes)
    result = run_patch(source, out, chosen, scan=scan, overwrite=overwrite, link=link, device=device,
                       progress=progress, verify=verify, search=choice.record(opts, device, dtype))
    return BudgetedPatch(choice, result)


def budget_report(done: BudgetedPatch, opts: BudgetOptions) -> str:
    """What `patch --max-kl` prints: the search, the texts, the chosen setting and its held-out figures, each
    figure with its definition."""
    from melsurgery.formats.wording import change_text, count
    from melsurgery.search.tune import choices, short_params

    c, ch = done.choice, done.choice.chosen
    assert ch is not None
    t, h = c.texts, ch.heldout
    what = "; ".join(f"{r.name} {short_params(r)}" for r in choices(ch.recipes))
    return "\n".join([
        f"search: {count(c.trials, 'trial')} ({c.ran} run now) over {', '.join(r.name for r in c.space.recipes)} "
        "and their "
        f"compositions; study in {c.folder}",
        f"tuning text: {t.tune_name}, {count(len(t.tune.ids), 'window')}, {c.tuning_tokens} tokens; held-out: "
        f"{t.held_name}, {count(len(t.held.ids), 'window')}, {c.heldout_tokens} tokens (windows of up to "
        f"{opts.max_tokens} tokens)",
        f"budget: {opts.describe()} on the held-out text; {count(len(c.candidates), 'setting')} re-measured there",
        f"chosen: trial #{ch.trial}: {what}",
        f"held-out figures: sink (mean over layers {c.space.me_layer + 1}-{c.space.num_layers - 1}, after the ME "
        f"Layer {c.space.me_layer}) {h.sink_base:.3f} -> {h.sink_patched:.3f} ({change_text(h.sink_reduction_pct)}); "
        f"KL(base || patched) {h.kl_mean:.4f} per token; perplexity {h.ppl_base:.2f} -> {h.ppl_patched:.2f} "
        f"({h.ppl_increase_pct:+.1f}%)",
    ])
