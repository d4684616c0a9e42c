"""Human-readable rendering of scan results (the CLI prints these; JSON carries the same figures)."""

from __future__ import annotations

from melsurgery.detect.scan_result import FfnNeuron, ScanResult
from melsurgery.formats.wording import count


def _num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _expert(n: FfnNeuron) -> str:
    if n.expert == "shared":
        return "shared expert "
    return f"expert {n.expert} " if n.expert is not None else ""


def _ranges(indices: list[int]) -> str:
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def scan_summary(r: ScanResult) -> str:
    """`scan --quiet`: the finding in one line."""
    if r.me_layer is None:
        return f"{r.model.id}: no ME Layer (no massive activation persists)"
    positions = sorted({t.pos for t in r.token_summary})
    return (f"{r.model.id}: ME Layer {r.me_layer}, massive dims {', '.join(str(d) for d in r.massive_dims)}"
            + (f" at {'position' if len(positions) == 1 else 'positions'} {', '.join(map(str, positions))}"
               if positions else "")
            + (f", persisting through layer {r.persist_until}" if r.persist_until is not None else ""))


def scan_report(r: ScanResult) -> str:
    """The human-readable scan report (docs/commands/scan.md shows one)."""
    m = r.model
    lines = [f"model: {m.id} ({m.family}, {count(m.num_layers, 'layer')}, hidden {m.hidden_size})"]
    if (c := r.calibration) is not None:
        lines += [f"calibration: {c.source}, {count(c.num_samples, 'sample')}, {count(c.tokens, 'token')}, "
                  f"{c.seconds:.1f} s"
                  + (f", computed in {c.dtype}" if c.dtype else ""),
                  *([f"adaptive calibration: {c.adaptive.reason}"] if c.adaptive else [])]
    lines += [
        "",
        f"{'state':<12}{'max|h|':>11}{'median|h|':>11}{'ratio':>9}{'sink':>8}  note",
    ]
    me = r.me_layer
    precursor_layers = {p.layer for p in r.precursors}
    for layer in r.layers:
        i = layer.layer
        note = ""
        if i == me:
            note = "<- ME Layer"
        elif layer.massive:
            note = "massive"
        elif i in precursor_layers:
            note = "precursor"
        if layer.mixer not in (None, "attention"):  # hybrid families: say which layers do not attend
            note = f"({layer.mixer}) {note}"
        lines.append(
            f"{layer.name:<12}{_num(layer.max_abs):>11}{_num(layer.median_abs, 3):>11}"
            f"{_num(layer.ratio, 0):>9}{_num(layer.sink, 3):>8}  {note}".rstrip()
        )
    lines.append("")
    if me is None:
        lines.append("no ME Layer: no massive activation persists (see the thresholds in --help)")
        if r.precursors:
            lines.append(f"large but transient entries at layers {_ranges(sorted(precursor_layers))}")
        return "\n".join(lines)
    lines.append(f"ME Layer: {me} (0-based); the massive activation persists through layer {r.persist_until}")
    lines.append("massive dims: " + ", ".join(str(d) for d in r.massive_dims))
    lines.append(
        "top dims of the massive tokens: "
        + ", ".join(f"{d.dim} ({_num(d.mean_abs)})" for d in r.top_dims[:5])
    )
    n_samples = count(r.calibration.num_samples, "sample") if r.calibration else "? samples"
    toks = "; ".join(f"position {t.pos} {t.token!r} in {t.count}" for t in r.token_summary[:4])
    lines.append(f"massive tokens: {len(r.massive_tokens)} in {n_samples}: {toks}")
    if r.precursors:
        worst = max(r.precursors, key=lambda p: abs(p.value))
        lines.append(
            f"precursors (large, do not persist): layers {_ranges(sorted(precursor_layers))}; "
            f"largest dim {worst.dim} = {_num(worst.value)} ({_num(worst.ratio, 0)}x median) at layer "
            f"{worst.layer}"
        )
    lines.append("")
    lines.append(f"attribution inside layer {me}:")
    for d in r.dims_attribution:
        lines.append(
            f"  dim {d.dim}: input {_num(d.input)}, {d.mixer} {d.attn_write:+,.1f}, "
            f"FFN {d.ffn_write:+,.1f} -> {_num(d.value)}"
        )
    if r.ffn_neurons:
        lines.append("  FFN neurons that write the massive dims:")
        for n in r.ffn_neurons:
            lines.append(
                f"    {_expert(n)}neuron {n.neuron} -> dim {n.dim}: {n.contribution:+,.1f} "
                f"({100 * n.share:.1f}%), "
                f"activation {_num(n.activation_massive)} on massive tokens, at most "
                f"{_num(n.activation_other_max, 2)} elsewhere"
            )
    if (nrm := r.norm) is not None:
        on_dims = ", ".join(f"dim {d}: {w:.4g}" for d, w in nrm.ffn_norm_weight_on_dims.items())
        other = "-" if nrm.ffn_norm_scale_other_median is None else f"{nrm.ffn_norm_scale_other_median:.4g}"
        lines.append(
            f"  FFN-{nrm.ffn_norm_role} RMSNorm: scale 1/rms {nrm.ffn_norm_scale_massive:.4g} "
            f"on massive tokens vs "
            f"{other} (median) elsewhere; weight {on_dims} (mean "
            f"{nrm.ffn_norm_weight_mean:.4g})"
        )
    if r.sink_after_me is not None:
        lines.append(f"attention sink after the ME Layer (mean over layers {me + 1}+): {r.sink_after_me:.3f}")
    lines += _attention_input_lines(r)
    return "\n".join(lines)


def _attention_input_lines(r: ScanResult) -> list[str]:
    """Per layer after the ME Layer: the magnitude selector and the dims that drive the sink."""
    lines = []
    sel = r.selector_layers
    if sel:
        fired = [s for s in sel if s.threshold is not None]
        none = [s.layer for s in sel if s.threshold is None]
        text = "magnitude selector (per layer, from the residual entering it): "
        if fired:
            thresholds = [s.threshold for s in fired if s.threshold is not None]
            text += (f"thresholds {_num(min(thresholds))}-{_num(max(thresholds))}"
                     f" at layers {_ranges([s.layer for s in fired])}")
        if none:
            text += f"{'; ' if fired else ''}no separating threshold at layers {_ranges(none)}"
        lines.append(text)
    sinks = [s for s in r.sink_dims if s.dims]
    if not sinks:
        return lines
    k = r.sink_dims_k
    magnitude = [d.dim for d in r.top_dims[:k]]
    lines.append(f"dims of the massive tokens' attention input that drive the sink (|grad x input|, top {k}; "
                 f"overlap with the magnitude top-{k} {magnitude}; share of the attribution in each):")
    for s in sinks:
        dims = ", ".join(f"{d.dim} ({100 * d.share:.0f}%)" for d in s.dims[:k])
        lines.append(f"  layer {s.layer}: {dims}; overlap {s.overlap:.2f}; share sink top-{k} "
                     f"{100 * s.sink_top_share:.0f}% vs magnitude top-{k} {100 * s.magnitude_top_share:.0f}%")
    lines.append(f"  mean overlap: {r.sink_dims_overlap:.2f}")
    if r.qk_norm:
        lines.append(f"  this family normalises queries and keys per head (QK-norm): the key's direction decides "
                     f"the sink, so the massive dims and the dims that drive the sink may differ (measured overlap "
                     f"{r.sink_dims_overlap:.2f}); consider wemask --dims-by sink")
    return lines
