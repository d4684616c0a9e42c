"""Manifests: YAML files that name a model, its calibration and its recipes, so a patch is reproducible."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .basemodel import explicit
from .detect import DetectParams
from .errors import UserError
from .recipes import resolve_recipes
from .scan import CalibrationSpec


@dataclass
class Manifest:
    model: str = "default"
    revision: str | None = None
    base_model: str | None = None  # the Hub id for the card's base_model, when it cannot be detected
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    detection: DetectParams = field(default_factory=DetectParams)
    recipes: list[tuple[str, dict]] = field(default_factory=list)

    def to_dict(self) -> dict:
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
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_manifest(path: Path) -> Manifest:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read manifest ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), list) or not data["recipes"]:
        raise UserError(f"{path}: a manifest needs a 'recipes' list (see manifests/ for examples)")
    try:
        cal = dict(data.get("calibration") or {})
        if cal.get("path"):
            cal["path"] = (Path(path).parent / cal["path"]).resolve()
        recipes = []
        for r in data["recipes"]:
            if isinstance(r, str):
                recipes.append((r, {}))
            else:
                recipes.append((str(r["name"]), dict(r.get("params") or {})))
        return Manifest(
            model=str(data.get("model", "default")),
            revision=data.get("revision"),
            base_model=explicit(str(data["base_model"]), "base_model").id if data.get("base_model") else None,
            calibration=CalibrationSpec(**cal),
            detection=DetectParams(**(data.get("detection") or {})),
            recipes=resolve_recipes(recipes),
        )
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except (TypeError, KeyError) as exc:
        raise UserError(f"{path}: invalid manifest ({exc})") from None
