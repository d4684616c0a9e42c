"""The search engine: one loop, shared by `tune` and the budgeted `patch`.

- `space`: what a trial may choose (recipes, layers, dims, strengths), as data derived from the recipes'
  parameter declarations;
- `engine`: trials without checkpoints (the base model runs once over a text, each trial reruns only the
  layers from the first one it edits), the Optuna study (stored, resumable, shared by workers), the loop;
- `tune`: the `tune` command's run folder, report and typed result;
- `budget`: the budgeted patch: the largest sink cut whose KL on held-out text is within a budget.
"""
