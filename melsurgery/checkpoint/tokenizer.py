"""A model folder's tokenizer, loaded without running anything shipped in the folder."""

from __future__ import annotations

from pathlib import Path

from melsurgery.architectures import is_patched_config, transformers_config
from melsurgery.checkpoint.reader import read_config
from melsurgery.errors import UserError


def load_tokenizer(folder: Path) -> object:
    """The folder's tokenizer, or a one-line error when it has none.

    A patched checkpoint's tokenizer is read with its base architecture's config: transformers would otherwise
    look for the remote config class and ask whether to run it."""
    from transformers import AutoTokenizer

    try:
        config = read_config(Path(folder))
    except UserError:
        config = {}  # whatever is wrong with it, the tokenizer alone may still load (and say what is wrong)
    options = {"config": transformers_config(config)} if is_patched_config(config) else {}
    try:
        return AutoTokenizer.from_pretrained(folder, **options)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
