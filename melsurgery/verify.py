"""`verify`: measure what a patch did, base versus patched, on held-out text.

Whole models are loaded here (evaluation is the one place that may), with eager attention so that
attention weights, and hence the sink score, are observable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import UserError

GEN_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "List three prime numbers greater than 10.",
]


@dataclass(frozen=True)
class Gates:
    max_kl: float | None = None
    max_ppl_increase: float | None = None  # percent
    min_sink_reduction: float | None = None  # percent

    def check(self, r: dict) -> list[str]:
        """Human-readable violations (empty when every gate holds); a NaN or infinite figure never passes."""
        bad = []
        for limit, key, flag, what, fails in (
            (self.max_kl, "kl_mean", "--max-kl", "KL", lambda x, lim: x > lim),
            (self.max_ppl_increase, "ppl_increase_pct", "--max-ppl-increase", "perplexity increase %",
             lambda x, lim: x > lim),
            (self.min_sink_reduction, "sink_reduction_pct", "--min-sink-reduction", "sink reduction %",
             lambda x, lim: x < lim),
        ):
            if limit is None:
                continue
            x = r.get(key)
            if not isinstance(x, int | float) or not math.isfinite(x):
                bad.append(f"{what} is {x} (not a finite number), so {flag} {limit:g} cannot hold")
            elif fails(x, limit):
                bad.append(f"{what} {x:.4g} {'>' if flag.startswith('--max') else '<'} {flag} {limit:g}")
        return bad


def eval_text(path: Path | None) -> tuple[str, str]:
    if path is None:
        embedded = resources.files("melsurgery.data").joinpath("eval.txt")
        return embedded.read_text(encoding="utf-8"), "melsurgery:eval.txt"
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read evaluation text ({exc})") from None


def windows(ids: list[int], size: int, limit: int | None) -> list[list[int]]:
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    chunks = [c for c in chunks if len(c) >= 2]
    return chunks[:limit] if limit else chunks


class _Run:
    """One model's forward on one window: logits, per-layer residual outputs, attention weights."""

    def __init__(self, model, ids: torch.Tensor) -> None:
        layers = model.model.layers
        outs: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)
                                                                          .detach().float()[0]))
                   for layer in layers]
        try:
            with torch.no_grad():
                res = model(ids, output_attentions=True, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.logits = res.logits[0].float()
        self.states = outs  # per layer [T, D]
        self.attn = [a[0].float().mean(0) for a in res.attentions]  # per layer [T, T], mean over heads


def _massive_positions(run: _Run, abs_threshold: float = 100.0, ratio: float = 1000.0) -> list[int]:
    """Positions whose residual is massive in some layer of the base model (else position 0)."""
    found: set[int] = set()
    for h in run.states:
        a = h.abs()
        floor = max(abs_threshold, ratio * float(a.median()))
        found |= set((a.amax(-1) >= floor).nonzero().flatten().tolist())
    return sorted(found) or [0]


def _sink(attn: torch.Tensor, positions: list[int]) -> float:
    vals = [float(attn[p + 1 :, p].mean()) for p in positions if p + 1 < attn.shape[0]]
    return sum(vals) / len(vals) if vals else float("nan")


def run_verify(base: Path, patched: Path, *, text: Path | None = None, max_tokens: int = 512,
               max_windows: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               generations: int = 3, max_new_tokens: int = 40, progress: bool = False) -> dict:
    from . import load

    start = time.perf_counter()
    raw, text_name = eval_text(text)
    mb, tok = load(base, device=device, dtype=dtype, attn_implementation="eager")
    mp, _ = load(patched, device=device, dtype=dtype, attn_implementation="eager")
    ids = tok(raw)["input_ids"]
    chunks = windows(list(ids), max_tokens, max_windows)
    if not chunks:
        raise UserError(f"{text_name}: too short to evaluate")
    n_layers = len(mb.model.layers)
    kl_sum = kl_max = nll_b = nll_p = agree = count = 0.0
    per_layer = {k: [[] for _ in range(n_layers)] for k in ("sink_b", "sink_p", "max_b", "max_p", "ratio_b", "ratio_p")}
    massive_positions = []
    it = chunks
    if progress:
        from tqdm import tqdm

        it = tqdm(chunks, desc="verify", unit="window", leave=False)
    for chunk in it:
        x = torch.tensor([chunk], device=device)
        rb, rp = _Run(mb, x), _Run(mp, x)
        pos = _massive_positions(rb)
        massive_positions.append(pos)
        lb, lp = rb.logits[:-1].log_softmax(-1), rp.logits[:-1].log_softmax(-1)
        kl = (lb.exp() * (lb - lp)).sum(-1)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        target = x[0, 1:]
        nll_b += float(-lb.gather(-1, target[:, None]).sum())
        nll_p += float(-lp.gather(-1, target[:, None]).sum())
        agree += float((lb.argmax(-1) == lp.argmax(-1)).sum())
        count += len(chunk) - 1
        for i in range(n_layers):
            for key, run in (("b", rb), ("p", rp)):
                a = run.states[i].abs()
                per_layer[f"max_{key}"][i].append(float(a.max()))
                per_layer[f"ratio_{key}"][i].append(float(a.max() / a.median().clamp(min=1e-12)))
                per_layer[f"sink_{key}"][i].append(_sink(run.attn[i], pos))

    def mean(v: list[float]) -> float:
        v = [x for x in v if not math.isnan(x)]
        return sum(v) / len(v) if v else float("nan")

    result = {
        "text": text_name,
        "windows": len(chunks),
        "tokens": int(count + len(chunks)),
        "massive_positions": massive_positions,
        "kl_mean": kl_sum / count,
        "kl_max": kl_max,
        "top1_agreement": agree / count,
        "ppl_base": math.exp(nll_b / count),
        "ppl_patched": math.exp(nll_p / count),
        "sink_base": [mean(v) for v in per_layer["sink_b"]],
        "sink_patched": [mean(v) for v in per_layer["sink_p"]],
        "max_abs_base": [max(v) for v in per_layer["max_b"]],
        "max_abs_patched": [max(v) for v in per_layer["max_p"]],
        "ratio_base": [mean(v) for v in per_layer["ratio_b"]],
        "ratio_patched": [mean(v) for v in per_layer["ratio_p"]],
    }
    result["ppl_increase_pct"] = 100 * (result["ppl_patched"] / result["ppl_base"] - 1)
    first = _first_sink_layer(Path(patched), n_layers)
    sb = mean(result["sink_base"][first:])
    sp = mean(result["sink_patched"][first:])
    result.update(sink_layers_from=first, sink_mean_base=sb, sink_mean_patched=sp,
                  sink_reduction_pct=100 * (1 - sp / sb) if sb else 0.0)
    result["generations"] = _generate(mb, mp, tok, generations, max_new_tokens, device)
    result["weights"] = _weight_check(Path(base), Path(patched))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _first_sink_layer(patched: Path, n_layers: int) -> int:
    """Average sinks from the layer after the ME Layer (from provenance), else over all layers."""
    try:
        me = json.loads((patched / "provenance.json").read_text())["scan"]["me_layer"]
        return min(int(me) + 1, n_layers - 1)
    except (OSError, KeyError, TypeError, ValueError):
        return 0


def _generate(mb, mp, tok, n: int, max_new_tokens: int, device: str) -> list[dict]:
    out = []
    for prompt in GEN_PROMPTS[:n]:
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
        row = {"prompt": prompt}
        for key, model in (("base", mb), ("patched", mp)):
            with torch.no_grad():
                g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            row[key] = tok.decode(g[0, ids.shape[1] :], skip_special_tokens=True)
        out.append(row)
    return out


def _weight_check(base: Path, patched: Path) -> dict:
    from .diff import diff_checkpoints

    changed = sorted(t.name for t in diff_checkpoints(base, patched).tensors if t.status != "identical")
    claimed = None
    prov = patched / "provenance.json"
    if prov.is_file():
        try:
            claimed = sorted({e["tensor"] for e in json.loads(prov.read_text())["edits"]})
        except (KeyError, TypeError, ValueError):
            claimed = None
    return {"changed": changed, "provenance_edits": claimed,
            "matches_provenance": None if claimed is None else claimed == changed}


def measurements_for_card(r: dict) -> dict:
    """The headline figures, as (base, patched) pairs for the model card and provenance."""
    return {
        f"attention sink (mean, layers {r['sink_layers_from']}+)": (f"{r['sink_mean_base']:.3f}",
                                                                    f"{r['sink_mean_patched']:.3f}"),
        "perplexity (held-out text)": (f"{r['ppl_base']:.2f}", f"{r['ppl_patched']:.2f}"),
        "KL(base, patched), mean per token": ("0", f"{r['kl_mean']:.4f}"),
        "top-1 agreement with base": ("1", f"{r['top1_agreement']:.3f}"),
        "max |h| (largest layer)": (f"{max(r['max_abs_base']):.0f}", f"{max(r['max_abs_patched']):.0f}"),
    }


def verify_report(r: dict) -> str:
    lines = [f"held-out text: {r['text']}, {r['windows']} windows, {r['tokens']} tokens ({r['seconds']:.1f} s)", "",
             f"{'layer':>5} {'max|h| base':>12} {'patched':>10} {'ratio base':>11} {'patched':>9} "
             f"{'sink base':>10} {'patched':>8}"]
    for i in range(len(r["sink_base"])):
        lines.append(f"{i:>5} {r['max_abs_base'][i]:>12,.1f} {r['max_abs_patched'][i]:>10,.1f} "
                     f"{r['ratio_base'][i]:>11,.0f} {r['ratio_patched'][i]:>9,.0f} "
                     f"{r['sink_base'][i]:>10.3f} {r['sink_patched'][i]:>8.3f}")
    lines += ["",
              f"perplexity: base {r['ppl_base']:.2f}, patched {r['ppl_patched']:.2f} ({r['ppl_increase_pct']:+.2f}%)",
              f"KL(base || patched): mean {r['kl_mean']:.4f}, max {r['kl_max']:.4f}; top-1 agreement "
              f"{100 * r['top1_agreement']:.1f}%",
              f"attention sink (mean over layers {r['sink_layers_from']}+): base {r['sink_mean_base']:.3f}, patched "
              f"{r['sink_mean_patched']:.3f} ({r['sink_reduction_pct']:+.1f}% reduction)"]
    w = r["weights"]
    lines.append(f"tensors that differ: {len(w['changed'])} ({', '.join(w['changed'][:6])}"
                 f"{', ...' if len(w['changed']) > 6 else ''})")
    if w["matches_provenance"] is not None:
        lines.append("  matches provenance.json edits" if w["matches_provenance"] else
                     f"  DOES NOT match provenance.json edits {w['provenance_edits']}")
    for g in r["generations"]:
        lines += ["", f"prompt: {g['prompt']}", f"  base:    {g['base'].strip()[:200]!r}",
                  f"  patched: {g['patched'].strip()[:200]!r}"]
    return "\n".join(lines)
