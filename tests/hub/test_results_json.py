"""PushResult as JSON: the typed result of a real push (through the loopback Hub, with the real client) and of a
dry run round-trips, and says what the Hub recorded."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from melsurgery.errors import UserError
from melsurgery.hub.push import PushResult, push
from tests.support.helpers import json_round_trip, patch
from tests.support.hub_server import HubServer, emit_result_code, result_of


@pytest.fixture(scope="module")
def patched_folder(planted: Path, planted_scan, tmp_path_factory) -> Path:
    """A real melsurgery output (ffn-dampen on the planted model): what `push` publishes."""
    out = tmp_path_factory.mktemp("typed-push") / "out"
    patch(planted, out, [("ffn-dampen", {})], planted_scan)
    return out


@pytest.mark.slow
def test_a_real_push_round_trips(hub_server: HubServer, patched_folder: Path) -> None:
    repo = f"{hub_server.user}/typed"
    code = emit_result_code() + textwrap.dedent(f"""
        from melsurgery.hub.push import push
        emit(push(r"{patched_folder}", "{repo}").to_json())
        """)
    doc = result_of(hub_server.run_python(code))  # huggingface_hub reads HF_ENDPOINT on import: a fresh process
    result = PushResult.from_json(doc, "push result")
    assert json_round_trip(result) == doc
    head = hub_server.hub.repos[repo].branches["main"]
    assert result.commit_url.endswith(head) and not result.dry_run and not result.no_changes
    assert {f.path: f.size for f in result.files} == {p.name: p.stat().st_size for p in patched_folder.iterdir()}


def test_a_dry_run_round_trips_and_a_bad_document_names_the_field(patched_folder: Path) -> None:
    result = push(patched_folder, "someone/typed", dry_run=True)
    doc = json_round_trip(result)
    assert doc["dry_run"] is True and doc["commit_url"] is None and doc["commit_message"].startswith("melsurgery: ")
    assert PushResult.from_json(doc) == result
    bad = json.loads(json.dumps(doc))
    bad["files"][1]["size"] = "12 kB"
    with pytest.raises(UserError, match=r"^PushResult JSON: files\[1\]\.size must be an integer, got '12 kB'; "):
        PushResult.from_json(bad)
