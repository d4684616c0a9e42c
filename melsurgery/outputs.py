"""Where melsurgery writes: the names of the files beside the weights, and its cache. Defined once, used by every
writer and reader."""

import os
from pathlib import Path

MODEL_CARD = "README.md"
PROVENANCE = "provenance.json"
MANIFEST = "melsurgery-manifest.yaml"
GENERATED = (MODEL_CARD, PROVENANCE, MANIFEST)


def cache_dir() -> Path:
    """melsurgery's cache: $MELSURGERY_CACHE, else $XDG_CACHE_HOME/melsurgery, else ~/.cache/melsurgery."""
    if os.environ.get("MELSURGERY_CACHE"):
        return Path(os.environ["MELSURGERY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "melsurgery"
