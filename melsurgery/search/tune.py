"""`tune`: search recipe settings per model (Optuna): sink reduction after the ME Layer against KL.

Massive activations and sinks differ from model to model, so the right cut is searched, not guessed.
Trials write no checkpoint: the base model runs once over the tuning text, the residual entering every
layer from the ME Layer on is cached, and a trial reruns only the layers from the first one it edits,
with its edits applied to the weights in memory (the writer's own `edited_tensor`) and WeMask installed
as the hook the shipped custom layer uses. The chosen settings are re-measured on held-out text.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import torch

from melsurgery.architectures import Family, family_for
from melsurgery.calibrate.stats import LayerStats
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.atomic import critical, interruptible, write_atomic
from melsurgery.checkpoint.edits import Edit, edited_tensor
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.source import Source
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError, quote
from melsurgery.formats.jsonsafe import dumps
from melsurgery.formats.textfile import open_regular, read_text
from melsurgery.measure.definitions import find_massive, layer_stats, sink, top_k_for
from melsurgery.measure.probes import Probe
from melsurgery.recipes import Recipe, RecipePlan, plan_recipes, registry, require_me, resolve_recipes
from melsurgery.search.storage import LOCK, STUDY, check_run_dir, check_storage, describe, open_storage, storage_errors
from melsurgery.surgery.patch import check_scan_fits

OBJECTIVES = ("sink", "ratio")
SEEDS = 2**32  # the samplers take seeds in [0, 2^32)
BUDGETS = (0.02, 0.05, 0.1)  # KL budgets reported in tune.json (and the README)
# Parameters the search leaves at their defaults: explicit dim/neuron lists, and mask_ratio, which is an
# alternative to top_k. Every other declared parameter is searched over its declared range, except options
# that are off by default (default None) unless they default to another parameter's value (a ramp's end).
FIXED = {"dims", "mask_ratio", "neurons"}
# Upper ends for declared integers without one, from the scan.
INT_HIGH = {"top_k": lambda scan: max(1, min(8, len(scan.top_dims or scan.massive_dims)))}


# --- Measurements: massive tokens, sink and ratio come from `measure` (the one definition, as verify) ---

def log_probs(logits: torch.Tensor, first: int) -> torch.Tensor:
    """Log-probabilities [T - first, V] of the scored tokens (after the special prefix) of one window."""
    return logits[first - 1 : -1].double().log_softmax(-1)


def kl_sum(base_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """KL(base || patched) summed over the scored tokens (the mean divides by their count)."""
    return float((base_logp.exp() * (base_logp - logp)).sum(-1).clamp(min=0).sum())


def nll_sum(logp: torch.Tensor, ids: list[int], first: int) -> float:
    """Negative log-likelihood of the window's scored tokens (perplexity = exp(sum / count))."""
    return float(-logp.gather(-1, torch.tensor(ids[first:], device=logp.device)[:, None]).sum())


def _mean(values: list) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


# --- Data between stages ---

@dataclass(frozen=True)
class Figures:
    """What one setting does to one text: sinks and ratios after the ME Layer, KL and perplexity."""

    sink_base: float
    sink_patched: float
    sink_reduction_pct: float
    ratio_base: float
    ratio_patched: float
    ratio_reduction_pct: float
    kl_mean: float
    ppl_base: float
    ppl_patched: float
    ppl_increase_pct: float
    tokens: int

    def finite(self) -> bool:
        """Whether every figure the search compares is a number (a broken trial is pruned, not ranked)."""
        return all(math.isfinite(x) for x in (self.sink_patched, self.kl_mean, self.ppl_patched, self.ratio_patched,
                                              self.sink_reduction_pct, self.ratio_reduction_pct, self.ppl_increase_pct))

    def objective(self, name: str) -> float:
        """The reduction the study maximises under `--objective` (sink or max/median ratio), in percent."""
        return self.sink_reduction_pct if name == "sink" else self.ratio_reduction_pct


@dataclass
class TextCache:
    """One text's windows and the base model's pass over them, computed once."""

    name: str
    windows: list[list[int]]
    first: int  # the first scored position of every window (after the special prefix)
    inputs: dict[int, list[torch.Tensor]]  # layer i -> the residual entering it, per window [T, D]
    base_logp: list[torch.Tensor]  # per window [T - first, V]
    stats: list[LayerStats]  # the base model's per-layer statistics (measure.layer_stats)
    tokens: list[tuple[int, int]]  # massive tokens (window, position) of the base model (measure.find_massive)
    nll: float

    @property
    def size(self) -> int:
        """Tokens in the text's windows, special prefixes included (what the model runs over)."""
        return sum(len(w) for w in self.windows)

    @property
    def scored(self) -> int:
        """Tokens that KL and perplexity are averaged over (the special prefixes are never scored)."""
        return sum(len(w) - self.first for w in self.windows)


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


def validate(opts: TuneOptions) -> TuneOptions:
    """Refuse bad options before any model is read."""
    if not opts.recipes:
        raise UserError("--recipes: name at least one recipe")
    known = registry()
    for r in opts.recipes:
        if r not in known:
            raise UserError(f"--recipes: unknown recipe {r!r}; available: {', '.join(known)}")
    if len(set(opts.recipes)) != len(opts.recipes):
        raise UserError("--recipes: a recipe is named twice")
    if opts.objective not in OBJECTIVES:
        raise UserError(f"--objective {opts.objective!r}: use one of {', '.join(OBJECTIVES)}")
    for flag, v in (("--max-kl", opts.max_kl), ("--max-ppl-increase", opts.max_ppl_increase),
                    ("--timeout", opts.timeout)):
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise UserError(f"{flag} {v}: must be a positive finite number")
    if opts.trials < 1:
        raise UserError(f"--trials {opts.trials}: must be at least 1")
    if not 0 <= opts.seed < SEEDS:
        raise UserError(f"--seed {opts.seed}: must lie in [0, {SEEDS - 1}]")
    if opts.storage:
        check_storage(opts.storage)
    return opts


# --- The evaluator: base pass once, trials over the suffix ---

class Evaluator:
    """Runs settings over cached texts: only the layers from a setting's first edited layer are rerun.

    Trials run through `streaming.run_layers` (the runner verify uses): each decoder layer from the
    first edited one is read, loaded with the trial's edited tensors swapped in and its WeMask hooks,
    run over the cached states and freed, so memory stays one layer plus activations whatever the model.
    """

    def __init__(self, source: Source, scan: ScanResult, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.ckpt = Checkpoint(source.folder)
        self.family: Family = family_for(self.ckpt.config)
        self.scan = scan
        self.me = require_me(scan)
        self.params = scan.params
        self.model = StreamingModel(self.ckpt, self.family, device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.num_layers = self.model.num_layers
        self.norm = self.model.final_norm(self.ckpt.load(self.family.final_norm))
        self.head = self.ckpt.load(self.model.head_tensor, dtype, device)

    def close(self) -> None:
        """Drop the LM head (vocabulary x hidden) the evaluator holds, once the run has written its outputs."""
        self.head = None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final residual states, through the model's final norm and LM head (as verify computes them)."""
        return self.model.logits(self.norm(h), self.head)

    def base_pass(self, name: str, windows: list[list[int]], first: int) -> TextCache:
        """Run the base model once over `windows`: cached inputs, log-probabilities, massive tokens, stats."""
        inputs: dict[int, list[torch.Tensor]] = {}
        stats: list[LayerStats] = []
        k = top_k_for(len(windows))

        def observe(i: int, _: int, ins: list, outs: list, probe: Probe) -> None:
            if i >= self.me:
                inputs[i] = ins
            stats.append(layer_stats(i, outs, k, probe.key_attention))

        stream = Stream(self.model.embed(windows))
        run_layers(self.model, [stream], probe=lambda layer: Probe(layer, self.family), observe=observe)
        with torch.no_grad():
            logp = [log_probs(self.logits(h), first) for h in stream.states]
        tokens = find_massive(stats, self.params).tokens
        nll = sum(nll_sum(lp, ids, first) for lp, ids in zip(logp, windows))
        return TextCache(name, windows, first, inputs, logp, stats, tokens, nll)

    def run(self, text: TextCache, plans: list[RecipePlan]) -> Figures:
        """The figures of `plans` on `text`, rerunning only the layers from the first one they edit."""
        edits = [e for p in plans for e in p.edits]
        spec = next((p.wemask for p in plans if p.wemask is not None), None)
        by_layer = self._edits_by_layer(edits)
        touched = set(by_layer) | set(spec.layers if spec else ())
        if not touched:
            return self._figures(text, text.stats, 0.0, text.nll)
        start = min(touched)
        if start < self.me:
            raise UserError(f"tune edits layers from the ME Layer ({self.me}) on; a setting edits layer {start}")
        prefix_len = {i: len(self.family.prefix(i)) for i in by_layer}

        def edited(i: int, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """Layer i's edited tensors, exactly as `patch` stores them (names relative to the layer)."""
            out: dict[str, torch.Tensor] = {}
            for e in by_layer.get(i, []):
                rel = e.tensor[prefix_len[i]:]
                if rel not in base:
                    raise UserError(f"{self.ckpt.folder}: the checkpoint has no tensor {e.tensor!r}")
                out[rel] = edited_tensor(out.get(rel, base[rel]), [e])
            return out

        stats = list(text.stats[:start])
        k = top_k_for(len(text.windows))

        def observe(i: int, _: int, ins: list, outs: list, probe: Probe) -> None:
            stats.append(layer_stats(i, outs, k, probe.key_attention))

        stream = Stream(list(text.inputs[start]), edits=edited, wemask=spec.to_config() if spec else None)
        run_layers(self.model, [stream], start, probe=lambda layer: Probe(layer, self.family), observe=observe)
        kl = nll_p = 0.0
        with torch.no_grad():
            for w, h in enumerate(stream.states):
                logp = log_probs(self.logits(h), text.first)
                kl += kl_sum(text.base_logp[w], logp)
                nll_p += nll_sum(logp, text.windows[w], text.first)
        return self._figures(text, stats, kl, nll_p)

    def _figures(self, text: TextCache, stats: list[LayerStats], kl: float, nll_p: float) -> Figures:
        n = text.scored
        after = range(min(self.me + 1, self.num_layers - 1), self.num_layers)
        sb = _mean([sink(text.stats[i], text.tokens) for i in after])
        sp = _mean([sink(stats[i], text.tokens) for i in after])
        rb = _mean([text.stats[i].ratio for i in after])
        rp = _mean([stats[i].ratio for i in after])
        ppl_b, ppl_p = math.exp(text.nll / n), math.exp(nll_p / n)
        return Figures(sb, sp, 100 * (1 - sp / sb) if sb else 0.0, rb, rp, 100 * (1 - rp / rb) if rb else 0.0,
                       kl / n, ppl_b, ppl_p, 100 * (ppl_p / ppl_b - 1), text.size)

    def _edits_by_layer(self, edits: list[Edit]) -> dict[int, list[Edit]]:
        out: dict[int, list[Edit]] = {}
        for e in edits:
            layer = next((i for i in range(self.num_layers) if e.tensor.startswith(self.family.prefix(i))), None)
            if layer is None:
                raise UserError(f"tune edits decoder layers only; a setting edits {e.tensor}")
            out.setdefault(layer, []).append(e)
        return out


# --- The search space, derived from the recipes' parameter declarations ---

@dataclass(frozen=True)
class Space:
    """What a trial may choose: which recipes compose, and each searched parameter over its declared range."""

    recipes: tuple[Recipe, ...]
    me_layer: int
    num_layers: int
    int_high: dict[str, int] = field(default_factory=dict)

    @property
    def combos(self) -> list[str]:
        """Every non-empty composition of the searched recipes, as Optuna categorical choices ('a+b')."""
        names = [r.name for r in self.recipes]
        return ["+".join(c) for k in range(1, len(names) + 1) for c in combinations(names, k)]

    def suggest(self, trial) -> list[tuple[str, dict]]:
        """(recipe, params) pairs for one trial, validated by the recipes' own declarations."""
        chosen = trial.suggest_categorical("recipes", self.combos).split("+")
        out = []
        for recipe in self.recipes:
            if recipe.name not in chosen:
                continue
            params = {}
            for p in recipe.params:
                if not _searched(p):
                    continue
                key = f"{recipe.name}.{p.name}"
                if p.kind == "layers":  # a contiguous run of layers after the ME Layer
                    lo, hi = self.me_layer + 1, self.num_layers - 1
                    first = trial.suggest_int(f"{key}.first", lo, hi)
                    count = trial.suggest_int(f"{key}.count", 1, hi - lo + 1)
                    params[p.name] = f"{first}-{min(hi, first + count - 1)}"
                elif p.kind == "choice":
                    params[p.name] = trial.suggest_categorical(key, list(p.choices))
                elif p.kind == "float" and p.low is not None and p.high is not None:
                    params[p.name] = trial.suggest_float(key, p.low, p.high)
                elif p.kind == "int" and p.low is not None and (p.high is not None or p.name in self.int_high):
                    high = int(p.high) if p.high is not None else self.int_high[p.name]
                    params[p.name] = trial.suggest_int(key, int(p.low), max(int(p.low), high))
            out.append((recipe.name, params))
        return resolve_recipes(out)


    def defaults(self, recipe: Recipe) -> dict:
        """The trial parameters that reproduce `recipe`'s declared defaults (clipped into the space)."""
        from melsurgery.recipes import parse_layers

        out: dict = {"recipes": recipe.name}
        declared = {p.name: p for p in recipe.params}
        for p in recipe.params:
            if not _searched(p):
                continue
            key = f"{recipe.name}.{p.name}"
            if p.same_as is not None:  # a ramp's end: the default ramp is flat
                out[key] = float(declared[p.same_as].default)
            elif p.kind == "layers":
                layers = [i for i in parse_layers(p.default, self.me_layer, self.num_layers) if i > self.me_layer]
                first = layers[0] if layers else self.me_layer + 1
                out[f"{key}.first"] = first
                out[f"{key}.count"] = (layers[-1] - first + 1) if layers else 1
            elif p.kind == "choice":
                out[key] = p.default
            elif p.kind == "float" and p.low is not None and p.high is not None:
                out[key] = float(p.default)
            elif p.kind == "int" and p.low is not None and (p.high is not None or p.name in self.int_high):
                high = int(p.high) if p.high is not None else self.int_high[p.name]
                out[key] = min(max(int(p.default), int(p.low)), high)
        return out


def _searched(p) -> bool:
    """Whether the search varies this declared parameter."""
    return p.name not in FIXED and (p.default is not None or p.same_as is not None)


def make_space(names: tuple[str, ...], scan: ScanResult) -> Space:
    """The search space of these recipes for this model, from their declared parameters."""
    if scan.me_layer is None:
        raise UserError("the scan found no ME Layer: there is nothing to tune")
    me, n = scan.me_layer, scan.model.num_layers
    if me + 1 >= n:
        raise UserError(f"the ME Layer is the last layer ({me}): no layer after it to act on")
    known = registry()
    return Space(tuple(known[r] for r in known if r in names), me, n, {k: f(scan) for k, f in INT_HIGH.items()})


# --- Texts ---

def split_text(raw: str) -> tuple[str, str]:
    """Tuning and held-out halves of one text, cut at the paragraph boundary nearest the middle."""
    cuts = [i for i in range(len(raw)) if raw.startswith("\n\n", i)]
    if not cuts:
        cuts = [i for i, c in enumerate(raw) if c == "\n"] or [len(raw) // 2]
    cut = min(cuts, key=lambda i: abs(i - len(raw) // 2))
    return raw[:cut].strip() + "\n", raw[cut:].strip() + "\n"


def text_windows(tokenizer, raw: str, max_tokens: int, limit: int | None):
    """Windows exactly as `verify` cuts them from the same text (each starts with the special prefix)."""
    from melsurgery.measure.verify import make_windows

    return make_windows(tokenizer, raw, max_tokens, limit)


# --- The study ---

def open_study(run_dir: Path, storage: str | None, fingerprint: dict, seed: int):
    """Create or continue the study in RUN_DIR (a journal file), or in `storage` (any Optuna storage URL).

    A study holds one model, text and search space: continuing it with others is refused.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is recorded, not logged with its traceback
    with storage_errors(storage, run_dir, "open the study"):
        study = optuna.create_study(study_name=STUDY, storage=open_storage(storage, run_dir), load_if_exists=True,
                                    directions=["maximize", "minimize"])
        held = study.user_attrs.get("fingerprint")
        done = len(study.get_trials(deepcopy=False))
    if held is None:
        with storage_errors(storage, run_dir, "write to the study"):
            study.set_user_attr("fingerprint", fingerprint)
    elif held != fingerprint:
        held = held if isinstance(held, dict) else {}
        diff = sorted(k for k in set(held) | set(fingerprint) if held.get(k) != fingerprint.get(k))
        raise UserError(f"the study in {quote(describe(storage, run_dir), 300)} was run with different "
                        f"{', '.join(diff)}; use a new RUN_DIR (or --storage) or the original settings")
    # a continued run must not replay the proposals of the first one
    study.sampler = optuna.samplers.TPESampler(seed=(seed + done) % SEEDS, n_startup_trials=8)
    return study


def trial_record(t) -> dict:
    """One Optuna trial as tune.json records it."""
    return {"number": t.number, "state": t.state.name, "recipes": t.user_attrs.get("recipes"),
            "params": t.params, "figures": t.user_attrs.get("figures"), "worker": t.user_attrs.get("worker")}


def feasible(fig: dict, max_kl: float | None, max_ppl: float | None) -> bool:
    """Whether a trial's figures meet the KL and perplexity budgets."""
    return ((max_kl is None or fig["kl_mean"] <= max_kl)
            and (max_ppl is None or fig["ppl_increase_pct"] <= max_ppl))


def pareto_front(records: list[dict], objective: str) -> list[int]:
    """Numbers of the complete trials no other trial beats on both reduction and KL."""
    key = "sink_reduction_pct" if objective == "sink" else "ratio_reduction_pct"
    pts = [(r["number"], r["figures"][key], r["figures"]["kl_mean"]) for r in records]
    return [n for n, red, kl in pts
            if not any((r2 >= red and k2 <= kl) and (r2 > red or k2 < kl) for _, r2, k2 in pts)]


def best_within(records: list[dict], objective: str, max_kl: float | None, max_ppl: float | None) -> dict | None:
    """The chosen trial: the largest reduction within the budget (ties: the smaller KL)."""
    key = "sink_reduction_pct" if objective == "sink" else "ratio_reduction_pct"
    ok = [r for r in records if feasible(r["figures"], max_kl, max_ppl)]
    return max(ok, key=lambda r: (r["figures"][key], -r["figures"]["kl_mean"]), default=None)


@dataclass
class TuneResult:
    """What a tune run wrote: its folder, tune.json's content and the chosen trial."""

    run_dir: Path
    data: dict
    chosen: dict | None
    manifest: object | None  # Manifest of the chosen trial
    ran: int  # trials this process ran
    scan: ScanResult


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Workers sharing RUN_DIR write its outputs one at a time (the last one sees every trial)."""
    fd = open_regular(run_dir / LOCK, "the run folder's lock file", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_tune(source: Source, model_arg: str, run_dir: Path, opts: TuneOptions, *, scan: ScanResult | None = None,
             calibration=None, detection=None, text: Path | None = None, heldout: Path | None = None,
             device: str = "cpu", dtype: torch.dtype = torch.float32,
             progress: bool = False) -> TuneResult:
    """Search, then write tune.json, tune.png and best.yaml into `run_dir`; see the README's `tune` section."""
    import optuna

    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.detect.scan import run_scan
    from melsurgery.measure.verify import eval_text
    from melsurgery.params import DetectParams
    from melsurgery.surgery.manifest import Manifest

    validate(opts)
    run_dir = Path(run_dir)
    check_run_dir(run_dir, opts.storage, source.folder)
    calibration = calibration or CalibrationSpec()
    detection = detection or DetectParams()
    raw, text_name = eval_text(text)
    if heldout is None:
        tune_raw, held_raw = split_text(raw)
        held_name = f"{text_name} (second half)"
        text_name += " (first half)"
    else:
        tune_raw, (held_raw, held_name) = raw, eval_text(heldout)
    tokenizer = load_tokenizer(source.folder)
    tune_w = text_windows(tokenizer, tune_raw, opts.max_tokens, opts.windows)
    held_w = text_windows(tokenizer, held_raw, opts.max_tokens, opts.windows)
    if not tune_w.ids or not held_w.ids:
        raise UserError(f"{text_name}: too short to split into tuning and held-out windows of {opts.max_tokens} "
                        "tokens; give a longer --text or a --heldout file")
    if scan is not None:
        check_scan_fits(scan, Checkpoint(source.folder).config)
        make_space(opts.recipes, scan)  # a scan without an ME Layer is refused before anything is written
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot create the run folder ({exc.strerror})") from None
    # the held-out text as verify reads it, so that `verify --text` reproduces the held-out figures
    write_atomic(run_dir / "heldout.txt", held_raw)

    if scan is None:  # scanned once per run folder: later runs and other workers reuse it
        scan_path = run_dir / "scan.json"
        key = {"calibration": str(asdict(calibration)), "detection": asdict(detection), "folder": str(source.folder)}
        with _locked(run_dir):
            scan = _cached_scan(scan_path, key)
            if scan is None:
                scan = run_scan(source, calibration, detection, device=device, dtype=dtype, progress=progress)
                write_atomic(scan_path, dumps({**scan.to_dict(), "tune_key": key}, default=str))
    space = make_space(opts.recipes, scan)
    fingerprint = {"model": str(source.folder), "recipes": list(opts.recipes), "objective": opts.objective,
                   "text": _sha(tune_raw), "max_tokens": opts.max_tokens, "windows": opts.windows,
                   "me_layer": space.me_layer, "dtype": str(dtype)}

    with _locked(run_dir):
        study = open_study(run_dir, opts.storage, fingerprint, opts.seed)
        with storage_errors(opts.storage, run_dir, "write to the study"):
            if not study.get_trials(deepcopy=False):  # a new study starts from the recipes' defaults
                for r in space.recipes:
                    study.enqueue_trial(space.defaults(r))
    evaluator = Evaluator(source, scan, device=device, dtype=dtype)
    config = evaluator.ckpt.config
    try:
        tuning = evaluator.base_pass("tuning", tune_w.ids, tune_w.first_target)
        if not math.isfinite(tuning.nll):
            raise UserError(f"{source.id}: the base model's perplexity on the tuning text is not a finite number "
                            "(its logits overflow or hold NaN); there is nothing to compare trials against")
        if not tuning.tokens:
            raise UserError(f"{text_name}: no massive activation persists on the tuning text, so it has no sink "
                            "to cut; give a longer --text or --max-tokens")

        def measure(recipes: list[tuple[str, dict]], on: TextCache) -> Figures:
            return evaluator.run(on, plan_recipes(scan, evaluator.family, config, recipes))

        def objective(trial) -> tuple[float, float]:
            recipes = space.suggest(trial)
            fig = measure(recipes, tuning)
            trial.set_user_attr("recipes", [{"name": n, "params": p} for n, p in recipes])
            trial.set_user_attr("figures", asdict(fig))
            trial.set_user_attr("worker", os.getpid())
            if not fig.finite():  # before the constraints: Optuna refuses a NaN constraint
                raise optuna.TrialPruned("non-finite figures")
            # the budget as Optuna constraints (feasible at <= 0): the sampler favours settings within it
            trial.set_constraint("kl", fig.kl_mean - opts.max_kl if opts.max_kl else -1.0)
            trial.set_constraint("ppl", fig.ppl_increase_pct - opts.max_ppl_increase if opts.max_ppl_increase else -1.0)
            return fig.objective(opts.objective), fig.kl_mean

        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        remaining = max(0, opts.trials - len(finished))
        ran = 0
        if remaining:
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=remaining, desc="tune", unit="trial", leave=False)

            def on_trial(study, trial) -> None:
                nonlocal ran
                ran += 1
                if bar is not None:
                    bar.update(1)
                    recs = [trial_record(t) for t in study.get_trials(deepcopy=False, states=(
                        optuna.trial.TrialState.COMPLETE,))]
                    best = best_within(recs, opts.objective, opts.max_kl, opts.max_ppl_increase)
                    if best:
                        f = best["figures"]
                        change = -f[_key(opts.objective)]
                        bar.set_postfix_str(f"best #{best['number']}: {opts.objective} {change:+.1f}% "
                                            f"KL {f['kl_mean']:.4f}")

            stop = optuna.study.MaxTrialsCallback(opts.trials, states=tuple(
                s for s in optuna.trial.TrialState if s.is_finished()))
            def interruptible_objective(trial) -> tuple[float, float]:
                with interruptible():  # a signal cuts a trial's computation, never Optuna's record of it
                    return objective(trial)

            try:
                with critical():
                    study.optimize(interruptible_objective, n_trials=remaining, timeout=opts.timeout,
                                   callbacks=[on_trial, stop], catch=(UserError,))
            finally:
                if bar is not None:
                    bar.close()

        held = evaluator.base_pass("held-out", held_w.ids, held_w.first_target)
        with _locked(run_dir):
            complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
            records = [trial_record(t) for t in sorted(complete, key=lambda t: t.number)]
            measured: dict[str, dict] = {}  # by what a setting does (its edits and mask): measured once

            def effect(recipes: list[tuple[str, dict]]) -> str:
                plans = plan_recipes(scan, evaluator.family, config, recipes)
                return repr([(p.edits, p.wemask) for p in plans])

            tried = {effect([(x["name"], x["params"]) for x in r["recipes"]]): r for r in records}

            def both(recipes: list[tuple[str, dict]]) -> dict:
                """Tuning figures (from its trial where there is one) and held-out figures of a setting."""
                key = effect(recipes)
                if key not in measured:
                    on_tuning = Figures(**tried[key]["figures"]) if key in tried else measure(recipes, tuning)
                    measured[key] = _measured(recipes, on_tuning, measure(recipes, held))
                return measured[key]

            defaults = []
            for r in space.recipes:
                recipes = resolve_recipes([(r.name, {})])
                try:
                    defaults.append(both(recipes))
                except UserError as exc:  # a default that does not apply to this model (e.g. no neurons)
                    defaults.append({"recipes": [{"name": r.name, "params": recipes[0][1]}], "error": str(exc)})
            chosen = best_within(records, opts.objective, opts.max_kl, opts.max_ppl_increase)
            by_budget = {}
            for b in BUDGETS:
                best = best_within(records, opts.objective, b, opts.max_ppl_increase)
                if best:
                    recipes = [(x["name"], x["params"]) for x in best["recipes"]]
                    by_budget[str(b)] = {"trial": best["number"], **both(recipes)}
            manifest = None
            chosen_out = None
            if chosen:
                recipes = [(x["name"], x["params"]) for x in chosen["recipes"]]
                manifest = Manifest(model=model_arg, revision=source.revision, calibration=calibration,
                                    detection=detection, recipes=resolve_recipes(recipes))
                chosen_out = {"trial": chosen["number"], **both(recipes),
                              "manifest": "best.yaml"}
            data = {
                "schema_version": 1,
                "model": {"id": source.id, "folder": str(source.folder), "revision": source.revision},
                "study": {"name": STUDY, "storage": describe(opts.storage, run_dir),
                          "trials": len(records), "seed": opts.seed},
                "objective": opts.objective,
                "budget": {"max_kl": opts.max_kl, "max_ppl_increase": opts.max_ppl_increase},
                "me_layer": space.me_layer,
                "workload": {"tuning": {"text": text_name, "windows": len(tune_w.ids), "tokens": tuning.size},
                             "heldout": {"text": held_name, "file": "heldout.txt", "windows": len(held_w.ids),
                                         "tokens": held.size},
                             "max_tokens": opts.max_tokens, "dtype": str(dtype).removeprefix("torch."),
                             "device": device},
                "search_space": {"recipes": [r.name for r in space.recipes], "combos": space.combos},
                "defaults": defaults,
                "trials": records,
                "pareto_front": pareto_front(records, opts.objective),
                "by_budget": by_budget,
                "chosen": chosen_out,
            }
            _write_outputs(run_dir, data, manifest)
    finally:
        evaluator.close()
    return TuneResult(run_dir, data, chosen_out, manifest, ran, scan)


def _key(objective: str) -> str:
    return "sink_reduction_pct" if objective == "sink" else "ratio_reduction_pct"


def _measured(recipes: list[tuple[str, dict]], tuning: Figures, heldout: Figures) -> dict:
    return {"recipes": [{"name": n, "params": p} for n, p in recipes], "tuning": asdict(tuning),
            "heldout": asdict(heldout)}


def _write_outputs(run_dir: Path, data: dict, manifest) -> None:
    """tune.json, tune.png and best.yaml, each replaced atomically (a stale best.yaml is removed)."""
    from melsurgery.report.plot import plot_tune

    write_atomic(run_dir / "tune.json", dumps(data, indent=1) + "\n")
    if manifest is not None:
        write_atomic(run_dir / "best.yaml", manifest.to_yaml())
    else:
        (run_dir / "best.yaml").unlink(missing_ok=True)
    plot_tune(data, run_dir / "tune.png")


def _cached_scan(path: Path, key: dict) -> ScanResult | None:
    """RUN_DIR's scan when it was made with these settings; None when absent, stale or damaged (scanned again)."""
    if not path.exists():
        return None
    try:
        held = json.loads(read_text(path, "the run folder's scan"))
    except (UserError, ValueError, RecursionError):
        return None
    return ScanResult.read(path) if isinstance(held, dict) and held.get("tune_key") == key else None


def tune_report(result: TuneResult) -> str:
    """What the command prints: the workload, the defaults, the front at the reported budgets, the choice."""
    d = result.data
    w = d["workload"]
    key = _key(d["objective"])
    what = "sink" if d["objective"] == "sink" else "max/median ratio"
    lines = [f"study: {d['study']['trials']} trials ({result.ran} run now) in {d['study']['storage']}",
             f"tuning text: {w['tuning']['text']}, {w['tuning']['windows']} windows, {w['tuning']['tokens']} tokens; "
             f"held-out: {w['heldout']['text']}, {w['heldout']['windows']} windows, {w['heldout']['tokens']} tokens",
             f"ME Layer {d['me_layer']}; {what} after it, held-out text (base -> patched), KL per token, perplexity:",
             ""]

    def row(label: str, entry: dict) -> str:
        h = entry["heldout"]
        base, patched = (h["sink_base"], h["sink_patched"]) if d["objective"] == "sink" else \
            (h["ratio_base"], h["ratio_patched"])
        recipes = "; ".join(f"{r['name']} {_short(r['params'])}" for r in entry["recipes"])
        return (f"  {label:<22} {base:>8.3f} -> {patched:<8.3f} ({-h[key]:+6.1f}%)  KL {h['kl_mean']:.4f}  "
                f"ppl {h['ppl_base']:.2f} -> {h['ppl_patched']:.2f}  {recipes}")

    for entry in d["defaults"]:
        name = entry["recipes"][0]["name"]
        lines.append(f"  default {name}: {entry['error']}" if "error" in entry else row(f"default {name}", entry))
    for b, entry in d["by_budget"].items():
        lines.append(row(f"KL <= {b} (#{entry['trial']})", entry))
    lines.append("")
    if d["chosen"]:
        lines.append(f"chosen: trial #{d['chosen']['trial']} (largest {what} reduction within the budget) -> "
                     f"{result.run_dir / 'best.yaml'}")
    else:
        lines.append("no trial within the budget: loosen --max-kl / --max-ppl-increase or run more --trials")
    return "\n".join(lines)


def _short(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
                     if v is not None and k not in FIXED)
