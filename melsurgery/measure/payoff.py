"""The payoff figures: what a model loses under a streaming KV window or int8 activations (definitions in
`measure.definitions`), computed on verify's windows from streams that ride verify's own pass over the layers.

Each arrangement is one more `Stream` of the same layer-by-layer pass (one decoder layer resident): a streaming
window is a rule on the attention mask, int8 activations are forward pre-hooks on the layer's linears. Scoring
needs only each target's log-probability; the plain forward's log-probs (the reference) come from verify's
base pass. The functions work on hidden states and log-probs, so a search can call them on its in-memory trials.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from melsurgery.calibrate.streaming import Edits, Stream, StreamingModel
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.measure.definitions import Arrangement, fake_int8, paired_changes, streaming_keys
from melsurgery.measure.logsoftmax import HEAD_ROWS, OnlineLogSoftmax, token_chunks
from melsurgery.measure.verify_result import PayoffFigure


def int8_hooks(layer: nn.Module, per_token: bool) -> list:
    """Fake-quantize the input of every nn.Linear inside this decoder layer (see `fake_int8`); the handles."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (fake_int8(args[0], per_token), *args[1:])

    return [m.register_forward_pre_hook(hook) for m in layer.modules() if isinstance(m, nn.Linear)]


def arranged_stream(arrangement: Arrangement, states: list[torch.Tensor], edits: Edits | None = None,
                    wemask: dict | None = None, twin: Stream | None = None) -> Stream:
    """A stream that runs the layers under `arrangement` (not observed by verify's probe); `twin`: the base
    model's stream under the same arrangement from the same states, whose outputs it takes up to its first
    edited layer."""
    keys = hooks = None
    if arrangement.window is not None:
        keys = functools.partial(streaming_keys, window=arrangement.window, keep_first=arrangement.keep_first)
    if arrangement.int8 is not None:
        hooks = functools.partial(int8_hooks, per_token=arrangement.int8 == "token")
    return Stream(list(states), edits, wemask, keys=keys, hooks=hooks, observed=False, twin=twin)


@dataclass(frozen=True)
class Scored:
    """Where each window's scored targets are: window w's positions first-1 .. T-2 predict its tokens first..T-1."""

    ids: list[list[int]]
    first: int

    def positions(self, w: int, start: int) -> range:
        """Window w's scored positions from `start` on."""
        return range(max(self.first - 1, start), len(self.ids[w]) - 1)

    def counts(self, start: int) -> list[int]:
        return [len(self.positions(w, start)) for w in range(len(self.ids))]

    def select(self, values: torch.Tensor, start: int) -> torch.Tensor:
        """Per-window NLL sums [windows] from verify's per-target values (window order, from position first-1)."""
        out, at = [], 0
        for ids in self.ids:
            n = len(ids) - self.first
            chunk = values[at : at + n]
            out.append(chunk[max(0, start - (self.first - 1)) :].sum() if n else values.new_zeros(()))
            at += n
        return torch.stack(out)


def target_logprobs(model: StreamingModel, ckpt: Checkpoint, rows: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """log p(target) [n] of pre-norm final states rows [n, D] under ckpt's final norm and LM head, in blocks."""
    with torch.no_grad():
        h = model.final_norm(ckpt.load(model.family.final_norm))(rows)
        head = model.head_tensor
        vocab = ckpt.info(head).shape[0]
        chunks = token_chunks(len(rows))
        accs = [OnlineLogSoftmax(len(targets[c]), h.device) for c in chunks]
        for lo in range(0, vocab, HEAD_ROWS):
            block = ckpt.load_row_block(head, lo, min(vocab, lo + HEAD_ROWS))
            for c, acc in zip(chunks, accs):
                acc.add_(model.logits(h[c], block).double(), lo, targets[c])  # as verify scores the plain forward
    return torch.cat([acc.logprob for acc in accs]) if accs else rows.new_zeros(0, dtype=torch.float64)


def arranged_nll(model: StreamingModel, ckpt: Checkpoint, streams: list[list[torch.Tensor]],
                 arrangements: list[Arrangement], scored: Scored) -> list[torch.Tensor]:
    """Per arrangement, the per-window NLL sums [windows] of its scored positions, one head pass for all of them."""
    rows, targets, spans = [], [], []
    for states, arr in zip(streams, arrangements):
        for w, h in enumerate(states):
            pos = scored.positions(w, arr.first_scored())
            rows.append(h[pos.start : pos.stop])
            targets.extend(scored.ids[w][pos.start + 1 : pos.stop + 1])
            spans.append(len(pos))
    lp = target_logprobs(model, ckpt, torch.cat(rows), torch.tensor(targets, device=model.device)).cpu()
    sums = torch.stack([chunk.sum() for chunk in lp.split(spans)]).neg()
    return list(sums.view(len(arrangements), len(scored.ids)))


def payoff_figures(arrangements: list[Arrangement], scored: Scored, plain: tuple[list[float], list[float]],
                   arranged: tuple[list[torch.Tensor], list[torch.Tensor]]) -> list[PayoffFigure]:
    """The payoff figures, base against patched: `plain` are verify's per-target log-probs (base, patched) of the
    plain forward, `arranged` the per-window NLL sums of each arrangement (base, patched), as `arranged_nll` gives."""
    plain_lp = [torch.tensor(lp, dtype=torch.float64) for lp in plain]
    out = []
    for k, arr in enumerate(arrangements):
        start = arr.first_scored()
        counts = torch.tensor(scored.counts(start), dtype=torch.float64)
        keep = counts > 0  # a window too short for this arrangement has nothing scored
        ref = [scored.select(-lp, start) for lp in plain_lp]
        base, patched, diff = paired_changes((arranged[0][k][keep], ref[0][keep]),
                                             (arranged[1][k][keep], ref[1][keep]), counts[keep])
        out.append(PayoffFigure.of(arr.name, arr.window, int(keep.sum()), int(counts.sum()), base, patched, diff))
    return out
