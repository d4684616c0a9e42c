"""Fit the first token's embedding row: Adam steps on sink + lambda * KL through the streaming engine.

With causal attention, position 0 attends only to itself, so its whole trajectory depends on its own
embedding row (and its rotary phase). Later positions depend on the row only through their attention to
position 0, but from layer 0 on: their states change in every layer, so nothing after the embeddings can
be cached across steps. What is cached is what does not depend on the row: the base model's pass (its
massive tokens, its sink per layer, and per scored position the terms the KL needs of the base distribution,
so that no step recomputes the base logits), and the embeddings of every other position. Each step is one
forward pass and one backward pass whose only leaf is the row (no weight gradients), windows batched, the LM
head scored in position blocks so that no full logit matrix is held.

Layers stay resident when they fit (then the forward keeps each layer's graph, and the backward walks them
in reverse); otherwise each layer is read again in the backward pass and its forward recomputed from its
stored input (memory: one layer plus each layer's input states), which is how a 7B model is fitted.

The sink and KL are those of `verify` (measure.definitions on the same windows and massive tokens): the
sink after the ME Layer, mean over layers, and KL(base || patched) per scored token. With tied input and
output embeddings the edited row is also the LM head's row of that token: its logit at every position
changes, and the KL here includes that change, so the fit pays for it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from melsurgery.architectures import Family, submodule
from melsurgery.calibrate.stats import LayerStats
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.atomic import write_atomic
from melsurgery.checkpoint.edits import Edit, edited_tensor
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import render_chat
from melsurgery.errors import UserError
from melsurgery.formats.textfile import read_text
from melsurgery.formats.wording import count
from melsurgery.measure.definitions import find_massive, head_sinks_of, key_attention, layer_stats, sink, top_k_for
from melsurgery.measure.probes import Probe
from melsurgery.params import DetectParams

HEAD_BLOCK_BYTES = 256 * 2**20  # logits of one block of scored positions (fp32, base and patched together)
RESIDENT_BYTES = 3 * 2**30  # decoder weights up to this size stay in memory during a fit


@dataclass(frozen=True)
class Figures:
    """A row's effect on a set of windows: sinks after the ME Layer (mean over layers), KL and NLL per token."""

    sink_base: float
    sink_patched: float
    kl: float
    nll_base: float
    nll_patched: float
    tokens: int  # scored tokens

    @property
    def sink_ratio(self) -> float:
        """patched / base sink (1: unchanged)."""
        return self.sink_patched / self.sink_base

    @property
    def sink_reduction_pct(self) -> float:
        """The sink cut in percent, as verify reports it (negative: the sink grew)."""
        return 100 * (1 - self.sink_ratio)

    @property
    def ppl_increase_pct(self) -> float:
        """The perplexity increase in percent."""
        return 100 * (math.exp(self.nll_patched - self.nll_base) - 1)

    def to_dict(self) -> dict:
        """JSON-ready figures, derived ones included."""
        return {"sink_base": self.sink_base, "sink_patched": self.sink_patched, "kl_mean": self.kl,
                "sink_reduction_pct": self.sink_reduction_pct, "ppl_increase_pct": self.ppl_increase_pct,
                "ppl_base": math.exp(self.nll_base), "ppl_patched": math.exp(self.nll_patched),
                "tokens": self.tokens}


def layer_edits(family: Family, num_layers: int, edits: list[Edit]) -> dict[int, list[Edit]]:
    """Folded edits of decoder layers, by layer; an edit of any other tensor is refused (the fit runs the
    embeddings and the head itself)."""
    out: dict[int, list[Edit]] = {}
    for e in edits:
        layer = next((i for i in range(num_layers) if e.tensor.startswith(family.prefix(i))), None)
        if layer is None:
            raise UserError(f"first-token fits on top of edits of decoder layers; another recipe edits {e.tensor}")
        out.setdefault(layer, []).append(e)
    return out


@dataclass
class _Batch:
    """Windows of one length, run together: ids [B, T] and their embeddings (the edited token's replaced per step)."""

    windows: list[int]  # indices into the objective's windows
    ids: torch.Tensor
    embeds: torch.Tensor
    # the base model, per scored position (filled by the base pass): final-normed states and the KL's terms
    base_final: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    neg_entropy: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    expected_row: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    p_token: torch.Tensor = field(default_factory=lambda: torch.empty(0))


class RowObjective:
    """sink + lambda * KL of a first-token row on fixed windows, with its gradient (see the module docstring).

    `edits`: folded edits of other recipes, applied to the decoder layers of the patched model (the KL and
    the sink are measured against the base model without them)."""

    def __init__(self, ckpt: Checkpoint, family: Family, windows: list[list[int]], first: int, token_id: int,
                 params: DetectParams, *, edits: list[Edit] = (), device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if any(w[0] != token_id for w in windows):
            raise UserError("first-token: every window must open with the edited token")
        self.ckpt, self.family, self.first, self.token_id = ckpt, family, first, token_id
        self.model = StreamingModel(ckpt, family, device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.num_layers = self.model.num_layers
        self.edits = layer_edits(family, self.num_layers, list(edits))
        self.windows = windows
        self.batches = self._batches(windows)
        self.n_scored = sum(len(w) - first for w in windows)
        info = ckpt.info(family.embed)
        self.stored_dtype = info.torch_dtype
        self.row0 = ckpt.load_rows(family.embed, [token_id], torch.float32, self.device)[0]
        self.scale = torch.tensor(self.model.embed_scale).to(dtype) if self.model.embed_scale is not None else None
        self.head = ckpt.load(self.model.head_tensor, dtype, device)
        self.tied = self.model.head_tensor == family.embed
        self.cap = getattr(self.model.config, "final_logit_softcapping", None)
        self.norm = self.model.final_norm(ckpt.load(family.final_norm))
        self.norm.requires_grad_(False)
        prefixes = tuple(family.prefix(i) for i in range(self.num_layers))
        stored = sum(ckpt.info(n).nbytes for n in ckpt.names() if n.startswith(prefixes))
        self.resident = stored / self.stored_dtype.itemsize * dtype.itemsize <= RESIDENT_BYTES
        self._resident: dict[int, torch.nn.Module] = {}
        self._base_pass(params)

    def _batches(self, windows: list[list[int]]) -> list[_Batch]:
        embeds = self.model.embed(windows)
        by_len: dict[int, list[int]] = {}
        for k, w in enumerate(windows):
            by_len.setdefault(len(w), []).append(k)
        return [_Batch(ks, torch.tensor([windows[k] for k in ks], device=self.device),
                       torch.stack([embeds[k] for k in ks])) for ks in by_len.values()]

    # --- the base model, once ---

    def _base_pass(self, params: DetectParams) -> None:
        """Massive tokens, sink per layer and the KL's terms of the base model (verify's definitions)."""
        stats: list[LayerStats] = []
        k = top_k_for(len(self.windows))
        order = [w for b in self.batches for w in b.windows]  # the stream's sequences -> window indices

        def observe(i: int, _: int, ins: list, outs: list, probe: Probe) -> None:
            stats.append(layer_stats(i, outs, k, probe.key_attention))

        stream = Stream([e for b in self.batches for e in b.embeds])
        run_layers(self.model, [stream], probe=lambda layer: Probe(layer, self.family), observe=observe)
        found = find_massive(stats, params)
        if found.me_layer is None or not found.tokens:
            raise UserError("first-token: no massive activation persists on the fitting windows, so there is no "
                            "sink to cut; give longer windows")
        self.tokens = sorted((order[s], q) for s, q in found.tokens)
        self.me_layer = found.me_layer
        after = range(min(self.me_layer + 1, self.num_layers - 1), self.num_layers)
        base = {i: sink(stats[i], found.tokens) for i in after}
        self.sink_layers = [i for i in after if base[i] is not None]
        self.sink_base = _mean(list(base.values()))
        self.windows_with_tokens = len({w for w, _ in self.tokens})
        start, self.nll_base = 0, 0.0
        with torch.no_grad():
            for b in self.batches:
                final = torch.stack(stream.states[start : start + len(b.windows)])
                start += len(b.windows)
                b.base_final = self.norm(final[:, self.first - 1 : -1]).reshape(-1, final.shape[-1])
                self._base_head(b)

    # --- layers ---

    def _layer(self, i: int) -> torch.nn.Module:
        if i in self._resident:
            return self._resident[i]
        base = self.model.read_layer(i)
        patched: dict[str, torch.Tensor] = {}
        for e in self.edits.get(i, []):
            rel = e.tensor[len(self.family.prefix(i)) :]
            if rel not in base:
                raise UserError(f"{self.ckpt.folder}: the checkpoint has no tensor {e.tensor!r}")
            patched[rel] = edited_tensor(patched.get(rel, base[rel]), [e])
        layer = self.model.load_layer(i, {**base, **patched})
        layer.requires_grad_(False)
        if self.resident:
            self._resident[i] = layer
        return layer

    def _run(self, i: int, b: _Batch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i on a batch [B, T, D], and its sink term (the batch's sum of per-window sinks) where it counts."""
        layer = self._layer(i)
        weights: list[torch.Tensor] = []
        handle = None
        if i in self.sink_layers:
            attn = submodule(layer, self.family.attn)
            handle = attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
        try:
            y = self.model.run_layer(layer, x)
        finally:
            if handle is not None:
                handle.remove()
            if not self.resident:
                self.model.free_layer(i)
        if not weights:
            return y, None
        w = weights[0]
        per = [head_sinks_of([key_attention(w[s : s + 1])], [(0, q) for k, q in self.tokens if k == window])
               for s, window in enumerate(b.windows)]
        per = [h.mean() for h in per if h is not None]
        return y, (torch.stack(per).sum() if per else None)

    # --- the head ---

    def _base_head(self, b: _Batch) -> None:
        """What the KL needs of the base distributions, per scored position, so that no step recomputes them:
        sum_v p log p, the expected head row sum_v p(v) W_v and p(edited token) (float64), and the base NLL.

        Without logit soft-capping the patched logits are linear in the state, so the cross term
        sum_v p_base(v) z_patched(v) is the state times the expected head row (plus the tied row's change)."""
        targets = b.ids[:, self.first :].reshape(-1)
        n, vocab = len(targets), self.head.shape[0]
        b.neg_entropy = torch.zeros(n, dtype=torch.float64, device=self.device)
        b.p_token = torch.zeros(n, dtype=torch.float64, device=self.device)
        b.expected_row = torch.zeros(n, self.head.shape[1], dtype=torch.float64, device=self.device)
        block = self._block()
        for lo in range(0, n, block):
            lp = self._logits(b.base_final[lo : lo + block], None).double().log_softmax(-1)
            p = lp.exp()
            self.nll_base -= float(lp.gather(-1, targets[lo : lo + block, None]).sum())
            b.neg_entropy[lo : lo + block] = (p * lp).sum(-1)
            b.p_token[lo : lo + block] = p[:, self.token_id]
            for v in range(0, vocab, 16384):  # fp32 products, summed in float64 across vocabulary blocks
                part = p[:, v : v + 16384].to(self.dtype) @ self.head[v : v + 16384]
                b.expected_row[lo : lo + block] += part.double()

    def _block(self) -> int:
        """Scored positions per block of logits (a block holds a few [positions, vocabulary] float64 arrays)."""
        return max(1, HEAD_BLOCK_BYTES // (self.head.shape[0] * 8 * 4))

    def _head(self, b: _Batch, normed: torch.Tensor, row: torch.Tensor, coef: float | None) -> tuple[float, float]:
        """KL(base || patched) and patched NLL summed over the batch's scored tokens, in blocks of positions.

        `normed`: final-normed states [N, D]. With `coef`, each block's KL times `coef` is back-propagated at
        once (into `normed` and the tied row), so no logit block outlives its turn."""
        targets = b.ids[:, self.first :].reshape(-1)
        block = self._block()
        kl_total = nll = 0.0
        change = (row - self.row0).double()
        for lo in range(0, len(targets), block):
            h = normed[lo : lo + block]
            z = self._logits(h, row).double()
            lse = z.logsumexp(-1)
            nll -= float((z.detach().gather(-1, targets[lo : lo + block, None])[:, 0] - lse.detach()).sum())
            if self.cap:  # soft-capped logits are not linear in the state: the base block is recomputed
                with torch.no_grad():
                    lb = self._logits(b.base_final[lo : lo + block], None).double().log_softmax(-1)
                kl = (lb.exp() * (lb - (z - lse[:, None]))).sum(-1)
            else:
                cross = (h.double() * b.expected_row[lo : lo + block]).sum(-1)
                if self.tied:
                    cross = cross + b.p_token[lo : lo + block] * (h.double() @ change)
                kl = b.neg_entropy[lo : lo + block] - cross + lse
            kl = kl.clamp(min=0).sum()
            kl_total += float(kl.detach())
            if coef is not None:
                (kl * coef).backward()
        return kl_total, nll

    def _logits(self, h: torch.Tensor, row: torch.Tensor | None) -> torch.Tensor:
        """Logits as the model computes them; with tied embeddings and a `row`, the edited token's own logit
        uses the edited row."""
        z = h @ self.head.T
        if row is not None and self.tied:
            own = h @ row.to(self.dtype)
            z = torch.cat([z[:, : self.token_id], own[:, None], z[:, self.token_id + 1 :]], dim=1)
        return torch.tanh(z / self.cap) * self.cap if self.cap else z

    # --- the objective ---

    def stored(self, row: torch.Tensor) -> torch.Tensor:
        """The row as the checkpoint will hold it (rounded to the stored dtype), with a straight-through gradient."""
        rounded = row.detach().to(self.stored_dtype).to(row.dtype)
        return row + (rounded - row).detach()

    def evaluate(self, row: torch.Tensor, kl_weight: float | None = None) -> tuple[Figures, torch.Tensor | None]:
        """The figures of `row` on the windows; with `kl_weight`, also the gradient of
        sink_patched / sink_base + kl_weight * KL with respect to the row."""
        grad = kl_weight is not None
        leaf = row.detach().clone().to(self.device).requires_grad_(grad)
        r = self.stored(leaf)
        sinks = dict.fromkeys(self.sink_layers, 0.0)
        kl = nll = 0.0
        for b in self.batches:
            k, n = self._batch(b, r, kl_weight, sinks)
            kl, nll = kl + k, nll + n
        per_layer = [v / self.windows_with_tokens for v in sinks.values()]
        figures = Figures(self.sink_base, _mean(per_layer), kl / self.n_scored, self.nll_base / self.n_scored,
                          nll / self.n_scored, self.n_scored)
        return figures, (leaf.grad if grad else None)

    def _batch(self, b: _Batch, r: torch.Tensor, kl_weight: float | None,
               sinks: dict[int, float]) -> tuple[float, float]:
        """One batch forward (and backward with `kl_weight`); adds its per-layer sink sums into `sinks`."""
        grad = kl_weight is not None
        keep = grad and self.resident  # keep each layer's graph, else recompute it in the backward pass
        with torch.set_grad_enabled(grad):
            x0 = b.embeds.clone()
            # every occurrence of the token takes the row (a chat template's first token opens later turns too)
            x0[b.ids == self.token_id] = r.to(self.dtype) * self.scale if self.scale is not None else r.to(self.dtype)
        inputs: list[torch.Tensor] = []
        graphs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        x = x0.detach()
        for i in range(self.num_layers):
            xin = x.requires_grad_(keep)
            with torch.set_grad_enabled(keep):
                y, s = self._run(i, b, xin)
            if s is not None:
                sinks[i] += float(s.detach())
            inputs.append(xin)
            if keep:
                graphs.append((y, s))
            x = y.detach()
        final = x.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            normed = self.norm(final[:, self.first - 1 : -1]).reshape(-1, final.shape[-1])
        hn = normed.detach().requires_grad_(grad)
        kl, nll = self._head(b, hn, r, kl_weight / self.n_scored if grad else None)
        if grad:
            normed.backward(hn.grad)
            coef = 1.0 / (self.sink_base * len(self.sink_layers) * self.windows_with_tokens)
            g = final.grad
            for i in reversed(range(self.num_layers)):
                if keep:
                    y, s = graphs[i]
                else:
                    with torch.enable_grad():
                        y, s = self._run(i, b, inputs[i].requires_grad_(True))
                outs, grads = [y], [g]
                if s is not None:
                    outs.append(s * coef)
                    grads.append(torch.ones_like(s))
                torch.autograd.backward(outs, grads)
                g = inputs[i].grad
            x0.backward(g)
        return kl, nll


def _mean(values: list) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


@dataclass(frozen=True)
class FitSettings:
    """How the path is walked: Adam steps on sink ratio + lambda * KL, lambda decreasing geometrically from
    `kl_weight_start` to `kl_weight_end` over the steps, so that the walk moves out along the front, from small
    cuts at little KL to larger ones. `lr` is Adam's step relative to the stored row's RMS (Adam moves every
    coordinate by about that much: a diagonal preconditioner; plain gradient steps crawl along the directions
    that cost little KL, and a lambda that chases a KL target makes the walk oscillate). The walk stops once KL
    passes `path_kl`."""

    steps: int = 24
    lr: float = 0.03
    kl_weight_start: float = 2.0
    kl_weight_end: float = 0.25
    path_kl: float = 0.3

    def kl_weight(self, step: int) -> float:
        """Lambda at a step (step 0 is the stored row)."""
        t = step / max(1, self.steps)
        return self.kl_weight_start * (self.kl_weight_end / self.kl_weight_start) ** t


@dataclass(frozen=True)
class PathPoint:
    """One row on the path with its figures on the fitting windows (exact: the forward pass of its step)."""

    step: int
    kl_weight: float
    figures: Figures
    row: tuple[float, ...]


def fit_path(objective: RowObjective, settings: FitSettings,
             progress: Callable[[PathPoint], None] | None = None) -> tuple[list[PathPoint], float]:
    """Walk from the stored row towards smaller sinks; every step's row and figures are kept (the front is
    read off the path). Returns the points and the seconds taken."""
    start = time.perf_counter()
    row = objective.row0.clone()
    rms = float(row.pow(2).mean().sqrt()) or 1.0
    opt = torch.optim.Adam([row.requires_grad_(True)], lr=settings.lr * rms)
    points: list[PathPoint] = []
    for step in range(settings.steps + 1):
        lam = settings.kl_weight(step)
        last = step == settings.steps
        fig, grad = objective.evaluate(row.detach(), None if last else lam)
        if not (math.isfinite(fig.kl) and math.isfinite(fig.sink_patched)):
            break
        points.append(PathPoint(step, lam, fig, tuple(float(x) for x in row.detach())))
        if progress:
            progress(points[-1])
        if last or fig.kl > settings.path_kl:
            break
        opt.zero_grad()
        row.grad = grad
        opt.step()
    return points, time.perf_counter() - start


def choose(points: list[PathPoint], max_kl: float) -> PathPoint:
    """The path's point with the smallest sink whose KL stays within `max_kl` (ties: the smaller KL); the
    start (the stored row) when none does."""
    within = [p for p in points if p.figures.kl <= max_kl]
    return min(within, key=lambda p: (p.figures.sink_patched, p.figures.kl)) if within else points[0]


# --- Which token is first ---

def first_token(tok, of: str) -> int:
    """The id of the token that opens every input: the tokenizer's own first token ("bos"), or the chat
    template's ("chat"). Refused, in one line naming what would be needed, where there is none."""
    from melsurgery.measure.verify import chat_prefix, special_prefix

    if of == "bos":
        prefix = special_prefix(tok)
        if prefix:
            return prefix[0]
        hint = ""
        if getattr(tok, "chat_template", None):
            try:
                hint = (f"; its chat template always opens with {tok.convert_ids_to_tokens(_chat_first(tok))!r}: "
                        "--first-token-of chat edits that token (for chat-formatted input)")
            except UserError:
                pass
        raise UserError("first-token: this tokenizer puts no token before the text (it adds no BOS), so no embedding "
                        "row is always first; the recipe needs a fixed special first token such as a BOS" + hint)
    chat_prefix(tok)  # no template: refused there, in its words
    return _chat_first(tok)


def _chat_first(tok) -> int:
    """The chat template's first token, the same for a conversation with and without a system turn, and special."""
    firsts = set()
    user, system = {"role": "user", "content": "a"}, {"role": "system", "content": "b"}
    for conv in ([user], [system, user]):
        text = render_chat(tok, conv)
        firsts.add(tok(text, add_special_tokens=False)["input_ids"][0])
    if len(firsts) != 1:
        raise UserError("first-token --first-token-of chat: the chat template does not always open with the same "
                        f"token ({sorted(tok.convert_ids_to_tokens(sorted(firsts)))})")
    tid = firsts.pop()
    if tid not in set(tok.all_special_ids) and tid not in getattr(tok, "added_tokens_decoder", {}):
        raise UserError(f"first-token --first-token-of chat: the chat template opens with "
                        f"{tok.convert_ids_to_tokens(tid)!r}, an ordinary token that text uses too; editing its row "
                        "would change that text")
    return tid


# --- The fit, as `patch` and the search call it ---

def fit_params(ctx, params: dict, edits: list[Edit]) -> dict:
    """The first-token params with `row` and `token_id` filled in: the path is fitted (or read from the
    cache) on the fitting text, on top of the other recipes' `edits`, and `kl` picks its point."""
    from melsurgery.architectures import family_for
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.measure.verify import make_windows

    ckpt = Checkpoint(ctx.folder)
    family = family_for(ckpt.config)
    tok = load_tokenizer(ctx.folder)
    token_id = first_token(tok, params["of"])
    win = make_windows(tok, ctx.text, params["window_tokens"], params["windows"],
                       "chat" if params["of"] == "chat" else "tokenizer")
    if not win.ids:
        raise UserError(f"first-token: the fitting text is too short for one window of "
                        f"{count(params['window_tokens'], 'token')}")
    settings = FitSettings(steps=params["steps"], lr=params["lr"], path_kl=max(FitSettings.path_kl, params["kl"]))
    path = cached_path(ctx, ckpt, family, win, token_id, edits, settings)
    point = choose(path, params["kl"])
    return {**params, "row": list(point.row), "token_id": token_id}


def cached_path(ctx, ckpt: Checkpoint, family: Family, win, token_id: int, edits: list[Edit],
                settings: FitSettings) -> list[PathPoint]:
    """The fitted path, from `ctx.cache` when an identical fit (model files, windows, edits, settings) ran
    before; a fit takes minutes and a search asks for the same path with many budgets."""
    import hashlib
    import os
    from dataclasses import asdict

    files = sorted((s, os.stat(ckpt.folder / s).st_size, os.stat(ckpt.folder / s).st_mtime_ns) for s in ckpt.shards)
    key = hashlib.sha256(json.dumps([str(ckpt.folder), files, win.ids, token_id, repr(edits), asdict(settings)],
                                    default=str).encode()).hexdigest()[:20]
    where = ctx.cache / f"first-token-{key}.json" if ctx.cache else None
    cached = _cached_path(where) if where is not None else None
    if cached is not None:
        return cached
    objective = RowObjective(ckpt, family, win.ids, win.first_target, token_id, ctx.scan.params, edits=edits,
                             device=ctx.device)
    bar = None
    if ctx.progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps + 1, desc="first-token fit", unit="step", leave=False)

    def show(p: PathPoint) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"sink {-p.figures.sink_reduction_pct:+.1f}% KL {p.figures.kl:.4f}")

    try:
        points, seconds = fit_path(objective, settings, show)
    finally:
        if bar is not None:
            bar.close()
    if where is not None:
        where.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(where, json.dumps({"seconds": seconds, "path": [
            {"step": p.step, "kl_weight": p.kl_weight, "figures": asdict(p.figures), "row": list(p.row)}
            for p in points]}))
    return points


def _cached_path(where: Path) -> list[PathPoint] | None:
    """A fit path cached by an earlier run; None when absent or damaged (then it is fitted again)."""
    if not where.exists():
        return None
    try:
        data = json.loads(read_text(where, "the first-token cache"))
        return [PathPoint(p["step"], p["kl_weight"], Figures(**p["figures"]), tuple(p["row"])) for p in data["path"]]
    except (UserError, ValueError, RecursionError, KeyError, TypeError):
        return None
