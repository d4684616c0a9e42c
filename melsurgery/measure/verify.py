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

from melsurgery.architectures import Family, family_for
from melsurgery.calibrate.stats import LayerStats
from melsurgery.calibrate.streaming import Stream, StreamingModel, run_layers
from melsurgery.checkpoint.provenance import Provenance
from melsurgery.checkpoint.reader import Checkpoint
from melsurgery.checkpoint.safeload import load_tokenizer, render_chat
from melsurgery.engines.loading import custom_layer_spec
from melsurgery.errors import UserError, quote
from melsurgery.formats.textfile import read_text
from melsurgery.formats.wording import count
from melsurgery.measure.definitions import (
    Arrangement,
    arrangements,
    find_massive,
    layer_stats,
    sink,
    sink_rate,
    top_k_for,
)
from melsurgery.measure.logsoftmax import HEAD_ROWS, OnlineKL, token_chunks
from melsurgery.measure.payoff import Scored, arranged_nll, arranged_stream, payoff_figures
from melsurgery.measure.probes import Probe
from melsurgery.measure.served import ENGINES, require_vllm, served_figures
from melsurgery.measure.verify_result import PayoffFigure, VerifyResult, WeightCheck
from melsurgery.params import DetectParams

GEN_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "List three prime numbers greater than 10.",
]


def gen_prompt_ids(tok, n: int) -> list[list[int]]:
    """The first n generation prompts as token ids, in the chat template where the tokenizer has one."""
    out = []
    for prompt in GEN_PROMPTS[:n]:
        if getattr(tok, "chat_template", None):
            text = render_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
            out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
        else:
            out.append(list(tok(prompt)["input_ids"]))
    return out


def eval_text(path: Path | None) -> tuple[str, str]:
    """The held-out text and its label: a file, or the embedded Hamlet excerpt."""
    if path is None:
        embedded = resources.files("melsurgery.data").joinpath("eval.txt")
        return embedded.read_text(encoding="utf-8"), "melsurgery:eval.txt"
    raw = read_text(path, "evaluation text")
    if not raw.strip():
        raise UserError(f"{path}: the evaluation text is empty")
    return raw, str(path)


def split_text(raw: str) -> tuple[str, str]:
    """Tuning and held-out halves of one text, cut at the paragraph boundary nearest the middle."""
    cuts = [i for i in range(len(raw)) if raw.startswith("\n\n", i)]
    if not cuts:
        cuts = [i for i, c in enumerate(raw) if c == "\n"] or [len(raw) // 2]
    cut = min(cuts, key=lambda i: abs(i - len(raw) // 2))
    return raw[:cut].strip() + "\n", raw[cut:].strip() + "\n"


@dataclass(frozen=True)
class Windows:
    """Evaluation windows: each starts with the same prefix (`prefix` ids: the tokenizer's, e.g. BOS, or the
    chat template's opening)."""

    ids: list[list[int]]
    prefix: list[int]

    @property
    def first_target(self) -> int:
        """The first position whose token is predicted and scored: the prefix is context, never a target."""
        return max(len(self.prefix), 1)


PREFIXES = ("tokenizer", "chat")  # what each window opens with: the tokenizer's special prefix, or a chat's opening
_CONTENT = "\ue000melsurgery\ue000"  # a user message no template rewrites, to find where its content starts


def special_prefix(tok) -> list[int]:
    """The ids the tokenizer puts before any text (BOS where the model uses one), as calibration gets them."""
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    full = list(tok("a")["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


def chat_prefix(tok) -> list[int]:
    """The ids a chat-formatted input opens with, up to the first user message's content (the template's default
    system turn included): what the model sees before any text in use, as calibration's chat samples get it."""
    if not getattr(tok, "chat_template", None):
        raise UserError("--prefix chat: the tokenizer has no chat template; use --prefix tokenizer")
    text = render_chat(tok, [{"role": "user", "content": _CONTENT}])
    if _CONTENT not in text:
        raise UserError("--prefix chat: the chat template does not show a user message's content verbatim; use "
                        "--prefix tokenizer")
    return list(tok(text[: text.index(_CONTENT)], add_special_tokens=False)["input_ids"])


def input_prefix(recipes: list[tuple[str, dict]]) -> str:
    """How a patch's input opens (one of PREFIXES): "chat" when a recipe assumes chat-formatted input (a first-token
    patch of the chat template's first token, `of: chat`), else the tokenizer's own prefix."""
    return "chat" if any(params.get("of") == "chat" for _, params in recipes) else "tokenizer"


def window_prefix(tok, kind: str) -> list[int]:
    """The ids every window opens with: `kind` is one of PREFIXES."""
    if kind not in PREFIXES:
        raise UserError(f"--prefix {kind!r}: use one of {', '.join(PREFIXES)}")
    return special_prefix(tok) if kind == "tokenizer" else chat_prefix(tok)


def make_windows(tok, raw: str, size: int, limit: int | None, prefix: str = "tokenizer") -> Windows:
    """Cut the text's tokens into windows of `size` tokens, each one the prefix (see `window_prefix`) plus text."""
    ids_prefix = window_prefix(tok, prefix)
    body = size - len(ids_prefix)
    if body < 1:
        raise UserError(f"--max-tokens {size}: the window prefix alone has {count(len(ids_prefix), 'token')}")
    ids = list(tok(raw, add_special_tokens=False)["input_ids"])
    chunks = [ids_prefix + ids[i : i + body] for i in range(0, len(ids), body)]
    first = max(len(ids_prefix), 1)
    chunks = [c for c in chunks if len(c) > first]
    return Windows(chunks[:limit] if limit else chunks, ids_prefix)


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


@dataclass
class _Pair:
    """The two checkpoints compared, and what both share: family, tokenizer, windows, the patch's checked spec."""

    base: Checkpoint
    patched: Checkpoint
    family: Family
    tok: object
    win: Windows
    text_name: str
    spec: dict | None


@dataclass
class _Streamed:
    """What the streaming pass measured: per-layer statistics of both streams, the head's scores, each scored
    target's log-prob (base, patched), the tensors that differ, and the payoff figures."""

    stats: list[list[LayerStats]]
    scores: dict
    target_logprobs: tuple[list[float], list[float]]
    changed: list[str]
    payoff: list[PayoffFigure]


def _claims(patched: Path, params: DetectParams | None, claimed: list[str] | None, prefix: str | None):
    """Detection thresholds, claimed edits and how windows open (`input_prefix` of the patch's recipes), from
    provenance.json where not given; and why it is unreadable."""
    unreadable = None
    if params is None or claimed is None or prefix is None:
        try:
            record = Provenance.find(Path(patched))
        except UserError as exc:  # measured without it, and said so in the report
            record, unreadable = None, str(exc)
        if record is not None:
            params = params or record.detect_params
            claimed = record.edited_tensors if claimed is None else claimed
            prefix = prefix or input_prefix([(r.name, r.params) for r in record.recipes])
    return params, claimed, prefix, unreadable


def _open_pair(base: Path, patched: Path, text: Path | None, max_tokens: int, max_windows: int | None,
               prefix: str | None) -> _Pair:
    """Everything checked before any layer runs: the text, the pair's tensors, the patch's spec, the windows."""
    raw, text_name = eval_text(text)
    bckpt, pckpt = Checkpoint(base), Checkpoint(patched)
    _check_pair(bckpt, pckpt)
    spec = custom_layer_spec(pckpt.folder, pckpt.config)
    family = family_for(bckpt.config)
    tok = load_tokenizer(Path(base))
    win = make_windows(tok, raw, max_tokens, max_windows, prefix or "tokenizer")
    if not win.ids:
        raise UserError(f"{text_name}: too short to evaluate")
    return _Pair(bckpt, pckpt, family, tok, win, text_name, spec)


def _stream(pair: _Pair, device: str, dtype: torch.dtype, progress: bool,
            payoff: list[Arrangement]) -> _Streamed:
    """Both models through every layer (one base layer in memory), then both heads: statistics and scores.

    Each payoff arrangement adds one base and one patched stream to the same pass (unobserved), scored after it."""
    bckpt, pckpt, family, win = pair.base, pair.patched, pair.family, pair.win
    model = StreamingModel(bckpt, family, device, dtype)
    changed: set[str] = set()

    def differs(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
        if _same(a, b):
            return False
        changed.add(name)
        return True

    memo: dict[int, dict[str, torch.Tensor]] = {}

    def patched_edits(i: int, base_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if i not in memo:  # once per layer, whatever the number of patched streams (one object: one load)
            prefix = family.prefix(i)
            memo.clear()
            memo[i] = {name: other for name, t in base_layer.items()
                       if differs(prefix + name, t, other := pckpt.load(prefix + name))}
        return memo[i]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=model.num_layers + 1, desc="verify", unit="layer", leave=False)
    try:
        embed_changed = _differs_by_rows(bckpt, pckpt, family.embed, differs)
        base_states = model.embed(win.ids)
        patched_states = model.embed(win.ids, pckpt) if embed_changed else list(base_states)
        based = [Stream(base_states), *(arranged_stream(a, base_states) for a in payoff)]
        twins = [None] * len(based) if embed_changed else based  # equal up to the patch's first edited layer
        streams = [*based, Stream(patched_states, edits=patched_edits, wemask=pair.spec, twin=twins[0]),
                   *(arranged_stream(a, patched_states, patched_edits, pair.spec, twin)
                     for a, twin in zip(payoff, twins[1:]))]
        at_patched = 1 + len(payoff)
        k = top_k_for(len(win.ids))
        stats: list[list[LayerStats]] = [[], []]

        def observe(i: int, s: int, inputs: list, outputs: list, probe: Probe) -> None:
            stats[int(s == at_patched)].append(layer_stats(i, outputs, k, probe.key_attention,
                                                           _mean(probe.similarity)))

        run_layers(model, streams, probe=lambda layer: Probe(layer, family, similarity=True), observe=observe,
                   progress=bar.update if bar else None)
        stats[1][:0] = stats[0][: streams[at_patched].borrowed]  # the layers before the patch's first edit
        scores, target_logprobs = _score_head(model, bckpt, pckpt, [streams[0].states, streams[at_patched].states],
                                              win, differs)
        figures = []
        if payoff:
            scored = Scored(win.ids, win.first_target)
            arranged = tuple(arranged_nll(model, ckpt, [s.states for s in streams[at + 1 : at + 1 + len(payoff)]],
                                          payoff, scored) for ckpt, at in ((bckpt, 0), (pckpt, at_patched)))
            figures = payoff_figures(payoff, scored, target_logprobs, arranged)
        _compare_rest(bckpt, pckpt, family, model.num_layers, differs)
        if bar:
            bar.update(1)
    finally:
        if bar:
            bar.close()
    return _Streamed(stats, scores, target_logprobs, sorted(changed), figures)


def _layer_figures(stats: list[list[LayerStats]], tokens: list[tuple[int, int]], me_layer: int | None) -> dict:
    """Per layer and averaged from the layer after the ME Layer: sink, sink rate, max |h|, ratio, similarity."""
    out: dict = {}
    for key, which in (("base", 0), ("patched", 1)):
        out[f"sink_{key}"] = [sink(layer, tokens) for layer in stats[which]]
        out[f"sink_rate_{key}"] = [sink_rate(layer, tokens) for layer in stats[which]]
        out[f"max_abs_{key}"] = [layer.max_abs for layer in stats[which]]
        out[f"ratio_{key}"] = [layer.ratio if math.isfinite(layer.ratio) else None for layer in stats[which]]
        out[f"similarity_{key}"] = [layer.similarity for layer in stats[which]]
    first = me_layer + 1 if me_layer is not None else 0
    sb, sp = _mean(out["sink_base"][first:]), _mean(out["sink_patched"][first:])
    out.update(sink_layers_from=first, sink_mean_base=sb, sink_mean_patched=sp,
               sink_reduction_pct=100 * (1 - sp / sb) if sb and sp is not None else None)
    for name in ("sink_rate", "similarity"):
        for key in ("base", "patched"):
            out[f"{name}_mean_{key}"] = _mean(out[f"{name}_{key}"][first:])
    return out


def run_verify(base: Path, patched: Path, *, text: Path | None = None, max_tokens: int = 512,
               max_windows: int | None = None, device: str = "cpu", dtype: torch.dtype | None = torch.float32,
               generations: int = 3, max_new_tokens: int = 40, progress: bool = False,
               params: DetectParams | None = None, claimed_edits: list[str] | None = None,
               engine: str = "transformers", prefix: str | None = None,
               payoff_window: int | None = 64) -> VerifyResult:
    """Base versus patched on held-out text, streaming: one decoder layer in memory serves both models.

    Each base layer is read once; the patched stream runs it with the patched checkpoint's differing
    tensors swapped in (and its WeMask hooks), so the patched checkpoint is read once too, tensor by
    tensor, which also tells which tensors differ. The LM head is scored in vocabulary blocks.

    `params`: the detection thresholds of the patch's scan; `claimed_edits`: the tensors the patch says it
    changed (checked against those that differ). Where not given, they come from the patched folder's
    provenance.json when it has one; else the default thresholds, and no claim to check. `prefix`: how each
    window opens (one of PREFIXES); where not given, as the patch's recipes assume their input opens
    (`input_prefix` of provenance.json's recipes), else with the tokenizer's own prefix.

    `engine` "vllm": also serve both models with vLLM on the same windows (`ServedFigures`: perplexity,
    top-1 agreement and greedy generations as vLLM computes them, and how far its log-probs are from
    transformers'); the generations then come from vLLM only.

    `payoff_window`: the streaming window of the payoff figures (`definitions.arrangements`: first token evicted
    or kept, int8 activations per tensor and per token), measured in the same pass; None skips them.
    """
    if engine not in ENGINES:
        raise UserError(f"engine {engine!r}: use {' or '.join(ENGINES)}")
    if engine == "vllm":
        require_vllm()
    params, claimed_edits, prefix, unreadable = _claims(patched, params, claimed_edits, prefix)
    start = time.perf_counter()
    pair = _open_pair(base, patched, text, max_tokens, max_windows, prefix)
    dtype = dtype or pair.base.float_dtype
    streamed = _stream(pair, device, dtype, progress, arrangements(payoff_window) if payoff_window else [])
    found = find_massive(streamed.stats[0], params or DetectParams())
    scores = streamed.scores
    served = None
    if engine == "vllm":
        served = served_figures(Path(base), Path(patched), pair.win.ids, pair.win.first_target, pair.tok,
                                streamed.target_logprobs, dtype=dtype, prompts=GEN_PROMPTS[:generations],
                                generations=gen_prompt_ids(pair.tok, generations), max_new_tokens=max_new_tokens)
        gens, note = [], None
    else:
        gens, note = _maybe_generate(pair.base, Path(base), Path(patched), pair.tok, generations, max_new_tokens,
                                     device, dtype)
    return VerifyResult(
        text=pair.text_name, windows=len(pair.win.ids), tokens=sum(len(w) for w in pair.win.ids),
        window_prefix=pair.tok.convert_ids_to_tokens(pair.win.prefix), **scores, me_layer=found.me_layer,
        massive_positions=[[q for s, q in found.tokens if s == w] for w in range(len(pair.win.ids))],
        ppl_increase_pct=100 * (scores["ppl_patched"] / scores["ppl_base"] - 1),
        **_layer_figures(streamed.stats, found.tokens, found.me_layer),
        weights=WeightCheck.of(streamed.changed, claimed_edits, unreadable),
        no_effect=scores["kl_max"] == 0 and not streamed.changed, generations=gens, generations_note=note,
        seconds=round(time.perf_counter() - start, 2), vllm=served, payoff=streamed.payoff)


def _differs_by_rows(a: Checkpoint, b: Checkpoint, name: str, differs) -> bool:
    """Whether a (large, 2-D) tensor differs, compared block by block so that memory stays bounded."""
    n = a.info(name).shape[0]
    return any(differs(name, a.load_row_block(name, lo, min(n, lo + HEAD_ROWS)),
                       b.load_row_block(name, lo, min(n, lo + HEAD_ROWS))) for lo in range(0, n, HEAD_ROWS))


def _score_head(model: StreamingModel, bckpt: Checkpoint, pckpt: Checkpoint, states: list[list[torch.Tensor]],
                win: Windows, differs) -> tuple[dict, tuple[list[float], list[float]]]:
    """Final norm and LM head for both streams, in vocabulary blocks: KL, perplexity, top-1 agreement, and
    each target's log-prob (base, patched).

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
        chunks = token_chunks(len(target))
        accs = [OnlineKL(len(target[c]), hb.device, argmax=True) for c in chunks]
        head = model.head_tensor
        vocab = bckpt.info(head).shape[0]
        for lo in range(0, vocab, HEAD_ROWS):
            hi = min(vocab, lo + HEAD_ROWS)
            rows_b = bckpt.load_row_block(head, lo, hi)
            rows_p = pckpt.load_row_block(head, lo, hi)
            if not differs(head, rows_b, rows_p):
                rows_p = rows_b
            for c, acc in zip(chunks, accs):
                acc.add(model.logits(hb[c], rows_b).double(), model.logits(hp[c], rows_p).double(), lo, target[c])
    kl = torch.cat([acc.kl for acc in accs]).clamp(min=0)
    lp_b, lp_p = (torch.cat([acc.base.logprob for acc in accs]), torch.cat([acc.patched.logprob for acc in accs]))
    agree = torch.cat([acc.base.arg == acc.patched.arg for acc in accs])
    return {
        "scored_tokens": len(target),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(agree.double().mean()),
        "ppl_base": math.exp(-float(lp_b.mean())),
        "ppl_patched": math.exp(-float(lp_p.mean())),
    }, (lp_b.tolist(), lp_p.tolist())


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
    have = free_memory(device)
    if need > 0.8 * have:
        return [], (f"generations skipped: they need both whole models ({need / 1e9:.1f} GB in {dtype}), "
                    f"more than the {have / 1e9:.1f} GB free on {device}")
    from melsurgery.engines.loading import load

    mb, _ = load(base, device=device, dtype=dtype)
    mp, _ = load(patched, device=device, dtype=dtype)
    return _generate(mb, mp, tok, n, max_new_tokens, device), None


def free_memory(device: str) -> int:
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
    for prompt, prompt_ids in zip(GEN_PROMPTS, gen_prompt_ids(tok, n)):
        ids = torch.tensor([prompt_ids], device=device)
        row = {"prompt": prompt}
        for key, model in (("base", mb), ("patched", mp)):
            with torch.no_grad():
                g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            row[key] = tok.decode(g[0, ids.shape[1] :], skip_special_tokens=True)
        out.append(row)
    return out
