"""The model card (README.md) of a patched checkpoint: YAML front matter plus what was done and measured."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from melsurgery.checkpoint.basemodel import BaseModelId, Origin
from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import quote
from melsurgery.formats import yamlsafe
from melsurgery.formats.wording import count, spans
from melsurgery.hub.metadata import hub_licenses
from melsurgery.outputs import MODEL_CARD
from melsurgery.version import __version__


def front_matter(text: str) -> dict:
    """A card's YAML front matter as a mapping ({} when there is none); ValueError when it is broken."""
    if not text.startswith("---"):
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", text, re.S)
    if not m:
        raise ValueError("the YAML front matter is not closed by a '---' line")
    try:
        meta = yamlsafe.load(m.group(1))
    except yamlsafe.YAMLRefused as exc:
        raise ValueError(f"the YAML front matter {exc}") from None
    if meta is not None and not isinstance(meta, dict):
        raise ValueError("the YAML front matter is not a mapping")
    return meta or {}


def base_license(folder: Path) -> tuple[dict, str | None]:
    """The licence fields of the base model's card that the Hub accepts, and a licence it would refuse.

    `license` (with `license_name` / `license_link` when it is `other`) is carried over when the Hub
    knows the id; an unknown one (e.g. 'Apache 2.0') is returned apart, for the card's text."""
    card = folder / MODEL_CARD
    try:
        meta = front_matter(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else {}
    except ValueError:  # a broken base card: nothing to carry over
        meta = {}
    lic = meta.get("license")
    if not lic:
        return {}, None
    if not (isinstance(lic, str) and lic in hub_licenses()):
        return {}, str(lic)
    fields = {"license": lic}
    if lic == "other":
        fields.update({k: meta[k] for k in ("license_name", "license_link") if isinstance(meta.get(k), str)})
    return fields, None


def _inline(text: str) -> str:
    """A name safe inside inline code: no backticks, no control characters."""
    return "".join(c if c.isprintable() and c != "`" else "'" for c in text)


def source_phrase(origin: Origin, base: BaseModelId | None, *, converted: bool) -> str:
    """The exact source as a noun phrase: which file or folder, its quantization type and conversion, and the Hub
    model it holds ("the Q4_1 GGUF `x.gguf` of [owner/name](...), dequantized to float32 by transformers")."""
    link = f"[{base.id}](https://huggingface.co/{base.id})" if base is not None else None
    name = f"`{_inline(origin.name)}`"
    if origin.kind == "gguf":
        others = f" (its other weight matrices {origin.other_types})" if origin.other_types else ""
        of = f" of {link}" if link else ""
        done = f", {origin.conversion}" if converted and origin.conversion else ""
        return f"the {origin.quantization} GGUF {name}{others}{of}{done}"
    rev = f" at revision `{_inline(origin.revision)}`" if origin.revision else ""
    if origin.kind == "hub":
        return f"{link or name}, its safetensors weights from the Hub{rev}"
    if origin.kind == "hf-cache":
        return f"{link or name}, its safetensors weights from the Hugging Face cache{rev}"
    return f"the local model folder {name}" + (f", whose Hub model is {link}" if link else "")


def identical_to(origin: Origin, base: BaseModelId | None, *, converted: bool) -> str:
    """What the untouched tensors are byte-identical to: the weights melsurgery read, not what they came from."""
    if origin.kind == "gguf" and converted:
        original = f" (not to the original weights of {base.id})" if base is not None else ""
        return f"the float32 dequantization of `{_inline(origin.name)}`{original}"
    if origin.kind == "gguf":
        return f"`{_inline(origin.name)}`"
    return "the source's"


def render_card(*, base: BaseModelId | None, origin: Origin, license: dict, unknown_license: str | None = None,
                plans: list, scan: ScanResult, applied: list, custom_layer: bool,
                measurements: dict | None = None, gguf_file: str | None = None, search=None,
                deferred_sources: int = 0) -> str:
    """README.md: front matter the Hub accepts (no `base_model` unless a valid id is known) and the story.

    `origin` is exactly what was read (its first sentence and `melsurgery_source` metadata). `base_model_relation`
    is `quantized` for a GGUF output (a quantization of the base model, some blocks edited) and left out
    otherwise: an edit of some tensors without training is none of adapter, merge, quantized or finetune.
    `gguf_file` names the patched GGUF of a GGUF output folder (loading instructions, tags); `search` (a
    provenance.SearchRecord) says how a budgeted patch was chosen and what it measured; `deferred_sources`: source
    weight files whose sha256 patch left to push."""
    recipes = [p.recipe for p in plans]
    converted = gguf_file is None
    meta: dict = {}
    if base is not None:
        meta.update(base_model=base.id, **({"base_model_relation": "quantized"} if gguf_file else {}))
    meta.update(library_name="gguf" if gguf_file else "transformers",
                tags=["melsurgery", "massive-activations", *(["gguf"] if gguf_file else []), *recipes], **license,
                melsurgery_source=origin.to_meta())
    effect = (f"The ME Layer (the layer where the massive activations emerge) is layer {scan.me_layer}; "
              f"{'massive dim' if len(scan.massive_dims) == 1 else 'massive dims'} {spans(scan.massive_dims)}.")
    intro = (f"This checkpoint is {source_phrase(origin, base, converted=converted)}, with its massive activations "
             f"mitigated by melsurgery {__version__}. {effect}")
    if base is not None:
        title = base.id.split("/")[-1]
        intro += f" Base model id from {base.origin}."
    else:
        title = _inline(origin.name)
        intro += (" Its Hub id is unknown, so this card names no `base_model`; `provenance.json` describes the "
                  "source in full.")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {title} + melsurgery ({', '.join(recipes)})", "", intro, ""]
    if unknown_license:
        lines += [f"The base model's card names the licence {quote(unknown_license)}, which is not a "
                  "licence id the Hub "
                  "knows, so this card carries no `license`: the base model's terms apply.", ""]
    lines += ["## What was done", ""]
    lines += [f"- {p.summary}" for p in plans]
    assumed = [p.assumes for p in plans if getattr(p, "assumes", "")]
    if assumed:
        lines += ["", "## Input this patch assumes", ""] + [f"- The patch assumes that {a}." for a in assumed]
    same = identical_to(origin, base, converted=converted)
    lines += ["", f"Edited tensors (all others are byte-identical to {same}):", ""]
    lines += [f"- `{a.tensor}`: {count(a.changed, 'entry', 'entries')} changed, max |delta| {a.max_abs_delta:.4g}"
              for a in applied] or [
        "- none"]
    lines += ["", "## Loading", ""]
    if gguf_file:
        wider = [f"`{a.tensor}` ({a.type} to {a.written_type})" for a in applied if a.written_type != a.type]
        types = f", except {', '.join(wider)}, written in a wider type to carry the edit" if wider else ""
        lines += [f"`{_inline(gguf_file)}` is the base GGUF with only the edited tensors changed: same metadata (plus "
                  f"`melsurgery.*` keys), tensor order, names, shapes and quantisation types{types}. Quantised "
                  "tensors kept in their type were requantised only in the blocks holding edited entries.", "",
                  "```bash",
                  f"llama-cli -m {gguf_file}", "```", "", "```python",
                  "from transformers import AutoModelForCausalLM",
                  f'model = AutoModelForCausalLM.from_pretrained(path, gguf_file="{gguf_file}")', "```"]
    elif custom_layer:
        lines += ["This checkpoint carries a small custom layer (token-selective masking cannot be folded into "
                  "weights), configured in `config.json` (`melsurgery_wemask`). It declares the model type "
                  "`melsurgery`, so an engine that would run it without the layer refuses it instead:", "",
                  "```python", "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
                  "# or, without remote code: import melsurgery; model, tokenizer = melsurgery.load(path)", "```", "",
                  "vLLM serves it through melsurgery's plugin (`pip install melsurgery` beside vLLM; nothing else "
                  "to pass). It has no GGUF form: llama.cpp cannot select tokens at run time.", "", "```bash",
                  "vllm serve path", "```"]
    else:
        lines += ["Only folded edits: a stock checkpoint.", "", "```python",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(path)", "```"]
    if measurements:
        lines += ["", "## Measured effect", "", "| metric | base | patched |", "|---|---|---|"]
        for key, (before, after) in measurements.items():
            lines.append(f"| {key} | {before} | {after} |")
    if search is not None:
        lines += search_lines(search)
    lines += ["", "Provenance (inputs, recipe, scan, output hashes): `provenance.json`."]
    if deferred_sources:
        lines += ["", f"The source's {deferred_sources} weight file{'s' * (deferred_sources > 1)} had no trusted "
                  "sha256 when patched (a plain folder: no `.sha256` sidecar, not a Hugging Face cache), so `patch` "
                  "did not read them whole: `provenance.json` records each by its size, mtime and inode and by the "
                  "sha256 of the bytes the edits replaced, and `melsurgery push` hashes the source (refusing one "
                  "that changed since), compares it with the output and records both files' sha256."]
    lines.append("")
    return "\n".join(lines)


def search_lines(search) -> list[str]:
    """The card's account of a budgeted patch: the budget, the search, and the held-out figures with their
    definitions (which layers, which text, how many windows)."""
    from melsurgery.formats.wording import budget_text, change_text

    budget = budget_text(search.budget["max_kl"], search.budget["max_ppl_increase"])
    st, tu, ho = search.study, search.tuning, search.heldout
    f, t = search.figures_heldout, search.figures_tuning
    held = (f"{_inline(ho['text'])}, {count(ho['windows'], 'window')} of up to {ho['max_tokens']} tokens "
            f"({count(ho['tokens'], 'token')})")
    payoff = search.objective not in ("sink", "ratio")
    aim = f"{search.objective} penalty removal" if payoff else "sink cut"
    lines = ["", "## How this patch was chosen", "",
             f"`melsurgery patch --max-kl` searched {count(st['trials'], 'setting')} of "
             f"{', '.join(search.space['recipes'])} "
             f"and their compositions (Optuna {st['sampler']}, seed {st['seed']}) on a tuning text "
             f"({_inline(tu['text'])}, {count(tu['windows'], 'window')}, {count(tu['tokens'], 'token')}), "
             "re-measured the "
             f"{st['candidates']} largest {aim}s within {st['slack']:g}x the budget on held-out text ({held}), and "
             f"chose trial #{search.trial}: the largest {aim} whose held-out figures are within the budget "
             f"({budget}).",
             "", "| figure (held-out text) | base | patched |", "|---|---|---|",
             f"| attention sink, mean over layers {search.sink_layers} (after the ME Layer) | {f['sink_base']:.3f} | "
             f"{f['sink_patched']:.3f} ({change_text(f['sink_reduction_pct'])}) |",
             f"| KL(base \\|\\| patched), mean per scored token | 0 | {f['kl_mean']:.4f} |",
             f"| perplexity | {f['ppl_base']:.2f} | {f['ppl_patched']:.2f} ({f['ppl_increase_pct']:+.1f}%) |", "",
             f"On the tuning text the same setting measured sink {change_text(t['sink_reduction_pct'])} at KL "
             f"{t['kl_mean']:.4f}. Computed in {search.compute['dtype']} on {search.compute['device']}."]
    if payoff:
        span = ("" if f.get("payoff_low") is None else
                f", 95% interval {f['payoff_low']:+.1f} to {f['payoff_high']:+.1f} over held-out windows")
        how = (f"first token evicted from a {st['payoff_window']}-key window" if "payoff_window" in st else
               "int8 activations, one scale per tensor")
        lines.insert(-2, f"| {search.objective} penalty: perplexity change with {how}, against the plain forward "
                         f"(the objective; see docs/payoff.md) | {f['payoff_base']:+.1f}% | "
                         f"{f['payoff_patched']:+.1f}% ({f['payoff_removed']:+.1f} points removed{span}) |")
    return lines
