"""`melsurgery push`: what validate_for_push refuses, and pushes through the loopback hub with the real CLI."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from melsurgery.errors import UserError
from melsurgery.hub.push import default_commit_message, validate_for_push
from tests.support.hub_server import HubServer, emit_result_code, result_of

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"



def run_push(hub: HubServer, *args: str, **kwargs):
    """The real console script, as users run it, against the loopback hub."""
    return hub.run(["melsurgery", "push", *args], **kwargs)


def printed(proc, key: str) -> str | None:
    """The value of a ``key: value`` line of `melsurgery push` output (None when absent)."""
    for line in proc.stdout.splitlines():
        if line.startswith(f"{key}: "):
            return line[len(key) + 2 :]
    return None


def write_provenance(folder: Path, recipes=("wemask", "ffn-dampen")) -> None:
    """provenance.json listing every current file, as melsurgery's writer does."""
    outputs = {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "provenance.json"
    }
    prov = {
        "outputs": outputs,
        "recipes": [{"name": name, "params": {}} for name in recipes],
        "source": {"id": BASE, "revision": "0" * 40},
        "melsurgery": "0.1.0",
    }
    (folder / "provenance.json").write_text(json.dumps(prov, indent=1))


def make_output(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(8, 4, generator=gen), "b": torch.zeros(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (folder / "README.md").write_text(f"---\nbase_model: {BASE}\nlicense: apache-2.0\n---\n# Patched\n")
    write_provenance(folder)
    return folder


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------
# validate_for_push
# --------------------------------------------------------------------------------------------------


def test_valid_folder_and_default_message(tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    manifest = validate_for_push(folder)
    assert [f.path for f in manifest.files] == ["README.md", "config.json", "model.safetensors", "provenance.json"]
    assert all(f.size == (folder / f.path).stat().st_size for f in manifest.files)
    assert default_commit_message(manifest) == f"melsurgery: wemask+ffn-dampen patch of {BASE}"


def _missing_card(folder: Path) -> None:
    (folder / "README.md").unlink()
    write_provenance(folder)


def _hash_mismatch(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 5}))


def _unlisted_file(folder: Path) -> None:
    (folder / "notes.txt").write_text("scratch")


def _corrupt_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])  # header length past the end of the file
    write_provenance(folder)


def _offsets_outside_file(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-16])  # truncated: the last tensor now ends past the file
    write_provenance(folder)


def _header_not_json(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("!")
    path.write_bytes(bytes(data))
    write_provenance(folder)


def _missing_listed_file(folder: Path) -> None:
    prov = json.loads((folder / "provenance.json").read_text())
    prov["outputs"]["tokenizer.json"] = "0" * 64
    (folder / "provenance.json").write_text(json.dumps(prov))


def _bad_provenance_shape(folder: Path) -> None:
    prov = json.loads((folder / "provenance.json").read_text())
    del prov["source"]
    (folder / "provenance.json").write_text(json.dumps(prov))


def _config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")
    write_provenance(folder)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_missing_card, "missing README.md"),
        (_hash_mismatch, "config.json: sha256 differs from provenance.json"),
        (_unlisted_file, "notes.txt: not listed in provenance.json"),
        (_corrupt_header, "corrupt safetensors header"),
        (_offsets_outside_file, "ends past the end of the file"),
        (_header_not_json, "corrupt safetensors header (not JSON)"),
        (_missing_listed_file, "tokenizer.json: listed in provenance.json but missing"),
        (_bad_provenance_shape, "'source' must be an object"),
        (_config_not_json, "config.json: config is not valid JSON"),
    ],
)
def test_validate_refuses(tmp_path: Path, damage, needle: str) -> None:
    folder = make_output(tmp_path / "out")
    damage(folder)
    with pytest.raises(UserError) as err:
        validate_for_push(folder)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message and err.value.exit_code == 2


def test_validate_refuses_missing_provenance(tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    (folder / "provenance.json").unlink()
    with pytest.raises(UserError, match="missing provenance.json"):
        validate_for_push(folder)


# --------------------------------------------------------------------------------------------------
# push through the loopback hub
# --------------------------------------------------------------------------------------------------


def download(hub: HubServer, repo: str, dest: Path, revision: str = "main") -> dict:
    code = emit_result_code() + textwrap.dedent(
        f"""
        from huggingface_hub import HfApi, snapshot_download
        api = HfApi()
        path = snapshot_download("{repo}", revision="{revision}", local_dir=r"{dest}")
        emit({{
            "path": path,
            "private": api.model_info("{repo}").private,
            "commits": [c.title for c in api.list_repo_commits("{repo}", revision="{revision}")],
        }})
        """
    )
    proc = hub.run_python(code)
    out = result_of(proc)
    out["proc"] = proc
    return out


def assert_no_token(hub: HubServer, procs, roots) -> None:
    """The token must not leak: not in any output, not in any file we wrote, served or downloaded."""
    token = hub.token.encode()
    for proc in procs:
        assert hub.token not in proc.stdout + proc.stderr
    for root in (*roots, hub.root, hub.client_home):
        for path in Path(root).rglob("*"):
            if path.is_file():
                assert token not in path.read_bytes(), path


def downloaded_files(dest: Path) -> dict[str, bytes]:
    files = {k: v for k, v in all_bytes(dest).items() if not k.startswith(".cache/")}
    assert files.pop(".gitattributes")  # the hub's own, from the initial commit
    return files


@pytest.mark.slow
def test_push_round_trip(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    repo = f"{hub_server.user}/smollm2-mel-fixed"
    proc = run_push(hub_server, str(folder), repo, "--private")
    assert proc.returncode == 0, proc.stderr
    message = f"melsurgery: wemask+ffn-dampen patch of {BASE}"
    total = sum(len(b) for b in all_bytes(folder).values())
    assert proc.stdout.splitlines()[0] == f"pushed 4 files ({total:,} bytes) to {repo}: {message}"
    assert printed(proc, "repo") == f"{hub_server.endpoint}/{repo}"
    assert printed(proc, "commit").startswith(f"{hub_server.endpoint}/{repo}/commit/")
    assert printed(proc, "pull request") is None
    head = hub_server.hub.commits[hub_server.hub.repos[repo].branches["main"]]
    assert {p: e.size for p, e in head.files.items() if p != ".gitattributes"} == {
        rel: len(data) for rel, data in all_bytes(folder).items()
    }
    assert printed(proc, "commit").endswith(head.oid)

    dest = tmp_path / "dl"
    got = download(hub_server, repo, dest)
    assert got["private"] is True
    assert got["commits"] == [message, "initial commit"]  # one commit
    assert downloaded_files(dest) == all_bytes(folder)
    assert hub_server.hub.unhandled == []
    assert_no_token(hub_server, [proc, got["proc"]], [folder, dest])


@pytest.fixture(scope="module")
def wemask_checkpoint(tmp_path_factory, planted: Path) -> Path:
    """A real melsurgery output: a planted model patched with wemask (custom layer shipped)."""
    from melsurgery.checkpoint.source import resolve
    from melsurgery.detect.scan import CalibrationSpec
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import run_patch

    out = tmp_path_factory.mktemp("wemask") / "out"
    man = Manifest(model=str(planted), calibration=CalibrationSpec(num_samples=4, max_tokens=32),
                   recipes=[("wemask", {})])
    run_patch(resolve(str(planted)), out, man)
    return out


@pytest.mark.slow
def test_push_real_patched_checkpoint_and_load_it_back(hub_server: HubServer, wemask_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    import melsurgery
    from melsurgery.checkpoint.reader import Checkpoint

    repo = f"{hub_server.org}/planted-wemask"
    proc = run_push(hub_server, str(wemask_checkpoint), repo, "--commit-message", "planted wemask")
    assert proc.returncode == 0, proc.stderr
    assert "modeling_melsurgery.py" in all_bytes(wemask_checkpoint)  # the custom layer travels too
    dest = tmp_path / "dl"
    got = download(hub_server, repo, dest)
    assert got["commits"] == ["planted wemask", "initial commit"]
    assert downloaded_files(dest) == all_bytes(wemask_checkpoint)  # every file, byte for byte

    model, tokenizer = melsurgery.load(dest)
    expected, _ = melsurgery.load(wemask_checkpoint)
    ids = torch.tensor([tokenizer("to be or not")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
    assert model.config.melsurgery_wemask == Checkpoint(wemask_checkpoint).config["melsurgery_wemask"]
    assert hub_server.hub.unhandled == []
    assert_no_token(hub_server, [proc, got["proc"]], [wemask_checkpoint, dest])


@pytest.mark.slow
def test_push_pr_and_branch(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    repo = f"{hub_server.user}/patched"
    assert run_push(hub_server, str(folder), repo, "--commit-message", "first").returncode == 0

    make_output(folder, seed=1)  # new weights, new provenance
    proc = run_push(hub_server, str(folder), repo, "--create-pr")
    assert proc.returncode == 0, proc.stderr
    assert printed(proc, "pull request") == f"{hub_server.endpoint}/{repo}/discussions/1"
    branches = hub_server.hub.repos[repo].branches
    assert printed(proc, "commit").endswith(branches["refs/pr/1"])
    main_files = hub_server.hub.commits[branches["main"]].files
    pr_files = hub_server.hub.commits[branches["refs/pr/1"]].files
    assert main_files["model.safetensors"].sha256 != pr_files["model.safetensors"].sha256
    assert hub_server.hub.commits[branches["main"]].title == "first"

    proc = run_push(hub_server, str(folder), repo, "--revision", "experiments")
    assert proc.returncode == 0, proc.stderr
    assert hub_server.hub.commits[branches["experiments"]].files == pr_files
    assert "(branch experiments)" in proc.stdout.splitlines()[0]

    # Pushing identical files again: the client sends no commit, and the output says so.
    proc = run_push(hub_server, str(folder), repo, "--revision", "experiments")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("nothing to push: ")
    assert len(hub_server.hub.history(hub_server.hub.commits[branches["experiments"]])) == 3
    assert hub_server.hub.unhandled == []


@pytest.mark.slow
def test_dry_run_sends_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    proc = run_push(hub_server, str(folder), f"{hub_server.user}/x", "--dry-run", token=None)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"would push 4 files ({sum(len(b) for b in all_bytes(folder).values()):,} bytes)")
    listed = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in lines if line.startswith("  ")}
    assert listed == {rel: len(data) for rel, data in all_bytes(folder).items()}
    assert lines[-1] == "dry run: nothing was sent"
    assert printed(proc, "commit") is None
    assert hub_server.hub.log == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no-token", "no Hugging Face token found"),
        ("bad-token", "rejected the token (401)"),
        ("read-token", "cannot write to"),
        ("refused", "cannot reach the Hugging Face Hub"),
        ("bad-repo-id", "invalid repo id"),
        ("invalid-folder", "missing README.md"),
        ("public-exists", "already exists and is public"),
    ],
)
@pytest.mark.slow
def test_push_failures_are_one_line_user_errors(hub_server: HubServer, tmp_path: Path, case: str, needle: str):
    folder = make_output(tmp_path / "out")
    repo = f"{hub_server.user}/target"
    args, kwargs = [str(folder), repo], {}
    if case == "no-token":
        kwargs["token"] = None
    elif case == "bad-token":
        kwargs["token"] = "hf_" + "x" * 34
    elif case == "read-token":
        kwargs["token"] = hub_server.read_token
    elif case == "refused":
        kwargs["extra_env"] = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    elif case == "bad-repo-id":
        args[1] = "not a/valid repo!"
    elif case == "invalid-folder":
        (folder / "README.md").unlink()
    elif case == "public-exists":
        assert run_push(hub_server, *args).returncode == 0
        args.append("--private")
    proc = run_push(hub_server, *args, **kwargs)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("melsurgery: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""
    assert needle in proc.stderr
    for secret in (hub_server.token, hub_server.read_token):
        assert secret not in proc.stdout + proc.stderr
    if case in ("no-token", "bad-repo-id", "invalid-folder"):
        assert hub_server.hub.log == []  # refused before anything was sent


# A server error that echoes the Authorization header: each place push turns a Hub answer into its one
# line (melsurgery's own card check, then the client's errors on repo creation and on the commit).
ECHO = "malformed request header: Authorization: {authorization}"
TOKEN_ECHOES = {
    "validate-yaml": ("POST", "/api/validate-yaml", "refused the card's metadata: malformed request header"),
    "create-repo": ("POST", "/api/repos/create", "refused the push (400): malformed request header"),
    "commit": ("POST", r"/api/models/[^/]+/[^/]+/commit/main", "refused the push (400): malformed request header"),
}


def echo_token(hub: HubServer, where: str):
    """Make the loopback hub answer `where` with a 400 whose message carries the bearer token it received."""
    method, path, _ = TOKEN_ECHOES[where]
    return hub.fail(method, path, 400, ECHO)


def assert_echoed(hub: HubServer, fault) -> None:
    """The server really sent the token back (in the body and the X-Error-Message header): without this the
    no-leak assertions could not fail."""
    assert fault.sent, "the fault never fired"
    for resp in fault.sent:
        assert f"Bearer {hub.token}" in resp.body.decode() and f"Bearer {hub.token}" in resp.headers["X-Error-Message"]


@pytest.mark.parametrize("where", sorted(TOKEN_ECHOES))
@pytest.mark.slow
def test_a_hub_error_echoing_the_token_never_shows_it(hub_server: HubServer, tmp_path: Path, where: str) -> None:
    fault = echo_token(hub_server, where)
    folder = make_output(tmp_path / "out")
    proc = run_push(hub_server, str(folder), f"{hub_server.user}/target")
    assert_echoed(hub_server, fault)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("melsurgery: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    # the server's message is shown, with the token scrubbed out of it
    assert TOKEN_ECHOES[where][2] in proc.stderr and "Authorization: Bearer ***" in proc.stderr, proc.stderr
    assert_no_token(hub_server, [proc], [folder])


@pytest.mark.slow
def test_the_echoed_token_leaks_without_scrubbing(hub_server: HubServer, tmp_path: Path) -> None:
    """The planted bug the test above must catch: the same push with melsurgery's redaction disabled (errors.redact,
    which the error line, the output streams and the JSON writers all call) shows the token on stderr (so the echo
    reaches the user unless melsurgery removes it)."""
    fault = echo_token(hub_server, "commit")
    folder = make_output(tmp_path / "out")
    code = textwrap.dedent(
        f"""
        import sys
        import melsurgery.errors as errors
        errors.redact = lambda text: text  # the planted bug: nothing is redacted
        from melsurgery.cli import main
        sys.argv = ["melsurgery", "push", r"{folder}", "{hub_server.user}/target"]
        main()
        """
    )
    proc = hub_server.run_python(code)
    assert_echoed(hub_server, fault)
    assert proc.returncode == 2 and f"Authorization: Bearer {hub_server.token}" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------------
# Model cards the Hub accepts
# --------------------------------------------------------------------------------------------------


def served_card(hub: HubServer, repo: str) -> str:
    """The README.md at the head of main on the loopback hub."""
    head = hub.hub.commits[hub.hub.repos[repo].branches["main"]]
    return (hub.root / "repos" / repo / "objects" / head.files["README.md"].sha256).read_bytes().decode()


@pytest.mark.parametrize("case", ["unknown-id", "--base-model", "hf-cache"])
@pytest.mark.slow
def test_patched_local_folder_card_is_accepted(hub_server: HubServer, planted: Path, planted_scan: dict,
                                               tmp_path: Path, case: str) -> None:
    """Patch a local folder, push it: the card names the base by Hub id when one is known, else by name only."""
    import shutil

    from melsurgery.checkpoint.source import resolve
    from melsurgery.hub.card import front_matter
    from melsurgery.surgery.manifest import Manifest
    from melsurgery.surgery.patch import run_patch
    from tests.support.helpers import run_cli

    src, out = tmp_path / "my-finetune", tmp_path / "out"
    expected = {"unknown-id": None, "--base-model": "acme/tiny-llama", "hf-cache": "planted-org/tiny-planted"}[case]
    if case == "hf-cache":
        src = tmp_path / "hub" / "models--planted-org--tiny-planted" / "snapshots" / ("0" * 40)
    shutil.copytree(planted, src)
    if case == "--base-model":
        res = run_cli("patch", src, "-o", out, "--recipe", "ffn-dampen", "--base-model", expected, "--num-samples",
                      "4", "--max-tokens", "32", "--quiet")
        assert res.returncode == 0, res.stderr
    else:
        run_patch(resolve(str(src)), out, Manifest(model=str(src), recipes=[("ffn-dampen", {})]), scan=planted_scan)
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    prov = json.loads((out / "provenance.json").read_text())["source"]
    assert prov["id"] == str(src) and prov["base_model"] == expected  # provenance keeps the full source
    assert str(tmp_path) not in card  # never a filesystem path in the card
    if expected is None:
        assert "base_model" not in meta and "base_model_relation" not in meta
        assert "the local model folder `my-finetune`" in card and "huggingface.co" not in card
    else:
        assert meta["base_model"] == expected and "base_model_relation" not in meta  # an edit is no finetune
        assert f"[{expected}](https://huggingface.co/{expected})" in card
        origin = {"--base-model": "--base-model", "hf-cache": "the Hugging Face cache path"}[case]
        assert origin in card and origin in prov["base_model_from"]

    repo = f"{hub_server.user}/patched"
    proc = run_push(hub_server, str(out), repo)
    assert proc.returncode == 0, proc.stderr
    # (a plain folder's patch leaves its sources' sha256 to push, which says so first)
    pushed = next(line for line in proc.stdout.splitlines() if line.startswith("pushed "))
    assert pushed.endswith(f"melsurgery: ffn-dampen patch of {expected or 'my-finetune'}")
    assert served_card(hub_server, repo) == card
    calls = [(m, p) for m, p, _ in hub_server.hub.log]
    # our push asks the Hub before creating the repo, and the client asks again before its commit
    assert calls[:2] == [("POST", "/api/validate-yaml"), ("POST", "/api/repos/create")]
    assert calls.count(("POST", "/api/validate-yaml")) == 2
    assert hub_server.hub.unhandled == []


BAD_CARDS = {
    "path": ("base_model: /home/me/models/smollm2-f32\n",
             "base_model '/home/me/models/smollm2-f32' is not a Hub model id (owner/name); "
             "name the base with `melsurgery patch --base-model OWNER/NAME`, or leave base_model out"),
    "licence": ("license: Apache 2.0\n", "license 'Apache 2.0' is not a licence id the Hub knows; use a licence id"),
    "tag": ("tags: [melsurgery, 3]\n", "tags[1] is 3 (int), not a string; write every tags entry as a string"),
    "yaml": ("tags: [unclosed\n", "the YAML front matter does not parse"),
}


def _bad_card(folder: Path, case: str) -> None:
    (folder / "README.md").write_text(f"---\n{BAD_CARDS[case][0]}---\n# Patched\n")
    write_provenance(folder)  # hashes match: only the metadata is wrong


@pytest.mark.parametrize("case", sorted(BAD_CARDS))
def test_validate_refuses_card_metadata_the_hub_would_refuse(tmp_path: Path, case: str) -> None:
    folder = make_output(tmp_path / "out")
    _bad_card(folder, case)
    with pytest.raises(UserError) as err:
        validate_for_push(folder)
    assert str(err.value).startswith(f"{folder / 'README.md'}: ") and BAD_CARDS[case][1] in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_push_refuses_a_path_as_base_model_before_sending_anything(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_output(tmp_path / "out")
    _bad_card(folder, "path")
    proc = run_push(hub_server, str(folder), f"{hub_server.user}/x")
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr == (f"melsurgery: error: {folder / 'README.md'}: the Hub would refuse this card: "
                           f"{BAD_CARDS['path'][1]}\n")
    assert proc.stdout == "" and hub_server.hub.log == []  # refused before anything was sent


@pytest.mark.slow
def test_the_loopback_hub_refuses_the_card_as_the_hub_does(hub_server: HubServer, tmp_path: Path) -> None:
    """Sent straight through the client (create_commit and ModelCard.validate), a path as base_model is refused."""
    folder = make_output(tmp_path / "out")
    (folder / "README.md").write_text("---\nbase_model: /home/me/models/smollm2-f32\nlicense: Apache 2.0\n---\n# P\n")
    repo = f"{hub_server.user}/direct"
    code = emit_result_code() + textwrap.dedent(
        f"""
        from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
        api = HfApi()
        api.create_repo("{repo}")
        folder = r"{folder}"
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=folder + "/" + n)
               for n in ("model.safetensors", "README.md")]
        out = {{}}
        try:
            api.create_commit("{repo}", operations=ops, commit_message="bad card")
        except ValueError as exc:
            out["commit"] = str(exc)
        try:
            ModelCard(open(folder + "/README.md").read()).validate()
        except ValueError as exc:
            out["validate"] = str(exc)
        emit(out)
        """
    )
    proc = hub_server.run_python(code)
    got = result_of(proc)
    base = '"base_model" with value "/home/me/models/smollm2-f32" is not valid. Use a model id from https://hf.co/models.'
    assert got["commit"].splitlines() == ["Invalid metadata in README.md.", f"- {base}",
                                          f'- "license" must be one of [{", ".join(hub_licenses_list())}, array]']
    assert got["validate"].splitlines()[0] == f"- {base}"
    head = hub_server.hub.commits[hub_server.hub.repos[repo].branches["main"]]
    assert head.title == "initial commit" and hub_server.hub.lfs_uploads == []  # nothing was uploaded


def hub_licenses_list() -> list[str]:
    from tests.support.hub_server import HUB_LICENSES

    return HUB_LICENSES


@pytest.mark.slow
def test_push_asks_the_hub_before_creating_the_repo(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    """A rule only the Hub knows (the real one may also want base_model to exist): no repo is left behind."""
    from tests.support import hub_server as server_module

    monkeypatch.setattr(server_module, "hub_metadata_errors",
                        lambda meta: [f'"base_model" with value "{meta["base_model"]}" is not valid. Use a model id '
                                      'from https://hf.co/models.'])
    folder = make_output(tmp_path / "out")
    proc = run_push(hub_server, str(folder), f"{hub_server.user}/x")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == (f"melsurgery: error: {folder / 'README.md'}: the Hugging Face Hub refused the card's "
                           f'metadata: "base_model" with value "{BASE}" is not valid. Use a model id from '
                           "https://hf.co/models.\n")
    assert hub_server.hub.repos == {} and [p for _, p, _ in hub_server.hub.log] == ["/api/validate-yaml"]
