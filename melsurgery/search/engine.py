"""Trials without checkpoints, and the loop that runs them: the one search engine of `tune` and `patch --max-kl`.

A trial is a setting of the space (recipes and their parameters). The base model runs once over a text;
the residual entering every layer from the first one the space can edit is cached, so a trial reruns
only the layers from the first one it edits, with its edits applied to the weights in memory (the
writer's own `edited_tensor`) and WeMask installed as the hook the shipped custom layer uses. Memory is
one decoder layer plus the activations, whatever the model size: layers are streamed from the
checkpoint as in `verify`, and the LM head is read in vocabulary blocks.

KL needs the base model's next-token distribution at every scored token, which is a vocabulary-sized
row per token (262,144 entries for Gemma 3: 2 MB per token in float64). The cache keeps, per token,
only the base log-sum-exp, the final-normed state n_b and the expected head row mu_b = sum_v p_b(v) W_v.
Where the logits are linear in the final-normed state (z = W n, no soft-capping),
KL(base || patched) = lse_p - lse_b - mu_b . (n_p - n_b) exactly; models with soft-capped logits
recompute the base logits block by block instead (as verify does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from melsurgery.architectures import Family, family_for
from melsurgery.calibrate.stats import LayerStats
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.atomic import critical, interruptible
from melsurgery.checkpoint.edits import Edit, edited_rows, edited_tensor
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.source import Source
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError, quote
from melsurgery.measure.definitions import find_massive, layer_stats, sink, top_k_for
from melsurgery.measure.probes import Probe
from melsurgery.recipes import RecipePlan, plan_recipes, require_me
from melsurgery.search.storage import STUDY, describe, open_storage, storage_errors

HEAD_ROWS = 8192  # LM-head rows (vocabulary entries) scored at a time
SEEDS = 2**32  # the samplers take seeds in [0, 2^32)
NAN = {"nan": True}  # a figure written as null (not a number) reads back as NaN


def _mean(values: list) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


# --- Data between stages ---

@dataclass(frozen=True)
class Figures:
    """What one setting does to one text: sinks and ratios after the ME Layer, KL and perplexity.

    `sink_*`: the sink (measure.py) averaged over the layers after the ME Layer; `*_reduction_pct`: the cut in
    percent of the base (negative: the setting raised it); `kl_mean`: KL(base || patched) per scored token."""

    sink_base: float = field(metadata=NAN)
    sink_patched: float = field(metadata=NAN)
    sink_reduction_pct: float = field(metadata=NAN)
    ratio_base: float = field(metadata=NAN)
    ratio_patched: float = field(metadata=NAN)
    ratio_reduction_pct: float = field(metadata=NAN)
    kl_mean: float = field(metadata=NAN)
    ppl_base: float = field(metadata=NAN)
    ppl_patched: float = field(metadata=NAN)
    ppl_increase_pct: float = field(metadata=NAN)
    tokens: int

    def finite(self) -> bool:
        """Whether every figure the search compares is a number (a broken trial is pruned, not ranked)."""
        return all(math.isfinite(x) for x in (self.sink_patched, self.kl_mean, self.ppl_patched, self.ratio_patched,
                                              self.sink_reduction_pct, self.ratio_reduction_pct, self.ppl_increase_pct))

    def objective(self, name: str) -> float:
        """The reduction the study maximises under `--objective` (sink or max/median ratio), in percent."""
        return self.sink_reduction_pct if name == "sink" else self.ratio_reduction_pct


@dataclass(frozen=True)
class Budget:
    """The quality budget: mean KL per token and perplexity increase (percent); None: no limit."""

    max_kl: float | None = 0.05
    max_ppl_increase: float | None = None

    def holds(self, fig: dict) -> bool:
        """Whether figures (a Figures as a dict) are within the budget."""
        return ((self.max_kl is None or fig["kl_mean"] <= self.max_kl)
                and (self.max_ppl_increase is None or fig["ppl_increase_pct"] <= self.max_ppl_increase))

    def constraints(self, fig: Figures) -> tuple[float, float]:
        """Optuna constraints (feasible at <= 0), so that the sampler favours settings within the budget."""
        return (fig.kl_mean - self.max_kl if self.max_kl else -1.0,
                fig.ppl_increase_pct - self.max_ppl_increase if self.max_ppl_increase else -1.0)


@dataclass
class TextCache:
    """One text's windows and what the base model does on them, computed once per text.

    `inputs`: the residual entering layer i (per window [T, D]) for every layer a trial may start from, and at
    key `num_layers` the last layer's output. The head figures are per scored token, all windows in order:
    `normed` the final-normed base state, `lse` the base log-sum-exp, `mean_row` the expected head row (None
    where logits are soft-capped), `targets` the next tokens."""

    name: str
    windows: list[list[int]]
    first: int  # the first scored position of every window (after the special prefix)
    inputs: dict[int, list[torch.Tensor]]
    stats: list[LayerStats]  # the base model's per-layer statistics (measure.layer_stats)
    tokens: list[tuple[int, int]]  # massive tokens (window, position) of the base model (measure.find_massive)
    normed: torch.Tensor
    lse: torch.Tensor
    mean_row: torch.Tensor | None
    targets: torch.Tensor
    nll: float

    @property
    def size(self) -> int:
        """Tokens in the text's windows, special prefixes included (what the model runs over)."""
        return sum(len(w) for w in self.windows)

    @property
    def scored(self) -> int:
        """Tokens that KL and perplexity are averaged over (the special prefixes are never scored)."""
        return sum(len(w) - self.first for w in self.windows)


@dataclass
class _HeadPass:
    """Online log-softmax over vocabulary blocks: log-sum-exp, the target's logit, and on request the expected
    head row (base pass) or the cross term against base logits (soft-capped models)."""

    m: torch.Tensor
    s: torch.Tensor
    target: torch.Tensor
    mean_row: torch.Tensor | None = None

    @classmethod
    def start(cls, n: int, dim: int | None, device: torch.device) -> _HeadPass:
        f64 = {"dtype": torch.float64, "device": device}
        return cls(torch.full((n,), -math.inf, **f64), torch.zeros(n, **f64), torch.zeros(n, **f64),
                   None if dim is None else torch.zeros(n, dim, **f64))

    def add(self, z: torch.Tensor, lo: int, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Fold in logits z [n, B] (float64) of vocabulary entries lo..lo+B-1; returns the old running max."""
        old = self.m
        self.m = torch.maximum(self.m, z.max(-1).values)
        scale = torch.exp(old - self.m)
        w = torch.exp(z - self.m[:, None])
        self.s = self.s * scale + w.sum(-1)
        if self.mean_row is not None:
            self.mean_row = self.mean_row * scale[:, None] + (w.to(rows.dtype) @ rows).double()
        inside = (targets >= lo) & (targets < lo + z.shape[1])
        picked = z.gather(1, (targets - lo).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
        self.target = torch.where(inside, picked, self.target)
        return old

    @property
    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


# --- The evaluator: base pass once per text, trials over the suffix ---

class Evaluator:
    """Runs settings over cached texts: only the layers from a setting's first edited layer are rerun.

    Trials run through `streaming.run_layers` (the runner verify uses): each decoder layer from the
    first edited one is read, loaded with the trial's edited tensors swapped in and its WeMask hooks,
    run over the cached states and freed. Edits of the embedding table (rows of the tokens at hand), the
    final norm and the LM head (block by block) are applied in memory too.
    """

    def __init__(self, source: Source, scan: ScanResult, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_from: int | None = None) -> None:
        self.ckpt = Checkpoint(source.folder)
        self.family: Family = family_for(self.ckpt.config)
        self.scan = scan
        self.me = require_me(scan)
        self.params = scan.params
        self.model = StreamingModel(self.ckpt, self.family, device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.num_layers = self.model.num_layers
        # the residuals a trial may start from: by default those entering the ME Layer and every later layer
        self.cache_from = self.me if cache_from is None else cache_from
        self.linear_head = not getattr(self.model.config, "final_logit_softcapping", None)

    def plans(self, recipes: list[tuple[str, dict]]) -> list[RecipePlan]:
        """The plans of (recipe, params) pairs for this model (pure: the scan decides)."""
        return plan_recipes(self.scan, self.family, self.ckpt.config, recipes)

    def base_pass(self, name: str, windows: list[list[int]], first: int) -> TextCache:
        """Run the base model once over `windows`: cached inputs, head figures, massive tokens, statistics."""
        inputs: dict[int, list[torch.Tensor]] = {}
        stats: list[LayerStats] = []
        k = top_k_for(len(windows))

        def observe(i: int, _: int, ins: list, outs: list, probe: Probe) -> None:
            if i >= self.cache_from:
                inputs[i] = ins
            stats.append(layer_stats(i, outs, k, probe.key_attention))

        stream = Stream(self.model.embed(windows))
        run_layers(self.model, [stream], probe=lambda layer: Probe(layer, self.family), observe=observe)
        inputs[self.num_layers] = stream.states
        targets = torch.tensor([t for ids in windows for t in ids[first:]], device=self.device)
        normed = self._normed(stream.states, first, [])
        head = self._head(normed, targets, [], mean_row=self.linear_head)
        tokens = find_massive(stats, self.params).tokens
        nll = float((head.lse - head.target).sum())
        return TextCache(name, windows, first, inputs, stats, tokens, normed, head.lse, head.mean_row, targets, nll)

    def run(self, text: TextCache, plans: list[RecipePlan]) -> Figures:
        """The figures of `plans` on `text`, rerunning only the layers from the first one they edit."""
        edits = [e for p in plans for e in p.edits]
        spec = next((p.wemask for p in plans if p.wemask is not None), None)
        embed = [e for e in edits if e.tensor == self.family.embed]
        norm = [e for e in edits if e.tensor == self.family.final_norm]
        head = [e for e in edits if e.tensor == self.model.head_tensor]
        by_layer = self._edits_by_layer([e for e in edits if e not in embed + norm + head])
        touched = set(by_layer) | set(spec.layers if spec else ())
        if not (touched or embed or norm or head):
            return self._figures(text, text.stats, 0.0, text.nll)
        start = 0 if embed else min(touched, default=self.num_layers)
        if start in text.inputs:
            states = list(text.inputs[start])
        else:  # before the cached layers: from the embeddings (an embedding edit, or a layer before the ME Layer)
            states, start = self.model.embed(text.windows, edits=embed), 0
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

        stream = Stream(states, edits=edited, wemask=spec.to_config() if spec else None)
        run_layers(self.model, [stream], start, probe=lambda layer: Probe(layer, self.family), observe=observe)
        normed = self._normed(stream.states, text.first, norm)
        # the base's expected head row stands for its logits only while the head is the same matrix, or differs
        # in a few rows (corrected below); soft-capped logits and column edits recompute the base logits instead
        linear = self.linear_head and all(e.axis == 0 and e.index is not None for e in head)
        out = self._head(normed, text.targets, head, base=None if linear else text)
        if linear:
            kl = (out.lse - text.lse) - ((normed - text.normed).double() * text.mean_row).sum(-1)
            kl -= self._edited_rows_term(text, normed, head)
        else:
            kl = out.mean_row  # the cross path's KL per token (see _head)
        nll_p = float((out.lse - out.target).sum())
        return self._figures(text, stats, float(kl.clamp(min=0).sum()), nll_p)

    def _edited_rows_term(self, text: TextCache, normed: torch.Tensor, edits: list[Edit]) -> torch.Tensor:
        """sum over the edited LM-head rows v of p_base(v) (z_patched(v) - W_v . n_patched): what the expected
        head row of the base misses of the base-weighted patched logits when rows of the head were edited."""
        rows = sorted({i for e in edits for i in e.index})
        if not rows:
            return torch.zeros(len(text.targets), dtype=torch.float64, device=self.device)
        stored = self.ckpt.load_rows(self.model.head_tensor, rows)
        new = edited_rows(stored, rows, edits).to(self.device, self.dtype)
        old = stored.to(self.device, self.dtype)
        with torch.no_grad():
            p_base = torch.exp(self.model.logits(text.normed, old).double() - text.lse[:, None])
            delta = self.model.logits(normed, new).double() - self.model.logits(normed, old).double()
        return (p_base * delta).sum(-1)

    def _normed(self, states: list[torch.Tensor], first: int, edits: list[Edit]) -> torch.Tensor:
        """Final-normed states [n, D] of the scored positions (position t predicts token t + 1), all windows."""
        weight = self.ckpt.load(self.family.final_norm)
        norm = self.model.final_norm(edited_tensor(weight, edits) if edits else weight)
        with torch.no_grad():
            return torch.cat([norm(h[first - 1 : -1]) for h in states])

    def _head(self, normed: torch.Tensor, targets: torch.Tensor, edits: list[Edit], *, mean_row: bool = False,
              base: TextCache | None = None) -> _HeadPass:
        """Log-sum-exp and target logits of final-normed states over the LM head, read in blocks of HEAD_ROWS.

        `mean_row`: also the expected head row under these states' distribution (the base pass). `base`: a
        text whose base logits are recomputed per block (soft-capped models); the KL per token is then
        returned in the result's `mean_row` slot."""
        name = self.model.head_tensor
        vocab = self.ckpt.info(name).shape[0]
        row_edits = sorted({i for e in edits if e.axis == 0 and e.index is not None for i in e.index})
        edited = edited_rows(self.ckpt.load_rows(name, row_edits), row_edits, edits) if row_edits else None
        acc = _HeadPass.start(len(targets), normed.shape[1] if mean_row else None, self.device)
        acc_b = _HeadPass.start(len(targets), None, self.device) if base is not None else None
        cross = torch.zeros(len(targets), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for lo in range(0, vocab, HEAD_ROWS):
                hi = min(vocab, lo + HEAD_ROWS)
                stored = self.ckpt.load_row_block(name, lo, hi)
                rows = self._edited_block(stored, lo, edits, row_edits, edited) if edits else stored
                rows = rows.to(self.device, self.dtype)
                acc.add(self.model.logits(normed, rows).double(), lo, targets, rows)
                if acc_b is not None:
                    zb = self.model.logits(base.normed, stored.to(self.device, self.dtype)).double()
                    zp = self.model.logits(normed, rows).double()
                    old = acc_b.add(zb, lo, targets, rows)
                    cross = cross * torch.exp(old - acc_b.m) + (torch.exp(zb - acc_b.m[:, None]) * (zb - zp)).sum(-1)
        if acc_b is not None:
            acc.mean_row = cross / acc_b.s - acc_b.lse + acc.lse
        elif acc.mean_row is not None:
            acc.mean_row = (acc.mean_row / acc.s[:, None]).to(normed.dtype)
        return acc

    @staticmethod
    def _edited_block(stored: torch.Tensor, lo: int, edits: list[Edit], row_edits: list[int],
                      edited: torch.Tensor | None) -> torch.Tensor:
        """A block of LM-head rows with the edits applied: column and whole-tensor edits to the block, edited
        rows (computed once, `edited`) swapped in."""
        whole = [e for e in edits if e.axis != 0 or e.index is None]
        rows = edited_rows(stored, list(range(lo, lo + len(stored))), whole) if whole else stored.clone()
        for k, i in enumerate(row_edits):
            if lo <= i < lo + len(stored):
                rows[i - lo] = edited[k]
        return rows

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
                raise UserError(f"a search trial edits {e.tensor}, which is neither a decoder layer, the embedding "
                                "table, the final norm nor the LM head")
            out.setdefault(layer, []).append(e)
        return out


def effect_key(plans: list[RecipePlan]) -> str:
    """What a setting does (its edits and custom-layer spec): two settings with one key measure the same."""
    return repr([(p.edits, p.wemask) for p in plans])


# --- The study: stored, resumable, shared by workers ---

def open_study(storage: str | None, run_dir: Path, fingerprint: dict, seed: int, *, startup: int = 8):
    """Create or continue the study in `storage` (an Optuna storage URL; None: RUN_DIR's journal file).

    A study holds one model, text and search space: continuing it with others is refused. Every failure of the
    storage is one line naming it, redacted (search/storage.py).
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
                        f"{', '.join(diff)}; use a new run folder (or --storage) or the original settings")
    # a continued run must not replay the proposals of the first one
    study.sampler = optuna.samplers.TPESampler(seed=(seed + done) % SEEDS, n_startup_trials=startup)
    return study


def trial_record(t) -> dict:
    """One Optuna trial as tune.json records it."""
    return {"number": t.number, "state": t.state.name, "recipes": t.user_attrs.get("recipes"),
            "params": t.params, "figures": t.user_attrs.get("figures"), "worker": t.user_attrs.get("worker")}


def complete_records(study) -> list[dict]:
    """The study's complete trials as records, in trial order."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [trial_record(t) for t in sorted(done, key=lambda t: t.number)]


def objective_key(objective: str) -> str:
    """The figure a study maximises: the sink or the max/median ratio reduction."""
    return "sink_reduction_pct" if objective == "sink" else "ratio_reduction_pct"


def pareto_front(records: list[dict], objective: str) -> list[int]:
    """Numbers of the complete trials no other trial beats on both reduction and KL."""
    key = objective_key(objective)
    pts = [(r["number"], r["figures"][key], r["figures"]["kl_mean"]) for r in records]
    return [n for n, red, kl in pts
            if not any((r2 >= red and k2 <= kl) and (r2 > red or k2 < kl) for _, r2, k2 in pts)]


def best_within(records: list[dict], objective: str, budget: Budget) -> dict | None:
    """The largest reduction within the budget (ties: the smaller KL); None when no trial within it cuts at all
    (a setting that raises the sink is never "the best cut")."""
    key = objective_key(objective)
    ok = [r for r in records if budget.holds(r["figures"]) and r["figures"][key] > 0]
    return max(ok, key=lambda r: (r["figures"][key], -r["figures"]["kl_mean"]), default=None)


def make_objective(evaluator: Evaluator, text: TextCache, suggest: Callable, objective: str, budget: Budget):
    """The Optuna objective: a trial's setting measured on `text`; (reduction, KL), the budget as constraints."""
    import os

    import optuna

    def run(trial) -> tuple[float, float]:
        recipes = suggest(trial)
        with interruptible():  # a signal cuts a trial's computation, never Optuna's records (its file lock included)
            fig = evaluator.run(text, evaluator.plans(recipes))
        trial.set_user_attr("recipes", [{"name": n, "params": p} for n, p in recipes])
        trial.set_user_attr("figures", asdict(fig))
        trial.set_user_attr("worker", os.getpid())
        if not fig.finite():  # before the constraints: Optuna refuses a NaN constraint
            raise optuna.TrialPruned("non-finite figures")
        for name, value in zip(("kl", "ppl"), budget.constraints(fig)):
            trial.set_constraint(name, value)
        return fig.objective(objective), fig.kl_mean

    return run


REFINE_STEPS = 3  # trials spent bringing one over-budget setting within the budget


def refine_share(trials: int, budget: Budget) -> int:
    """Trials of a search of `trials` spent scaling its most promising over-budget settings into the budget: a third,
    at most three settings' worth; none without a budget."""
    if budget.max_kl is None and budget.max_ppl_increase is None:
        return 0
    return min(3 * REFINE_STEPS, trials // 3) // REFINE_STEPS * REFINE_STEPS


def over_budget(fig: dict, budget: Budget) -> float:
    """How many times over the budget figures are (at most 1: within it), by KL or perplexity, whichever is
    tighter."""
    ratios = [fig["kl_mean"] / budget.max_kl] if budget.max_kl else []
    if budget.max_ppl_increase:
        ratios.append(max(fig["ppl_increase_pct"], 0.0) / budget.max_ppl_increase)
    return max(ratios)


def _promising(study, objective: str, budget: Budget):
    """The over-budget trial whose cut should be largest once scaled into the budget, not refined before.

    A setting's sink cut changes at first order in its strength, KL and perplexity at second order, so scaling a
    setting that is `over` times over the budget by t = 1/sqrt(over) keeps about cut/sqrt(over) of its cut."""
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    done = {t.user_attrs["toward"] for t in trials if "toward" in t.user_attrs}
    key = objective_key(objective)
    over = [(t, t.user_attrs["figures"]) for t in trials if t.number not in done and "toward" not in t.user_attrs]
    over = [(t, f[key] / math.sqrt(o)) for t, f in over if f[key] > 0 and (o := over_budget(f, budget)) > 1]
    return max(over, key=lambda x: x[1], default=(None, 0.0))[0]


def _run(study, objective_fn, n: int, timeout: float | None, callbacks: list) -> None:
    """n trials of the study (fewer when `timeout` seconds pass); only the objective's computation is
    interruptible (see `make_objective`), so a signal never cuts Optuna's journal or its lock."""
    with critical():
        study.optimize(objective_fn, n_trials=n, timeout=timeout, callbacks=callbacks, catch=(UserError,))


def _refine(study, objective_fn, space, trials: int, deadline: float | None, objective: str, budget: Budget,
            callbacks: list) -> None:
    """Scale the most promising over-budget settings toward no effect (`Space.toward_neutral`) until they fit the
    budget: a first guess from the second-order rule, then REFINE_STEPS - 1 steps of the same rule within the
    bracket of scales known to be inside and outside the budget."""
    import optuna

    def finished() -> int:
        return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))

    def left() -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    while finished() < trials and (left() is None or left() > 0):
        origin = _promising(study, objective, budget)
        if origin is None:
            return
        lo, hi = 0.0, 1.0
        t = min(0.98, max(0.02, 0.95 / math.sqrt(over_budget(origin.user_attrs["figures"], budget))))
        for _ in range(REFINE_STEPS):
            if finished() >= trials or (left() is not None and left() <= 0):
                return
            study.enqueue_trial(space.toward_neutral(origin.params, t), user_attrs={"toward": origin.number,
                                                                                      "scale": t})
            _run(study, objective_fn, 1, left(), callbacks)
            last = study.get_trials(deepcopy=False)[-1]
            if last.state != optuna.trial.TrialState.COMPLETE:
                break
            over = over_budget(last.user_attrs["figures"], budget)
            lo, hi = (t, hi) if over <= 1 else (lo, t)
            guess = t * 0.95 / math.sqrt(over) if over > 0 else hi
            t = guess if lo < guess < hi else (lo + hi) / 2


def run_trials(study, objective_fn, trials: int, *, timeout: float | None, objective: str, budget: Budget,
               progress: bool, space=None, label: str = "search") -> int:
    """The one search loop: run trials until the study holds `trials` finished ones (all workers together) or
    `timeout` seconds pass, and return how many this process ran.

    Sampled trials first (TPE); with a budget and a `space`, the last `refine_share` of them scale the most
    promising over-budget settings into the budget (`_refine`). With `progress`, a bar on stderr shows the largest
    cut within the budget so far."""
    import optuna

    from melsurgery.formats.wording import change_text

    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    remaining = max(0, trials - len(finished))
    if not remaining:
        return 0
    ran = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=remaining, desc=label, unit="trial", leave=False)

    def on_trial(study, trial) -> None:
        nonlocal ran
        ran += 1
        if bar is None:
            return
        bar.update(1)
        best = best_within(complete_records(study), objective, budget)
        if best:
            f = best["figures"]
            within = "within the budget " if budget.max_kl or budget.max_ppl_increase else ""
            bar.set_postfix_str(f"largest cut {within}#{best['number']}: {objective} "
                                f"{change_text(f[objective_key(objective)])}, KL {f['kl_mean']:.4f}")

    states = tuple(s for s in optuna.trial.TrialState if s.is_finished())
    refine = refine_share(trials, budget) if space is not None else 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sampled = max(0, trials - refine - len(finished))
        if sampled:
            share = None if timeout is None else timeout * (trials - refine) / trials
            _run(study, objective_fn, sampled, share,
                 [on_trial, optuna.study.MaxTrialsCallback(trials - refine, states=states)])
        if refine:
            _refine(study, objective_fn, space, trials, deadline, objective, budget,
                    [on_trial, optuna.study.MaxTrialsCallback(trials, states=states)])
    finally:
        if bar is not None:
            bar.close()
    return ran
