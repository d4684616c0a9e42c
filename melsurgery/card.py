"""The model card (README.md) of a patched checkpoint: YAML front matter plus what was done and measured."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from . import __version__


def base_license(folder: Path) -> str | None:
    """The licence named in the base model's card front matter, if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    m = re.match(r"^---\s*\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def render_card(*, base_id: str, license: str | None, plans: list, scan: dict, applied: list,
                custom_layer: bool, measurements: dict | None = None) -> str:
    recipes = [p.recipe for p in plans]
    meta = {
        "base_model": base_id,
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "tags": ["melsurgery", "massive-activations", *recipes],
    }
    if license:
        meta["license"] = license
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {base_id.split('/')[-1]} + melsurgery ({', '.join(recipes)})", "",
             f"This checkpoint is [{base_id}](https://huggingface.co/{base_id}) with its massive activations "
             f"mitigated by melsurgery {__version__}. The ME Layer (the layer where the massive activations "
             f"emerge) is layer {scan.get('me_layer')}; massive dims {scan.get('massive_dims')}.", "",
             "## What was done", ""]
    lines += [f"- {p.summary}" for p in plans]
    lines += ["", "Edited tensors (all others are byte-identical to the base):", ""]
    lines += [f"- `{a.tensor}`: {a.changed} entries changed, max |delta| {a.max_abs_delta:.4g}" for a in applied] or [
        "- none"]
    lines += ["", "## Loading", ""]
    if custom_layer:
        lines += ["This checkpoint carries a small custom layer (token-selective masking cannot be folded into "
                  "weights), configured in `config.json` (`melsurgery_wemask`):", "", "```python",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
                  "# or, without remote code: import melsurgery; model, tokenizer = melsurgery.load(path)", "```"]
    else:
        lines += ["Only folded edits: a stock checkpoint.", "", "```python",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(path)", "```"]
    if measurements:
        lines += ["", "## Measured effect", "", "| metric | base | patched |", "|---|---|---|"]
        for key, (base, patched) in measurements.items():
            lines.append(f"| {key} | {base} | {patched} |")
    lines += ["", "Provenance (inputs, recipe, scan, output hashes): `provenance.json`.", ""]
    return "\n".join(lines)
