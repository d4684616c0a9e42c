"""Session-wide settings and the fixtures that build shared models and the loopback Hub.

Support code (planted models, references, the Hub server, CLI helpers) lives in tests/support/ and is
imported by its full name; nothing here touches ``sys.path``.
"""

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.support.helpers import QUICK_SCAN, run_cli
from tests.support.hub_server import HubServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property-based tests draw the same examples on every run: a failure is reproducible, and a pass is
# not luck of the draw.
settings.register_profile("melsurgery", derandomize=True, print_blob=True)
settings.load_profile("melsurgery")

# Fixtures whose use makes a test `slow` (left out of `make test-fast`): the real default model and its full scan.
# Other slow tests carry an explicit @pytest.mark.slow (CONTRIBUTING.md says when).
SLOW_FIXTURES = frozenset({"smollm2", "smollm2_scan"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `slow` every test that uses a SLOW_FIXTURES fixture, directly or through another fixture."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, converted from its GGUF once (cached in the user's cache dir)."""
    from melsurgery.checkpoint.source import resolve

    return resolve("default")


@pytest.fixture(scope="session")
def smollm2_scan(smollm2):
    from melsurgery.detect.scan import run_scan

    return run_scan(smollm2)


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A planted Llama folder (fp32, one shard) shared by the tests that only read it."""
    from tests.support.planted import planted_folder

    return planted_folder(tmp_path_factory.mktemp("planted") / "model")


@pytest.fixture(scope="session")
def planted_scan(planted):
    """The scan of the shared planted folder (ME Layer 3, dim 17, neuron 41)."""
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import run_scan

    return run_scan(resolve(str(planted)))


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """A planted Llama folder in two shards and its scan JSON (a short calibration), shared by the tests that
    only read them (robustness, hostile input, interruption): patch runs given the JSON skip the scan."""
    from tests.support.planted import planted_folder

    root = tmp_path_factory.mktemp("sharded")
    folder = planted_folder(root / "base", shards=2)
    scan = root / "scan.json"
    res = run_cli("scan", folder, *QUICK_SCAN, "--json", scan)
    assert res.returncode == 0, res.stderr
    return folder, scan


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A fresh, empty loopback Hub on 127.0.0.1:<free port> for one test; stopped at teardown.

    Yields an object with ``.endpoint``, ``.token`` (write), ``.read_token``, ``.user``, ``.org``,
    ``.root`` (server storage), ``.env()``, ``.run()``, ``.run_python()`` and ``.hub`` (request log,
    ``unhandled`` requests, ``lfs_uploads``) for assertions. Drive the real client in a subprocess built
    from ``hub_server.env()`` (or ``.run`` / ``.run_python``): huggingface_hub fixes its endpoint when
    first imported, and the pytest process may already have imported it pointing at huggingface.co.
    """
    base = tmp_path_factory.mktemp("hub")
    server = HubServer(base / "storage", client_home=base / "client-home").start()
    try:
        yield server
    finally:
        server.stop()
    # A route the client needed but the server lacks, or a server crash, is a test-infrastructure bug:
    # fail loudly here rather than letting the client swallow it.
    assert not server.hub.errors, f"hub server crashed: {server.hub.errors}"
