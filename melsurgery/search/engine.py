"""Trials without checkpoints: the evaluator that measures a setting on a text (the study and its loop are
`search.study`, the session that drives both is `search.session`).

A trial is a setting of the space (recipes and their parameters). The base model runs once over a text;
the residual entering every layer from the first one the space can edit is cached, so a trial reruns
only the layers from the first one it edits, with its edits applied to the weights in memory (the
writer's own `edited_tensor`) and WeMask installed as the hook the shipped custom layer uses. Where the
layers from the ME Layer and the LM head fit RESIDENT_SHARE of the free memory, they stay in memory in
the compute dtype after their first read; otherwise memory is one decoder layer plus the activations,
whatever the model size: layers are streamed from the checkpoint as in `verify`, and the LM head is read
in vocabulary blocks. Logits are scored in the compute dtype into one reused block buffer, with the sums
kept in float64 (`OnlineLogSoftmax.add_`).

KL needs the base model's next-token distribution at every scored token, which is a vocabulary-sized
row per token (262,144 entries for Gemma 3: 2 MB per token in float64). The cache keeps, per token,
only the base log-sum-exp, the final-normed state n_b and the expected head row mu_b = sum_v p_b(v) W_v.
Where the logits are linear in the final-normed state (z = W n, no soft-capping),
KL(base || patched) = lse_p - lse_b - mu_b . (n_p - n_b) exactly; models with soft-capped logits
recompute the base logits block by block instead (as verify does).

A payoff objective (`search.records.OBJECTIVES`) adds one arrangement (`measure.definitions`: an evicting
streaming window, or int8 activations) that changes the computation from layer 0 on. The base pass then also runs
the base model under it once per text and caches its residual entering every cached layer (as much memory again
as the plain cache: (layers from the ME Layer on + 1) x tokens x hidden size x 4 bytes, 20 x 1024 x 576 x 4 = 47 MB
for SmolLM2-135M over two windows of 512 tokens) and its NLL per window; a trial runs one more stream, under the
arrangement, from its first edited layer, and one more pass over the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from melsurgery.architectures import Family, family_for
from melsurgery.calibrate.stats import LayerStats
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.edits import Edit, edited_rows, edited_tensor
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.source import Source
from melsurgery.checkpoint.validate import check_finite
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.measure.definitions import Arrangement, find_massive, layer_stats, paired_changes, sink, top_k_for
from melsurgery.measure.logsoftmax import HEAD_ROWS, OnlineKL, OnlineLogSoftmax
from melsurgery.measure.payoff import Scored, arranged_stream
from melsurgery.measure.probes import Probe
from melsurgery.measure.verify import free_memory
from melsurgery.recipes import RecipePlan, plan_recipes, require_me
from melsurgery.search.records import Figures

RESIDENT_SHARE = 0.25  # the held layers and head may take at most this share of the memory free at the start


def _mean(values: list) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


# --- Data between stages ---

@dataclass
class ArrangedBase:
    """The base model under a payoff arrangement on one text: the residual entering every cached layer (keys as in
    `TextCache.inputs`) and, per window, the NLL sums over the arrangement's scored positions of the arranged and the
    plain forward."""

    arrangement: Arrangement
    inputs: dict[int, list[torch.Tensor]]
    nll: torch.Tensor
    plain: torch.Tensor


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
    arranged: ArrangedBase | None = None

    @property
    def size(self) -> int:
        """Tokens in the text's windows, special prefixes included (what the model runs over)."""
        return sum(len(w) for w in self.windows)

    @property
    def scored(self) -> int:
        """Tokens that KL and perplexity are averaged over (the special prefixes are never scored)."""
        return sum(len(w) - self.first for w in self.windows)


@dataclass(frozen=True)
class _Head:
    """What the LM head gives per scored token: log-sum-exp, the target's logit, the expected head row (base pass)
    and the KL against recomputed base logits (soft-capped models)."""

    lse: torch.Tensor
    target: torch.Tensor
    mean_row: torch.Tensor | None
    kl: torch.Tensor | None


# --- The evaluator: base pass once per text, trials over the suffix ---

class Evaluator:
    """Runs settings over cached texts: only the layers from a setting's first edited layer are rerun.

    Trials run through `streaming.run_layers` (the runner verify uses): each decoder layer from the
    first edited one is read, loaded with the trial's edited tensors swapped in and its WeMask hooks,
    run over the cached states and freed. Edits of the embedding table (rows of the tokens at hand), the
    final norm and the LM head (block by block) are applied in memory too.
    """

    def __init__(self, source: Source, scan: ScanResult, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_from: int | None = None,
                 resident: bool | None = None, arrangement: Arrangement | None = None) -> None:
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
        self.arrangement = arrangement  # the payoff objective's arrangement (None: no payoff figures)
        # `resident`: hold the layers a trial reruns and the LM head in memory (None: when they fit the budget)
        self.resident = self.resident_bytes() <= RESIDENT_SHARE * free_memory(device) if resident is None else resident
        self._head_rows: torch.Tensor | None = None
        if self.resident:
            self.model.hold(range(self.cache_from, self.num_layers))

    def resident_bytes(self) -> int:
        """Bytes of the decoder layers from `cache_from` and the LM head in the compute dtype."""
        layers = tuple(self.family.prefix(i) for i in range(self.cache_from, self.num_layers))
        names = [n for n in self.ckpt.names() if n.startswith(layers)] + [self.model.head_tensor]
        return sum(math.prod(self.ckpt.info(n).shape) for n in names) * torch.finfo(self.dtype).bits // 8

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
        text = TextCache(name, windows, first, inputs, stats, tokens, normed, head.lse, head.mean_row, targets, nll)
        if self.arrangement is not None:
            text.arranged = self._arranged_base(text, head.lse - head.target)
        return text

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
            fig = self._figures(text, text.stats, torch.zeros(text.scored, dtype=torch.float64), text.nll)
            return self._with_payoff(text, fig, *(text.arranged.nll, text.arranged.plain) if text.arranged else ())
        start = 0 if embed else min(touched, default=self.num_layers)
        if start in text.inputs:
            states = list(text.inputs[start])
        else:  # before the cached layers: from the embeddings (an embedding edit, or a layer before the ME Layer)
            states, start = self.model.embed(text.windows, edits=embed), 0
        prefix_len = {i: len(self.family.prefix(i)) for i in by_layer}

        def edited(i: int, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """Layer i's edited tensors, exactly as `patch` stores them (names relative to the layer; edited from
            the stored tensor, in its dtype, even where the layer is held in the compute dtype)."""
            out: dict[str, torch.Tensor] = {}
            for e in by_layer.get(i, []):
                rel = e.tensor[prefix_len[i]:]
                if rel not in base:
                    raise UserError(f"{self.ckpt.folder}: the checkpoint has no tensor {e.tensor!r}")
                out[rel] = edited_tensor(out[rel] if rel in out else self.ckpt.load(e.tensor), [e])
            return out

        stats = list(text.stats[:start])
        k = top_k_for(len(text.windows))

        def observe(i: int, _: int, ins: list, outs: list, probe: Probe) -> None:
            stats.append(layer_stats(i, outs, k, probe.key_attention))

        stream = Stream(states, edits=edited, wemask=spec.to_config() if spec else None)
        arranged = self._arranged_trial(text, start, embed, stream)
        run_layers(self.model, [stream, *arranged], start, probe=lambda layer: Probe(layer, self.family),
                   observe=observe)
        normed = self._normed(stream.states, text.first, norm)
        # the base's expected head row stands for its logits only while the head is the same matrix, or differs
        # in a few rows (corrected below); soft-capped logits and column edits recompute the base logits instead
        linear = self.linear_head and all(e.axis == 0 and e.index is not None for e in head)
        out = self._head(normed, text.targets, head, base=None if linear else text)
        if linear:
            kl = (out.lse - text.lse) - ((normed - text.normed).double() * text.mean_row).sum(-1)
            kl -= self._edited_rows_term(text, normed, head)
        else:
            kl = out.kl
        nll_p = float((out.lse - out.target).sum())
        fig = self._figures(text, stats, kl.clamp(min=0), nll_p)
        if not arranged:
            return fig
        return self._with_payoff(text, fig, self._arranged_nll(text, arranged[0].states, norm, head),
                                 self._scored_sums(text, out.lse - out.target))

    # --- the payoff objective: the same trial under its arrangement ---

    def _arranged_base(self, text: TextCache, token_nll: torch.Tensor) -> ArrangedBase:
        """The base model under the arrangement, from layer 0 (once per text): inputs of the cached layers, NLL."""
        stream = arranged_stream(self.arrangement, self.model.embed(text.windows))
        inputs: dict[int, list[torch.Tensor]] = {}
        for i in range(self.num_layers):
            if i >= self.cache_from:
                inputs[i] = list(stream.states)
            run_layers(self.model, [stream], i, i + 1)
        inputs[self.num_layers] = stream.states  # a trial that edits only the final norm or the head starts here
        return ArrangedBase(self.arrangement, inputs, self._arranged_nll(text, stream.states, [], []),
                            self._scored_sums(text, token_nll))

    def _arranged_trial(self, text: TextCache, start: int, embed: list[Edit], plain: Stream) -> list[Stream]:
        """The trial's stream under the arrangement (the plain stream's edits and WeMask), from `start`: none when
        the objective is no payoff."""
        base = text.arranged
        if base is None:
            return []
        states = base.inputs[start] if start in base.inputs and not embed else self.model.embed(text.windows,
                                                                                                  edits=embed)
        return [arranged_stream(base.arrangement, states, plain.edits, plain.wemask)]

    def _scored_sums(self, text: TextCache, token_nll: torch.Tensor) -> torch.Tensor:
        """Per-window NLL sums [windows] over the arrangement's scored positions, from NLL per scored token."""
        return Scored(text.windows, text.first).select(token_nll.cpu(), self.arrangement.first_scored())

    def _arranged_nll(self, text: TextCache, states: list[torch.Tensor], norm: list[Edit],
                      head: list[Edit]) -> torch.Tensor:
        """Per-window NLL sums of final states run under the arrangement (with the trial's norm and head edits)."""
        out = self._head(self._normed(states, text.first, norm), text.targets, head)
        return self._scored_sums(text, out.lse - out.target)

    def _with_payoff(self, text: TextCache, fig: Figures, nll: torch.Tensor | None = None,
                     plain: torch.Tensor | None = None) -> Figures:
        """`fig` with the payoff figures of a trial whose arranged and plain per-window NLL sums are `nll`, `plain`
        (as `verify` computes them: `measure.definitions.paired_changes`); `fig` itself without a payoff."""
        base = text.arranged
        if base is None or nll is None or plain is None:
            return fig
        counts = torch.tensor(Scored(text.windows, text.first).counts(base.arrangement.first_scored()),
                              dtype=torch.float64)
        keep = counts > 0
        b, p, diff = paired_changes((base.nll[keep], base.plain[keep]), (nll[keep], plain[keep]), counts[keep])
        return replace(fig, payoff_base=b.value, payoff_patched=p.value, payoff_removed=-diff.value,
                       payoff_low=None if diff.high is None else -diff.high,
                       payoff_high=None if diff.low is None else -diff.low)

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
              base: TextCache | None = None) -> _Head:
        """Log-sum-exp and target logits of final-normed states over the LM head, read in blocks of HEAD_ROWS.

        `mean_row`: also the expected head row under these states' distribution (the base pass). `base`: a
        text whose base logits are recomputed per block (soft-capped models), for the KL per token."""
        name = self.model.head_tensor
        vocab = self.ckpt.info(name).shape[0]
        row_edits = sorted({i for e in edits if e.axis == 0 and e.index is not None for i in e.index})
        edited = edited_rows(self.ckpt.load_rows(name, row_edits), row_edits, edits) if row_edits else None
        pair = OnlineKL(len(targets), self.device) if base is not None else None
        acc = pair.patched if pair is not None else OnlineLogSoftmax(len(targets), self.device,
                                                                      dim=normed.shape[1] if mean_row else None)
        # one logits buffer for every block; float32 at least (a narrower compute dtype is widened per block)
        wide = self.dtype in (torch.float32, torch.float64)
        buf = torch.empty(len(targets) * min(vocab, HEAD_ROWS), dtype=self.dtype, device=self.device) if wide else None
        with torch.no_grad():
            for lo in range(0, vocab, HEAD_ROWS):
                hi = min(vocab, lo + HEAD_ROWS)
                if edits:  # edited from the stored rows, in their dtype, as `patch` stores them
                    stored = self.ckpt.load_row_block(name, lo, hi)
                    rows = self._edited_block(stored, lo, edits, row_edits, edited).to(self.device, self.dtype)
                    stored = stored.to(self.device, self.dtype)
                else:
                    rows = stored = self._head_block(lo, hi)
                if pair is None:
                    out = buf[: len(targets) * (hi - lo)].view(len(targets), hi - lo) if wide else None
                    z = self.model.logits(normed, rows, out)
                    acc.add_(z if wide else z.float(), lo, targets, rows)
                else:
                    pair.add(self.model.logits(base.normed, stored).double(), self.model.logits(normed, rows).double(),
                             lo, targets)
        return _Head(acc.lse, acc.target, acc.expected_row(normed.dtype) if mean_row else None,
                     None if pair is None else pair.kl)

    def _head_block(self, lo: int, hi: int) -> torch.Tensor:
        """LM-head rows lo..hi-1 in the compute dtype: a view of the held head, or read from the checkpoint."""
        name = self.model.head_tensor
        if not self.resident:
            return self.ckpt.load_row_block(name, lo, hi).to(self.device, self.dtype)
        if self._head_rows is None:
            self._head_rows = self.ckpt.load(name, self.dtype, self.device)
            check_finite(self._head_rows, name, self.ckpt.folder)
        return self._head_rows[lo:hi]

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

    def _figures(self, text: TextCache, stats: list[LayerStats], kl: torch.Tensor, nll_p: float) -> Figures:
        """The figures of a run from its layer statistics, its KL per scored token and its total NLL."""
        n = text.scored
        per_window = torch.split(kl.cpu(), [len(w) - text.first for w in text.windows])
        kl_windows = tuple(float(k.mean()) for k in per_window)
        after = range(min(self.me + 1, self.num_layers - 1), self.num_layers)
        sb = _mean([sink(text.stats[i], text.tokens) for i in after])
        sp = _mean([sink(stats[i], text.tokens) for i in after])
        rb = _mean([text.stats[i].ratio for i in after])
        rp = _mean([stats[i].ratio for i in after])
        ppl_b, ppl_p = math.exp(text.nll / n), math.exp(nll_p / n)
        return Figures(sb, sp, 100 * (1 - sp / sb) if sb else 0.0, rb, rp, 100 * (1 - rp / rb) if rb else 0.0,
                       float(kl.sum()) / n, ppl_b, ppl_p, 100 * (ppl_p / ppl_b - 1), text.size, kl_windows)

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

