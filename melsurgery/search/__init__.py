"""The search: one session that `tune`, the budgeted `patch` and `benchmarks/pareto.py` drive.

- `records`: the currency (a setting, figures, a budget, objectives, trial records);
- `options`: `SearchOptions`, declared once and validated when made;
- `space`: what a trial may choose, derived from the recipes' parameter declarations;
- `engine`: the evaluator: a setting measured on a text without writing a checkpoint;
- `study`: the Optuna study (stored, resumable, shared by workers, marked ours) and the trial loop;
- `storage`: where a study lives, proven sound before any work;
- `session`: texts, scan, lock, study, base passes, trials, the held-out choice and its cache;
- `tune`, `budget`: the drivers (the tune run folder; the budgeted patch and its re-check).
"""
