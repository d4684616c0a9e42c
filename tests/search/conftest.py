"""The planted sink model both search tests run on (tune and the budgeted patch): one per test module."""

from __future__ import annotations

import pytest

from melsurgery.checkpoint.source import resolve
from melsurgery.detect.scan import run_scan, write_json
from tests.support.planted_sink import HELD_TEXT, TUNE_TEXT, masked_sink_model


@pytest.fixture(scope="module")
def sinkmodel(tmp_path_factory):
    """(root, model folder): the masked-sink model, its scan JSON and the tuning and held-out texts in root."""
    root = tmp_path_factory.mktemp("search")
    folder = masked_sink_model(root / "model")
    (root / "tune.txt").write_text(TUNE_TEXT)
    (root / "held.txt").write_text(HELD_TEXT)
    write_json(run_scan(resolve(str(folder))), root / "scan.json")
    return root, folder
