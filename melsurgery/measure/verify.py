"""`verify`: measure what a patch did, base versus patched, on held-out text.

Streaming and paired: each base decoder layer is loaded once and runs both hidden-state streams, the
patched one with the patched checkpoint's differing tensors and its WeMask hooks. Memory is one layer
plus the activations, whatever the model size. Massive tokens, the sink and the sink rate are
defined in `melsurgery.measure`, exactly as `scan` uses them. Only greedy generation loads whole
models, and only when both fit.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from melsurgery.architectures import family_for
from melsurgery.calibrate.stats import LayerStats
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.provenance import Provenance
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import load_tokenizer, render_chat
from melsurgery.engines.modeling_melsurgery import CONFIG_KEY
from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import read_text
from melsurgery.measure.definitions import find_massive, layer_stats, sink, sink_rate, top_k_for
from melsurgery.measure.probes import Probe
from melsurgery.params import DetectParams

GEN_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "List three prime numbers greater than 10.",
]


@dataclass(frozen=True)
class Gates:
    """Publishing gates: a patch passes when every given limit holds (NaN never passes)."""

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
            if x is None and key == "sink_reduction_pct":
                bad.append("no massive tokens in the base on this text: --min-sink-reduction cannot be checked")
            elif not isinstance(x, int | float) or not math.isfinite(x):
                bad.append(f"{what} is {x} (not a finite number), so {flag} {limit:g} cannot hold")
            elif fails(x, limit):
                bad.append(f"{what} {x:.4g} {'>' if flag.startswith('--max') else '<'} {flag} {limit:g}")
        return bad


def eval_text(path: Path | None) -> tuple[str, str]:
    """The held-out text and its label: a file, or the embedded Hamlet excerpt."""
    if path is None:
        embedded = resources.files("melsurgery.data").joinpath("eval.txt")
        return embedded.read_text(encoding="utf-8"), "melsurgery:eval.txt"
    raw = read_text(path, "evaluation text")
    if not raw.strip():
        raise UserError(f"{path}: the evaluation text is empty")
    return raw, str(path)


@dataclass(frozen=True)
class Windows:
    """Evaluation windows: each starts with the tokenizer's special prefix (`prefix` ids, e.g. BOS)."""

    ids: list[list[int]]
    prefix: list[int]

    @property
    def first_target(self) -> int:
        """The first position whose token is predicted and scored: the prefix is context, never a target."""
        return max(len(self.prefix), 1)


def special_prefix(tok) -> list[int]:
    """The ids the tokenizer puts before any text (BOS where the model uses one), as calibration gets them."""
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    full = list(tok("a")["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


def make_windows(tok, raw: str, size: int, limit: int | None) -> Windows:
    """Cut the text's tokens into windows of `size` tokens, each one the special prefix plus text."""
    prefix = special_prefix(tok)
    body = size - len(prefix)
    if body < 1:
        raise UserError(f"--max-tokens {size}: the tokenizer's special prefix alone has {len(prefix)} tokens")
    ids = list(tok(raw, add_special_tokens=False)["input_ids"])
    chunks = [prefix + ids[i : i + body] for i in range(0, len(ids), body)]
    first = max(len(prefix), 1)
    chunks = [c for c in chunks if len(c) > first]
    return Windows(chunks[:limit] if limit else chunks, prefix)


HEAD_ROWS = 8192  # LM-head rows (vocabulary entries) scored at a time


class _Online:
    """Log-softmax figures of one stream over vocabulary blocks, without holding a whole logit row."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.m = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        self.s = torch.zeros(n, dtype=torch.float64, device=device)
        self.best = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        self.arg = torch.zeros(n, dtype=torch.long, device=device)
        self.target = torch.zeros(n, dtype=torch.float64, device=device)

    def add(self, z: torch.Tensor, lo: int, targets: torch.Tensor) -> None:
        """Fold in logits z [n, B] of vocabulary entries lo..lo+B-1."""
        top, where = z.max(-1)
        new = torch.maximum(self.m, top)
        self.s = self.s * torch.exp(self.m - new) + torch.exp(z - new[:, None]).sum(-1)
        self.m = new
        better = top > self.best
        self.best = torch.where(better, top, self.best)
        self.arg = torch.where(better, where + lo, self.arg)
        inside = (targets >= lo) & (targets < lo + z.shape[1])
        picked = z.gather(1, (targets - lo).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
        self.target = torch.where(inside, picked, self.target)

    @property
    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte-identical (dtype, shape and every bit)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _check_pair(base: Checkpoint, patched: Checkpoint) -> None:
    """A patched checkpoint holds the base's tensors, with the same dtypes and shapes."""
    only = sorted(set(base.names()) ^ set(patched.names()))
    if only:
        raise UserError(f"{patched.folder}: not a patch of {base.folder}: tensor names differ ({quote(only[0])} is in "
                        "one only); compare them with `melsurgery diff`")
    for name in base.names():
        a, b = base.info(name), patched.info(name)
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            raise UserError(f"{patched.folder}: not a patch of {base.folder}: {name} is {b.dtype} {list(b.shape)} "
                            f"there, {a.dtype} {list(a.shape)} in the base")


def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else None


def run_verify(base: Path, patched: Path, *, text: Path | None = None, max_tokens: int = 512,
               max_windows: int | None = None, device: str = "cpu", dtype: torch.dtype | None = torch.float32,
               generations: int = 3, max_new_tokens: int = 40, progress: bool = False,
               params: DetectParams | None = None, claimed_edits: list[str] | None = None) -> dict:
    """Base versus patched on held-out text, streaming: one decoder layer in memory serves both models.

    Each base layer is read once; the patched stream runs it with the patched checkpoint's differing
    tensors swapped in (and its WeMask hooks), so the patched checkpoint is read once too, tensor by
    tensor, which also tells which tensors differ. The LM head is scored in vocabulary blocks.

    `params`: the detection thresholds of the patch's scan; `claimed_edits`: the tensors the patch says it
    changed (checked against those that differ). Where not given, they come from the patched folder's
    provenance.json when it has one; else the default thresholds, and no claim to check.
    """
    unreadable = None  # why the patched folder's provenance.json could not be used, when it could not
    if params is None or claimed_edits is None:
        try:
            record = Provenance.find(Path(patched))
        except UserError as exc:  # measured without it, and said so in the report
            record, unreadable = None, str(exc)
        if record is not None:
            params = params or record.detect_params
            claimed_edits = record.edited_tensors if claimed_edits is None else claimed_edits
    start = time.perf_counter()
    raw, text_name = eval_text(text)
    bckpt, pckpt = Checkpoint(base), Checkpoint(patched)
    _check_pair(bckpt, pckpt)
    family = family_for(bckpt.config)
    dtype = dtype or bckpt.float_dtype
    tok = load_tokenizer(Path(base))
    win = make_windows(tok, raw, max_tokens, max_windows)
    if not win.ids:
        raise UserError(f"{text_name}: too short to evaluate")
    model = StreamingModel(bckpt, family, device, dtype)
    changed: set[str] = set()

    def differs(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
        if _same(a, b):
            return False
        changed.add(name)
        return True

    def patched_edits(i: int, base_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = family.prefix(i)
        edits = {}
        for name, t in base_layer.items():
            other = pckpt.load(prefix + name)
            if differs(prefix + name, t, other):
                edits[name] = other
        return edits

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=model.num_layers + 1, desc="verify", unit="layer", leave=False)
    try:
        embed_changed = _differs_by_rows(bckpt, pckpt, family.embed, differs)
        base_states = model.embed(win.ids)
        streams = [Stream(base_states),
                   Stream(model.embed(win.ids, pckpt) if embed_changed else list(base_states), edits=patched_edits,
                          wemask=pckpt.config.get(CONFIG_KEY))]
        k = top_k_for(len(win.ids))
        stats: list[list[LayerStats]] = [[], []]

        def observe(i: int, s: int, inputs: list, outputs: list, probe: Probe) -> None:
            stats[s].append(layer_stats(i, outputs, k, probe.key_attention, _mean(probe.similarity)))

        run_layers(model, streams, probe=lambda layer: Probe(layer, family, similarity=True), observe=observe,
                   progress=bar.update if bar else None)
        scores = _score_head(model, bckpt, pckpt, [s.states for s in streams], win, differs)
        _compare_rest(bckpt, pckpt, family, model.num_layers, differs)
        if bar:
            bar.update(1)
    finally:
        if bar:
            bar.close()

    found = find_massive(stats[0], params or DetectParams())
    tokens = found.tokens
    result = {
        "text": text_name,
        "windows": len(win.ids),
        "tokens": sum(len(w) for w in win.ids),
        "window_prefix": tok.convert_ids_to_tokens(win.prefix),
        **scores,
        "me_layer": found.me_layer,
        "massive_positions": [[q for s, q in tokens if s == w] for w in range(len(win.ids))],
    }
    for key, which in (("base", 0), ("patched", 1)):
        result[f"sink_{key}"] = [sink(layer, tokens) for layer in stats[which]]
        result[f"sink_rate_{key}"] = [sink_rate(layer, tokens) for layer in stats[which]]
        result[f"max_abs_{key}"] = [layer.max_abs for layer in stats[which]]
        result[f"ratio_{key}"] = [layer.ratio if math.isfinite(layer.ratio) else None for layer in stats[which]]
        result[f"similarity_{key}"] = [layer.similarity for layer in stats[which]]
    result["ppl_increase_pct"] = 100 * (result["ppl_patched"] / result["ppl_base"] - 1)
    first = found.me_layer + 1 if found.me_layer is not None else 0
    sb, sp = _mean(result["sink_base"][first:]), _mean(result["sink_patched"][first:])
    result.update(sink_layers_from=first, sink_mean_base=sb, sink_mean_patched=sp,
                  sink_reduction_pct=100 * (1 - sp / sb) if sb and sp is not None else None,
                  sink_rate_mean_base=_mean(result["sink_rate_base"][first:]),
                  sink_rate_mean_patched=_mean(result["sink_rate_patched"][first:]),
                  similarity_mean_base=_mean(result["similarity_base"][first:]),
                  similarity_mean_patched=_mean(result["similarity_patched"][first:]))
    result["weights"] = _weight_check(sorted(changed), claimed_edits, unreadable)
    result["no_effect"] = result["kl_max"] == 0 and not changed
    result["generations"], result["generations_note"] = _maybe_generate(bckpt, Path(base), Path(patched), tok,
                                                                        generations, max_new_tokens, device, dtype)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _differs_by_rows(a: Checkpoint, b: Checkpoint, name: str, differs) -> bool:
    """Whether a (large, 2-D) tensor differs, compared block by block so that memory stays bounded."""
    n = a.info(name).shape[0]
    return any(differs(name, a.load_row_block(name, lo, min(n, lo + HEAD_ROWS)),
                       b.load_row_block(name, lo, min(n, lo + HEAD_ROWS))) for lo in range(0, n, HEAD_ROWS))


def _score_head(model: StreamingModel, bckpt: Checkpoint, pckpt: Checkpoint, states: list[list[torch.Tensor]],
                win: Windows, differs) -> dict:
    """Final norm and LM head for both streams, in vocabulary blocks: KL, perplexity, top-1 agreement.

    Position t's distribution predicts token t+1; the targets are the tokens after the special prefix."""
    family, first = model.family, win.first_target
    norm_name = family.final_norm
    nb, np_ = bckpt.load(norm_name), pckpt.load(norm_name)
    with torch.no_grad():
        norm = model.final_norm(nb)
        hb = torch.cat([norm(h[first - 1 : -1]) for h in states[0]])
        norm = model.final_norm(np_) if differs(norm_name, nb, np_) else norm
        hp = torch.cat([norm(h[first - 1 : -1]) for h in states[1]])
        target = torch.tensor([t for ids in win.ids for t in ids[first:]], device=hb.device)
        acc_b, acc_p = _Online(len(target), hb.device), _Online(len(target), hb.device)
        cross = torch.zeros(len(target), dtype=torch.float64, device=hb.device)
        head = model.head_tensor
        vocab = bckpt.info(head).shape[0]
        for lo in range(0, vocab, HEAD_ROWS):
            hi = min(vocab, lo + HEAD_ROWS)
            rows_b = bckpt.load_row_block(head, lo, hi)
            rows_p = pckpt.load_row_block(head, lo, hi)
            if not differs(head, rows_b, rows_p):
                rows_p = rows_b
            zb = model.logits(hb, rows_b).double()
            zp = model.logits(hp, rows_p).double()
            old = acc_b.m
            acc_b.add(zb, lo, target)
            acc_p.add(zp, lo, target)
            cross = cross * torch.exp(old - acc_b.m) + (torch.exp(zb - acc_b.m[:, None]) * (zb - zp)).sum(-1)
    kl = (cross / acc_b.s - acc_b.lse + acc_p.lse).clamp(min=0)
    n = len(target)
    return {
        "scored_tokens": n,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((acc_b.arg == acc_p.arg).double().mean()),
        "ppl_base": math.exp(float((acc_b.lse - acc_b.target).mean())),
        "ppl_patched": math.exp(float((acc_p.lse - acc_p.target).mean())),
    }


def _compare_rest(bckpt: Checkpoint, pckpt: Checkpoint, family, num_layers: int, differs) -> None:
    """Compare the tensors that neither the layers nor the head and embeddings covered (none, usually)."""
    seen = (family.embed, family.final_norm, family.lm_head)
    prefixes = tuple(family.prefix(i) for i in range(num_layers))
    for name in bckpt.names():
        if name not in seen and not name.startswith(prefixes):
            differs(name, bckpt.load(name), pckpt.load(name))


def _maybe_generate(ckpt: Checkpoint, base: Path, patched: Path, tok, n: int, max_new_tokens: int, device: str,
                   dtype: torch.dtype) -> tuple[list[dict], str | None]:
    """Greedy generations need both whole models: run them only when both fit, else say why not."""
    if n == 0:
        return [], None
    need = 2 * sum(math.prod(ckpt.info(t).shape) for t in ckpt.names()) * torch.finfo(dtype).bits // 8
    have = _free_memory(device)
    if need > 0.8 * have:
        return [], (f"generations skipped: they need both whole models ({need / 1e9:.1f} GB in {dtype}), "
                    f"more than the {have / 1e9:.1f} GB free on {device}")
    from melsurgery.engines.loading import load

    mb, _ = load(base, device=device, dtype=dtype)
    mp, _ = load(patched, device=device, dtype=dtype)
    return _generate(mb, mp, tok, n, max_new_tokens, device), None


def _free_memory(device: str) -> int:
    """Bytes a new allocation can get: free device memory, or MemAvailable (page cache counts as free)."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _generate(mb, mp, tok, n: int, max_new_tokens: int, device: str) -> list[dict]:
    out = []
    for prompt in GEN_PROMPTS[:n]:
        if getattr(tok, "chat_template", None):
            text = render_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
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


def _weight_check(changed: list[str], claimed: list[str] | None, unreadable: str | None) -> dict:
    """The tensors that differ, against those the patch claims to have changed (None: no claim), and why a
    provenance.json present could not be read (None: read, or absent)."""
    if claimed is not None:
        claimed = sorted(set(claimed))
    return {"changed": changed, "provenance_edits": claimed,
            "matches_provenance": None if claimed is None else claimed == changed,
            "provenance_unreadable": unreadable}


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def measurements_for_card(r: dict) -> dict:
    """The headline figures, as (base, patched) pairs for the model card and provenance."""
    layers = f"layers {r['sink_layers_from']}+"
    return {
        f"attention sink (mean, {layers})": (_f(r["sink_mean_base"], ".3f"), _f(r["sink_mean_patched"], ".3f")),
        f"attention-input similarity (mean, {layers})": (_f(r["similarity_mean_base"], ".3f"),
                                                        _f(r["similarity_mean_patched"], ".3f")),
        "perplexity (held-out text)": (f"{r['ppl_base']:.2f}", f"{r['ppl_patched']:.2f}"),
        "KL(base, patched), mean per token": ("0", f"{r['kl_mean']:.4f}"),
        "top-1 agreement with base": ("1", f"{r['top1_agreement']:.3f}"),
        "max |h| (largest layer)": (f"{max(r['max_abs_base']):.0f}", f"{max(r['max_abs_patched']):.0f}"),
    }


def verify_report(r: dict) -> str:
    """The human-readable verify report."""
    prefix = f", each opening with {''.join(r['window_prefix'])!r}" if r["window_prefix"] else ""
    lines = [f"held-out text: {r['text']}, {r['windows']} windows{prefix}, {r['tokens']} tokens, "
             f"{r['scored_tokens']} scored ({r['seconds']:.1f} s)",
             "massive tokens (base, on this text): " + (
                 f"ME Layer {r['me_layer']}, positions {sorted({q for w in r['massive_positions'] for q in w})}"
                 if r["me_layer"] is not None else "none: the sink is not measured"), "",
             f"{'layer':>5} {'max|h| base':>12} {'patched':>10} {'ratio base':>11} {'patched':>9} "
             f"{'sink base':>10} {'patched':>8} {'rate base':>10} {'patched':>8} {'sim base':>9} {'patched':>8}"]
    for i in range(len(r["sink_base"])):
        lines.append(f"{i:>5} {r['max_abs_base'][i]:>12,.1f} {r['max_abs_patched'][i]:>10,.1f} "
                     f"{_f(r['ratio_base'][i], ',.0f'):>11} {_f(r['ratio_patched'][i], ',.0f'):>9} "
                     f"{_f(r['sink_base'][i], '.3f'):>10} {_f(r['sink_patched'][i], '.3f'):>8} "
                     f"{_f(r['sink_rate_base'][i], '.2f'):>10} {_f(r['sink_rate_patched'][i], '.2f'):>8} "
                     f"{_f(r['similarity_base'][i], '.3f'):>9} {_f(r['similarity_patched'][i], '.3f'):>8}")
    reduction = "" if r["sink_reduction_pct"] is None else f" ({r['sink_reduction_pct']:+.1f}% reduction)"
    lines += ["",
              f"perplexity: base {r['ppl_base']:.2f}, patched {r['ppl_patched']:.2f} ({r['ppl_increase_pct']:+.2f}%)",
              f"KL(base || patched): mean {r['kl_mean']:.4f}, max {r['kl_max']:.4f}; top-1 agreement "
              f"{100 * r['top1_agreement']:.1f}%",
              f"attention sink (mean over layers {r['sink_layers_from']}+): base {_f(r['sink_mean_base'], '.3f')}, "
              f"patched {_f(r['sink_mean_patched'], '.3f')}{reduction}; sink rate base "
              f"{_f(r['sink_rate_mean_base'], '.2f')}, patched {_f(r['sink_rate_mean_patched'], '.2f')}",
              f"attention-input similarity (mean over layers {r['sink_layers_from']}+, lower is more diverse): base "
              f"{_f(r['similarity_mean_base'], '.3f')}, patched {_f(r['similarity_mean_patched'], '.3f')}"]
    w = r["weights"]
    lines.append(f"tensors that differ: {len(w['changed'])} ({', '.join(w['changed'][:6])}"
                 f"{', ...' if len(w['changed']) > 6 else ''})")
    if w["matches_provenance"] is not None:
        lines.append("  matches provenance.json edits" if w["matches_provenance"] else
                     f"  DOES NOT match provenance.json edits {w['provenance_edits']}")
    if w["provenance_unreadable"]:
        lines.append("  provenance.json is unreadable, so no claim was checked and the default detection thresholds "
                     f"were used: {w['provenance_unreadable']}")
    if r["no_effect"]:
        lines.append("THIS PATCH CHANGED NOTHING: no tensor differs and KL(base || patched) is 0 on every token "
                     "(a custom layer that selects no token does nothing)")
    if r["generations_note"]:
        lines += ["", r["generations_note"]]
    for g in r["generations"]:
        lines += ["", f"prompt: {g['prompt']}", f"  base:    {g['base'].strip()[:200]!r}",
                  f"  patched: {g['patched'].strip()[:200]!r}"]
    return "\n".join(lines)
