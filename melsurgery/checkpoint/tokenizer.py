"""A model folder's tokenizer, loaded without running anything shipped in the folder."""

from __future__ import annotations

from pathlib import Path

from melsurgery.errors import UserError


def load_tokenizer(folder: Path) -> object:
    """The folder's tokenizer, or a one-line error when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
