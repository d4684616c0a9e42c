"""`patch`: scan (or read a scan), plan the recipes, write a standalone checkpoint atomically."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import torch

from melsurgery.architectures import BASE_KEY, PATCHED_ARCH_PREFIX, PATCHED_MODEL_TYPE, WEMASK_KEY, family_for
from melsurgery.checkpoint.atomic import atomic_folder, check_output
from melsurgery.checkpoint.basemodel import explicit
from melsurgery.checkpoint.provenance import DerivedFile, Provenance, RecipeRecord, SearchRecord, WriteRecord
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import check_tokenizer
from melsurgery.checkpoint.source import Source, origin
from melsurgery.checkpoint.validate import nonfinite, open_model, refuse_custom_layer
from melsurgery.checkpoint.writer import AppliedEdit, copy_side_files, write_weights
from melsurgery.detect.scan import ScanResult, check_scan_params, run_scan
from melsurgery.errors import UserError
from melsurgery.fit import FitContext, fit_recipes
from melsurgery.formats.typed import JsonRecord
from melsurgery.hub.card import base_license, render_card
from melsurgery.measure.verify import eval_text, input_prefix, split_text
from melsurgery.measure.verify_result import VerifyResult, measurements_for_card
from melsurgery.outputs import MANIFEST, MODEL_CARD
from melsurgery.params import LAYER_WORDS
from melsurgery.recipes import RecipePlan, WeMaskSpec, parse_layers, plan_recipes, resolve_recipes
from melsurgery.surgery.manifest import Manifest
from melsurgery.version import __version__

MODELING_FILE = "modeling_melsurgery.py"
AUTO_MAP = {"AutoConfig": "modeling_melsurgery.MelsurgeryConfig",
            "AutoModelForCausalLM": "modeling_melsurgery.MelsurgeryForCausalLM"}


@dataclass(frozen=True)
class PatchResult(JsonRecord):
    """What `run_patch` wrote: the folder, the plans, the edits applied, the scan, the verify figures."""

    out: Path
    plans: list[RecipePlan]
    applied: list[AppliedEdit]
    scan: ScanResult
    custom_layer: bool
    verified: VerifyResult | None = None
    writer: WriteRecord | None = None


def scan_summary(scan: ScanResult) -> dict:
    """The part of a scan that provenance keeps (enough to reproduce and to verify the patch)."""
    keys = ("me_layer", "massive_dims", "top_dims", "persist_until", "ffn_neurons", "selector_threshold",
            "sink_after_me", "token_summary", "calibration", "params")
    data = scan.to_json()
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
    search: SearchRecord | None = None,
    fit_text: str | None = None,
) -> PatchResult:
    """Write the patched checkpoint; with `verify` (run_verify options) measure it before it is committed.

    `search`: how a budgeted patch chose these recipes (the card and provenance record it). Recipes with fitted
    values (first-token) are fitted after the scan on `fit_text` (default: the tuning half of the embedded
    evaluation text, the half that verify's held-out figures in tune never see); the written manifest holds the
    fitted values, so it reproduces the patch without fitting again."""
    # everything that can be checked without calibrating is checked first: fail fast
    recipes = resolve_recipes(manifest.recipes)
    check_scan_params(manifest.calibration, manifest.detection)
    check_output(out, overwrite, protect=source.folder)
    base = explicit(manifest.base_model, "base_model") if manifest.base_model else source.base_model
    ckpt, family = open_model(source.folder)
    refuse_custom_layer(ckpt, "patch")
    check_tokenizer(source.folder)
    check_params_fit(recipes, ckpt.config)
    if scan is None:
        scan = run_scan(source, manifest.calibration, manifest.detection, device=device, dtype=torch.float32,
                        progress=progress)
    else:
        check_scan_fits(scan, ckpt.config)
    manifest = fitted(manifest, source, scan, device=device, progress=progress, fit_text=fit_text)
    recipes = manifest.recipes
    plans = plan_recipes(scan, family, ckpt.config, recipes)
    check_plans(plans, ckpt)
    edits = [e for p in plans for e in p.edits]
    wemask = next((p.wemask for p in plans if p.wemask is not None), None)
    with atomic_folder(out, overwrite, protect=source.folder) as tmp:
        written = write_weights(ckpt, edits, tmp, link=link)
        applied, inputs = written.applied, dict(written.inputs)
        inputs.update(copy_side_files(ckpt, tmp, skip=("config.json",) if wemask else ()))
        if wemask:
            config = patched_config(ckpt.config, wemask.to_config())
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            modeling = resources.files("melsurgery.engines").joinpath(MODELING_FILE).read_bytes()
            (tmp / MODELING_FILE).write_bytes(modeling)
        check_written(tmp, ckpt, applied)
        (tmp / MANIFEST).write_text(manifest.to_yaml())
        measured = None
        if verify is not None:
            from melsurgery.measure.verify import run_verify

            measured = run_verify(source.folder, tmp, device=device, progress=progress, params=scan.params,
                                  claimed_edits=sorted({a.tensor for a in applied}),
                                  **{"prefix": input_prefix(recipes), "payoff_window": None, **verify})
        license, unknown_license = base_license(source.folder)
        card = render_card(base=base, origin=origin(source), license=license, unknown_license=unknown_license,
                           plans=plans, scan=scan, applied=applied, custom_layer=wemask is not None,
                           measurements=measurements_for_card(measured) if measured else None, search=search,
                           deferred_sources=len(written.record.deferred))
        (tmp / MODEL_CARD).write_text(card)
        # the weights' sha256 as written, so provenance need not read them again
        write_provenance(tmp, replace(source, base_model=base), manifest, scan, plans, applied, inputs,
                         measurements=measured.compact() if measured else None, known=written.outputs,
                         derived=written.derived, writer=written.record, search=search)
    return PatchResult(Path(out), plans, applied, scan, wemask is not None, measured, written.record)


def patched_config(config: dict, spec: dict) -> dict:
    """config.json of a checkpoint that needs the custom layer: a model type and architecture names no stock
    engine knows (so an engine without the layer refuses it rather than running the base model), the base's
    recorded under BASE_KEY, the remote-code map, and the WeMask spec."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = list(config.get("architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]])
    return {**config, "model_type": PATCHED_MODEL_TYPE, "architectures": [PATCHED_ARCH_PREFIX + n for n in names],
            BASE_KEY: {"model_type": config["model_type"], "architectures": names}, "auto_map": AUTO_MAP,
            WEMASK_KEY: spec}


def fitted(manifest: Manifest, source: Source, scan: ScanResult, *, device: str = "cpu", progress: bool = False,
           fit_text: str | None = None) -> Manifest:
    """The manifest with the fitted values of its recipes filled in (first-token's row), fitted after the scan on
    `fit_text` (default: the tuning half of the embedded evaluation text, the half tune never reports on); the
    written manifest then reproduces the patch without fitting again."""
    ckpt = Checkpoint(source.folder)
    text = split_text(eval_text(None)[0])[0] if fit_text is None else fit_text
    ctx = FitContext(source.folder, family_for(ckpt.config), ckpt.config, scan, text, device, progress)
    return replace(manifest, recipes=fit_recipes(ctx, manifest.recipes))


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
            if not all(math.isfinite(x) for x in (e.scale, e.shift, e.offset, *(e.add or ()))):
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


def write_provenance(folder: Path, source: Source, manifest: Manifest, scan: ScanResult, plans: list[RecipePlan],
                     applied: list, inputs: dict, measurements: dict | None = None,
                     known: dict[str, str] | None = None, writer: WriteRecord | None = None,
                     search: SearchRecord | None = None, derived: dict[str, DerivedFile] | None = None) -> Provenance:
    """provenance.json: inputs, recipe, scan summary, measurements and the sha256 of every output file.

    `applied`: the writer's records (AppliedEdit, or GGUFEdit for a GGUF output); `known`: sha256 already
    computed while writing (the weights), not read again; `derived`: edited weight files recorded by their
    derivation; `writer`: how the weights were written."""
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
        writer=writer,
        search=search,
    ).with_outputs(folder, known, derived)
    prov.write(folder)
    return prov
