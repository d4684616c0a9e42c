"""Model sources: Hub repo ids (through a loopback Hub), the local cache offline, GGUF files, the alias."""

import json
import sys

import pytest

from melsurgery.checkpoint.source import default_gguf, resolve
from tests.support.helpers import run_cli


@pytest.mark.slow
def test_hub_repo_id_then_offline_from_the_cache(planted, hub_server, tmp_path):
    up = hub_server.run_python(
        "from huggingface_hub import HfApi; api = HfApi(); "
        f"api.create_repo('{hub_server.user}/tiny'); api.upload_folder(folder_path='{planted}', "
        f"repo_id='{hub_server.user}/tiny')")
    assert up.returncode == 0, up.stderr
    scan = [sys.executable, "-m", "melsurgery", "scan", f"{hub_server.user}/tiny", "--quiet", "--num-samples", "4"]
    res = hub_server.run([*scan, "--json", str(tmp_path / "a.json")])
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "a.json").read_text())["me_layer"] == 3
    # offline: the same id resolves from the local Hub cache
    res = hub_server.run([*scan, "--json", str(tmp_path / "b.json")], extra_env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "b.json").read_text())["model"]["kind"] == "hub"
    # offline and not cached: one clear line
    res = hub_server.run([sys.executable, "-m", "melsurgery", "scan", f"{hub_server.user}/other", "--quiet"],
                         extra_env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and "not in the local Hub cache" in res.stderr and "Traceback" not in res.stderr
    # online but missing
    res = hub_server.run([sys.executable, "-m", "melsurgery", "scan", f"{hub_server.user}/missing", "--quiet"])
    assert res.returncode == 2 and "no such repo" in res.stderr


def test_gguf_file_and_alias_share_the_cached_conversion(smollm2):
    assert resolve(str(default_gguf())).folder == smollm2.folder
    assert resolve("smollm2").folder == smollm2.folder == resolve(None).folder
    card = (smollm2.folder / "README.md").read_text()
    assert "license: apache-2.0" in card


@pytest.mark.slow
def test_scan_without_a_model_uses_the_default(smollm2):
    res = run_cli("scan", "--quiet", "--num-samples", "4", "--max-tokens", "24")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("HuggingFaceTB/SmolLM2-135M-Instruct: ME Layer 11, massive dims 507")
    assert len(res.stdout.splitlines()) == 1


@pytest.mark.slow
def test_missing_gguf_and_garbage_arguments(tmp_path):
    res = run_cli("scan", tmp_path / "nope.gguf", "--quiet")
    assert res.returncode == 2 and "no such GGUF file" in res.stderr
    res = run_cli("scan", "not a model", "--quiet")
    assert res.returncode == 2 and "not a Hub repo id" in res.stderr


@pytest.mark.slow
def test_hub_errors_echoing_the_token_never_show_it(hub_server, tmp_path):
    """A Hub source whose server echoes the bearer token in its errors, on the repo lookup and on a download:
    one line, exit 2, and the token nowhere in the output (the server really sent it back)."""
    echo = "malformed request header: Authorization: {authorization}"
    scan = [sys.executable, "-m", "melsurgery", "scan", f"{hub_server.user}/tiny", "--quiet"]
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    up = hub_server.run_python(
        "from huggingface_hub import HfApi; api = HfApi(); "
        f"api.create_repo('{hub_server.user}/tiny'); api.upload_folder(folder_path='{folder}', "
        f"repo_id='{hub_server.user}/tiny')")
    assert up.returncode == 0, up.stderr
    for method, path in (("GET", r"/[^/]+/[^/]+/resolve/[^/]+/config\.json"), ("GET", r"/api/models/.+")):
        fault = hub_server.fail(method, path, 400, echo)
        res = hub_server.run(scan)
        assert fault.sent and all(f"Bearer {hub_server.token}" in r.body.decode() for r in fault.sent)
        assert res.returncode == 2 and res.stdout == "", res.stderr
        assert res.stderr.startswith("melsurgery: error: ") and res.stderr.count("\n") == 1, res.stderr
        assert hub_server.token not in res.stderr
        # the server's own message, with its status, not "cannot be reached"
        assert "HTTP 400" in res.stderr and "malformed request header" in res.stderr, res.stderr
