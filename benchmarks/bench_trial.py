#!/usr/bin/env python
"""One search trial against one plain forward pass from its first edited layer, with the trial's parts.

In one process, on the tuning windows a budgeted patch uses (the first half of the embedded held-out text,
--windows windows of --max-tokens): the base pass, then N trials as the search draws them (the space's
starting settings, then Optuna's TPE sampler), each timed with its parts, and, for each layer a trial
starts from, the floor: the same tokens through the decoder layers from that layer, the final norm and
the LM head, with every weight already in memory in the compute dtype (no checkpoint reads, no statistics,
no KL). The parts are timed by wrapping the evaluator's own functions:

- read+load: reading decoder layers from the checkpoint and materialising them (with the trial's edits);
- forward: the decoder layers' computation (the attention probe's hooks included);
- statistics: the per-layer statistics (massive activations, attention to the sink);
- head: the LM head, log-sum-exp and KL;
- sampler: Optuna's ask, suggest and tell;
- allocation: minor page faults (getrusage) per trial, each a page the kernel had to hand out afresh.

Every figure is CPU seconds (user+sys of this process; wall seconds of the trial beside them): on a
loaded machine they are the ones to compare. The script uses only the evaluator's public API and its internal step
names, so the same file runs against another checkout (PYTHONPATH=that checkout) for a paired comparison.

    python benchmarks/bench_trial.py --scan scan.json              # the default model, 1 window of 512
    python benchmarks/bench_trial.py MODEL --scan scan.json --max-tokens 64 --trials 3 --stream
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import defaultdict
from pathlib import Path


def _usage() -> tuple[float, float, int]:
    """CPU seconds (user+sys), wall seconds, minor page faults so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, time.perf_counter(), r.ru_minflt


class Parts:
    """CPU seconds spent in named functions, wrapped in place (instrumentation only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner, attr: str, part: str) -> None:
        inner = getattr(owner, attr)

        def timed(*a, **kw):
            t0 = time.process_time()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds[part] += time.process_time() - t0

        setattr(owner, attr, timed)


def floor(ev, text, start: int, repeat: int) -> float:
    """Least CPU seconds of a plain forward from layer `start` (weights in memory, compute dtype) to the logits."""
    import torch

    model = ev.model
    for i in range(start, ev.num_layers):
        state = {k: v.to(ev.device, ev.dtype) for k, v in model.ckpt.load_prefix(model.family.prefix(i)).items()}
        model.layers[i].load_state_dict(model.family.module_state(state), strict=False, assign=True)
    norm = model.final_norm(ev.ckpt.load(model.family.final_norm))
    head = ev.ckpt.load(model.head_tensor, ev.dtype, ev.device)
    best = float("inf")
    try:
        for _ in range(repeat):
            t0 = time.process_time()
            with torch.no_grad():
                for h in text.inputs[start]:
                    x = h[None]
                    for i in range(start, ev.num_layers):
                        x = model.run_layer(model.layers[i], x)
                    norm(x[0, text.first - 1 : -1]) @ head.T
            best = min(best, time.process_time() - t0)
    finally:
        for i in range(start, ev.num_layers):
            model.free_layer(i)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default", help="A model folder, or `default` (SmolLM2).")
    ap.add_argument("--scan", type=Path, help="A scan JSON of the model (else it is scanned first).")
    ap.add_argument("--trials", type=int, default=12, help="Trials (default 12).")
    ap.add_argument("--max-tokens", type=int, default=512, help="Window length (default 512, as the patch).")
    ap.add_argument("--windows", type=int, default=1, help="Tuning windows (default 1, as `make demo`).")
    ap.add_argument("--stream", action="store_true",
                    help="Stream every layer from the checkpoint per trial, as for a model over the memory budget.")
    args = ap.parse_args(argv)

    import optuna
    import torch

    import melsurgery.search.engine as engine
    from melsurgery.checkpoint.safeload import load_tokenizer
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import read_json, run_scan
    from melsurgery.measure.verify import eval_text, split_text
    from melsurgery.recipes import registry
    from melsurgery.search.session import text_windows
    from melsurgery.search.space import make_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    source = resolve(args.model)
    scan = read_json(args.scan) if args.scan else run_scan(source)
    win = text_windows(load_tokenizer(source.folder), split_text(eval_text(None)[0])[0], args.max_tokens,
                       args.windows)
    space = make_space(tuple(registry()), scan)
    ev = engine.Evaluator(source, scan, **({"resident": False} if args.stream else {}))
    parts = Parts()
    parts.wrap(ev.model, "read_layer", "read+load")
    parts.wrap(ev.model, "load_layer", "read+load")
    parts.wrap(ev.model, "run_layer", "forward")
    parts.wrap(ev, "_head", "head")
    parts.wrap(engine, "layer_stats", "statistics")

    c0, w0, f0 = _usage()
    text = ev.base_pass("tuning", win.ids, win.first_target)
    c1, w1, f1 = _usage()
    parts.seconds.clear()
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=8))
    for start in space.starts():
        study.enqueue_trial(start)
    rows, sampler_s, floors = [], 0.0, {}
    for _ in range(args.trials):
        s0 = time.process_time()
        trial = study.ask()
        recipes = space.suggest(trial)
        plans = ev.plans(recipes)
        sampler_s += time.process_time() - s0
        edited = {i for p in plans for e in p.edits for i in range(ev.num_layers)
                  if e.tensor.startswith(ev.family.prefix(i))}
        edited |= {i for p in plans if p.wemask is not None for i in p.wemask.layers}
        first = min(edited, default=ev.num_layers)
        before = dict(parts.seconds)
        u0 = _usage()
        fig = ev.run(text, plans)
        u1 = _usage()
        s0 = time.process_time()
        study.tell(trial, [fig.sink_reduction_pct, fig.kl_mean])
        sampler_s += time.process_time() - s0
        rows.append((first, u1[1] - u0[1], u1[0] - u0[0], u1[2] - u0[2],
                     {k: parts.seconds[k] - before.get(k, 0.0) for k in parts.seconds}))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # before the floors load whole suffixes
    for first in sorted({r[0] for r in rows}):
        floors[first] = floor(ev, text, first, 3) if first < ev.num_layers else 0.0

    n = len(rows)
    print(f"model {source.id}: {len(win.ids)} tuning window(s), {sum(map(len, win.ids))} tokens "
          f"(windows of {args.max_tokens}), {ev.dtype}, CPU, {torch.get_num_threads()} threads; {n} trials "
          f"({len(space.starts())} starting settings, then TPE); layers "
          f"{'held' if getattr(ev, 'resident', False) else 'streamed per trial'}; peak RSS over the base pass "
          f"and trials {peak_gb:.2f} GB")
    print(f"base pass: {w1 - w0:.2f} s wall, {c1 - c0:.2f} s CPU, {f1 - f0} minor faults")
    ratios = [r[2] / floors[r[0]] for r in rows if floors[r[0]] > 0]
    total = sum(r[2] for r in rows)
    print(f"trial: mean {sum(r[1] for r in rows) / n:.3f} s wall, {total / n:.3f} s CPU, "
          f"{sum(r[3] for r in rows) / n:.0f} minor faults")
    print(f"trial / plain forward from its first edited layer (CPU seconds): mean {sum(ratios) / len(ratios):.2f}x, "
          f"max {max(ratios):.2f}x (floors: " + ", ".join(f"layer {k}: {v:.3f} s" for k, v in floors.items()) + ")")
    shares = defaultdict(float)
    for r in rows:
        for k, v in r[4].items():
            shares[k] += v
    shares["sampler"] = sampler_s
    shares["other"] = total - sum(v for k, v in shares.items() if k != "sampler")
    print("parts per trial (CPU s, share of the trial's CPU time): " + ", ".join(
        f"{k} {v / n:.3f} ({100 * v / total:.0f}%)" for k, v in shares.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
