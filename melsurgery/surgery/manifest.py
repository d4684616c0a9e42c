"""Manifests: YAML files that name a model, its calibration and its recipes, so a patch is reproducible."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from melsurgery.calibrate.samples import CalibrationSpec
from melsurgery.checkpoint.basemodel import explicit
from melsurgery.errors import UserError, quote
from melsurgery.formats import yamlsafe
from melsurgery.formats.textfile import read_bytes
from melsurgery.params import CALIBRATION, DETECTION, DetectParams
from melsurgery.params import resolve as resolve_params
from melsurgery.recipes import resolve_recipes


@dataclass
class Manifest:
    """A reproducible patch: model, revision, calibration, detection and recipes in order."""

    model: str = "default"
    revision: str | None = None
    base_model: str | None = None  # the Hub id for the card's base_model, when it cannot be detected
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    detection: DetectParams = field(default_factory=DetectParams)
    recipes: list[tuple[str, dict]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain data in the manifest file's own schema, so a written manifest loads back as the same patch."""
        cal = asdict(self.calibration)
        cal["path"] = str(cal["path"]) if cal["path"] else None
        return {
            "model": self.model,
            "revision": self.revision,
            "base_model": self.base_model,
            "calibration": cal,
            "detection": asdict(self.detection),
            "recipes": [{"name": n, "params": dict(p)} for n, p in self.recipes],
        }

    def to_yaml(self) -> str:
        """The `melsurgery-manifest.yaml` written beside every output: re-running it reproduces the patch."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


MAX_BYTES = 1024 * 1024  # a manifest is a few lines; anything near this is not one
TOP_LEVEL = ("model", "revision", "base_model", "calibration", "detection", "recipes")


def read_yaml(path: Path) -> object:
    """Parse YAML with limits: a regular file of at most MAX_BYTES, read by `yamlsafe.load` (alias expansion,
    nesting and repeated keys limited)."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes; a manifest may be at most {MAX_BYTES:,}")
    try:
        return yamlsafe.load(read_bytes(path, "manifest", MAX_BYTES).decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: cannot read manifest (not UTF-8 text)") from None
    except yamlsafe.YAMLRefused as exc:
        raise UserError(f"{path}: cannot read manifest: the YAML {exc}") from None


def load_manifest(path: Path, model: str | None = None) -> Manifest:
    """Read and check a manifest: every field has its type and range checked, with one message per field,
    and every recipe name and parameter is resolved, all before any model is opened. `model`: the model
    the command line names (used when the manifest names none; one that names another is refused)."""
    data = read_yaml(path)
    try:
        return _manifest(data, Path(path), model)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def _section(data: dict, key: str) -> dict:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{key} must be a mapping (e.g. {key}: {{...}}), got {value!r:.60}")
    return value


def _same_model(a: str, b: str) -> bool:
    """Two spellings of one model: the same text, or paths to the same folder or file."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _manifest(data: object, path: Path, given: str | None = None) -> Manifest:
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), list) or not data["recipes"]:
        raise UserError("a manifest needs a 'recipes' list (see manifests/ for examples)")
    unknown = sorted(set(data) - set(TOP_LEVEL), key=str)
    if unknown:
        raise UserError(f"unknown field {quote(unknown[0])}; a manifest has {', '.join(TOP_LEVEL)}")
    model, revision = data.get("model"), data.get("revision")
    if model is not None and (not isinstance(model, str) or not model):
        raise UserError(f"model must be a folder, Hub id, .gguf file or 'default', got {model!r:.60}")
    if given and model is not None and not _same_model(given, model):
        raise UserError(f"names model {quote(model)}, the command line {quote(given)}; drop MODEL or edit the manifest")
    model = given or model or "default"
    if revision is not None and not isinstance(revision, str):
        raise UserError(f"revision must be a string or null, got {revision!r:.60}")
    base_model = data.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise UserError(f"base_model must be a Hub id (owner/name) or null, got {base_model!r:.60}")
    cal = dict(_section(data, "calibration"))
    calib_path = cal.pop("path", None)
    if calib_path is not None and not isinstance(calib_path, str):
        raise UserError(f"calibration: path must be a file name, got {calib_path!r:.60}")
    counts = resolve_params("calibration", CALIBRATION, cal, strict=True)
    detection = resolve_params("detection", DETECTION, _section(data, "detection"), strict=True)
    recipes = []
    for k, r in enumerate(data["recipes"]):
        if isinstance(r, str):
            recipes.append((r, {}))
        elif isinstance(r, dict) and isinstance(r.get("name"), str) and set(r) <= {"name", "params"}:
            recipes.append((r["name"], r.get("params")))
        else:
            raise UserError(f"recipes[{k}] must be a recipe name or {{name: ..., params: {{...}}}}, got {r!r:.60}")
    return Manifest(
        model=model,
        revision=revision,
        base_model=explicit(base_model, "base_model").id if base_model else None,
        calibration=CalibrationSpec(path=(path.parent / calib_path).resolve() if calib_path else None, **counts),
        detection=DetectParams(**detection),
        recipes=resolve_recipes(recipes, strict=True),
    )
