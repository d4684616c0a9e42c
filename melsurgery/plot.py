"""Optional plots (matplotlib is an extra: `pip install 'melsurgery[plot]'`)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'melsurgery[plot]'") from None
    return plt


def _save(plt, fig, path: Path) -> None:
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None
    finally:
        plt.close(fig)


def plot_scan(result: dict, path: Path) -> None:
    """Per-layer max |h| and max/median ratio on a log scale, with the ME Layer marked."""
    plt = _pyplot()
    layers = [entry for entry in result["layers"] if entry["layer"] >= 0]
    x = [entry["layer"] for entry in layers]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.semilogy(x, [entry["max_abs"] for entry in layers], marker="o", label="max |h|")
    ax.semilogy(x, [entry["ratio"] or float("nan") for entry in layers], marker="s", label="max / median")
    ax.axhline(result["params"]["abs_threshold"], color="grey", ls=":", lw=1, label="absolute threshold")
    if result["me_layer"] is not None:
        ax.axvline(result["me_layer"], color="red", ls="--", label=f"ME Layer {result['me_layer']}")
    ax.set_xlabel("decoder layer (output)")
    ax.set_title(f"massive activations: {result['model']['id']}")
    ax.legend()
    fig.tight_layout()
    _save(plt, fig, path)


def plot_verify(result: dict, path: Path) -> None:
    """Sink score and max/median ratio per layer, base versus patched."""
    plt = _pyplot()
    x = list(range(len(result["sink_base"])))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    a1.plot(x, result["sink_base"], marker="o", label="base")
    a1.plot(x, result["sink_patched"], marker="s", label="patched")
    a1.set_title("attention sink (mean attention to massive tokens)")
    a1.set_xlabel("layer")
    a1.legend()
    a2.semilogy(x, result["ratio_base"], marker="o", label="base")
    a2.semilogy(x, result["ratio_patched"], marker="s", label="patched")
    a2.set_title("max |h| / median |h|")
    a2.set_xlabel("layer (output)")
    a2.legend()
    fig.tight_layout()
    _save(plt, fig, path)
