"""Hooks that record, per sequence run through one layer, the attention quantities `measure` defines.

scan, verify and tune install the same probe (`run_layers(probe=...)`), so the key attention behind
every sink figure is captured the same way everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from melsurgery.architectures import Family, has_submodule, submodule
from melsurgery.measure import definitions as measure


class Probe:
    """Hooks that record, per sequence run through one layer, each head's key attention and, when
    asked, the mean pairwise cosine similarity of the attention inputs (after any WeMask hook).
    Layers of hybrids whose mixer is not attention have neither (`attends` False)."""

    def __init__(self, layer: nn.Module, family: Family, similarity: bool = False) -> None:
        self.layer, self.family = layer, family
        self.attends = has_submodule(layer, family.attn)
        self.measure_similarity = similarity and self.attends
        self.key_attention: list[torch.Tensor] = []
        self.similarity: list[float] = []
        self._handles: list = []

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.similarity.append(measure.similarity(x[0]))

    def hooks(self) -> list:
        """Install the recording hooks on the layer's attention and return their handles (none without attention)."""
        if not self.attends:
            return []
        attn = submodule(self.layer, self.family.attn)
        handles = [attn.register_forward_hook(
            lambda m, a, out: self.key_attention.append(measure.key_attention(out[1])))]
        if self.measure_similarity:
            handles.append(attn.register_forward_pre_hook(self._capture_input, with_kwargs=True))
        return handles

    def __enter__(self) -> Probe:
        self._handles = self.hooks()
        return self

    def end_sample(self) -> None:
        """Check after each sequence that every hook fired once for it, so records stay aligned with samples."""
        if len({len(records) for records in self.counts()}) > 1:  # none at all: a layer without attention
            raise RuntimeError("layer hooks fired an unexpected number of times")

    def counts(self) -> list[list]:
        """The per-sample record lists this probe fills (what end_sample compares in length)."""
        attention = [self.key_attention] if self.attends else []
        return [*attention, *([self.similarity] if self.measure_similarity else [])]

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
