"""`patch` into GGUF: fold recipes into a llama.cpp file, keeping every byte that need not change.

The scan and the plan run on the dequantised Hugging Face view of the source (as for any GGUF
source); each planned edit is then mapped onto its GGUF tensor through the architecture entry
(llama.cpp names, the rotary row permutation of q/k, Gemma's stored 1 + g norms). Edits on F32,
F16 and BF16 tensors are computed in fp32 and rounded once. On a block-quantised tensor only the
blocks holding entries whose value changes are requantised, with the `gguf` package's quantiser for
that type; every other block keeps its bytes. Each edited tensor is then read back as a runtime reads
it (dequantised with `gguf`'s own code) and compared with the fp32 edit: where the source's type
misses the edit by more than TOLERANCE (see `edit_error`), or has no quantiser, the tensor is written
in the first wider type that carries it (Q8_0, F16, F32; GGUF runtimes read a type per tensor), and
every tensor stored after it moves by whole alignments.

Output layout:
- `-o OUT.gguf`: one self-describing file; the record of what was done is in its metadata
  (`melsurgery.*` keys), because a GGUF is usually run, copied and shared as a single file;
- `-o DIR --format gguf`: a folder for publishing (`push`): the patched file under the source's file
  name, the model card README.md, provenance.json (hashes of every file) and the manifest, which is
  how GGUF repos on the Hub are laid out.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from melsurgery.architectures import Family, family_for, gguf_target
from melsurgery.checkpoint.atomic import atomic_file, atomic_folder, check_output, check_output_file
from melsurgery.checkpoint.edits import Edit, apply_edit, is_identity
from melsurgery.checkpoint.gguf_file import (
    GGUFFile,
    GGUFInfo,
    can_dequantise,
    can_quantise,
    dequantise_bytes,
    quantise_blocks,
)
from melsurgery.checkpoint.hashing import sha256_file
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.source import Source, origin
from melsurgery.checkpoint.writer import copy_spliced, fsync_file
from melsurgery.detect.scan import run_scan
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.formats.typed import JsonRecord
from melsurgery.hub.card import base_license, render_card
from melsurgery.outputs import MANIFEST, MODEL_CARD
from melsurgery.recipes import RecipePlan, plan_recipes
from melsurgery.surgery.manifest import Manifest
from melsurgery.surgery.patch import check_scan_fits, fitted
from melsurgery.version import __version__

GGUF_HINT = "name a .gguf file, or pass --format gguf to write a folder"
FOLDED = ("norm-rescale", "ffn-dampen", "me-norm", "first-token")
# The written tensor may miss the asked edit by at most this fraction of it (see edit_error); a type
# that cannot is replaced by the first of WIDER that can (GGUF runtimes read each tensor in its own type).
TOLERANCE = 0.1
WIDER = ("Q8_0", "F16", "F32")
# The recipe -> role map used to refuse unquantisable types before the scan; the exact check follows the plan.
_ROLES = {"ffn-dampen": "ffn_down", "me-norm": "ffn_norm", "norm-rescale": "attn_norm"}


@dataclass
class GGUFEdit:
    """What changed in one GGUF tensor (figures after dequantisation, the way a runtime sees them)."""

    tensor: str  # GGUF name
    hf_tensor: str  # the same tensor in the Hugging Face view (what the scan and the plan name)
    type: str  # the source's type
    written_type: str  # the type written: the source's, or a wider one where the source's cannot carry the edit
    bytes_added: int  # the written tensor's size minus the source's (0 when the type is kept)
    edit_error: float  # ||written - asked|| / ||asked - source||, dequantised as a runtime does (see edit_error)
    source_type_error: float | None  # the same in the source's type (None: gguf has no quantiser for it)
    changed: int  # entries whose dequantised value differs from the source
    max_abs_delta: float
    blocks_requantised: int  # blocks holding entries the edit changes, requantised (F32/F16/BF16: entries)
    blocks_changed: int  # of those, blocks whose bytes differ (a small change can round back onto the grid)
    blocks_total: int
    requant_max_abs_err: float  # max |stored - exact edit| over the rewritten blocks
    requant_rms_err: float


@dataclass(frozen=True)
class GGUFPatchResult(JsonRecord):
    """What `run_patch_gguf` wrote: the output (file or folder), the plans, the block-level edits, the scan."""

    out: Path
    file: Path  # the .gguf written
    plans: list[RecipePlan]
    applied: list[GGUFEdit]
    scan: ScanResult
    source_sha256: str
    output_sha256: str


def refuse_unfoldable(recipes: list[tuple[str, dict]]) -> None:
    """Refuse, before any work, recipes a GGUF cannot carry (it has no place for a custom layer)."""
    bad = [name for name, _ in recipes if name not in FOLDED]
    if bad:
        raise UserError(
            f"{', '.join(bad)} cannot be written into a GGUF: wemask selects tokens at run time, which needs a "
            "custom layer that llama.cpp and other GGUF runtimes do not have; GGUF output takes only the folded "
            f"recipes ({', '.join(FOLDED)}), or write safetensors (an -o folder without --format gguf)")


def _refuse_types_early(gf: GGUFFile, recipes: list[tuple[str, dict]]) -> None:
    """Before the scan: a recipe whose target role gguf cannot read in any layer cannot succeed."""
    for name, _ in recipes:
        role = _ROLES.get(name)
        infos = [i for n, i in gf.tensors.items() if n.startswith("blk.") and n.endswith(f".{role}.weight")]
        if infos and not any(can_dequantise(i.type) for i in infos):
            raise UserError(f"{name}: {infos[0].name} is {infos[0].type_name}, which the gguf package cannot read; "
                            "use a recipe that edits only F32 norm weights (norm-rescale, me-norm), or another "
                            "quantisation of the model")


Ops = list[tuple[Edit, int | None]]  # edits of one GGUF tensor in its own indices, with the expert slice


def map_edits(edits: list[Edit], family: Family, config: dict, gf: GGUFFile) -> dict[str, Ops]:
    """Planned edits (Hugging Face names) as edits of GGUF tensors: (edit in GGUF indices, expert slice)."""
    out: dict[str, Ops] = {}
    for e in edits:
        if is_identity(e):
            continue
        target = gguf_target(family, e.tensor, config)
        if target.name not in gf.tensors:
            raise UserError(f"{gf.path}: has no tensor {target.name} (for {e.tensor}); is it a {family.name} model?")
        index = e.index
        if index is not None and e.axis == 0 and target.row_order is not None:
            index = tuple(target.row_order[i] for i in index)
        mapped = replace(e, tensor=target.name, index=index, offset=e.offset - target.norm_added)
        out.setdefault(target.name, []).append((mapped, target.expert))
    return out


def _edited(old: np.ndarray, ops: Ops) -> np.ndarray:
    """The intended tensor: the edits applied in fp32 to the source's dequantised values."""
    new = torch.from_numpy(old.copy())
    for edit, expert in ops:
        if expert is None:
            new = apply_edit(new, edit)
        else:
            new[expert] = apply_edit(new[expert], edit)
    return new.numpy()


@dataclass(frozen=True)
class _Written:
    """One way to store an edited tensor: its type, its bytes, the values a runtime dequantises from them, and
    which blocks were requantised and rewrote their bytes (None: the whole tensor was written anew)."""

    type: Any
    data: np.ndarray  # [blocks, type size] uint8
    values: np.ndarray  # float32, the tensor's shape
    hit: np.ndarray | None
    rewritten: int


def _in_place(raw: np.ndarray, info: GGUFInfo, old: np.ndarray, exact: np.ndarray) -> _Written:
    """The source's type: only the blocks holding an entry the edit changes are requantised."""
    flat = exact.reshape(-1, info.block_size)
    hit = (flat != old.reshape(-1, info.block_size)).any(axis=1)
    blocks = raw.reshape(-1, info.type_size).copy()
    stored = quantise_blocks(flat[hit], info)
    rewritten = int((stored != blocks[hit]).any(axis=1).sum())
    blocks[hit] = stored
    values = old.reshape(-1, info.block_size).copy()
    values[hit] = dequantise_bytes(stored, replace(info, shape=(int(hit.sum()) * info.block_size,))).reshape(
        -1, info.block_size)
    return _Written(info.type, blocks, values.reshape(info.shape), hit, rewritten)


def _whole(info: GGUFInfo, exact: np.ndarray, qtype: Any) -> _Written:
    """The whole tensor quantised anew in another type (a tensor has one type)."""
    from gguf import GGML_QUANT_SIZES

    bs, ts = GGML_QUANT_SIZES[qtype]
    as_type = replace(info, type=qtype, block_size=bs, type_size=ts, nbytes=exact.size // bs * ts)
    blocks = quantise_blocks(exact.reshape(-1, bs), as_type)
    values = dequantise_bytes(blocks, as_type)
    return _Written(qtype, blocks, values, None, len(blocks))


def _bits(qtype: Any) -> float:
    """Bits per weight of a type: the order in which wider types are tried."""
    from gguf import GGML_QUANT_SIZES

    bs, ts = GGML_QUANT_SIZES[qtype]
    return 8 * ts / bs


def _ways(raw: np.ndarray, info: GGUFInfo, old: np.ndarray, exact: np.ndarray):
    """The ways to store the edit, cheapest first: the source's type in place (where gguf can quantise it), then
    each wider type of WIDER that fits the tensor's rows; the last, F32, holds the fp32 edit exactly."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if can_quantise(info.type):
        yield _in_place(raw, info, old, exact)
    for name in WIDER:
        qtype = GGMLQuantizationType[name]
        if _bits(qtype) > _bits(info.type) and info.shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0:
            yield _whole(info, exact, qtype)


def edit_error(values: np.ndarray, exact: np.ndarray, old: np.ndarray) -> float:
    """How far the stored tensor misses the asked one, relative to the edit itself: over the entries the edit
    changes, sum |stored - asked| / sum |asked - source| (float64). 0 is the edit exactly; 1 is as far off as not
    editing at all. The sum counts every entry by its share of the edit: an L2 norm would let the few largest
    entries hide the rest (on the default model, ffn-dampen in Q4_1 misses 7% of the edit in L2 but 50% here,
    and its KL is 15 times the asked patch's; each entry of a down-projection column feeds its own residual dim).
    Entries the edit leaves alone are not counted: kept in the source's type they keep their bytes outside the
    requantised blocks, and a wider type re-rounds them on a grid several times finer than the source's."""
    asked = exact.astype(np.float64) - old
    edited = asked != 0
    if not edited.any():
        return 0.0
    return float(np.abs(values.astype(np.float64)[edited] - exact[edited]).sum() / np.abs(asked[edited]).sum())


def edit_tensor(gf: GGUFFile, name: str, ops: Ops, hf_tensor: str) -> tuple[bytes, GGUFEdit]:
    """The tensor's new bytes and type: the edit applied in fp32 to the dequantised values, stored in the source's
    type (only the changed blocks requantised) where that carries it within TOLERANCE, else in the
    first wider type that does (Q8_0, F16, F32)."""
    info = gf.tensors[name]
    raw = gf.raw(name)
    old = dequantise_bytes(raw, info)
    exact = _edited(old, ops)
    if not np.isfinite(exact).all():
        held = int((~np.isfinite(old)).sum())  # a cache converted by an older melsurgery may hold it
        if held:
            raise UserError(f"{gf.path}: tensor {name} holds {held} NaN or infinite entries; the GGUF is broken: "
                            "re-download or re-export it")
        raise UserError(f"{name}: the edit produces non-finite values; check the recipe parameters")
    same_error = None
    for way in _ways(raw, info, old, exact):
        error = edit_error(way.values, exact, old)
        same_error = error if way.type == info.type else same_error
        if error <= TOLERANCE:
            break
    err = np.abs(way.values.astype(np.float64) - exact)
    err = err if way.hit is None else err.reshape(-1, info.block_size)[way.hit]
    delta = np.abs(way.values.astype(np.float64) - old)[(way.values != old)]
    applied = GGUFEdit(
        tensor=name, hf_tensor=hf_tensor, type=info.type_name, written_type=way.type.name,
        bytes_added=way.data.nbytes - info.nbytes, edit_error=error, source_type_error=same_error,
        changed=int(delta.size), max_abs_delta=float(delta.max()) if delta.size else 0.0,
        blocks_requantised=len(way.data) if way.hit is None else int(way.hit.sum()), blocks_changed=way.rewritten,
        blocks_total=len(way.data), requant_max_abs_err=float(err.max()) if err.size else 0.0,
        requant_rms_err=float(math.sqrt(float((err**2).mean()))) if err.size else 0.0)
    return way.data.tobytes(), applied


def retyped_lines(res: GGUFPatchResult) -> list[str]:
    """One line per tensor written in a wider type than the source's: why, and the bytes it adds."""
    lines = []
    for a in (a for a in res.applied if a.written_type != a.type):
        why = (f"{a.type} would miss the asked edit by {a.source_type_error:.0%}"
               if a.source_type_error is not None else f"the gguf package cannot quantise {a.type}")
        lines.append(f"{a.tensor} written in {a.written_type}, not {a.type}: {why} (the limit is {TOLERANCE:.0%}; "
                     f"{a.written_type} misses it by {a.edit_error:.1%}); +{a.bytes_added:,} bytes "
                     f"({a.bytes_added / res.file.stat().st_size:.2%} of the file)")
    return lines


def read_back(path: Path, source: GGUFFile, new_bytes: dict[str, bytes], retyped: dict[str, tuple[Any, int]]) -> None:
    """The written file parsed afresh before it is committed: the same tensors in the same order and shapes, the
    edited ones with the bytes and types meant, every other one starting with the source's bytes (its first
    4 KiB: its offset is right; the copy of the rest is the spliced copy's)."""
    out = GGUFFile(path)
    same = list(out.tensors) == list(source.tensors) and all(
        out.tensors[n].shape == i.shape and out.tensors[n].type == (retyped[n][0] if n in retyped else i.type)
        for n, i in source.tensors.items())
    for name, info in source.tensors.items() if same else ():
        head = min(info.nbytes, 4096)
        got = out.raw(name).tobytes() if name in new_bytes else out.head(name, head)
        same = same and got == (new_bytes[name] if name in new_bytes else source.head(name, head))
    if not same:
        raise RuntimeError(f"{path}: the GGUF written does not read back as meant")


def metadata_keys(source_file: Path, source_sha256: str, manifest: Manifest, plans: list[RecipePlan],
                  applied: list[GGUFEdit], scan: ScanResult) -> dict[str, str]:
    """The `melsurgery.*` keys of the output (strings; structured values as JSON)."""
    from melsurgery.surgery.patch import scan_summary

    return {
        "melsurgery.version": __version__,
        "melsurgery.source.file": source_file.name,
        "melsurgery.source.sha256": source_sha256,
        "melsurgery.recipes": json.dumps([{"name": p.recipe, "params": p.params, "summary": p.summary}
                                          for p in plans], sort_keys=True, default=str),
        "melsurgery.edits": json.dumps([asdict(a) for a in applied], sort_keys=True),
        "melsurgery.scan": json.dumps(scan_summary(scan), sort_keys=True, default=str),
        "melsurgery.manifest": manifest.to_yaml(),
    }


def gguf_source_file(spec: str | None) -> Path:
    """The .gguf behind a model argument, found without converting it (the default alias, or a .gguf path)."""
    from melsurgery.checkpoint.source import DEFAULT_ALIASES, default_gguf

    if spec is None or spec.lower() in DEFAULT_ALIASES:
        return default_gguf()
    path = Path(spec).expanduser()
    if path.suffix.lower() != ".gguf":
        raise UserError(f"{spec}: GGUF output needs a GGUF source (a .gguf file or the default model); "
                        "melsurgery does not convert safetensors to GGUF")
    if not path.is_file():
        raise UserError(f"{spec}: no such GGUF file")
    return path


def gguf_preflight(src_file: Path, out: Path, recipes: list[tuple[str, dict]], *, folder: bool,
                   overwrite: bool) -> None:
    """Everything that can be refused before the source is converted and scanned."""
    refuse_unfoldable(recipes)
    if folder:
        check_output(out, overwrite, protect=src_file)
    else:
        check_output_file(out, overwrite, protect=src_file, hint=GGUF_HINT, new_folder=True)
    _refuse_types_early(GGUFFile(src_file), recipes)


def run_patch_gguf(
    source: Source,
    out: Path,
    manifest: Manifest,
    *,
    folder: bool = False,
    scan: ScanResult | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = False,
) -> GGUFPatchResult:
    """Patch the GGUF `source.origin_file` into `out` (a .gguf file, or with `folder` a publishable folder)."""
    if source.origin_file is None:
        raise UserError(f"{source.id}: GGUF output needs a GGUF source (a .gguf file or the default model); "
                        "melsurgery does not convert safetensors to GGUF")
    src_file = source.origin_file
    gguf_preflight(src_file, out, manifest.recipes, folder=folder, overwrite=overwrite)
    gf = GGUFFile(src_file)
    config = Checkpoint(source.folder).config
    family = family_for(config)
    if scan is None:
        scan = run_scan(source, manifest.calibration, manifest.detection, device=device, dtype=torch.float32,
                        progress=progress)
    else:
        check_scan_fits(scan, config)
    manifest = fitted(manifest, source, scan, device=device, progress=progress)
    plans = plan_recipes(scan, family, config, manifest.recipes)
    hf_names = {}
    for e in (e for p in plans for e in p.edits):
        hf_names.setdefault(gguf_target(family, e.tensor, config).name, e.tensor)
    by_tensor = map_edits([e for p in plans for e in p.edits], family, config, gf)
    for name in by_tensor:  # every type checked before any work on the tensors
        if not can_dequantise(gf.tensors[name].type):
            raise UserError(f"{hf_names[name]}: {name} is {gf.tensors[name].type_name}, which the gguf package "
                            "cannot read; use another quantisation of the model")
    new_bytes: dict[str, bytes] = {}
    applied: list[GGUFEdit] = []
    for name in sorted(by_tensor, key=lambda n: gf.tensors[n].start):
        new_bytes[name], a = edit_tensor(gf, name, by_tensor[name], hf_names[name])
        applied.append(a)
    source_sha = sha256_file(src_file)
    from gguf import GGMLQuantizationType

    retyped = {a.tensor: (GGMLQuantizationType[a.written_type], len(new_bytes[a.tensor]))
               for a in applied if a.written_type != a.type}
    header = gf.header(metadata_keys(src_file, source_sha, manifest, plans, applied, scan), retyped)
    splices = {0: (gf.data_offset, lambda _old: header)}
    for name, data in new_bytes.items():
        if name in retyped:  # its span and padding replaced: the tensors after it move by whole alignments
            padded = data + bytes(-len(data) % gf.alignment)
            splices[gf.tensors[name].start] = (gf.padded_end(name), lambda _old, d=padded: d)
        else:
            splices[gf.tensors[name].start] = (gf.tensors[name].end, lambda _old, d=data: d)
    if not folder:
        with atomic_file(out, overwrite, protect=src_file, hint=GGUF_HINT) as tmp:
            _, out_sha = copy_spliced(src_file, tmp, splices)
            read_back(tmp, gf, new_bytes, retyped)
        return GGUFPatchResult(Path(out), Path(out), plans, applied, scan, source_sha, out_sha)
    from melsurgery.checkpoint.basemodel import explicit
    from melsurgery.surgery.patch import write_provenance

    base = explicit(manifest.base_model, "base_model") if manifest.base_model else source.base_model
    with atomic_folder(out, overwrite, protect=src_file) as tmp:
        target = tmp / src_file.name
        _, out_sha = copy_spliced(src_file, target, splices, sync=False)
        fsync_file(target)
        read_back(target, gf, new_bytes, retyped)
        (tmp / MANIFEST).write_text(manifest.to_yaml())
        license, unknown_license = base_license(source.folder)
        card = render_card(base=base, origin=origin(source), license=license, unknown_license=unknown_license,
                           plans=plans, scan=scan, applied=applied, custom_layer=False, gguf_file=src_file.name)
        (tmp / MODEL_CARD).write_text(card)
        write_provenance(tmp, replace(source, base_model=base), manifest, scan, plans, applied,
                         {src_file.name: source_sha}, known={src_file.name: out_sha})
    return GGUFPatchResult(Path(out), Path(out) / src_file.name, plans, applied, scan, source_sha, out_sha)
