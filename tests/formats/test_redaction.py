"""The secret redactor changes only secrets: every help text of every command, a model card, the scan, verify and
diff reports pass through it unchanged, while real credential shapes are still masked."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from melsurgery.cli import main
from melsurgery.errors import redact


def _helps(cmd: click.Command, path: tuple[str, ...]):
    """(command path, its --help text) for the group and every command below it."""
    yield path, cmd.get_help(click.Context(cmd, info_name=" ".join(path), terminal_width=100))
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _helps(sub, (*path, name))


HELPS = list(_helps(main, ("melsurgery",)))


def _changed(text: str) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(text.splitlines(), redact(text).splitlines()) if a != b]


@pytest.mark.parametrize("path, text", HELPS, ids=[" ".join(p) for p, _ in HELPS])
def test_every_help_text_survives_redaction(path, text):
    assert _changed(text) == []


@pytest.mark.parametrize("name", sorted(main.commands))
def test_help_as_printed_holds_no_mask(name):
    """Through the CLI's own output layer (stdout redacted as every command's is)."""
    res = CliRunner().invoke(main, [name, "--help"], terminal_width=100)
    assert res.exit_code == 0 and "***" not in res.output, res.output
    assert "first-token: gradient steps" in res.output or name != "patch"


def test_card_and_reports_survive_redaction(planted, planted_scan, tmp_path):
    from melsurgery.checkpoint.source import resolve
    from melsurgery.compare.checkpoints import diff_checkpoints, diff_report
    from melsurgery.measure.verify import run_verify
    from melsurgery.measure.verify_result import verify_report
    from melsurgery.report.text import scan_report
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import run_patch

    out = tmp_path / "out"
    man = Manifest(model=str(planted), recipes=[("ffn-dampen", {}), ("first-token", {"steps": 2})])
    run_patch(resolve(str(planted)), out, man, scan=planted_scan)
    texts = {"card": (out / "README.md").read_text(), "scan": scan_report(planted_scan),
             "verify": verify_report(run_verify(planted, out, max_windows=1, max_tokens=32, generations=1,
                                                max_new_tokens=8)),
             "diff": diff_report(diff_checkpoints(planted, out))}
    for name, text in texts.items():
        assert _changed(text) == [], name


@pytest.mark.parametrize("text, secret", [
    ("HF_TOKEN=hf_AbCdEf1234567890xyz", "AbCdEf1234567890xyz"),
    ("Authorization: Bearer eyJhbGciOi.J9xyz-abc", "eyJhbGciOi.J9xyz-abc"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZA=='", "dXNlcjpwYXNzd29yZA=="),
    ("token: ghp_16C7e42F292c6912E7710c838347Ae178B4a", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    ("https://bob:s3cr3tpw@db.example/x", "s3cr3tpw"),
    ('{"api_key": "sk-live-4f9a8b7c"}', "sk-live-4f9a8b7c"),
])
def test_real_credential_shapes_are_still_masked(text, secret):
    assert secret not in redact(text) and "***" in redact(text)


@pytest.mark.parametrize("text", ["first-token: gradient steps of the fit.", "first-token: fitting windows",
                                  "sink-token: tokens per window", "KL per token: 0.0123"])
def test_prose_around_token_is_not_a_secret(text):
    assert redact(text) == text
