#!/usr/bin/env python
"""The last words of `make demo`: one readable summary of the budgeted patch and what verify measured.

    python scripts/demo_summary.py out        # reads out/smollm2-budget/provenance.json and out/verify.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from melsurgery.checkpoint.provenance import Provenance
    from melsurgery.formats.wording import budget_text, change_text, count
    from melsurgery.search.records import setting
    from melsurgery.search.space import setting_text

    out = Path((argv or sys.argv[1:] or ["out"])[0])
    prov = Provenance.read(out / "smollm2-budget")
    s = prov.search
    if s is None:
        raise SystemExit(f"{out / 'smollm2-budget'}: not a budgeted patch (no search record in provenance.json)")
    h, t = s.figures_heldout, s.figures_tuning
    v = json.loads((out / "verify.json").read_text())
    folds = all(r.folds for r in prov.recipes)
    whole = ": the whole embedded text, both halves" if v["text"] == "melsurgery:eval.txt" else ""
    what = setting_text(setting([(r.name, r.params) for r in prov.recipes]))
    lines = [
        "",
        f"==== melsurgery demo: the budgeted patch of {prov.source.get('id')} ====",
        f"budget: {budget_text(s.budget['max_kl'], s.budget['max_ppl_increase'])}, checked on held-out text "
        f"({s.heldout['text']}, {count(s.heldout['windows'], 'window')}, {s.heldout['tokens']} tokens)",
        f"search: {s.study['trials']} trials over {', '.join(s.space['recipes'])} and their compositions, on the "
        f"tuning text ({s.tuning['text']}, {count(s.tuning['windows'], 'window')}); {s.study['candidates']} "
        "re-measured on the held-out text",
        f"chosen (trial #{s.trial}): {what}",
        "  " + ("folded into the weights: a stock checkpoint" if folds else
                "a custom layer (wemask): loads with trust_remote_code=True, melsurgery.load() or vLLM beside "
                "melsurgery; refused elsewhere"),
        f"result on the held-out text: attention sink after the ME Layer (mean over layers {s.sink_layers}) "
        f"{h['sink_base']:.3f} -> {h['sink_patched']:.3f} ({change_text(h['sink_reduction_pct'])})",
        f"  at the cost of KL(base || patched) {h['kl_mean']:.4f} per token; perplexity {h['ppl_base']:.2f} -> "
        f"{h['ppl_patched']:.2f} ({h['ppl_increase_pct']:+.1f}%)",
        f"  (on the tuning text: sink {change_text(t['sink_reduction_pct'])}, KL {t['kl_mean']:.4f})",
        f"verify of the written checkpoint ({v['text']}{whole}, {count(v['windows'], 'window')}, "
        f"{v['tokens']} tokens): sink (layers {v['sink_layers_from']}-{len(v['sink_base']) - 1}) "
        f"{change_text(v['sink_reduction_pct'])}, KL {v['kl_mean']:.4f}, perplexity {v['ppl_increase_pct']:+.1f}%",
        f"plots: {out / 'scan.png'} (where the massive activation emerges), {out / 'search.png'} (the search), "
        f"{out / 'verify.png'} (per layer, base vs patched)",
        *generation_lines(v),
        *loading_lines(out / "smollm2-budget", folds),
    ]
    print("\n".join(lines))
    return 0


def generation_lines(v: dict) -> list[str]:
    """verify's greedy generations, base and patched side by side (or why there are none)."""
    if not v["generations"]:
        return ["", v["generations_note"] or "no generations (verify ran with --generations 0)"]
    lines = ["", "greedy generations, base vs patched (as verify printed them):"]
    for g in v["generations"]:
        lines += [f"  prompt:  {g['prompt']}", f"  base:    {g['base'].strip()[:160]!r}",
                  f"  patched: {g['patched'].strip()[:160]!r}"]
    return lines


def loading_lines(folder: Path, folds: bool) -> list[str]:
    """The demo's last lines: the folder written and how to load and run it."""
    load = ("model = AutoModelForCausalLM.from_pretrained(path); tok = AutoTokenizer.from_pretrained(path)"
            if folds else "model, tok = melsurgery.load(path)   # the custom layer, without trust_remote_code")
    head = ("from transformers import AutoModelForCausalLM, AutoTokenizer" if folds else "import melsurgery")
    return ["", f"wrote {folder}; load and run it with:",
            f"  {head}; path = {str(folder)!r}",
            f"  {load}",
            '  ids = tok("The capital of France is", return_tensors="pt").input_ids; '
            "print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))"]


if __name__ == "__main__":
    raise SystemExit(main())
