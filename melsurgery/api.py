"""The Python API: one function per CLI command, each taking its models as the CLI does.

Every MODEL argument goes through `checkpoint.source.as_source`, the resolution the CLI uses: a folder, a Hub id,
a .gguf file, `default`, a `Path` or an already resolved `Source` are accepted alike by every entry point. The
functions are thin: options pass through to the stage that owns them, so their defaults are defined once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from melsurgery.checkpoint.source import Source, as_source

Model = Source | str | Path


def scan(model: Model, *args: Any, revision: str | None = None, **options: Any):
    """Find and explain the ME Layer of `model` (`melsurgery scan`); options as `detect.scan.run_scan`."""
    from melsurgery.detect.scan import run_scan

    return run_scan(as_source(model, revision), *args, **options)


def patch(model: Model, out: str | Path, manifest: Any = None, *, max_kl: float | None = None,
          max_ppl_increase: float | None = None, revision: str | None = None, **options: Any):
    """Write a patched checkpoint (`melsurgery patch`).

    `manifest`: a `Manifest`, a manifest file, or recipes as [(name, params), ...]. With a budget (`max_kl`,
    `max_ppl_increase`) and no manifest, the recipes are searched instead: see `budgeted_patch`. An `out` ending
    in .gguf writes a GGUF (from a GGUF source). Other options as `surgery.patch.run_patch`."""
    if max_kl is not None or max_ppl_increase is not None:
        if manifest is not None:
            from melsurgery.errors import UserError

            raise UserError("give recipes (a manifest) or a budget (max_kl, max_ppl_increase), not both")
        return budgeted_patch(model, out, max_kl=max_kl, max_ppl_increase=max_ppl_increase, revision=revision,
                              **options)
    source = as_source(model, revision)
    man = _manifest(manifest, source, revision)
    if str(out).lower().endswith(".gguf"):
        from melsurgery.surgery.gguf_patch import run_patch_gguf

        return run_patch_gguf(source, Path(out), man, **options)
    from melsurgery.surgery.patch import run_patch

    return run_patch(source, Path(out), man, **options)


def budgeted_patch(model: Model, out: str | Path, *, max_kl: float | None = None,
                   max_ppl_increase: float | None = None, recipes: tuple[str, ...] = (), manifest: Any = None,
                   revision: str | None = None, **options: Any):
    """The main job in one call (`melsurgery patch --max-kl`): search the recipes, and write the largest sink cut
    whose held-out KL (and/or perplexity increase) is within the budget; `BudgetNotMet` when none is.

    Options that are search settings (the fields of `SearchOptions`) go to the search,
    the others (scan, text, heldout, overwrite, device, plot, ...) to `search.budget.run_budgeted_patch`;
    `manifest` gives the calibration and detection settings."""
    from dataclasses import fields

    from melsurgery.search.budget import run_budgeted_patch
    from melsurgery.search.options import SearchOptions

    names = {f.name for f in fields(SearchOptions)}
    opts = SearchOptions(max_kl=max_kl, max_ppl_increase=max_ppl_increase, recipes=tuple(recipes),
                         **{k: v for k, v in options.items() if k in names})  # checked when made
    source = as_source(model, revision)
    rest = {k: v for k, v in options.items() if k not in names}
    return run_budgeted_patch(source, Path(out), _manifest(manifest or [], source, revision), opts, **rest)


def verify(base: Model, patched: Model, *, revision: str | None = None, **options: Any):
    """Base versus patched on held-out text (`melsurgery verify`); options as `measure.verify.run_verify`."""
    from melsurgery.measure.verify import run_verify

    return run_verify(as_source(base, revision).folder, as_source(patched).folder, **options)


def diff(a: Model, b: Model, **options: Any):
    """Tensor-by-tensor comparison (`melsurgery diff`); options as `compare.checkpoints.diff_checkpoints`."""
    from melsurgery.compare.checkpoints import diff_checkpoints

    return diff_checkpoints(a, b, **options)


def tune(model: Model, run_dir: str | Path, opts: Any, *, revision: str | None = None, **options: Any):
    """Search the recipes' settings into `run_dir` (`melsurgery tune`); options as `search.tune.run_tune`."""
    from melsurgery.search.tune import run_tune

    source = as_source(model, revision)
    name = model.id if isinstance(model, Source) else str(model)
    return run_tune(source, name, Path(run_dir), opts, **options)


def _manifest(manifest: Any, source: Source, revision: str | None):
    """A `Manifest` from what the caller gave: one, a manifest file, or recipes as [(name, params), ...]."""
    from melsurgery.recipes import resolve_recipes
    from melsurgery.surgery.manifest import Manifest, load_manifest

    if isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, str | Path):
        return load_manifest(Path(manifest), source.id)
    return Manifest(model=source.id, revision=revision, recipes=resolve_recipes(list(manifest or [])))
