"""What `verify` measured, typed: `VerifyResult` (its JSON is `verify --json`), the gates, the report.

Every figure is defined in measure/definitions.py (massive tokens, sink, sink rate, similarity) or in
measure/verify.py (KL, perplexity, top-1 agreement on the evaluation windows). With `--engine vllm` the
`vllm` part holds the same output figures as vLLM serves them, on the same windows (`ServedFigures`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from melsurgery.formats.typed import JsonRecord
from melsurgery.formats.wording import change_text, count

# a figure that may be NaN or infinite: written as null (JSON has no spelling for them), read back as NaN
NAN = {"nan": True}


@dataclass
class WeightCheck:
    """The tensors that differ, against those the patch claims to have changed (None: no claim), and why a
    provenance.json present could not be read (None: read, or absent)."""

    changed: list[str]
    provenance_edits: list[str] | None
    matches_provenance: bool | None
    provenance_unreadable: str | None

    @classmethod
    def of(cls, changed: list[str], claimed: list[str] | None, unreadable: str | None) -> WeightCheck:
        claimed = sorted(set(claimed)) if claimed is not None else None
        return cls(changed, claimed, None if claimed is None else claimed == changed, unreadable)


@dataclass
class ServedFigures:
    """The output figures as vLLM serves base and patched, on the windows transformers scored.

    Perplexity and top-1 agreement have the transformers path's definitions (same targets); `logprob_gap_*`
    is the mean |log p_vLLM - log p_transformers| of the scored target tokens, per model: near 0 when vLLM
    serves what transformers measured (custom layer included). vLLM returns no whole distributions, so KL,
    sink, similarity and massive activations stay transformers' figures."""

    engine: str
    ppl_base: float = field(metadata=NAN)
    ppl_patched: float = field(metadata=NAN)
    ppl_increase_pct: float = field(metadata=NAN)
    top1_agreement: float
    logprob_gap_base: float = field(metadata=NAN)
    logprob_gap_patched: float = field(metadata=NAN)
    generations: list[dict] = field(default_factory=list)


@dataclass
class PayoffFigure:
    """One payoff figure (definitions in measure/definitions.py): the perplexity change (percent) of base and of
    patched under one arrangement, their difference (percentage points, patched minus base), each with its 95%
    bootstrap interval over windows ([low, high]; null with one window). `windows`, `scored_tokens`: what it is
    computed on (a streaming window scores only positions >= `window`)."""

    name: str
    window: int | None
    windows: int
    scored_tokens: int
    base_pct: float = field(metadata=NAN)
    base_interval: list[float] | None
    patched_pct: float = field(metadata=NAN)
    patched_interval: list[float] | None
    difference_pp: float = field(metadata=NAN)
    difference_interval: list[float] | None

    @classmethod
    def of(cls, name: str, window: int | None, windows: int, scored: int, *figures) -> PayoffFigure:
        """From the (base, patched, difference) `Interval`s of `definitions.paired_changes`."""
        values = []
        for f in figures:
            bounded = f.low is not None and math.isfinite(f.low) and math.isfinite(f.high)
            values += [f.value, [f.low, f.high] if bounded else None]
        return cls(name, window, windows, scored, *values)


@dataclass
class TaskFigure:
    """One task metric, base against patched on the same prompts (`verify --tasks`, measure/tasks.py): accuracy of
    each with its 95% Wilson interval (instruction level: on a design-effect-adjusted n), and the paired difference
    (patched minus base, accuracy points in [-1, 1]) with its 95% percentile bootstrap interval over prompts;
    `better`/`worse`: prompts where the patched model scores higher/lower. `responses`: the resumable answer files."""

    task: str
    metric: str
    prompts: int
    base: float
    base_interval: list[float]
    patched: float
    patched_interval: list[float]
    difference: float = field(metadata=NAN)
    difference_interval: list[float] | None
    better: int
    worse: int
    responses: list[str]


# mean |Δ log-prob| above which vLLM is said not to serve what transformers measured (docs/engines.md)
ENGINE_GAP = 0.02


@dataclass
class VerifyResult(JsonRecord):
    """Base versus patched on held-out text (`verify --json`; field order and names are the JSON's)."""

    json_fix = "rerun verify"

    text: str
    windows: int
    tokens: int
    window_prefix: list[str]
    scored_tokens: int
    kl_mean: float = field(metadata=NAN)
    kl_max: float = field(metadata=NAN)
    top1_agreement: float
    ppl_base: float = field(metadata=NAN)
    ppl_patched: float = field(metadata=NAN)
    me_layer: int | None
    massive_positions: list[list[int]]
    sink_base: list[float | None]
    sink_rate_base: list[float | None]
    max_abs_base: list[float]
    ratio_base: list[float | None]
    similarity_base: list[float | None]
    sink_patched: list[float | None]
    sink_rate_patched: list[float | None]
    max_abs_patched: list[float]
    ratio_patched: list[float | None]
    similarity_patched: list[float | None]
    ppl_increase_pct: float = field(metadata=NAN)
    sink_layers_from: int
    sink_mean_base: float | None
    sink_mean_patched: float | None
    sink_reduction_pct: float | None
    sink_rate_mean_base: float | None
    sink_rate_mean_patched: float | None
    similarity_mean_base: float | None
    similarity_mean_patched: float | None
    weights: WeightCheck
    no_effect: bool
    generations: list[dict]
    generations_note: str | None
    seconds: float
    vllm: ServedFigures | None = field(default=None, metadata={"omit_none": True})  # only with --engine vllm
    payoff: list[PayoffFigure] = field(default_factory=list)  # empty with --no-payoff
    tasks: list[TaskFigure] = field(default_factory=list)  # only with --tasks

    def compact(self) -> dict:
        """The figures provenance keeps: everything but the generated text, the timing and the positions."""
        return {k: v for k, v in self.to_json().items() if k not in ("generations", "seconds", "massive_positions")}


@dataclass(frozen=True)
class Gates:
    """Publishing gates: a patch passes when every given limit holds (NaN never passes)."""

    max_kl: float | None = None
    max_ppl_increase: float | None = None  # percent
    min_sink_reduction: float | None = None  # percent

    def check(self, r: VerifyResult) -> list[str]:
        """Human-readable violations (empty when every gate holds); a NaN or infinite figure never passes."""
        bad = []
        for limit, x, flag, what, fails in (
            (self.max_kl, r.kl_mean, "--max-kl", "KL", lambda x, lim: x > lim),
            (self.max_ppl_increase, r.ppl_increase_pct, "--max-ppl-increase", "perplexity", lambda x, lim: x > lim),
            (self.min_sink_reduction, r.sink_reduction_pct, "--min-sink-reduction", "sink", lambda x, lim: x < lim),
        ):
            if limit is None:
                continue
            if x is None and flag == "--min-sink-reduction":
                bad.append("no massive tokens in the base on this text: --min-sink-reduction cannot be checked")
            elif not isinstance(x, int | float) or not math.isfinite(x):
                bad.append(f"{what} is {x} (not a finite number), so {flag} {limit:g} cannot hold")
            elif fails(x, limit):
                bad.append(_violation(what, x, flag, limit))
        return bad


def _violation(what: str, x: float, flag: str, limit: float) -> str:
    """A violated gate in words that read true whichever way the figure moved ("sink fell 3.86%, less than
    --min-sink-reduction 5 asks", "sink rose 2.1%, where --min-sink-reduction 5 asks for a fall of 5%")."""
    if what == "KL":
        return f"KL {x:.4g} > --max-kl {limit:g}"
    rose = x > 0 if what == "perplexity" else x < 0  # the sink figure is a reduction: positive when it fell
    moved = f"{what} unchanged" if x == 0 else f"{what} {'rose' if rose else 'fell'} {abs(x):.4g}%"
    if what == "perplexity":
        return f"{moved}, more than {flag} {limit:g} allows" if limit >= 0 else (
            f"{moved}, where {flag} {limit:g} asks for a fall of at least {-limit:g}%")
    if x >= 0:
        return f"{moved}, less than the {limit:g}% fall {flag} {limit:g} asks for"
    return (f"{moved}, where {flag} {limit:g} asks for a fall of at least {limit:g}%" if limit > 0 else
            f"{moved}, more than the {-limit:g}% rise {flag} {limit:g} allows")


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def measurements_for_card(r: VerifyResult) -> dict:
    """The headline figures, as (base, patched) pairs for the model card and provenance."""
    layers = f"layers {r.sink_layers_from}-{len(r.sink_base) - 1}"
    on = f"{r.text}, {count(r.windows, 'window')}, {count(r.tokens, 'token')}"
    patched_sink = _f(r.sink_mean_patched, ".3f")
    if r.sink_reduction_pct is not None:
        patched_sink += f" ({change_text(r.sink_reduction_pct)})"
    return {
        f"attention sink (mean over {layers}; {on})": (_f(r.sink_mean_base, ".3f"), patched_sink),
        f"attention-input similarity (mean, {layers})": (_f(r.similarity_mean_base, ".3f"),
                                                        _f(r.similarity_mean_patched, ".3f")),
        "perplexity (held-out text)": (f"{r.ppl_base:.2f}", f"{r.ppl_patched:.2f}"),
        "KL(base, patched), mean per token": ("0", f"{r.kl_mean:.4f}"),
        "top-1 agreement with base": ("1", f"{r.top1_agreement:.3f}"),
        "max |h| (largest layer)": (f"{max(r.max_abs_base):.0f}", f"{max(r.max_abs_patched):.0f}"),
    }


def _layer_table(r: VerifyResult) -> list[str]:
    lines = [f"{'layer':>5} {'max|h| base':>12} {'patched':>10} {'ratio base':>11} {'patched':>9} "
             f"{'sink base':>10} {'patched':>8} {'rate base':>10} {'patched':>8} {'sim base':>9} {'patched':>8}"]
    for i in range(len(r.sink_base)):
        lines.append(f"{i:>5} {r.max_abs_base[i]:>12,.1f} {r.max_abs_patched[i]:>10,.1f} "
                     f"{_f(r.ratio_base[i], ',.0f'):>11} {_f(r.ratio_patched[i], ',.0f'):>9} "
                     f"{_f(r.sink_base[i], '.3f'):>10} {_f(r.sink_patched[i], '.3f'):>8} "
                     f"{_f(r.sink_rate_base[i], '.2f'):>10} {_f(r.sink_rate_patched[i], '.2f'):>8} "
                     f"{_f(r.similarity_base[i], '.3f'):>9} {_f(r.similarity_patched[i], '.3f'):>8}")
    return lines


def _weight_lines(w: WeightCheck) -> list[str]:
    more = ", ..." if len(w.changed) > 6 else ""
    lines = [f"tensors that differ: {len(w.changed)} ({', '.join(w.changed[:6])}{more})"]
    if w.matches_provenance is not None:
        lines.append("  matches provenance.json edits" if w.matches_provenance else
                     f"  DOES NOT match provenance.json edits {w.provenance_edits}")
    if w.provenance_unreadable:
        lines.append("  provenance.json is unreadable, so no claim was checked and the default detection thresholds "
                     f"were used: {w.provenance_unreadable}")
    return lines


def _served_lines(s: ServedFigures) -> list[str]:
    lines = ["", f"as {s.engine} serves them (same windows, same targets; the figures above are transformers'):",
             f"  perplexity: base {s.ppl_base:.2f}, patched {s.ppl_patched:.2f} ({s.ppl_increase_pct:+.2f}%); top-1 "
             f"agreement {100 * s.top1_agreement:.1f}%",
             f"  mean |log p(vLLM) - log p(transformers)| per scored token: base {s.logprob_gap_base:.2g}, patched "
             f"{s.logprob_gap_patched:.2g}"]
    if s.logprob_gap_patched > ENGINE_GAP:
        lines.append(f"  vLLM DOES NOT SERVE WHAT WAS MEASURED: the patched model's log-probs differ from "
                     f"transformers' by {s.logprob_gap_patched:.3f} on average (more than {ENGINE_GAP})")
    for g in s.generations:
        lines += [f"  prompt: {g['prompt']}", f"    base:    {g['base'].strip()[:200]!r}",
                  f"    patched: {g['patched'].strip()[:200]!r}"]
    return lines


PAYOFF_LABELS = {"evict": "streaming, window {w}, first token evicted", "keep-first": "streaming, window {w}, first "
                 "token kept", "int8-tensor": "int8 activations, one scale per tensor",
                 "int8-token": "int8 activations, one scale per token"}


def _interval(x: float, bounds: list[float] | None, unit: str) -> str:
    text = f"{x:+.1f}{unit}"
    return text + (f" [{bounds[0]:+.1f}, {bounds[1]:+.1f}]" if bounds else "")


def payoff_lines(figures: list[PayoffFigure]) -> list[str]:
    """The payoff figures, base against patched (definitions in measure/definitions.py)."""
    if not figures:
        return []
    lines = ["", f"payoff: perplexity change against the same model's plain forward, base -> patched, and the "
                 f"difference in percentage points (95% bootstrap interval over the {figures[0].windows} windows):"]
    width = max(len(PAYOFF_LABELS[f.name].format(w=f.window)) for f in figures)
    for f in figures:
        label = PAYOFF_LABELS[f.name].format(w=f.window)
        lines.append(f"  {label:<{width}}  base {_interval(f.base_pct, f.base_interval, '%')}, patched "
                     f"{_interval(f.patched_pct, f.patched_interval, '%')}; difference "
                     f"{_interval(f.difference_pp, f.difference_interval, ' pp')} ({f.scored_tokens:,} tokens"
                     + (f", positions >= {f.window})" if f.window else ")"))
    return lines


def _share(x: float, bounds: list[float]) -> str:
    return f"{100 * x:.1f}% [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"


def task_lines(figures: list[TaskFigure]) -> list[str]:
    """The task figures, base against patched on the same prompts."""
    if not figures:
        return []
    lines = ["", "tasks (greedy, same prompts; accuracy with 95% Wilson interval, difference patched minus base with "
                 "95% paired bootstrap interval over prompts):"]
    for f in figures:
        diff = f"{100 * f.difference:+.1f}"
        if f.difference_interval:
            diff += f" [{100 * f.difference_interval[0]:+.1f}, {100 * f.difference_interval[1]:+.1f}]"
        lines.append(f"  {f.task} {f.metric} ({f.prompts} prompts): base {_share(f.base, f.base_interval)}, patched "
                     f"{_share(f.patched, f.patched_interval)}; difference {diff} points ({f.better} prompts better, "
                     f"{f.worse} worse)")
    return lines
def sink_warning(r: VerifyResult) -> str | None:
    """The line said first when a patch does the opposite of its purpose: the sink after the ME Layer rose."""
    if r.sink_reduction_pct is None or not math.isfinite(r.sink_reduction_pct) or r.sink_reduction_pct >= 0.05:
        return None
    if r.sink_reduction_pct > -0.05:
        return (f"THIS PATCH DOES NOT CUT THE ATTENTION SINK: unchanged over layers {r.sink_layers_from}-"
                f"{len(r.sink_base) - 1} on this text")
    return (f"THIS PATCH RAISES THE ATTENTION SINK it is meant to cut: {change_text(r.sink_reduction_pct)} over "
            f"layers {r.sink_layers_from}-{len(r.sink_base) - 1} on this text ({r.sink_mean_base:.3f} -> "
            f"{r.sink_mean_patched:.3f})")


def verify_report(r: VerifyResult) -> str:
    """The human-readable verify report (a patch that raises the sink says so on its first line)."""
    prefix = f", each opening with {''.join(r.window_prefix)!r}" if r.window_prefix else ""
    lines = [*filter(None, [sink_warning(r)]),
             f"held-out text: {r.text}, {count(r.windows, 'window')}{prefix}, {count(r.tokens, 'token')}, "
             f"{r.scored_tokens} scored ({r.seconds:.1f} s)",
             "massive tokens (base, on this text): " + (
                 f"ME Layer {r.me_layer}, positions {sorted({q for w in r.massive_positions for q in w})}"
                 if r.me_layer is not None else "none: the sink is not measured"), "", *_layer_table(r)]
    change = "" if r.sink_reduction_pct is None else f" ({change_text(r.sink_reduction_pct)})"
    after = f"layers {r.sink_layers_from}-{len(r.sink_base) - 1}"
    on = f"the text above, {count(r.windows, 'window')}"
    lines += ["",
              f"perplexity: base {r.ppl_base:.2f}, patched {r.ppl_patched:.2f} ({r.ppl_increase_pct:+.2f}%)",
              f"KL(base || patched): mean {r.kl_mean:.4f}, max {r.kl_max:.4f}; top-1 agreement "
              f"{100 * r.top1_agreement:.1f}%",
              f"attention sink (mean over {after}, {on}): base {_f(r.sink_mean_base, '.3f')}, "
              f"patched {_f(r.sink_mean_patched, '.3f')}{change}; sink rate base "
              f"{_f(r.sink_rate_mean_base, '.2f')}, patched {_f(r.sink_rate_mean_patched, '.2f')}",
              f"attention-input similarity (mean over {after}, lower is more diverse): base "
              f"{_f(r.similarity_mean_base, '.3f')}, patched {_f(r.similarity_mean_patched, '.3f')}",
              *_weight_lines(r.weights), *payoff_lines(r.payoff), *task_lines(r.tasks)]
    if r.no_effect:
        lines.append("THIS PATCH CHANGED NOTHING: no tensor differs and KL(base || patched) is 0 on every token "
                     "(a custom layer that selects no token does nothing)")
    if r.generations_note:
        lines += ["", r.generations_note]
    for g in r.generations:
        lines += ["", f"prompt: {g['prompt']}", f"  base:    {g['base'].strip()[:200]!r}",
                  f"  patched: {g['patched'].strip()[:200]!r}"]
    if r.vllm is not None:
        lines += _served_lines(r.vllm)
    return "\n".join(lines)
