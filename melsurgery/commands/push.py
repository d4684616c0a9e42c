"""`melsurgery push DIR REPO_ID`."""

from __future__ import annotations

from pathlib import Path

import click

from melsurgery.commands.shared import examples
from melsurgery.formats.wording import count


@click.command(
    epilog=examples(
        "melsurgery push out/damp you/SmolLM2-135M-Instruct-damp --dry-run   # validate and list, send nothing",
        "melsurgery push out/damp you/SmolLM2-135M-Instruct-damp --private",
        "melsurgery push out/damp you/SmolLM2-135M-Instruct-damp --create-pr --commit-message 'ffn-dampen x0.2'",
    )
)
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (refuses to push into an existing public one).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing), or refs/pr/N.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--commit-message", default=None, help="Default: 'melsurgery: <recipes> patch of <base model>'.")
@click.option("--dry-run", is_flag=True, help="Validate DIR and list what would be uploaded; send nothing.")
def push(folder, repo_id, private, revision, create_pr, commit_message, dry_run) -> None:
    """Validate DIR (a melsurgery output: provenance, hashes, headers, card) and upload it as one commit.

    The token comes from HF_TOKEN or `hf auth login` and is never printed. Exit status: 0 on
    success, 2 on any failure (one line on stderr).
    """
    from melsurgery.hub.push import push as push_folder

    result = push_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, dry_run=dry_run)
    total = sum(f.size for f in result.files)
    where = f"{repo_id}" + (f" (branch {revision})" if revision and not create_pr else "")
    if result.dry_run:
        click.echo(f"would push {count(len(result.files), 'file')} ({total:,} bytes) to {where}"
                   f"{' as a pull request' if create_pr else ''}{' (private)' if private else ''}")
        click.echo(f"commit message: {result.commit_message}")
        width = max(len(f.path) for f in result.files)
        for f in result.files:
            click.echo(f"  {f.path:<{width}}  {f.size:>15,}")
        if result.sealed:
            click.echo(f"would record in provenance.json the sha256 of {_edited(result.sealed)} (patch recorded "
                       "only their edited bytes')")
            _judged(result.judged)
        click.echo("dry run: nothing was sent")
        return
    if result.sealed:
        click.echo(f"recorded in provenance.json the sha256 of {_edited(result.sealed)}")
        _judged(result.judged)
    if result.no_changes:
        click.echo(f"nothing to push: {where} already holds exactly these {count(len(result.files), 'file')}")
    else:
        click.echo(f"pushed {count(len(result.files), 'file')} ({total:,} bytes) to {where}: {result.commit_message}")
    click.echo(f"repo: {result.repo_url}")
    if result.commit_url:
        click.echo(f"commit: {result.commit_url}")
    if result.pr_url:
        click.echo(f"pull request: {result.pr_url}")


def _edited(files: list[str]) -> str:
    return f"{len(files)} derived file{'s' * (len(files) > 1)} ({', '.join(files)})"


_JUDGED = {"source": "its untouched bytes are its source's (compared byte for byte)",
           "source-hashed": "its untouched bytes are its source's (compared byte for byte); the source's sha256, "
                            "deferred by patch, recorded (the source still had the size, mtime and inode patch saw)",
           "mtime": "its untouched bytes trusted on size and mtime (its source was not found to compare with)"}


def _judged(judged: dict[str, str]) -> None:
    for rel, how in judged.items():
        click.echo(f"  {rel}: {_JUDGED[how]}")
