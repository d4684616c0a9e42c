"""The streamed log-softmax over the LM head: logits arrive in vocabulary blocks and no whole logit row is held.

A vocabulary-sized row per token (262,144 entries for Gemma 3: 2 MB per token in float64) is what
`verify` and the search must not hold for every scored token, so the log-sum-exp is accumulated block by
block with a running maximum (the online softmax). `OnlineLogSoftmax` keeps per token the log-sum-exp,
the target's logit and, on request, the argmax and the expected head row sum_v p(v) W_v;
`OnlineKL` adds KL(base || patched) from base and patched logits of the same blocks.
"""

from __future__ import annotations

import math

import torch

HEAD_ROWS = 8192  # LM-head rows (vocabulary entries) scored at a time
# Tokens scored at a time against one head block: a block's logits stay a fixed size below the allocator's
# mmap threshold (256 x 8192 float64, 16 MiB; see melsurgery.allocator), reused from step to step,
# whatever the text's length, instead of growing with it.
TOKEN_ROWS = 256


def token_chunks(n: int) -> list[slice]:
    """The slices of n scored tokens taken at a time against one head block (TOKEN_ROWS each)."""
    return [slice(r, r + TOKEN_ROWS) for r in range(0, n, TOKEN_ROWS)]


class OnlineLogSoftmax:
    """Log-softmax figures of n tokens over vocabulary blocks.

    `argmax`: also track each token's most likely entry; `dim`: also accumulate the expected head row (of that
    width) under each token's distribution (`expected_row` once every block is in)."""

    def __init__(self, n: int, device: torch.device, *, argmax: bool = False, dim: int | None = None) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.m = torch.full((n,), -math.inf, **f64)
        self.s = torch.zeros(n, **f64)
        self.target = torch.zeros(n, **f64)
        self.best = torch.full((n,), -math.inf, **f64) if argmax else None
        self.arg = torch.zeros(n, dtype=torch.long, device=device) if argmax else None
        self.row = None if dim is None else torch.zeros(n, dim, **f64)

    def add(self, z: torch.Tensor, lo: int, targets: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Fold in logits z [n, B] of vocabulary entries lo..lo+B-1 (`rows`: their head rows, for the expected
        row); returns the running maximum before this block. z is left as it was (`add_` reuses it)."""
        return self.add_(z.clone(), lo, targets, rows)

    def add_(self, z: torch.Tensor, lo: int, targets: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`add`, overwriting z with exp(z - running maximum): no vocabulary-sized temporary is made.

        z may be float32 (the search) or float64 (verify): the running maximum is one of z's own values, so
        subtracting it in z's dtype is exact up to z's rounding; the sums are kept in float64."""
        old = self.m
        top, where = z.max(-1)
        self.m = torch.maximum(old, top.double())
        inside = (targets >= lo) & (targets < lo + z.shape[1])
        picked = z.gather(1, (targets - lo).clamp(0, z.shape[1] - 1)[:, None])[:, 0].double()
        self.target = torch.where(inside, picked, self.target)
        if self.best is not None:
            better = top > self.best
            self.best = torch.where(better, top.double(), self.best)
            self.arg = torch.where(better, where + lo, self.arg)
        scale = torch.exp(old - self.m)
        w = z.sub_(self.m[:, None].to(z.dtype)).exp_()
        self.s = self.s * scale + w.sum(-1).double()
        if self.row is not None:
            self.row = self.row * scale[:, None] + (w.to(rows.dtype) @ rows).double()
        return old

    @property
    def lse(self) -> torch.Tensor:
        """The log-sum-exp of each token's logits."""
        return self.m + torch.log(self.s)

    @property
    def logprob(self) -> torch.Tensor:
        """The log-probability of each token's target."""
        return self.target - self.lse

    def expected_row(self, dtype: torch.dtype) -> torch.Tensor:
        """sum_v p(v) W_v per token (after every block)."""
        return (self.row / self.s[:, None]).to(dtype)


class OnlineKL:
    """KL(base || patched) per token from base and patched logits of the same vocabulary blocks, beside each
    stream's log-softmax figures."""

    def __init__(self, n: int, device: torch.device, *, argmax: bool = False) -> None:
        self.base = OnlineLogSoftmax(n, device, argmax=argmax)
        self.patched = OnlineLogSoftmax(n, device, argmax=argmax)
        self.cross = torch.zeros(n, dtype=torch.float64, device=device)

    def add(self, zb: torch.Tensor, zp: torch.Tensor, lo: int, targets: torch.Tensor) -> None:
        """Fold in base and patched logits [n, B] (float64) of entries lo..lo+B-1."""
        old = self.base.add(zb, lo, targets)
        self.patched.add(zp, lo, targets)
        self.cross = self.cross * torch.exp(old - self.base.m) + (torch.exp(zb - self.base.m[:, None])
                                                                  * (zb - zp)).sum(-1)

    @property
    def kl(self) -> torch.Tensor:
        """KL(base || patched) per token (not clamped: rounding can make it a hair below zero)."""
        return self.cross / self.base.s - self.base.lse + self.patched.lse
