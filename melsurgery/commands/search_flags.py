"""The search's flags, declared once for `tune` and `patch --max-kl` (same names, defaults and help), and the
`SearchOptions` they make."""

from __future__ import annotations

from pathlib import Path

import click

from melsurgery.commands.shared import finite_float
from melsurgery.search.options import PAYOFF_WINDOW, TRIALS, SearchOptions
from melsurgery.search.records import OBJECTIVES


def search_flags(*, budget_default: float | None):
    """The flags of a search: its budget (`budget_default`: --max-kl when none is given), objective, trials, time
    limit, windows and texts."""
    opts = [
        click.option("--max-kl", type=float, callback=finite_float, default=budget_default,
                     show_default=budget_default is not None,
                     help="Budget: the largest cut whose mean KL(base || patched) per token on held-out text is at "
                          "most this" + (" (no recipe flags needed)." if budget_default is None else ".")),
        click.option("--max-ppl-increase", type=float, callback=finite_float, default=None,
                     help="Budget: perplexity increase on held-out text, percent (alone or with --max-kl)."),
        click.option("--objective", type=click.Choice(list(OBJECTIVES)), default="sink", show_default=True,
                     help="What to maximise: the reduction of the sink or the max/median ratio after the ME Layer, or "
                          "the payoff penalty removed (percentage points of perplexity change): evict (streaming "
                          "window, first token evicted) or int8 (per-tensor int8 activations)."),
        click.option("--payoff-window", type=click.IntRange(min=1), default=PAYOFF_WINDOW, show_default=True,
                     help="Streaming window of --objective evict (keys each query sees; scored on positions >= it)."),
        click.option("--trials", type=click.IntRange(min=1), default=None,
                     help=f"Trials the search study should hold (default {TRIALS}); a rerun continues it."),
        click.option("--timeout", type=float, callback=finite_float, default=None,
                     help="Stop starting trials after this many seconds."),
        click.option("--windows", type=click.IntRange(min=1), default=None,
                     help="Use at most N windows of each text (tuning, held-out)."),
        click.option("--text", type=click.Path(path_type=Path), default=None,
                     help="Tuning text (default: the embedded held-out text, first half)."),
        click.option("--heldout", type=click.Path(path_type=Path), default=None,
                     help="Held-out text the budget is checked on (default: the second half of --text)."),
    ]

    def add(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return add


SEARCH_FLAGS = ("max_kl", "max_ppl_increase", "objective", "payoff_window", "trials", "timeout", "windows", "text",
                "heldout")


def search_options(values: dict, recipes: tuple[str, ...], **extra) -> SearchOptions:
    """The options of the search flags' `values` (as click passes them), the recipes to search and any option only
    one command has (`extra`)."""
    given = {k: values[k] for k in ("max_kl", "max_ppl_increase", "objective", "payoff_window", "timeout", "windows")}
    if values.get("trials") is not None:
        given["trials"] = values["trials"]
    return SearchOptions(recipes=tuple(recipes), **given, **extra)
