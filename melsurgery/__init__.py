"""melsurgery: find and fix massive activations (the Massive Emergence Layer) in decoder checkpoints.

The library API, one entry point per CLI command (the CLI is a thin layer over these):

    import melsurgery
    result = melsurgery.scan("default")               # a folder, Hub id, .gguf file, `default` or a Source
    melsurgery.patch("default", "out", max_kl=0.05)   # the largest sink cut within KL 0.05 (budgeted_patch)
    melsurgery.patch("default", "out", [("ffn-dampen", {"factor": 0.2})])   # given recipes (or a Manifest)
    report = melsurgery.verify("default", "out")      # base versus patched, on held-out text
    model, tokenizer = melsurgery.load(out)           # a patched checkpoint, custom layer included

Names are imported on first use, so `import melsurgery` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from melsurgery.version import __version__

# public name -> (module, attribute)
_API = {
    "resolve": ("melsurgery.checkpoint.source", "as_source"),
    "Source": ("melsurgery.checkpoint.source", "Source"),
    "scan": ("melsurgery.api", "scan"),
    "ScanResult": ("melsurgery.detect.scan_result", "ScanResult"),
    "CalibrationSpec": ("melsurgery.calibrate.samples", "CalibrationSpec"),
    "DetectParams": ("melsurgery.params", "DetectParams"),
    "Manifest": ("melsurgery.surgery.manifest", "Manifest"),
    "load_manifest": ("melsurgery.surgery.manifest", "load_manifest"),
    "patch": ("melsurgery.api", "patch"),
    "budgeted_patch": ("melsurgery.api", "budgeted_patch"),
    "patch_gguf": ("melsurgery.surgery.gguf_patch", "run_patch_gguf"),
    "verify": ("melsurgery.api", "verify"),
    "diff": ("melsurgery.api", "diff"),
    "tune": ("melsurgery.api", "tune"),
    "SearchOptions": ("melsurgery.search.options", "SearchOptions"),
    "push": ("melsurgery.hub.push", "push"),
    "load": ("melsurgery.engines.loading", "load"),
    "UserError": ("melsurgery.errors", "UserError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'melsurgery' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
