import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["conftest_hub"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property-based tests draw the same examples on every run: a failure is reproducible, and a pass is
# not luck of the draw.
settings.register_profile("melsurgery", derandomize=True, print_blob=True)
settings.load_profile("melsurgery")


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


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """A planted Llama folder in two shards and its scan JSON (a short calibration), shared by the tests that
    only read them (robustness, hostile input, interruption): patch runs given the JSON skip the scan."""
    from planted import planted_folder

    root = tmp_path_factory.mktemp("sharded")
    folder = planted_folder(root / "base", shards=2)
    scan = root / "scan.json"
    res = run_cli("scan", folder, *QUICK_SCAN, "--json", scan)
    assert res.returncode == 0, res.stderr
    return folder, scan


QUICK_SCAN = ("--quiet", "--num-samples", "2", "--max-tokens", "16")


def run_cli(*args, env=None, timeout=600):
    """Run the real console script in a subprocess: exit codes and stderr exactly as users see them."""
    import subprocess

    return subprocess.run(["melsurgery", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, mtime and mode of every file below `folder` (what 'untouched' means)."""
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st_ = p.stat()
            out[p.relative_to(folder).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), st_.st_mtime_ns,
                                                     st_.st_mode)
    return out


def assert_clean_failure(res, *needles: str, out: Path | None = None, code: int | None = None) -> None:
    """What a user must see on bad input: a non-zero exit (`code` when given), exactly one `melsurgery: error:`
    line on stderr, no traceback, and (for `out`) no output folder, not even a hidden temporary one."""
    assert res.returncode not in (0, 3), res.stdout + res.stderr
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("melsurgery: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(".melsurgery-tmp-*"))


def patch(folder, out, recipes, scan=None, **kw):
    """The library's patch of a local folder with these (name, params) recipes: one helper for every test."""
    from melsurgery.checkpoint.source import resolve
    from melsurgery.manifest import Manifest
    from melsurgery.patch import run_patch

    return run_patch(resolve(str(folder)), out, Manifest(model=str(folder), recipes=recipes), scan=scan, **kw)
