"""ScanResult as JSON: the typed result of a real scan round-trips, and `scan --json` writes exactly its to_json()."""

from __future__ import annotations

import json

import pytest

from melsurgery.detect.scan_result import ScanResult
from melsurgery.errors import UserError
from tests.support.helpers import QUICK_SCAN, cli_returning, json_round_trip


def test_a_real_scan_round_trips(planted_scan) -> None:
    doc = json_round_trip(planted_scan)
    assert ScanResult.from_json(doc) == planted_scan
    assert doc["me_layer"] == 3 and doc["massive_dims"] == [17]


@pytest.mark.slow
def test_scan_json_is_the_to_json_of_the_result_it_reports(planted, tmp_path, monkeypatch) -> None:
    path = tmp_path / "scan.json"
    result, res = cli_returning(monkeypatch, "melsurgery.detect.scan:run_scan", "scan", planted, *QUICK_SCAN,
                                "--json", path)
    assert res.exit_code == 0, res.output
    assert json.loads(path.read_text()) == result.to_json()
    assert f"ME Layer {result.me_layer}" in res.output  # the one-line summary of --quiet


def test_a_scan_nested_in_another_document_is_checked_by_its_own_rules(planted_scan) -> None:
    """The scan's checks beyond types (layers inside the model) run wherever a scan sits, naming the full path."""
    from melsurgery.formats.typed import Need, load

    bad = {**planted_scan.to_json(), "me_layer": 6}
    with pytest.raises(UserError, match=r"^doc: scan\.me_layer must be null or a layer index 0-5, got 6; fix it$"):
        load(ScanResult, bad, "scan", Need("doc", "fix it"))
    with pytest.raises(UserError, match=r"^doc: scan is not a melsurgery scan result \(schema_version 1\)$"):
        load(ScanResult, {**bad, "schema_version": 2}, "scan", Need("doc", "fix it"))
