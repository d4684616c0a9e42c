"""pytest plugin: the `hub_server` fixture, a loopback Hugging Face Hub (see tests/hub_server.py).

Register it once from tests/conftest.py with ``pytest_plugins = ["conftest_hub"]``.

Drive the real client in a subprocess built from ``hub_server.env()`` (or ``hub_server.run`` /
``hub_server.run_python``): huggingface_hub fixes its endpoint when first imported, and the pytest
process may already have imported it pointing at huggingface.co.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hub_server import HubServer


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A fresh, empty hub on 127.0.0.1:<free port> for one test; stopped at teardown.

    Yields an object with ``.endpoint``, ``.token`` (write), ``.read_token``, ``.user``, ``.org``,
    ``.root`` (server storage), ``.env()``, ``.run()``, ``.run_python()`` and ``.hub`` (request log,
    ``unhandled`` requests, ``lfs_uploads``) for assertions.
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
