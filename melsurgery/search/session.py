"""One search session: the core that `tune`, the budgeted patch and the front script drive.

A session holds, for one model and one set of options: the tuning and held-out texts, the scan, the
folder's lock, the study, the base model's pass over each text, the trials, and the held-out re-measure
with its cache. Drivers open a session, run it, and read what it measured; they never call the study,
the evaluator or the storage themselves (tests/search/test_session.py checks it).

A budget has one meaning everywhere: the study scores trials on the tuning text, the settings that cut
most within twice the budget there are re-measured on held-out text, and the choice is the largest
held-out cut within the budget there.

Where things live: the study in `folder`'s journal (or `opts.storage`), the scan in folder/scan.json and
the held-out figures in folder/heldout.json, both keyed by content (the model's weights, the texts, the
settings), so that a second identical run reuses them; a cached entry is used only when it is complete,
well-typed, in range and made for this input, else it is measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from melsurgery.checkpoint.atomic import write_atomic
from melsurgery.checkpoint.guard import cache_folder as guarded_cache
from melsurgery.checkpoint.source import Source
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import NoMassiveActivations, UserError
from melsurgery.formats.jsonsafe import dumps
from melsurgery.formats.textfile import read_text, refuse_special
from melsurgery.search.engine import Evaluator, TextCache, effect_key
from melsurgery.search.options import SearchOptions
from melsurgery.search.records import Budget, Measured, Setting, TrialRecord, pairs, setting
from melsurgery.search.space import Space, make_space
from melsurgery.search.storage import LOCK
from melsurgery.search.study import complete_trials, make_objective, open_study, run_trials

SLACK = 2.0  # tuning-text candidates reach up to this many times the budget (held-out KL decides)
FINGERPRINT_BYTES = 1 << 16
HELDOUT = "heldout.json"


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

    @property
    def tune_tokens(self) -> int:
        """Tokens of the tuning windows (special prefixes included: what the model runs over)."""
        return sum(len(w) for w in self.tune.ids)

    @property
    def held_tokens(self) -> int:
        """Tokens of the held-out windows."""
        return sum(len(w) for w in self.held.ids)


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


# --- Keys and the lock ---

def text_sha(text: str) -> str:
    """A short digest of a text, for fingerprints."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


# what a fingerprint holds: a change of it keys every cached search anew (a study of another version is never
# reopened from the user cache)
FINGERPRINT_SCHEMA = 2


def fingerprint(source: Source, opts: SearchOptions, texts: Texts, calibration, detection, dtype: torch.dtype) -> dict:
    """What a study is of (the same in every driver): the model's content, the space, the tuning text, the settings."""
    return {"schema": FINGERPRINT_SCHEMA, "model": model_fingerprint(source.folder), "recipes": list(opts.searched),
            "objective": opts.objective,
            "text": text_sha(texts.tune_raw), "max_tokens": opts.max_tokens, "windows": opts.windows,
            "dtype": str(dtype), "calibration": str(asdict(calibration)), "detection": asdict(detection),
            **({"payoff_window": opts.payoff_window} if opts.objective == "evict" else {})}


def digest(data: dict) -> str:
    """A short content hash of JSON data (cache keys)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_folder(source: Source, key: dict, kind: str = "search") -> Path:
    """The user-cache folder of a search keyed by `key` (its content hash names it)."""
    folder = guarded_cache(kind) / f"{source.folder.name}-{digest(key)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the search cache ({exc.strerror}); set MELSURGERY_CACHE") from None
    return folder


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Workers sharing a folder write its study set-up, scan and outputs one at a time (the last sees every trial)."""
    from filelock import FileLock

    refuse_special(folder / LOCK, "the search folder's lock file")
    with FileLock(str(folder / LOCK)):
        yield


# --- The scan, once per folder ---

def scan_once(folder: Path, source: Source, calibration, detection, *, device: str, dtype: torch.dtype,
              progress: bool) -> ScanResult:
    """The scan, computed once per folder (later runs and other workers reuse FOLDER/scan.json)."""
    from melsurgery.detect.scan import run_scan

    scan_path = folder / "scan.json"
    key = {"calibration": str(asdict(calibration)), "detection": asdict(detection), "folder": str(source.folder),
           "model": model_fingerprint(source.folder)}
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
        held = json.loads(read_text(path, "the search folder's scan"))
        return ScanResult.read(path) if isinstance(held, dict) and held.get("tune_key") == key else None
    except (UserError, ValueError, RecursionError):
        return None


# --- Held-out figures, kept across runs ---

class HeldOutCache:
    """Held-out figures of settings, by what they do, in FOLDER/heldout.json. The file names the input it was
    measured on (`key`); an entry is used only when complete, well-typed, in range and for that input."""

    def __init__(self, folder: Path, key: str, tokens: int) -> None:
        self.path, self.key, self.tokens = folder / HELDOUT, key, tokens
        self.data: dict[str, dict] = {}
        if self.path.exists():
            try:
                held = json.loads(read_text(self.path, "the held-out cache"))
            except (UserError, ValueError, RecursionError):
                held = None
            if isinstance(held, dict) and held.get("key") == key and isinstance(held.get("figures"), dict):
                self.data = held["figures"]

    def get(self, setting_key: str):
        """The cached figures of a setting when they can be trusted; None: measure it (again)."""
        from melsurgery.search.records import Figures

        return Figures.cached(self.data[setting_key], self.tokens) if setting_key in self.data else None

    def put(self, setting_key: str, fig) -> None:
        """Remember a setting's held-out figures (written at once: an interrupted run keeps them)."""
        self.data[setting_key] = asdict(fig)
        write_atomic(self.path, dumps({"key": self.key, "figures": self.data}) + "\n")


# --- Choosing on held-out text ---

@dataclass(frozen=True)
class Choice:
    """What a search chose under one budget: the chosen setting (None: nothing within it) and what it weighed."""

    budget: Budget
    chosen: Measured | None
    candidates: tuple[Measured, ...]


def candidates_for(trials: list[TrialRecord], budget: Budget, goal) -> list[TrialRecord]:
    """The trials worth re-measuring: a cut, within SLACK times the budget on the tuning text, the largest first."""
    loose = budget.scaled(SLACK)
    ok = [t for t in trials if goal.of(t.figures) > 0 and loose.holds(t.figures)]
    return sorted(ok, key=lambda t: (-goal.of(t.figures), t.figures.kl_mean))


def pick(candidates: list[Measured], budget: Budget, goal) -> Measured | None:
    """The largest held-out cut within the budget on held-out text (ties: the smaller KL); None when no candidate
    cuts within it."""
    ok = [c for c in candidates if c.heldout is not None and c.heldout.finite() and goal.of(c.heldout) > 0
          and budget.holds(c.heldout)]
    return max(ok, key=lambda c: (goal.of(c.heldout), -c.heldout.kl_mean), default=None)


# --- The session ---

class SearchSession:
    """A search of one model under one set of options (checked when they were made): see the module docstring.

    `folder`: where the study (unless `opts.storage`), the scan, the held-out cache and the lock live; `scan`: a
    scan to use instead of scanning (or reading FOLDER/scan.json)."""

    def __init__(self, source: Source, opts: SearchOptions, texts: Texts, folder: Path, *, calibration, detection,
                 scan: ScanResult | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = False, label: str = "search") -> None:
        self.source, self.opts, self.texts, self.folder = source, opts, texts, Path(folder)
        self.device, self.dtype, self.progress, self.label = device, dtype, progress, label
        self.scan = scan or scan_once(self.folder, source, calibration, detection, device=device, dtype=dtype,
                                      progress=progress)
        if self.scan.me_layer is None:
            raise NoMassiveActivations(f"{source.id}: no massive activation persists (no ME Layer), so there is no "
                                       "sink to cut; nothing written")
        self.space: Space = make_space(opts.searched, self.scan)
        self.fingerprint = {**fingerprint(source, opts, texts, calibration, detection, dtype),
                            "me_layer": self.space.me_layer}
        with locked(self.folder):
            self.study = open_study(opts.storage, self.folder, self.fingerprint, opts.seed)
            if not self.study.get_trials(deepcopy=False):  # new: from the defaults and late-layer variants
                for start in self.space.starts():
                    self.study.enqueue_trial(start)
        self.evaluator = Evaluator(source, self.scan, device=device, dtype=dtype, arrangement=opts.arrangement)
        self.cache = HeldOutCache(self.folder, digest({**self.fingerprint, "heldout": text_sha(texts.held_raw)}),
                                  texts.held_tokens)
        self._passes: dict[str, TextCache] = {}
        self.ran = 0

    def lock(self):
        """The folder's lock, for a driver writing outputs that must see every worker's trials."""
        return locked(self.folder)

    # the base model over each text, once
    def tuning(self) -> TextCache:
        """The base model over the tuning text; refused when there is nothing to compare or nothing to cut."""
        if "tuning" not in self._passes:
            t = self.texts
            cache = self.evaluator.base_pass("tuning", t.tune.ids, t.tune.first_target)
            if not math.isfinite(cache.nll):
                raise UserError(f"{self.source.id}: the base model's perplexity on the tuning text is not a finite "
                                "number (its logits overflow or hold NaN); there is nothing to compare trials against")
            if not cache.tokens:
                raise UserError(f"{t.tune_name}: no massive activation persists on the tuning text, so it has no sink "
                                "to cut; give a longer --text or --max-tokens")
            self._passes["tuning"] = cache
        return self._passes["tuning"]

    def held(self) -> TextCache:
        """The base model over the held-out text (run only when a setting is not in the cache)."""
        if "held" not in self._passes:
            t = self.texts
            cache = self.evaluator.base_pass("held-out", t.held.ids, t.held.first_target)
            if not cache.tokens:
                raise UserError(f"{t.held_name}: no massive activation persists on the held-out text, so the sink "
                                "cut cannot be measured there; give a longer --heldout text")
            self._passes["held"] = cache
        return self._passes["held"]

    # trials
    def run(self) -> int:
        """Run trials until the study holds `opts.trials` finished ones (all workers together) or the timeout
        passes; the tuning pass runs only when trials are left. Returns the trials this process ran."""
        finished = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        if len(finished) >= self.opts.trials:
            return 0
        goal, budget = self.opts.goal, self.opts.budget
        self.ran += run_trials(self.study, make_objective(self.evaluator, self.tuning(), self.space, goal, budget),
                               self.opts.trials, timeout=self.opts.timeout, goal=goal, budget=budget,
                               progress=self.progress, space=self.space, label=self.label)
        return self.ran

    def trials(self) -> list[TrialRecord]:
        """The study's complete trials, in order (every worker's)."""
        return complete_trials(self.study)

    # measuring settings on both texts
    def key(self, chosen: Setting) -> str:
        """What a setting does, as a key: two settings with one key measure the same."""
        return effect_key(self.evaluator.plans(pairs(chosen)))

    def heldout(self, chosen: Setting):
        """A setting's held-out figures (from the cache when they can be trusted)."""
        key = self.key(chosen)
        fig = self.cache.get(key)
        if fig is None:
            fig = self.evaluator.run(self.held(), self.evaluator.plans(pairs(chosen)))
            self.cache.put(key, fig)
        return fig

    def measure(self, chosen: Setting, trial: TrialRecord | None = None, manifest: str | None = None) -> Measured:
        """A setting's figures on both texts (on the tuning text from its trial where there is one)."""
        tuning = trial.figures if trial is not None else self.evaluator.run(self.tuning(),
                                                                             self.evaluator.plans(pairs(chosen)))
        return Measured(trial=None if trial is None else trial.number, recipes=chosen, tuning=tuning,
                        heldout=self.heldout(chosen), manifest=manifest)

    def default(self, name: str) -> Measured:
        """A recipe's defaults measured, or why they do not apply to this model (e.g. it has no FFN neurons)."""
        from melsurgery.recipes import resolve_recipes

        chosen = setting(resolve_recipes([(name, {})]))
        try:
            return self.measure(chosen)
        except UserError as exc:
            return Measured(recipes=chosen, error=str(exc))

    def choose(self, budget: Budget | None = None, trials: list[TrialRecord] | None = None) -> Choice:
        """The largest held-out cut within `budget` (default: the options' budget): the `opts.candidates` distinct
        settings that cut most within twice the budget on the tuning text, re-measured on held-out text."""
        budget = budget or self.opts.budget
        goal = self.opts.goal
        todo: dict[str, TrialRecord] = {}
        for t in candidates_for(self.trials() if trials is None else trials, budget, goal):
            key = self.key(t.recipes)
            if len(todo) >= self.opts.candidates:
                break
            todo.setdefault(key, t)
        bar = None
        if self.progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="held-out", unit="setting", leave=False)
        found = []
        try:
            for t in todo.values():
                found.append(self.measure(t.recipes, t))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return Choice(budget, pick(found, budget, goal), tuple(found))
