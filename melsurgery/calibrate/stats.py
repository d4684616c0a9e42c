"""What a streaming pass records: plain data, no torch import, so detection and reports can use it.

`measure` holds the one definition of every quantity computed from these records; `streaming`
produces them layer by layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch



@dataclass
class Sample:
    """One tokenised calibration sample: ids, their token strings and where it came from."""

    ids: list[int]
    tokens: list[str]
    kind: str = "text"


@dataclass
class Entry:
    """One hidden-state entry: (sequence, token position, dim) and its value."""

    sample: int
    pos: int
    dim: int
    value: float


@dataclass
class LayerStats:
    """Statistics of one residual-stream state: index -1 is the embeddings, i the output of layer i."""

    index: int
    max_abs: float
    median_abs: float
    top: list[Entry]
    # per sequence: [heads, T] key attention (see measure's docstring); None for the embeddings and
    # layers without attention (hybrids).
    key_attention: list[torch.Tensor] | None = None
    attribution: dict | None = None
    # mean pairwise cosine similarity of the attention inputs; None when not measured
    similarity: float | None = None
    # the layer's attention input: a detect.attn_input.AttnInputRecord (scan only), typed loosely because the
    # records sit below detection in the stage order
    attn_input: Any = None
    mixer: str | None = None  # the kind of the layer's token mixer (attention; in hybrids conv, state-space)

    @property
    def ratio(self) -> float:
        """Largest |h| over the median |h| of the layer: the scale-free size that scan, verify and tune compare."""
        return self.max_abs / self.median_abs if self.median_abs > 0 else math.inf


@dataclass
class Stats:
    """Everything a streaming pass measured: per-layer statistics and the samples they refer to."""

    layers: list[LayerStats] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    num_layers: int = 0
    hidden_size: int = 0
