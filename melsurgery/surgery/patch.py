"""`patch`: scan (or read a scan), plan the recipes, write a standalone checkpoint atomically."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import torch

from melsurgery.checkpoint.atomic import atomic_folder, check_output
from melsurgery.checkpoint.basemodel import explicit
from melsurgery.checkpoint.provenance import Provenance, RecipeRecord
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import check_tokenizer
from melsurgery.checkpoint.source import Source
from melsurgery.checkpoint.validate import nonfinite, open_model
from melsurgery.checkpoint.writer import AppliedEdit, copy_side_files, write_weights
from melsurgery.detect.scan import ScanResult, check_scan_params, run_scan
from melsurgery.errors import UserError
from melsurgery.hub.card import base_license, render_card
from melsurgery.outputs import MANIFEST, MODEL_CARD
from melsurgery.params import LAYER_WORDS
from melsurgery.recipes import RecipePlan, WeMaskSpec, parse_layers, plan_recipes, resolve_recipes
from melsurgery.surgery.manifest import Manifest
from melsurgery.version import __version__

MODELING_FILE = "modeling_melsurgery.py"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_melsurgery.MelsurgeryForCausalLM"}


@dataclass
class PatchResult:
    """What `run_patch` wrote: the folder, the plans, the edits applied, the scan, the verify figures."""

    out: Path
    plans: list[RecipePlan]
    applied: list[AppliedEdit]
    scan: ScanResult
    custom_layer: bool
    verified: dict | None = None


def scan_summary(scan: ScanResult) -> dict:
    """The part of a scan that provenance keeps (enough to reproduce and to verify the patch)."""
    keys = ("me_layer", "massive_dims", "top_dims", "persist_until", "ffn_neurons", "selector_threshold",
            "sink_after_me", "token_summary", "calibration", "params")
    data = scan.to_dict()
    summary = {k: data[k] for k in keys}
    # timings would make two identical patches differ byte for byte
    summary["calibration"] = {k: v for k, v in (data["calibration"] or {}).items() if k != "seconds"}
    return summary


def run_patch(
    source: Source,
    out: Path,
    manifest: Manifest,
    *,
    scan: ScanResult | None = None,
    overwrite: bool = False,
    link: bool = False,
    device: str = "cpu",
    progress: bool = False,
    verify: dict | None = None,
) -> PatchResult:
    """Write the patched checkpoint; with `verify` (run_verify options) measure it before it is committed."""
    # everything that can be checked without calibrating is checked first: fail fast
    recipes = resolve_recipes(manifest.recipes)
    check_scan_params(manifest.calibration, manifest.detection)
    check_output(out, overwrite, protect=source.folder)
    base = explicit(manifest.base_model, "base_model") if manifest.base_model else source.base_model
    ckpt, family = open_model(source.folder)
    check_tokenizer(source.folder)
    check_params_fit(recipes, ckpt.config)
    if scan is None:
        scan = run_scan(source, manifest.calibration, manifest.detection, device=device, dtype=torch.float32,
                        progress=progress)
    else:
        check_scan_fits(scan, ckpt.config)
    plans = plan_recipes(scan, family, ckpt.config, recipes)
    check_plans(plans, ckpt)
    edits = [e for p in plans for e in p.edits]
    wemask = next((p.wemask for p in plans if p.wemask is not None), None)
    with atomic_folder(out, overwrite, protect=source.folder) as tmp:
        weights: dict[str, str] = {}  # sha256 of the weight files as written, so provenance need not reread them
        applied, inputs = write_weights(ckpt, edits, tmp, link=link, outputs=weights)
        inputs.update(copy_side_files(ckpt, tmp, skip=("config.json",) if wemask else ()))
        if wemask:
            config = dict(ckpt.config)
            config["auto_map"] = AUTO_MAP
            config["melsurgery_wemask"] = wemask.to_config()
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            modeling = resources.files("melsurgery.engines").joinpath(MODELING_FILE).read_bytes()
            (tmp / MODELING_FILE).write_bytes(modeling)
        check_written(tmp, ckpt, applied)
        (tmp / MANIFEST).write_text(manifest.to_yaml())
        measured = None
        if verify is not None:
            from melsurgery.measure.verify import measurements_for_card, run_verify

            measured = run_verify(source.folder, tmp, device=device, progress=progress, params=scan.params,
                                  claimed_edits=sorted({a.tensor for a in applied}), **verify)
        license, unknown_license = base_license(source.folder)
        card = render_card(base=base, name=source.name, license=license, unknown_license=unknown_license,
                           plans=plans, scan=scan, applied=applied, custom_layer=wemask is not None,
                           measurements=measurements_for_card(measured) if measured else None)
        (tmp / MODEL_CARD).write_text(card)
        write_provenance(tmp, replace(source, base_model=base), manifest, scan, plans, applied, inputs,
                         measurements=_compact(measured), known=weights)
    return PatchResult(Path(out), plans, applied, scan, wemask is not None, measured)


def check_scan_fits(scan: ScanResult, config: dict) -> None:
    """A --scan result must describe a model of this depth and width (one of another model plans nonsense)."""
    for what, theirs, ours in (("layers", scan.model.num_layers, config.get("num_hidden_layers")),
                               ("hidden size", scan.model.hidden_size, config.get("hidden_size"))):
        if theirs != ours:
            raise UserError(f"the --scan result is for a model with {theirs} {what}, this one has {ours}; "
                            "scan this model")


def check_params_fit(recipes: list[tuple[str, dict]], config: dict) -> None:
    """Explicit dims and layer indices must exist in this model: refused before the scan, not after it."""
    hidden, n = config["hidden_size"], config["num_hidden_layers"]
    for name, params in recipes:
        bad = [d for d in params.get("dims") or [] if d >= hidden]
        if bad:
            raise UserError(f"{name}: --dims {bad[0]} is out of range: the model's hidden size is {hidden} "
                            f"(dims 0-{hidden - 1})")
        layers = params.get("layers")
        if layers is not None and layers not in LAYER_WORDS:
            parse_layers(layers, 0, n)


def check_plans(plans: list[RecipePlan], ckpt: Checkpoint) -> None:
    """Every planned edit and custom-layer spec acts on something that exists: nothing empty, nothing out of
    range, every factor finite. Checked before anything is written."""
    hidden, n = ckpt.config["hidden_size"], ckpt.config["num_hidden_layers"]
    for plan in plans:
        for e in plan.edits:
            shape = ckpt.info(e.tensor).shape
            if not all(math.isfinite(x) for x in (e.scale, e.shift, e.offset)):
                raise UserError(f"{plan.recipe}: the edit of {e.tensor} has a non-finite factor")
            if e.index is None:
                continue
            if not e.index:
                raise UserError(f"{plan.recipe}: selects nothing to edit in {e.tensor}")
            if e.axis >= len(shape):
                raise UserError(f"{plan.recipe}: {e.tensor} has no axis {e.axis} (shape {list(shape)})")
            bad = [i for i in e.index if not 0 <= i < shape[e.axis]]
            if bad:
                raise UserError(f"{plan.recipe}: index {bad[0]} is out of range for {e.tensor} "
                                f"(size {shape[e.axis]} along axis {e.axis}); check --dims / --neurons")
        spec = plan.wemask
        if spec is not None:
            _check_wemask(spec, hidden, n)


def _check_wemask(spec: WeMaskSpec, hidden: int, n: int) -> None:
    """Every masked layer masks at least one dim, all in range, with a finite threshold and values."""
    if not spec.per_layer:
        raise UserError("wemask: masks no layer; check --layers")
    bad = [v for v in spec.selector_dims if not 0 <= v < hidden]
    if bad:
        raise UserError(f"wemask: selector dim {bad[0]} is out of range (0-{hidden - 1})")
    for m in spec.per_layer:
        if not m.dims:
            raise UserError(f"wemask: masks no dims at layer {m.layer}; give --dims or --top-k of at least 1")
        for what, values, size in (("dim", m.dims, hidden), ("layer", (m.layer,), n)):
            bad = [v for v in values if not 0 <= v < size]
            if bad:
                raise UserError(f"wemask: {what} {bad[0]} is out of range (0-{size - 1})")
        if spec.selector == "magnitude" and not (m.threshold is not None and math.isfinite(m.threshold)):
            raise UserError(f"wemask: the selector threshold of layer {m.layer} is not a finite number; rerun scan")
        if not math.isfinite(m.strength) or (m.values is not None and not all(map(math.isfinite, m.values))):
            raise UserError(f"wemask: non-finite strength or replacement values at layer {m.layer}; rerun scan")


def check_written(folder: Path, source: Checkpoint, applied: list[AppliedEdit]) -> None:
    """The written checkpoint before it is committed: it opens like any source (headers, config against shapes),
    holds the source's tensors with their dtypes and shapes, and every edited tensor is finite."""
    out, _ = open_model(folder)
    for name, info in source.tensors.items():
        got = out.tensors.get(name)
        if got is None or (got.dtype, got.shape) != (info.dtype, info.shape):
            raise UserError(f"{folder}: {name} was written wrongly; nothing was written")
    for a in applied:
        bad = nonfinite(out.load(a.tensor))
        if bad:
            had = nonfinite(source.load(a.tensor))
            raise UserError(f"{a.tensor}: the edit leaves {bad} non-finite entries (NaN or Inf; the source tensor "
                            f"holds {had}); nothing was written")


def _compact(measured: dict | None) -> dict | None:
    """Verification figures for provenance: everything but the generated text."""
    if measured is None:
        return None
    return {k: v for k, v in measured.items() if k not in ("generations", "seconds", "massive_positions")}


def write_provenance(folder: Path, source: Source, manifest: Manifest, scan: ScanResult, plans: list[RecipePlan],
                     applied: list, inputs: dict, measurements: dict | None = None,
                     known: dict[str, str] | None = None) -> Provenance:
    """provenance.json: inputs, recipe, scan summary, measurements and the sha256 of every output file.

    `applied`: the writer's records (AppliedEdit, or GGUFEdit for a GGUF output); `known`: sha256 already
    computed while writing (the weights), not read again."""
    prov = Provenance(
        tool=f"melsurgery {__version__}",
        source={"id": source.id, "kind": source.kind, "revision": source.revision,
                "gguf": source.origin_file.name if source.origin_file else None, "name": source.name,
                "base_model": source.base_model.id if source.base_model else None,
                "base_model_from": source.base_model.origin if source.base_model else None, "files": inputs},
        manifest=manifest.to_dict(),
        recipes=tuple(RecipeRecord(name=p.recipe, params=p.params, folds=p.folds, summary=p.summary) for p in plans),
        edits=tuple(asdict(e) for e in applied),
        scan=scan_summary(scan),
        measurements=measurements or {},
    ).with_outputs(folder, known)
    prov.write(folder)
    return prov
