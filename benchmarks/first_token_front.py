"""The first-token recipe's front: fit the path on the tuning half of the text, measure its points held out.

    python3 benchmarks/first_token_front.py MODEL --of bos --json out.json [--on ffn-dampen:factor=0.035]

The path is fitted exactly as `patch --recipe first-token` fits it (fit.first_token, on the tuning
half of the embedded evaluation text); its start (the stored row, i.e. the `--on` recipes alone) and up to
`--heldout-points` of its points that no other point beats on the tuning figures are then measured on the
held-out half (windows of 512 tokens opening like the fitting windows, the sink and KL of verify). Writes a
JSON with settings, wall times and both sets of figures; `--plot` draws fronts from such JSON files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import measured, workload


def _recipe(spec: str) -> tuple[str, dict]:
    """ffn-dampen:factor=0.035,neurons=... -> ("ffn-dampen", {"factor": "0.035", ...})."""
    name, _, rest = spec.partition(":")
    params = dict(kv.split("=", 1) for kv in rest.split(";") if kv)
    return name, params


def _front(points: list[dict], n: int) -> list[dict]:
    """Up to n points that no other point beats on both tuning sink and tuning KL, spread over the KL range."""
    def key(p: dict) -> tuple[float, float]:
        return p["tuning"]["sink_patched"], p["tuning"]["kl_mean"]

    front = [p for p in points
             if not any(key(q) != key(p) and key(q)[0] <= key(p)[0] and key(q)[1] <= key(p)[1] for q in points)]
    front.sort(key=lambda p: key(p)[1])
    if len(front) <= n:
        return front
    return [front[round(k * (len(front) - 1) / (n - 1))] for k in range(n)]


def run(args) -> dict:
    import torch

    from melsurgery.architectures import family_for
    from melsurgery.checkpoint.reader import Checkpoint
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json, run_scan
    from melsurgery.fit.first_token import FitSettings, RowObjective, first_token, fit_path
    from melsurgery.measure.verify import eval_text, make_windows, split_text
    from melsurgery.params import DetectParams
    from melsurgery.recipes import plan_recipes, resolve_recipes

    torch.manual_seed(0)
    source = resolve(args.model)
    ckpt = Checkpoint(source.folder)
    family = family_for(ckpt.config)
    with measured("scan") as scanning:
        scan = read_json(args.scan) if args.scan else run_scan(source) if args.on else None
    detect = scan.params if scan else DetectParams()
    others = plan_recipes(scan, family, ckpt.config, resolve_recipes([_recipe(s) for s in args.on])) if scan else []
    edits = [e for p in others for e in p.edits]
    tok = load_tokenizer(source.folder)
    token_id = first_token(tok, args.of)
    prefix = "chat" if args.of == "chat" else "tokenizer"
    tune_raw, held_raw = split_text(eval_text(None)[0])
    fit_w = make_windows(tok, tune_raw, args.window_tokens, args.windows, prefix)
    held_w = make_windows(tok, held_raw, 512, None, prefix)
    settings = FitSettings(steps=args.steps, lr=args.lr, kl_weight_start=args.kl_weight_start,
                           kl_weight_end=args.kl_weight_end, path_kl=args.path_kl)
    with measured("fit base pass") as fit_base:
        objective = RowObjective(ckpt, family, fit_w.ids, fit_w.first_target, token_id, detect, edits=edits)

    def show(p) -> None:
        f = p.figures
        print(f"step {p.step:3d} lambda {p.kl_weight:7.3f}: sink {-f.sink_reduction_pct:+6.1f}% KL {f.kl:.4f} "
              f"ppl {f.ppl_increase_pct:+.1f}%", flush=True)

    points, fit_seconds = fit_path(objective, settings, show)
    del objective
    records = [{"step": p.step, "kl_weight": p.kl_weight, "tuning": p.figures.to_dict(), "row": list(p.row)}
               for p in points]
    with measured("held-out base pass") as held_base:
        held = RowObjective(ckpt, family, held_w.ids, held_w.first_target, token_id, detect, edits=edits)
    chosen = [records[0]] + [r for r in _front(records[1:], args.heldout_points)]
    for r in chosen:
        with measured("held-out point") as point:
            r["heldout"] = held.evaluate(torch.tensor(r["row"]))[0].to_dict()
        r["heldout_seconds"] = round(point.wall_s, 1)
        h = r["heldout"]
        print(f"held-out, step {r['step']:3d}: sink {-h['sink_reduction_pct']:+6.1f}% KL {h['kl_mean']:.4f} "
              f"ppl {h['ppl_increase_pct']:+.1f}%", flush=True)
    return {
        "model": args.model, "folder": str(source.folder), "of": args.of, "token_id": token_id,
        "token": tok.convert_ids_to_tokens(token_id), "on": [list(_recipe(s)) for s in args.on],
        "on_summary": [p.summary for p in others], "me_layer_scan": scan.me_layer if scan else None,
        "settings": {**vars(settings), "windows": len(fit_w.ids), "window_tokens": args.window_tokens,
                     "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads()},
        "fitting": {"text": "melsurgery:eval.txt (first half)", "windows": len(fit_w.ids),
                    "tokens": sum(map(len, fit_w.ids)), "prefix": tok.convert_ids_to_tokens(fit_w.prefix)},
        "heldout": {"text": "melsurgery:eval.txt (second half)", "windows": len(held_w.ids),
                    "tokens": sum(map(len, held_w.ids)), "prefix": tok.convert_ids_to_tokens(held_w.prefix),
                    "sink_base": held.sink_base, "me_layer": held.me_layer},
        "workload": workload(f"{args.model}", f"{len(fit_w.ids)} fitting windows x {args.window_tokens} tokens",
                             f"{len(held_w.ids)} held-out windows x 512", "float32, CPU"),
        "seconds": {"scan": round(scanning.wall_s, 1), "fit_base_pass": round(fit_base.wall_s, 1),
                    "fit_path": round(fit_seconds, 1), "steps": len(points),
                    "heldout_base_pass": round(held_base.wall_s, 1),
                    "heldout_per_point": [r["heldout_seconds"] for r in chosen]},
        "path": records,
    }


def plot(files: list[Path], out: Path) -> None:
    """Sink cut against held-out KL: the tuning path (line) and its held-out points (markers), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for f in files:
        d = json.loads(Path(f).read_text())
        model = Path(d["folder"]).name.split(".")[0].split("-q4")[0]
        label = f"{model}, first-token" + (f" on {', '.join(s for s in d['on_summary'])[:40]}" if d["on"] else "")
        ax = axes[0 if "gemma" not in model.lower() else 1]
        tune = [(p["tuning"]["kl_mean"], p["tuning"]["sink_reduction_pct"]) for p in d["path"]]
        held = sorted((p["heldout"]["kl_mean"], p["heldout"]["sink_reduction_pct"])
                      for p in d["path"] if "heldout" in p)
        line = ax.plot(*zip(*tune), ":", alpha=0.6, label=f"{label} (fitting windows)")[0]
        ax.plot(*zip(*held), "o-", color=line.get_color(), label=f"{label} (held-out)")
    for ax, title in zip(axes, ("SmolLM2-135M-Instruct (chat-formatted windows)", "Gemma-3-270M (BOS windows)")):
        ax.axvline(0.05, color="grey", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("KL(base || patched), mean per token")
        ax.set_ylabel("sink cut after the ME Layer (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--of", choices=("bos", "chat"), default="bos")
    ap.add_argument("--on", action="append", default=[], help="recipe:param=value;... fitted on top of (repeatable)")
    ap.add_argument("--scan", type=Path)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--kl-weight-start", type=float, default=2.0)
    ap.add_argument("--kl-weight-end", type=float, default=0.25)
    ap.add_argument("--path-kl", type=float, default=0.3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-tokens", type=int, default=256)
    ap.add_argument("--heldout-points", type=int, default=6)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", nargs="+", type=Path, help="JSON files to draw (no fit)")
    ap.add_argument("--png", type=Path, default=Path("docs/img/first-token-front.png"))
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot, args.png)
        return
    if not args.model or not args.json:
        sys.exit("give MODEL and --json")
    args.json.write_text(json.dumps(run(args), indent=1) + "\n")


if __name__ == "__main__":
    main()
