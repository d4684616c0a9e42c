"""The last lines of every command, for people: what was found or written with its headline figure, where the
files are, and what to run next. Implementation detail goes under --verbose and into the JSON, not here."""

from __future__ import annotations

from dataclasses import dataclass

from melsurgery.detect.scan_result import ScanResult
from melsurgery.formats.wording import change_text, count
from melsurgery.measure.verify_result import VerifyResult


@dataclass(frozen=True)
class Summary:
    """One outcome sentence, the files written, and the next commands."""

    outcome: str
    files: tuple[str, ...] = ()
    next: tuple[str, ...] = ()

    def render(self) -> str:
        lines = ["", self.outcome]
        if self.files:
            lines.append("files: " + ", ".join(self.files))
        lines += [f"next: {command}" for command in self.next]
        return "\n".join(lines)


def scan_takeaway(r: ScanResult, model: str, files: tuple[str, ...]) -> Summary:
    """The scan in plain words: where the massive activation emerges, how large, who writes it, what it costs."""
    if r.me_layer is None:
        return Summary(f"No massive activation persists in {r.model.id}: there is no ME Layer, so nothing to patch.",
                       files)
    top = next((e for layer in r.layers if layer.layer == r.me_layer for e in layer.top), None)
    record = next((layer for layer in r.layers if layer.layer == r.me_layer), None)
    size = ""
    if top is not None and record is not None and record.ratio:
        size = f" at {abs(top.value):,.0f} ({record.ratio:,.0f}x the median |h|)"
    positions = sorted({t.pos for t in r.token_summary})
    where = f"position {positions[0]}" if len(positions) == 1 else f"positions {', '.join(map(str, positions))}"
    neurons = sorted({n.neuron for n in r.ffn_neurons})
    writers = (f", written by FFN neuron{'s' if len(neurons) > 1 else ''} {', '.join(map(str, neurons[:4]))}"
               if neurons else "")
    sink = (f"; later layers put {r.sink_after_me:.0%} of their attention on it (the attention sink)"
            if r.sink_after_me is not None else "")
    dims = ", ".join(map(str, r.massive_dims))
    outcome = (f"{r.model.id}: the massive activation emerges at layer {r.me_layer} of {r.model.num_layers} (the ME "
               f"Layer): {where} carries dim{'s' if len(r.massive_dims) != 1 else ''} {dims}{size}{writers}"
               f"{sink}.")
    scan_json = next((f for f in files if f.endswith(".json")), None)
    reuse = f" --scan {scan_json}" if scan_json else ""
    patch = f"melsurgery patch {model} -o PATCHED --max-kl 0.05{reuse}   # the largest sink cut within KL 0.05"
    return Summary(outcome, files, (patch,))


def patch_takeaway(out: str, model: str, loads: str, sink_pct: float | None, kl: float | None,
                   measured_on: str | None) -> Summary:
    """What patch wrote, how it loads, its measured figure when there is one, and how to check and publish it."""
    figure = ""
    if sink_pct is not None and kl is not None:
        figure = f"; attention sink {change_text(sink_pct)} at KL {kl:.4f} ({measured_on})"
    return Summary(f"Wrote the patched checkpoint {out} (loads with {loads}){figure}.", (out,),
                   (f"melsurgery verify {model} {out}   # measure it on held-out text, with generations",
                    f"melsurgery push {out} you/NAME --dry-run   # check the folder and card before publishing"))


def verify_takeaway(r: VerifyResult, patched: str, files: tuple[str, ...]) -> Summary:
    """Patched against base in one sentence: what moved and what it cost, on which text; then how to publish."""
    figures = [f"attention sink {change_text(r.sink_reduction_pct)}", f"KL {r.kl_mean:.4f} per token",
               f"perplexity {r.ppl_increase_pct:+.1f}%"]
    for f in r.payoff:
        if f.name in ("evict", "int8-tensor"):
            what = "first-token eviction" if f.name == "evict" else "int8 activations"
            figures.append(f"{what} penalty {f.base_pct:+.0f}% -> {f.patched_pct:+.0f}%")
    outcome = (f"{patched} against its base on {r.text} ({count(r.windows, 'window')}, {count(r.tokens, 'token')}): "
               + ", ".join(figures) + ".")
    if r.no_effect:
        outcome = f"{patched} changes nothing: every tensor and every next-token distribution equals the base's."
    return Summary(outcome, files, (f"melsurgery push {patched} you/NAME --dry-run   # check the folder and card",))
