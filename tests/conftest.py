import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["conftest_hub"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, converted from its GGUF once (cached in the user's cache dir)."""
    from melsurgery.checkpoint.source import resolve

    return resolve("default")


@pytest.fixture(scope="session")
def smollm2_scan(smollm2):
    from melsurgery.scan import run_scan

    return run_scan(smollm2)


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A planted Llama folder (fp32, one shard) shared by the tests that only read it."""
    from planted import planted_folder

    return planted_folder(tmp_path_factory.mktemp("planted") / "model")


@pytest.fixture(scope="session")
def planted_scan(planted):
    """The scan of the shared planted folder (ME Layer 3, dim 17, neuron 41)."""
    from melsurgery.checkpoint.source import resolve
    from melsurgery.scan import run_scan

    return run_scan(resolve(str(planted)))


def run_cli(*args, env=None):
    """Run the real console script in a subprocess: exit codes and stderr exactly as users see them."""
    import subprocess

    return subprocess.run(["melsurgery", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
