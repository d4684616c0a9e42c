"""Optional plots (matplotlib is an extra: `pip install 'melsurgery[plot]'`)."""

from __future__ import annotations

import io
from pathlib import Path

from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from melsurgery.formats.wording import count


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'melsurgery[plot]'") from None
    return plt


def _save(plt, fig, path: Path) -> None:
    """The PNG rendered in memory, then written whole or not at all (the path guard and atomic write)."""
    from melsurgery.checkpoint.atomic import write_atomic

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=110, format="png")
    finally:
        plt.close(fig)
    write_atomic(path, buffer.getvalue())


def _integer_layers(ax) -> None:
    """Layers are whole numbers: no 12.5 on a layer axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mark_me_layer(ax, me_layer: int | None, label: bool = True) -> None:
    if me_layer is not None:
        ax.axvline(me_layer, color="red", ls="--", lw=1, label=f"ME Layer {me_layer}" if label else None)


def plot_scan(result: ScanResult, path: Path) -> None:
    """Per layer: max |h| and max/median ratio (log scale) with the ME Layer marked; the attention sink (mass
    that later queries put on the massive tokens); and, after the ME Layer, how much of the sink attribution
    the sink and the magnitude top-k dims hold."""
    plt = _pyplot()
    layers = [entry for entry in result.layers if entry.layer >= 0]
    x = [entry.layer for entry in layers]
    sinks = [s for s in result.sink_dims if s.dims]
    fig, axes = plt.subplots(1, 3 if sinks else 2, figsize=(17 if sinks else 12, 4.6))
    ax, a_sink = axes[0], axes[1]
    ax.semilogy(x, [entry.max_abs for entry in layers], marker="o", label="max |h|")
    ax.semilogy(x, [entry.ratio or float("nan") for entry in layers], marker="s", label="max |h| / median |h|")
    ax.axhline(result.params.abs_threshold, color="grey", ls=":", lw=1, label="absolute threshold")
    _mark_me_layer(ax, result.me_layer)
    ax.set_xlabel("decoder layer (output)")
    ax.set_ylabel("hidden-state magnitude (log scale)")
    ax.set_title("massive activations per layer")
    ax.legend(fontsize=8)
    sink = [float("nan") if v is None else v for v in result.sink]
    a_sink.plot(list(range(len(sink))), sink, marker="o", color="tab:purple", label="attention sink")
    _mark_me_layer(a_sink, result.me_layer)
    a_sink.set_ylim(0, 1.02)
    a_sink.set_xlabel("decoder layer")
    a_sink.set_ylabel("attention mass on the massive tokens")
    a_sink.set_title("attention sink per layer (mean over heads and later queries)")
    a_sink.legend(fontsize=8)
    if sinks:
        a2 = axes[2]
        k = result.sink_dims_k
        xs = [s.layer for s in sinks]
        a2.plot(xs, [s.sink_top_share for s in sinks], marker="o", label=f"sink top-{k} dims (per layer)")
        a2.plot(xs, [s.magnitude_top_share for s in sinks], marker="s", label=f"magnitude top-{k} dims")
        a2.plot(xs, [s.overlap for s in sinks], ls=":", marker="x", label="overlap of the two")
        a2.set_ylim(0, 1.05)
        a2.set_xlabel("decoder layer (attention input)")
        a2.set_ylabel("share of the attribution")
        a2.set_title("which dims drive the sink (|grad x input|)")
        a2.legend(fontsize=8)
    for a in axes:
        _integer_layers(a)
    cal = result.calibration
    text = (f"{cal.source}, {count(cal.num_samples, 'sample')}, {count(cal.tokens, 'token')}, "
            f"{cal.dtype or 'float32'}") if cal else ""
    fig.suptitle(f"melsurgery scan: {result.model.id}" + (f"  ({text})" if text else ""), fontsize=10)
    fig.tight_layout()
    _save(plt, fig, path)


def plot_verify(result: dict, path: Path, *, base: str = "base", patched: str = "patched") -> None:
    """Sink, max/median ratio and attention-input similarity per layer, base versus patched, the ME Layer
    marked; the title names both models and the text."""
    plt = _pyplot()

    def values(key: str) -> list[float]:
        return [float("nan") if v is None else v for v in result[key]]

    x = list(range(len(result["sink_base"])))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = (("sink", "attention sink", "attention mass on the massive tokens", False),
              ("ratio", "max |h| / median |h|", "ratio (log scale)", True),
              ("similarity", "attention-input similarity", "mean pairwise cosine", False))
    for ax, (key, title, ylabel, log) in zip(axes, panels):
        draw = ax.semilogy if log else ax.plot
        draw(x, values(f"{key}_base"), marker="o", ms=4, label="base")
        draw(x, values(f"{key}_patched"), marker="s", ms=4, label="patched")
        _mark_me_layer(ax, result.get("me_layer"))
        ax.set_title(title)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(ylabel)
        _integer_layers(ax)
        ax.legend(fontsize=8)
    fig.suptitle(f"melsurgery verify: {base} (base) vs {patched} (patched); {result['text']}, "
                 f"{count(result['windows'], 'window')}, {count(result['tokens'], 'token')}", fontsize=10)
    fig.tight_layout()
    _save(plt, fig, path)


def plot_tune(data: dict, path: Path) -> None:
    """Every trial's cut against its KL (log scale), the Pareto front, the budget and the defaults."""
    plt = _pyplot()
    key, label = {"sink": ("sink_reduction_pct", "sink cut after the ME Layer (%; below 0: it rose)"),
                  "ratio": ("ratio_reduction_pct", "max/median ratio cut after the ME Layer (%; below 0: it rose)")
                  }.get(data["objective"], ("payoff_removed", f"{data['objective']} penalty removed (points)"))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    trials = {t["number"]: t["figures"] for t in data["trials"]}
    floor = 1e-6

    def xy(figs: list[dict]) -> tuple[list[float], list[float]]:
        return [max(f["kl_mean"], floor) for f in figs], [f[key] for f in figs]

    ax.scatter(*xy(list(trials.values())), s=14, color="0.65", label=f"trials ({len(trials)})")
    front = sorted((trials[n] for n in data["pareto_front"]), key=lambda f: f["kl_mean"])
    ax.plot(*xy(front), "o-", color="tab:blue", ms=5, label="Pareto front")
    for d in data["defaults"]:
        if "tuning" in d:
            (x,), (y,) = xy([d["tuning"]])
            ax.scatter([x], [y], marker="s", s=40, color="tab:red", zorder=3)
            ax.annotate(f"default {d['recipes'][0]['name']}", (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    if data["chosen"]:
        (x,), (y,) = xy([data["chosen"]["tuning"]])
        ax.scatter([x], [y], marker="*", s=160, color="tab:green", zorder=4, label=f"chosen #{data['chosen']['trial']}")
    if data["budget"]["max_kl"]:
        ax.axvline(data["budget"]["max_kl"], color="tab:green", ls="--", lw=1, label="--max-kl")
    ax.set_xscale("log")
    ax.set_xlabel("KL(base || patched) per token, tuning text")
    ax.set_ylabel(label)
    ax.set_title(f"melsurgery tune: {data['model']['id']}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(plt, fig, path)


def plot_search(data: dict, path: Path) -> None:
    """A budgeted patch's search: every trial on the tuning text, the candidates re-measured on held-out text
    (an arrow from tuning to held-out), the chosen one, and the budget."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    floor = 1e-6
    trials = data["trials"]
    ax.scatter([max(t["kl_mean"], floor) for t in trials], [t["sink_reduction_pct"] for t in trials], s=14,
               color="0.65", label=f"trials, tuning text ({len(trials)})")
    for k, c in enumerate(data["candidates"]):
        a, b = c["tuning"], c["heldout"]
        ax.annotate("", (max(b["kl_mean"], floor), b["sink_reduction_pct"]),
                    (max(a["kl_mean"], floor), a["sink_reduction_pct"]), arrowprops={"arrowstyle": "->", "lw": 0.6,
                                                                                      "color": "tab:blue"})
        ax.scatter([max(b["kl_mean"], floor)], [b["sink_reduction_pct"]], s=22, color="tab:blue",
                   label="re-measured on held-out text" if k == 0 else None, zorder=3)
    chosen = data.get("chosen")
    if chosen:
        h = chosen["heldout"]
        ax.scatter([max(h["kl_mean"], floor)], [h["sink_reduction_pct"]], marker="*", s=180, color="tab:green",
                   zorder=4, label=f"chosen #{chosen['trial']}: sink -{h['sink_reduction_pct']:.1f}%, "
                                   f"KL {h['kl_mean']:.3f}")
    if data.get("max_kl"):
        ax.axvline(data["max_kl"], color="tab:green", ls="--", lw=1, label=f"KL budget {data['max_kl']:g}")
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("KL(base || patched) per token")
    ax.set_ylabel(f"sink cut (%), mean over layers {data['sink_layers']}")
    ax.set_title(f"patch --max-kl: {data['model']} ({data['texts']})", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(plt, fig, path)
