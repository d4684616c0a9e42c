"""`melsurgery diff A B`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from melsurgery.commands.shared import complete_model, examples, json_option, preflight


@click.command(
    epilog=examples(
        "melsurgery diff default out/damp --only-changed",
        "melsurgery diff default out/damp --stat --json diff.json",
        "melsurgery diff owner/model owner/model-patched --revision-a v1 --revision main",
    )
)
@click.argument("a", shell_complete=complete_model)
@click.argument("b", shell_complete=complete_model)
@click.option("--revision-a", default=None, help="Hub revision of A (branch, tag or commit).")
@click.option("--revision", "revision_b", default=None, help="Hub revision of B (branch, tag or commit).")
@json_option("Write every figure as JSON.")
@click.option("--only-changed", is_flag=True, help="List only tensors and files that differ.")
@click.option("--stat", is_flag=True, help="Per layer: tensors that differ and entries changed, instead of tensors.")
def diff(a, b, revision_a, revision_b, json_path, only_changed, stat) -> None:
    """Compare checkpoints A and B tensor by tensor (folders or Hub repo ids), streaming.

    Two .gguf files are compared as stored: quantisation blocks, dequantised values, metadata keys.

    Exit status as diff(1): 0 when identical, 1 when they differ, 2 on errors. Shard layout alone
    is no difference: tensors are matched by name.
    """
    preflight((a, b), (json_path,))
    if a.lower().endswith(".gguf") and b.lower().endswith(".gguf") and Path(a).is_file() and Path(b).is_file():
        from melsurgery.compare.gguf import diff_gguf, gguf_diff_report
        from melsurgery.compare.gguf import write_json as write_gguf_json
        from melsurgery.errors import UserError

        if stat or revision_a or revision_b:
            raise UserError("--stat and --revision apply to checkpoint folders, not to two .gguf files")
        r = diff_gguf(Path(a), Path(b))
        click.echo(gguf_diff_report(r, only_changed=only_changed))
        if json_path:
            write_gguf_json(r, json_path)
            click.echo(f"wrote {json_path}")
        sys.exit(0 if r.identical else 1)
    from melsurgery.compare.checkpoints import diff_checkpoints, diff_report, write_json

    result = diff_checkpoints(a, b, revision_a=revision_a, revision_b=revision_b)
    click.echo(diff_report(result, only_changed=only_changed, stat=stat))
    if json_path:
        write_json(result, json_path)
        click.echo(f"wrote {json_path}")
    sys.exit(0 if result.identical else 1)
