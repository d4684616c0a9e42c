#!/usr/bin/env python
"""Issue 13's benchmark: `tune` trials per minute, and one trial's cost against one full `verify` of the same text.

In one process, on the same tuning windows (the first half of the embedded held-out text, windows of
--max-tokens): the base pass (once per study), N random trials over all recipes and their compositions,
and `run_verify` (generations off) of base against a patched checkpoint on that same text. Times are
wall-clock on whatever this machine is doing; the report states tokens, dtype and threads.

    python scripts/bench_tune.py                 # the embedded SmolLM2-135M-Instruct
    python scripts/bench_tune.py /path/to/model --trials 4 --max-tokens 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default", help="A model folder, or `default` (SmolLM2).")
    ap.add_argument("--trials", type=int, default=8, help="Random trials to time (default 8).")
    ap.add_argument("--max-tokens", type=int, default=512, help="Window length (default 512, as verify).")
    ap.add_argument("--scan", type=Path, help="Reuse a scan JSON (e.g. a tune run's RUN_DIR/scan.json).")
    args = ap.parse_args(argv)

    import optuna
    import torch

    from melsurgery.checkpoint.source import resolve
    from melsurgery.checkpoint.tokenizer import load_tokenizer
    from melsurgery.detect.scan import read_json, run_scan
    from melsurgery.measure.verify import eval_text, run_verify, split_text
    from melsurgery.recipes import plan_recipes, registry, resolve_recipes
    from melsurgery.search.tune import Evaluator, make_space, text_windows
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
    try:
        t0 = time.perf_counter()
        text = ev.base_pass("tuning", windows, win.first_target)
        base_s = time.perf_counter() - t0
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
        times = []
        for _ in range(args.trials):
            trial = study.ask()
            recipes = space.suggest(trial)
            t0 = time.perf_counter()
            fig = ev.run(text, plan_recipes(scan, ev.family, ev.ckpt.config, recipes))
            times.append(time.perf_counter() - t0)
            study.tell(trial, [fig.sink_reduction_pct, fig.kl_mean])
    finally:
        ev.close()
    with tempfile.TemporaryDirectory(prefix="melsurgery-bench-tune-") as tmp:
        patched = Path(tmp) / "patched"
        run_patch(source, patched, Manifest(model=args.model, recipes=resolve_recipes([("wemask", {})])), scan=scan)
        (Path(tmp) / "tune.txt").write_text(tune_raw)
        t0 = time.perf_counter()
        run_verify(source.folder, patched, text=Path(tmp) / "tune.txt", max_tokens=args.max_tokens, generations=0)
        verify_s = time.perf_counter() - t0
    trial_s = statistics.mean(times)
    print(f"model {source.id}: tuning text {len(windows)} windows / {tokens} tokens of {args.max_tokens}, fp32, CPU, "
          f"{torch.get_num_threads()} threads")
    print(f"base pass (once per study): {base_s:.1f} s")
    print(f"trial: mean {trial_s:.1f} s, median {statistics.median(times):.1f} s, max {max(times):.1f} s over "
          f"{len(times)} random trials -> {60 / trial_s:.1f} trials/min")
    print(f"verify of the same text (generations off): {verify_s:.1f} s -> one trial costs {trial_s / verify_s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
