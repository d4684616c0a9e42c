"""Hostile input at the tool's edges: Hub identifiers, caches, a broken stderr, header bombs, third-party log lines.

Each class has one mechanism; these tests use variants of each class, not only the case that found it. What a user
must see on bad input is what tests/test_bad_input_cli.py checks: one `melsurgery: error:` line, the documented exit
status, nothing written, the source untouched.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from melsurgery.errors import UserError
from tests.support.helpers import assert_clean_failure, run_cli

# --- Hub identifiers and revisions ----------------------------------------------------------------------

BAD_IDS = ["owner/..", "a/b.git", "tester/-model", "owner/.hidden", "owner/x--y", "-owner/x", "owner/x.",
           "o/" + "x" * 97, "owner/näme", "owner/a b", "owner/a\x1b[2Jb", "owner/"]
BAD_REVISIONS = ["../../etc", "a..b", "main~1", "v1:x", "a b", "a\rb", "refs/heads/", ".hidden", "x.lock", "a//b",
                 "@", "br@{1}", "x" * 300, "\udcff", ""]
GOOD_REVISIONS = ["main", "v1.0", "refs/pr/3", "0123456789abcdef0123456789abcdef01234567", "feature/x-y_z"]


@pytest.mark.parametrize("repo_id", BAD_IDS)
def test_a_hub_id_the_hub_refuses_is_bad_input_before_any_download(repo_id, tmp_path, monkeypatch):
    """`owner/..`, `a/b.git`, `tester/-model` passed the tool's own pattern and failed inside huggingface_hub
    ("internal error (HFValidationError ...)", exit 70)."""
    import huggingface_hub

    from melsurgery.checkpoint.source import resolve

    monkeypatch.chdir(tmp_path)  # no folder of that name
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    with pytest.raises(UserError, match="not a Hub repo id"):
        resolve(repo_id)


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_a_revision_git_refuses_is_bad_input_before_any_download(revision, monkeypatch):
    import huggingface_hub

    from melsurgery.checkpoint.source import resolve

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    with pytest.raises(UserError, match="invalid revision"):
        resolve("HuggingFaceTB/SmolLM2-135M", revision)


@pytest.mark.parametrize("revision", GOOD_REVISIONS)
def test_a_good_revision_reaches_the_hub_client(revision, monkeypatch):
    import huggingface_hub

    from melsurgery.checkpoint.source import resolve

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    with pytest.raises(AssertionError, match="download attempted"):
        resolve("HuggingFaceTB/SmolLM2-135M", revision)


def _no_download(*args, **kwargs):
    raise AssertionError("download attempted")


@pytest.mark.parametrize("repo_id,revision", [("owner/..", None), ("tester/-model", None), ("a/b.git", None),
                                              ("owner/name", "../x"), ("owner/name", "a\x1bb")])
def test_push_refuses_the_same_ids_and_revisions_before_reading_the_folder(repo_id, revision, tmp_path):
    from melsurgery.hub.push import push

    with pytest.raises(UserError, match="invalid re"):
        push(tmp_path / "absent", repo_id, revision=revision, dry_run=True)


@pytest.mark.parametrize("argv", [
    ("scan", "owner/..", "--quiet"),
    ("patch", "a/b.git", "-o", "{tmp}/out", "--recipe", "wemask"),
    ("verify", "tester/-model", "{tmp}"),
    ("tune", "owner/..", "-o", "{tmp}/run"),
    ("diff", "owner/x--y", "owner/y"),
    ("scan", "owner/name", "--revision", "../../x"),
    ("push", "{tmp}", "owner/..", "--dry-run"),
])
def test_every_command_names_a_bad_hub_id_in_one_line(argv, tmp_path, monkeypatch):
    """In process, through the CLI's error mapping: one line, exit 2, never the internal-error line."""
    from melsurgery.cli import main

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in argv])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and ("invalid re" in lines[0] or "not a Hub repo id" in lines[0]), res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


# --- a broken stderr -----------------------------------------------------------------------------------

def _closed_reader_pipe() -> int:
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("stderr", ["devfull", "closed", "pipe-reader-gone"])
def test_a_user_error_keeps_its_exit_status_when_stderr_is_broken(stderr, tmp_path):
    """Writing the error line failed (ENOSPC, EPIPE) and click turned that into its generic exit 1."""
    argv = ["melsurgery", "scan", str(tmp_path / "absent" / "x" / "y")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if stderr == "devfull":
        with open("/dev/full", "w") as full:
            res = subprocess.run(argv, stderr=full, stdout=subprocess.PIPE, env=env, timeout=120)
    elif stderr == "closed":
        res = subprocess.run(argv, stdout=subprocess.PIPE, env=env, timeout=120,
                             preexec_fn=lambda: os.close(2))
    else:
        fd = _closed_reader_pipe()
        try:
            res = subprocess.run(argv, stderr=fd, stdout=subprocess.PIPE, env=env, timeout=120)
        finally:
            os.close(fd)
    assert res.returncode == 2


def test_closed_standard_streams_are_reopened_on_dev_null():
    """With fd 2 closed, the first file a command opened took fd 2: a library's write to "stderr" landed in it."""
    code = ("import os; from melsurgery.commands.shared import _open_standard_fds; _open_standard_fds(); "
            "print(os.readlink('/proc/self/fd/2'), os.readlink('/proc/self/fd/0'))")
    res = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, timeout=120,
                         preexec_fn=lambda: (os.close(2), os.close(0)))
    assert res.stdout.split() == [os.devnull, os.devnull]


# --- safetensors header bombs ---------------------------------------------------------------------------

def _safetensors(path: Path, entries: dict, data: bytes = b"") -> Path:
    header = json.dumps(entries, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _empty_tensors(n: int) -> dict:
    return {f"model.layers.0.t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}


def _one_byte_tensors(n: int) -> tuple[dict, bytes]:
    return {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}, bytes(n)


BOMBS = {
    # a few MB of empty tensors and no data: the header is larger than its data
    "empty-tensors": lambda: (_empty_tensors(60_000), b""),
    # metadata padding the header: the same bound, whatever the header holds
    "metadata-padding": lambda: ({"__metadata__": {"x": "y" * 3_000_000}}, b""),
    # as many bytes of data as of header, but more entries than any real file holds
    "too-many-tensors": lambda: _one_byte_tensors(100_100),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_a_header_bomb_is_refused_without_parsing_it(case, tmp_path, monkeypatch):
    """A loose shard whose 100 MB header listed 1.7 million empty tensors made `scan` run past 60 s at about 2 GB:
    the header was parsed, then every tensor checked. Its claims are now bounded on its bytes, before parsing."""
    from melsurgery.checkpoint import safetensors_file

    entries, data = BOMBS[case]()
    path = _safetensors(tmp_path / "model.safetensors", entries, data)

    def no_parse(*args, **kwargs):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(safetensors_file.json, "loads", no_parse)
    with pytest.raises(UserError, match="implausible safetensors header.*not parsed"):
        safetensors_file.read_header(path)


def test_a_tensor_name_past_the_bound_is_refused(tmp_path):
    from melsurgery.checkpoint.safetensors_file import read_header

    path = _safetensors(tmp_path / "model.safetensors",
                        {"x" * 5000: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(UserError, match="a tensor name of 5,000 characters"):
        read_header(path)


@pytest.mark.slow
def test_scan_refuses_a_bomb_shard_in_one_line(sharded, tmp_path):
    """Through the CLI: a loose shard beside a real model's shards is refused, the model untouched."""
    from tests.support.helpers import snapshot
    from tests.test_bad_input_cli import copy_model

    src = copy_model(sharded, tmp_path, "src")
    (src / "model.safetensors.index.json").unlink()  # without an index, every .safetensors file is read
    _safetensors(src / "extra.safetensors", _empty_tensors(40_000))
    before = snapshot(src)
    res = run_cli("scan", src, "--quiet", "--num-samples", "1", "--max-tokens", "8")
    assert_clean_failure(res, "implausible safetensors header", code=2)
    assert snapshot(src) == before


# --- caches inside a model being read -------------------------------------------------------------------

CACHE_PLACES = {
    "MELSURGERY_CACHE": lambda model: {"MELSURGERY_CACHE": str(model / "cache")},
    "MELSURGERY_CACHE-is-the-model": lambda model: {"MELSURGERY_CACHE": str(model)},
    "MELSURGERY_CACHE-via-dotdot": lambda model: {"MELSURGERY_CACHE": str(model / "sub" / ".." / "c")},
    "XDG_CACHE_HOME": lambda model: {"MELSURGERY_CACHE": "", "XDG_CACHE_HOME": str(model / "xdg")},
    "HOME": lambda model: {"MELSURGERY_CACHE": "", "XDG_CACHE_HOME": "", "HOME": str(model)},
}
# the homes of the libraries' caches (matplotlib wrote its font cache into the model with HOME there and
# MELSURGERY_CACHE elsewhere)
LIBRARY_PLACES = {
    "HOME-with-our-cache-elsewhere": lambda model: {"HOME": str(model)},
    "MPLCONFIGDIR": lambda model: {"MPLCONFIGDIR": str(model / "mpl")},
    "HF_HOME": lambda model: {"HF_HOME": str(model / "hf")},
    "XDG_CONFIG_HOME": lambda model: {"XDG_CONFIG_HOME": str(model)},
}


def _cache_env(case: str, model: Path, tmp_path: Path) -> dict:
    if case in LIBRARY_PLACES:
        return {"MELSURGERY_CACHE": str(tmp_path / "cache"), **LIBRARY_PLACES[case](model)}
    if case != "shapes-link":
        return CACHE_PLACES[case](model)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shapes").symlink_to(model)  # the cache's shapes/ a link into the model
    return {"MELSURGERY_CACHE": str(cache)}


@pytest.mark.parametrize("case", [*sorted(CACHE_PLACES), "shapes-link", *sorted(LIBRARY_PLACES)])
@pytest.mark.slow
def test_a_cache_inside_the_model_being_read_is_refused_before_any_write(sharded, tmp_path, case):
    """With the cache pointing into the model folder, a plain `scan` wrote its skeleton entry into the model it
    read. The cache goes through the output guard: refused in one line, the model untouched."""
    from tests.support.helpers import snapshot
    from tests.test_bad_input_cli import copy_model

    src = copy_model(sharded, tmp_path, "src")
    before = snapshot(src)
    env = _cache_env(case, src, tmp_path)
    res = run_cli("scan", src, "--quiet", "--num-samples", "1", "--max-tokens", "8", "--plot", tmp_path / "p.png",
                  env=env)
    assert_clean_failure(res, "lies inside the source model", "and caches are written there", code=2)
    assert snapshot(src) == before
    assert sorted(p.name for p in src.iterdir()) == sorted(before)


def test_every_cache_write_goes_through_the_guard():
    """`cache_dir()` is spelled only where the guard turns it into a folder (checkpoint/guard.py `cache_folder`):
    a new cache elsewhere would bypass the check above."""
    import ast

    root = Path(__file__).resolve().parent.parent / "melsurgery"
    callers = sorted({str(p.relative_to(root)) for p in root.rglob("*.py")
                      for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.Call)
                      and getattr(node.func, "id", getattr(node.func, "attr", None)) == "cache_dir"})
    assert callers == ["checkpoint/guard.py"], callers


# --- third-party log lines ------------------------------------------------------------------------------

HOSTILE_TEXT = {
    "cr-and-escape": "\x1b[31mevil\rOVERWRITTEN",
    "osc-title-and-newline": "a\x1b]0;pwned\x07b\nmelsurgery: fake line",
    "bidi-and-token": "\u202eabc hf_" + "A" * 30,
}


def _terminal_safe(stderr: str) -> None:
    assert not set(stderr) & {"\r", "\x1b", "\x07", "\u202e"}, repr(stderr)
    assert "hf_" + "A" * 30 not in stderr
    assert not any(line.startswith("melsurgery: fake") for line in stderr.splitlines())


@pytest.mark.parametrize("case", sorted(HOSTILE_TEXT))
def test_a_library_log_line_goes_through_the_terminal_filter(case, monkeypatch, capsys):
    """A handler bound to a stream before the command started (as transformers and optuna bind theirs on import),
    a library logger, and the warnings module: each line is one printable line, as our own messages are."""
    import io
    import logging
    import warnings

    from melsurgery.commands.shared import redacted_output

    early = io.StringIO()
    logger = logging.getLogger("hostile.library")
    handler = logging.StreamHandler(early)
    logger.addHandler(handler)
    try:
        with redacted_output():
            logger.warning("rope_type=%r", HOSTILE_TEXT[case])
            logger.warning(HOSTILE_TEXT[case])
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                logging.captureWarnings(True)  # pytest's own capture is outside the command; re-arm ours
                warnings.warn(HOSTILE_TEXT[case], UserWarning, stacklevel=1)
    finally:
        logger.removeHandler(handler)
    assert len(early.getvalue().splitlines()) == 2
    _terminal_safe(early.getvalue())
    _terminal_safe(capsys.readouterr().err)


@pytest.mark.slow
def test_a_config_value_echoed_by_transformers_reaches_the_terminal_escaped(sharded, tmp_path):
    """`rope_type` holding an escape sequence and a carriage return: transformers' warning printed the raw \\r
    before our one-line error."""
    from tests.test_bad_input_cli import copy_model, edit_config

    src = copy_model(sharded, tmp_path, "src")
    edit_config(src, rope_scaling={"rope_type": "".join(HOSTILE_TEXT.values()), "factor": 2.0})
    res = run_cli("scan", src, "--quiet", "--num-samples", "1", "--max-tokens", "8")
    assert res.returncode == 2, res.stderr
    _terminal_safe(res.stderr)
    assert res.stderr.splitlines()[-1].startswith("melsurgery: error: ")
    assert all(line.startswith(("melsurgery: error: ", "[transformers]")) for line in res.stderr.splitlines())


# --- numbers in a config that are not sizes -------------------------------------------------------------

BASE_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
BAD_NUMBERS = {
    "nan-rope-theta": ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, "is nan"),
    "inf-top-level": ({"initializer_range": float("inf")}, "'initializer_range' is inf"),
    "nan-in-a-list": ({"layer_types": ["full", float("-inf")]}, "'layer_types.1' is -inf"),
    "zero-rope-theta": ({"rope_theta": 0}, "rope_theta must be a positive number"),
    "negative-scaled-theta": ({"rope_scaling": {"rope_theta": -1.0}}, "rope_theta must be a positive number"),
    "string-theta": ({"rope_parameters": {"rope_theta": "1e4"}}, "rope_theta must be a positive number"),
    # a header naming thousands of one-byte layers passes the header bounds; building their skeleton took minutes
    "layers-past-the-bound": ({"num_hidden_layers": 1025}, "at most 1,024 layers"),
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_config_numbers_are_finite_and_rope_theta_positive(case):
    """A NaN, zero or negative rope_theta ran the whole calibration and ended as "layer 0 produced non-finite
    activations ... although its weights are finite" (or, for inf, passed): now named in the config, before any
    work."""
    from melsurgery.checkpoint.validate import check_config_types

    change, needle = BAD_NUMBERS[case]
    with pytest.raises(UserError, match=needle):
        check_config_types({**BASE_CONFIG, **change}, "config.json")
    check_config_types(BASE_CONFIG, "config.json")


# --- the Hub endpoint ------------------------------------------------------------------------------------

BAD_ENDPOINTS = ["http://[::1", "ftp://mirror/", "notaurl", "http://a\x1b[2J.com", "http://h:99999", "http://h:x",
                 " http://h", "http://:80", "https://u:pw@[::1"]


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_a_malformed_hf_endpoint_is_bad_input(endpoint, monkeypatch):
    """huggingface_hub parses HF_ENDPOINT deep inside a request or an import: "Invalid IPv6 URL" and
    "unsupported protocol" were internal errors (exit 70)."""
    from melsurgery.checkpoint.network import check_endpoint

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(UserError, match="HF_ENDPOINT=.*not an http") as caught:
        check_endpoint()
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize("endpoint", ["https://huggingface.co", "http://127.0.0.1:8080/", "https://u:pw@mirror.local"])
def test_a_good_hf_endpoint_passes(endpoint, monkeypatch):
    from melsurgery.checkpoint.network import check_endpoint

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    check_endpoint()


def test_scan_of_a_hub_id_with_a_malformed_endpoint_is_one_line(tmp_path):
    res = run_cli("scan", "owner/name", "--quiet", env={"HF_ENDPOINT": "http://[::1", "HF_HUB_OFFLINE": "0",
                                                         "HF_HOME": str(tmp_path / "hf")})
    assert_clean_failure(res, "HF_ENDPOINT=", code=2)


# --- empty arguments -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (("scan", ""), "argument 1 of `scan`"),
    (("scan", "{model}", "--json", ""), "--json ''"),
    (("scan", "{model}", "--json="), "--json ''"),
    (("patch", "{model}", "-o", "", "--recipe", "wemask"), "-o ''"),
    (("diff", "", "{model}"), "argument 1 of `diff`"),
    (("verify", "{model}", ""), "argument 2 of `verify`"),
    (("tune", "", "-o", "{tmp}/run"), "argument 1 of `tune`"),
])
def test_an_empty_argument_is_refused_not_read_as_the_current_folder(argv, needle, tmp_path, monkeypatch):
    """`melsurgery scan "$MODEL"` with MODEL unset scanned the current folder (an empty path is "."), and `-o ""`
    or `--json ""` named it as the output."""
    from melsurgery.cli import main
    from tests.support.planted import planted_folder

    model = planted_folder(tmp_path / "model")
    monkeypatch.chdir(model)  # the current folder is a model: an empty argument would have read it
    res = CliRunner().invoke(main, [a.format(model=model, tmp=tmp_path) for a in argv])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "an empty value" in lines[0], res.output
    assert not (tmp_path / "run").exists()


def test_a_model_path_that_is_not_utf8_is_named_before_the_tokenizer_fails_on_it(tmp_path):
    """A folder whose name holds bytes that are not UTF-8 reached the tokenizers library, which refused it with
    "cannot load the tokenizer (UnicodeEncodeError: ... surrogates not allowed)"."""
    from melsurgery.checkpoint.source import resolve
    from tests.support.planted import planted_folder

    model = planted_folder(tmp_path / "model").rename(tmp_path / os.fsdecode(b"model-\xff"))
    with pytest.raises(UserError, match=r"model-\\udcff': the path is not valid UTF-8"):
        resolve(str(model))
    resolve(str(model.rename(tmp_path / "modèle")))  # UTF-8 beyond ASCII is fine


# --- numbers in flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["3-99999999999", "0-" + "9" * 40, "1,2-4000000000000"])
def test_a_layer_range_past_the_model_is_refused_before_it_is_expanded(spec):
    """`--layers 3-99999999999` built the whole range as a list: "out of memory" (exit 5) instead of naming it."""
    from melsurgery.recipes.base import parse_layers

    with pytest.raises(UserError, match="layers must lie in 0-5"):
        parse_layers(spec, me_layer=3, num_layers=6)
    assert parse_layers("1,2-4", me_layer=3, num_layers=6) == (1, 2, 3, 4)
