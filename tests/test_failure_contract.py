"""The failure contract: each class of failure has one mechanism, and these tests would have caught the class.

The rule for every bad input: a documented non-zero exit code (not a generic 1), at most two lines on stderr,
no traceback, no secret printed, the source untouched, no partial output, within 60 s. `Outcome` and `refused`
check exactly that. Most variants run the real command group in this process (click's runner: the same Group,
error mapping and output layer as the console script, without an interpreter start per case); what needs a
process of its own (signals, hangs, a full disk, the console script's streams) runs as a subprocess.

Classes (see docs/reliability.md, "Hostile input: the guarantees"): code from a checkpoint, secrets printed,
writes where not asked, hangs, tracebacks, debris, raw echo; a closed pipe,
SIGHUP, sizes that allocate before they are checked.
"""

from __future__ import annotations

import ast
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import melsurgery
from melsurgery.checkpoint.guard import check_writable, protect, protecting
from melsurgery.cli import main
from melsurgery.commands.shared import failure
from melsurgery.errors import LINE_LIMIT, QUOTE_LIMIT, UserError, printable, quote, redact
from tests.support.helpers import QUICK_SCAN, default_signals, snapshot

ROOT = Path(melsurgery.__file__).parent
TEXT = "To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer the slings.\n"
TUNE = ("--max-tokens", "16", "--windows", "1", "--trials", "1", "--quiet")
VERIFY = ("--windows", "1", "--max-tokens", "16", "--generations", "0", "--quiet")
TOKEN = "hf_" + "Q" * 20 + "s3cr3t" + "Z" * 8  # a token-shaped secret
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@dataclass
class Outcome:
    """What a user sees of one run: exit status, stdout, stderr, and how long it took (wall time in this process;
    CPU time for a subprocess, whose wall time on a shared machine says more about the neighbours)."""

    code: int
    stdout: str
    stderr: str
    seconds: float = 0.0


class Hung(BaseException):
    """Raised by the test's alarm in a command that is still running after 60 s (a blocked open, a silent server)."""


def _hung(signum, frame):
    raise Hung


def cli(*args, env: dict | None = None, stdin: str | None = None) -> Outcome:
    """The command group in this process, as the console script runs it (streams, signals, guard, mapping); an
    alarm ends a command still running after 60 s (it then fails with exit 70, not the documented code)."""
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(60)
    try:
        res = CliRunner().invoke(main, [str(a) for a in args], env=env, input=stdin, catch_exceptions=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return Outcome(res.exit_code, res.stdout, res.stderr, time.monotonic() - start)


def console(*args, env: dict | None = None, stdin: str | None = None, timeout: float = 300, **kw) -> Outcome:
    """The real console script in a subprocess, killed (and the test failed) after `timeout` seconds of wall time;
    `seconds` is its CPU time (a hang on a FIFO or a silent server burns none: the kill catches it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(["melsurgery", *map(str, args)], capture_output=True, text=True, input=stdin,
                          env={**os.environ, **(env or {})}, timeout=timeout, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Outcome(proc.returncode, proc.stdout, proc.stderr, cpu)


def refused(res: Outcome, code: int = 2, *needles: str, secrets: tuple[str, ...] = (), out: Path | None = None,
            prefix: str = "melsurgery: error: ") -> str:
    """The rule for bad input; returns the first stderr line."""
    assert res.code == code, (res.code, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith(prefix), res.stderr
    assert not CONTROL.search(res.stderr.replace("\r", "")), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    for secret in secrets:
        assert secret not in res.stdout + res.stderr, "secret printed"
    if out is not None:
        assert not out.exists(), out
        assert not list(out.parent.glob(".melsurgery-tmp-*")), list(out.parent.iterdir())
    assert res.seconds < 60, res.seconds
    return lines[0]


def copy_model(sharded, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(sharded[0], tmp_path / name))


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


# --- code runs from a checkpoint -------------------------------------------------------------------------

LOADERS = {"from_pretrained", "from_config", "apply_chat_template"}
SHIPPED = ROOT / "engines" / "modeling_melsurgery.py"  # runs in the user's transformers, never imported as code here
WRAPPER = ROOT / "checkpoint" / "safeload.py"
# The vLLM harness passes its request's field through to vLLM; nothing in the package sets it other than False
# (any `trust_remote_code=True` in the package fails this test).
PASS_THROUGH = {"engines/vllm_serve.py: trust_remote_code=request.trust_remote_code"}


def loader_bypasses(source: str, name: str) -> list[str]:
    """Calls of transformers' loaders outside the wrapper, and any trust_remote_code=True, in one module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADERS:
            found.append(f"{name}:{node.lineno}: .{node.func.attr}(...) bypasses checkpoint/safeload.py")
        for kw in getattr(node, "keywords", []) if isinstance(node, ast.Call) else []:
            if kw.arg != "trust_remote_code" or (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                continue
            if f"{name}: trust_remote_code={ast.unparse(kw.value)}" not in PASS_THROUGH:
                found.append(f"{name}:{node.lineno}: trust_remote_code is not the constant False")
    return found


def test_every_transformers_load_goes_through_the_wrapper():
    """An AST walk of the package: no from_pretrained/from_config/apply_chat_template call outside safeload.py,
    no trust_remote_code other than False anywhere (the shipped modeling file is for the user's transformers)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path not in (SHIPPED, WRAPPER):
            found += loader_bypasses(path.read_text(), str(path.relative_to(ROOT)))
    assert found == []
    # the check can fail
    assert len(loader_bypasses("AutoTokenizer.from_pretrained(p)\nm.from_config(c, trust_remote_code=True)", "x")) == 3
    assert loader_bypasses("LLM(m, trust_remote_code=True)", "engines/vllm_serve.py")


def evil_folder(sharded, tmp_path: Path, marker: Path, kind: str) -> Path:
    """A planted model whose tokenizer or config names a Python file (auto_map) that writes `marker` when imported."""
    folder = copy_model(sharded, tmp_path, f"evil-{kind}")
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast, LlamaConfig\n" \
           "class Evil(PreTrainedTokenizerFast):\n    pass\nclass EvilConfig(LlamaConfig):\n    pass\n"
    (folder / "evil.py").write_text(code)
    name = "tokenizer_config.json" if kind.startswith("tokenizer") else "config.json"
    data = json.loads((folder / name).read_text())
    if kind == "tokenizer-unknown-class":  # only the shipped code could build this tokenizer
        data.update(auto_map={"AutoTokenizer": ["evil.Evil", None]}, tokenizer_class="Evil")
    elif kind == "tokenizer-known-class":  # the stock class can: auto_map must simply be ignored
        data.update(auto_map={"AutoTokenizer": ["evil.Evil", "evil.Evil"]})
    else:
        data.update(auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (folder / name).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("kind", ["tokenizer-unknown-class", "tokenizer-known-class", "config"])
@pytest.mark.slow
def test_a_folder_that_ships_code_never_runs_it(sharded, tmp_path, text, kind):
    """scan, patch, verify and tune on a folder whose auto_map names a file that writes a marker: the marker is
    never written, even with "y" on stdin for transformers' trust prompt (and once through the console script)."""
    marker = tmp_path / "MARKER"
    folder = evil_folder(sharded, tmp_path, marker, kind)
    before = snapshot(folder)
    runs = [("scan", folder, *QUICK_SCAN), ("patch", folder, "-o", tmp_path / "out", "--recipe", "ffn-dampen",
                                             "--scan", sharded[1], "--quiet"),
            ("verify", sharded[0], folder, *VERIFY),
            ("tune", folder, "-o", tmp_path / "run", "--scan", sharded[1], "--text", text, *TUNE)]
    for args in runs:
        res = cli(*args, stdin="y\ny\ny\n")
        if kind == "tokenizer-unknown-class":
            refused(res, 2, "never runs", out=tmp_path / "out")
        else:  # ran (tune may find no cut of this model's sink within its budget: exit 4, its documented answer)
            assert res.code == 0 or (args[0] == "tune" and res.code == 4), res.stderr
        assert not marker.exists(), f"{args[0]} ran the folder's code"
    if kind == "tokenizer-unknown-class":
        refused(console(*runs[0], stdin="y\ny\ny\n", timeout=300), 2, "never runs")
        assert not marker.exists()
    assert snapshot(folder) == before


@pytest.mark.slow
def test_a_patched_folder_s_modeling_file_is_never_imported(sharded, tmp_path):
    """Our own custom layer comes from the installed package: a wemask output whose shipped modeling file was
    replaced by code writing a marker is verified (and loaded) without running that file."""
    from melsurgery.engines.loading import load

    out, marker = tmp_path / "wm", tmp_path / "MARKER"
    assert cli("patch", sharded[0], "-o", out, "--recipe", "wemask", "--scan", sharded[1], "--quiet").code == 0
    shipped = next(out.glob("modeling_*.py"))
    shipped.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + shipped.read_text())
    res = cli("verify", sharded[0], out, *VERIFY)
    assert res.code == 0, res.stderr
    model, _ = load(out)
    assert model._melsurgery_hooks and not marker.exists()


def test_the_wrapper_refuses_trust_remote_code():
    from transformers import AutoConfig

    from melsurgery.checkpoint.safeload import from_pretrained

    with pytest.raises(ValueError, match="never runs code"):
        from_pretrained(AutoConfig, "unused", trust_remote_code=True)


# --- secrets printed ---------------------------------------------------------------------------------------

SEPARATORS = st.sampled_from([" ", "\n", "=", ": ", "(", "'", '"', ",", "\t", "; "])
NOISE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PASSWORD = st.text(alphabet=ALNUM + "!$%&()*+,;=:-._~@[]", min_size=4, max_size=24).filter(lambda p: p.strip("@"))


@st.composite
def leaks(draw) -> tuple[str, str]:
    """(text, secret): a secret in one of the shapes output may carry, between arbitrary text."""
    kind = draw(st.sampled_from(["hf", "org", "url", "bearer", "pair"]))
    word = draw(st.text(alphabet=ALNUM, min_size=10, max_size=40))
    if kind == "hf":
        secret = shown = "hf_" + word
    elif kind == "org":
        secret = shown = "api_org_" + word
    elif kind == "url":
        secret = draw(PASSWORD)
        scheme = draw(st.sampled_from(["http", "https", "postgresql+psycopg2", "mysql", "redis"]))
        user = draw(st.text(alphabet=ALNUM, min_size=1, max_size=8))
        shown = f"{scheme}://{user}:{secret}@{draw(st.sampled_from(['db', '127.0.0.1:5432', 'h.example']))}/x"
    elif kind == "bearer":
        secret = word
        shown = f"{draw(st.sampled_from(['Bearer', 'Basic']))} {word}"
    else:
        secret = word
        key = draw(st.sampled_from(["api_key", "password", "secret", "access_token", "token", "Authorization"]))
        shown = f"{key}{draw(st.sampled_from(['=', ': ', '=' + chr(34)]))}{word}"
    before, after = draw(NOISE), draw(NOISE)
    assume(secret not in before + after)  # the surrounding text may hold anything but the secret itself
    return before + draw(SEPARATORS) + shown + draw(SEPARATORS) + after, secret


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(leaks())
@pytest.mark.slow
def test_redaction_removes_every_secret_shape(case):
    text, secret = case
    cleaned = redact(text)
    assert secret not in cleaned
    assert redact(cleaned) == cleaned
    code, line = failure(UserError(text))
    assert secret not in line and code == 2


def test_figures_and_ordinary_words_survive_redaction():
    """Redaction takes secrets, not the report: numbers after 'token', 'tokens: 16', plain URLs and paths."""
    for text in ("KL per token: 0.0123", "tokens: 16", "max_tokens=512", "https://huggingface.co/org/model",
                 "sqlite:////tmp/study.db", "a token of 8 bytes", "/home/u/models/hf_cache/x"):
        assert redact(text) == text


@pytest.mark.slow
def test_a_storage_password_is_never_printed_or_recorded(sharded, tmp_path, text):
    """tune --storage with a password in the URL: refused (no driver here, or no server), the URL shown redacted;
    a SQLite URL cannot carry one and is refused before any work."""
    secret = "Sup3rS3cretPw"
    for url in (f"postgresql://bob:{secret}@127.0.0.1:1/db", f"mysql://bob:{secret}@127.0.0.1:1/db",
                f"sqlite://bob:{secret}@/{tmp_path}/s.db", f"bogus://bob:{secret}@x/y"):
        res = cli("tune", sharded[0], "-o", tmp_path / "run", "--scan", sharded[1], "--text", text,
                  "--storage", url, *TUNE)
        refused(res, 2, "--storage", "***", secrets=(secret,), out=tmp_path / "run")
    from melsurgery.search.storage import describe

    assert secret not in describe(f"postgresql://bob:{secret}@h/db", tmp_path)


@pytest.mark.slow
def test_hub_endpoint_userinfo_and_echoed_tokens_are_never_printed(hub_server, tmp_path):
    """A Hub that echoes the request's credentials in a success answer (the commit URL it returns): the push
    succeeds and the token appears nowhere in its output. Then HF_ENDPOINT with user:password in it (the client
    sends those as Basic credentials, which this Hub refuses): one line, neither the password nor the token."""
    from tests.hub.test_push import make_output

    folder = make_output(tmp_path / "out")
    hub_server.hub.echo_credentials = True
    args = ["melsurgery", "push", str(folder), f"{hub_server.user}/target"]
    proc = hub_server.run(args)
    assert proc.returncode == 0, proc.stderr
    assert "?debug=Bearer" in proc.stdout  # the echo reached the client, redacted
    assert hub_server.token not in proc.stdout + proc.stderr
    endpoint = hub_server.endpoint.replace("http://", "http://bob:EndpointPw99@")
    proc = hub_server.run(args, extra_env={"HF_ENDPOINT": endpoint})
    res = Outcome(proc.returncode, proc.stdout, proc.stderr)
    if res.code:
        refused(res, 2, secrets=(hub_server.token, "EndpointPw99"))
    assert "EndpointPw99" not in proc.stdout + proc.stderr and hub_server.token not in proc.stdout + proc.stderr


# --- writes where not asked --------------------------------------------------------------------------------


def into_source(root: Path, src: Path) -> dict[str, Path]:
    """Spellings of paths that lead into (or onto) the source folder: plain, `..`, `.`, symlinks, relative."""
    link = root / "link-to-src"
    link.symlink_to(src)
    (root / "chain").symlink_to(link)
    (root / "elsewhere").mkdir(exist_ok=True)
    return {
        "inside": src / "x.out",
        "dotdot": root / "elsewhere" / ".." / src.name / "x.out",
        "dot-and-back": src / "." / "sub" / ".." / "x.out",
        "symlink": link / "x.out",
        "symlink-chain": root / "chain" / "x.out",
        "relative": Path(os.path.relpath(src / "x.out")),
        "a-source-file": src / "config.json",
        "the-source": src,
    }


def test_no_output_path_leads_into_the_source(sharded, tmp_path, text):
    """Every writer (scan/verify --json and --plot, diff --json, patch -o, tune RUN_DIR, --apply and a SQLite
    --storage) refuses every spelling of a path into the source, before any work; the source is untouched."""
    src = copy_model(sharded, tmp_path, "src")
    before = snapshot(src)
    m, s = src, sharded[1]
    for name, bad in into_source(tmp_path, src).items():
        runs = {
            "scan --json": ("scan", m, *QUICK_SCAN, "--json", bad),
            "scan --plot": ("scan", m, *QUICK_SCAN, "--plot", bad),
            "verify --json": ("verify", sharded[0], m, *VERIFY, "--json", bad),
            "diff --json": ("diff", sharded[0], m, "--json", bad),
            "patch -o": ("patch", m, "-o", bad, "--recipe", "ffn-dampen", "--scan", s, "--quiet", "--overwrite"),
            "tune RUN_DIR": ("tune", m, "-o", bad, "--scan", s, "--text", text, *TUNE),
            "tune --apply": ("tune", m, "-o", tmp_path / "run", "--apply", bad, "--overwrite", "--scan", s,
                             "--text", text, *TUNE),
            "tune --storage": ("tune", m, "-o", tmp_path / "run", "--storage", f"sqlite:///{bad}", "--scan", s,
                               "--text", text, *TUNE),
        }
        for what, args in runs.items():
            line = refused(cli(*args))
            assert "the source model" in line or "is a folder" in line, (name, what, line)
        assert snapshot(src) == before, name
    assert not (tmp_path / "run").exists()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
@pytest.mark.slow
def test_the_guard_judges_the_place_not_the_spelling(tmp_path_factory, data):
    """Any walk through real folders, `..` and symlinks: the guard refuses exactly the paths that land on, inside
    or above the source, as the kernel resolves them one step at a time."""
    root = tmp_path_factory.getbasetemp() / "guard-walk"
    src = root / "src"
    if not root.exists():
        (src / "sub").mkdir(parents=True)
        (src / "config.json").write_text("{}")
        (root / "other").mkdir()
        (root / "link").symlink_to(src)
        (src / "sub" / "back").symlink_to(root / "other")
    spelled, here = root, root
    for _ in range(data.draw(st.integers(0, 6))):
        up = [".."] if here != root else []  # the walk stays inside its own folder
        step = data.draw(st.sampled_from(sorted(p.name for p in here.iterdir() if p.is_dir()) + [".", *up]))
        spelled = spelled / step
        here = here.parent if step == ".." else Path(os.path.realpath(here / step))
    name = data.draw(st.sampled_from(["out", "src", "config.json", "sub"]))
    landed = Path(os.path.realpath(here / name))
    bad = landed == src or src in landed.parents or landed in src.parents
    with protecting():
        protect(src)
        if bad:
            with pytest.raises(UserError, match="source model"):
                check_writable(spelled / name)
        else:
            check_writable(spelled / name)


# --- hangs -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_fifo_anywhere_a_file_is_read_is_refused_unopened(sharded, tmp_path, text):
    """A FIFO where a named file, a model file, or a run folder's lock, journal or scan is expected: every
    command returns at once with one line naming the FIFO (before: blocked forever; the alarm in `cli` would
    end a blocked open after 60 s with exit 70, failing the test)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    m, s = sharded[0], sharded[1]

    def model_with_fifo(name: str) -> Path:
        folder = copy_model(sharded, tmp_path, f"m-{name}")
        (folder / name).unlink()
        os.mkfifo(folder / name)
        return folder

    def run_dir_with_fifo(name: str) -> Path:
        run = tmp_path / f"run-{name}"
        run.mkdir()
        os.mkfifo(run / name)
        return run

    cases = [
        ("scan", m, *QUICK_SCAN, "--calib", fifo),
        ("verify", m, m, *VERIFY, "--text", fifo),
        ("tune", m, "-o", tmp_path / "r0", "--scan", s, "--text", text, "--heldout", fifo, *TUNE),
        ("patch", m, "-o", tmp_path / "out", "--recipe", "ffn-dampen", "--scan", fifo, "--quiet"),
        ("patch", m, "-o", tmp_path / "out", "--manifest", fifo, "--quiet"),
        ("scan", model_with_fifo("config.json"), *QUICK_SCAN),
        ("scan", model_with_fifo("tokenizer.json"), *QUICK_SCAN),
        ("tune", m, "-o", run_dir_with_fifo(".lock"), "--scan", s, "--text", text, *TUNE),
        ("tune", m, "-o", run_dir_with_fifo("study.journal"), "--scan", s, "--text", text, *TUNE),
        ("tune", m, "-o", run_dir_with_fifo("scan.json"), "--text", text, *TUNE),
    ]
    for args in cases:
        refused(cli(*args), 2, "FIFO", out=tmp_path / "out")
    refused(console(*cases[0]), 2, "FIFO")  # and once as the console script


@pytest.mark.slow
def test_a_server_that_never_answers_is_given_up_on(hub_server, tmp_path):
    """An endpoint that accepts the connection and never answers: a Hub source and a push each give up after
    MELSURGERY_TIMEOUT seconds (not retried), one line, exit 2 (before: waited forever)."""
    from tests.hub.test_push import make_output
    from tests.support.silent_server import silent_server

    folder = make_output(tmp_path / "out")
    with silent_server() as url:
        env = {**hub_server.env(), "HF_ENDPOINT": url, "MELSURGERY_TIMEOUT": "2", "HF_HUB_OFFLINE": "0"}
        for args in (("scan", "someone/model", "--quiet"), ("push", folder, "someone/model")):
            res = console(*args, env=env)
            refused(res, 2, "no answer from 127.0.0.1 within 2 s", secrets=(hub_server.token,))
    from melsurgery.checkpoint.network import DEFAULT_TIMEOUT, timeout

    assert timeout() == DEFAULT_TIMEOUT == 30
    for bad in ("0", "-1", "nan", "inf", "soon"):
        os.environ["MELSURGERY_TIMEOUT"] = bad
        try:
            with pytest.raises(UserError, match="MELSURGERY_TIMEOUT"):
                timeout()
        finally:
            del os.environ["MELSURGERY_TIMEOUT"]


TEMPLATES = {
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "huge-output": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
}


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
@pytest.mark.slow
def test_a_chat_template_that_never_ends_is_bounded(sharded, tmp_path, kind):
    """A chat template that loops for hours, recurses or renders megabytes: refused when the tokenizer is
    loaded (its template is tried once, bounded in time and size), before any model work."""
    folder = copy_model(sharded, tmp_path, "tpl")
    (folder / "chat_template.jinja").write_text(TEMPLATES[kind])
    res = console("scan", folder, *QUICK_SCAN, env={"MELSURGERY_TEMPLATE_TIMEOUT": "3"})
    refused(res, 2, "chat template")


# --- tracebacks: a generated family of broken inputs through every command -----------------------------------

NAN = float("nan")
CONFIG_CHANGES = {
    "layers-negative": {"num_hidden_layers": -1},
    "layers-huge": {"num_hidden_layers": 10**12},  # before: a list of 10^12 layers, MemoryError
    "layers-2^31": {"num_hidden_layers": 2**31},
    "layers-float": {"num_hidden_layers": 6.5},
    "layers-string": {"num_hidden_layers": "6"},
    "layers-null": {"num_hidden_layers": None},
    "layers-bool": {"num_hidden_layers": True},
    "hidden-huge": {"hidden_size": 10**15},
    "heads-zero": {"num_attention_heads": 0},
    "vocab-list": {"vocab_size": []},
    "eps-nan": {"rms_norm_eps": NAN},
    "window-negative": {"sliding_window": -1},
    "model-type-escape": {"model_type": "\x1b[31mEVIL\r" + "A" * 100_000},
    "model-type-number": {"model_type": 5},
}
FILE_CHANGES = {
    "config-list": ("config.json", b"[]"),
    "config-empty": ("config.json", b""),
    "config-binary": ("config.json", b"\xff\xfe\x00garbage"),
    "config-deep": ("config.json", b"[" * 100_000 + b"]" * 100_000),
    "tokenizer-empty-object": ("tokenizer.json", b"{}"),  # before: KeyError 'added_tokens'
    "tokenizer-list": ("tokenizer.json", b"[]"),
    "tokenizer-binary": ("tokenizer.json", b"\x00\x01\x02"),
    "tokenizer-config-list": ("tokenizer_config.json", b"[1, 2]"),
    "index-not-object": ("model.safetensors.index.json", b"17"),
}


def broken_models(sharded, tmp_path: Path) -> dict[str, Path]:
    models = {}
    for name, changes in CONFIG_CHANGES.items():
        folder = copy_model(sharded, tmp_path, name)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        models[name] = folder
    for name, (file, data) in FILE_CHANGES.items():
        folder = copy_model(sharded, tmp_path, name)
        (folder / file).write_bytes(data)
        models[name] = folder
    for name, cut in (("tokenizer-truncated", "tokenizer.json"), ("config-truncated", "config.json"),
                      ("index-truncated", "model.safetensors.index.json")):
        folder = copy_model(sharded, tmp_path, name)
        data = (folder / cut).read_bytes()
        (folder / cut).write_bytes(data[: len(data) // 2])
        models[name] = folder
    return models


@pytest.mark.slow
def test_every_command_refuses_a_family_of_broken_models_cleanly(sharded, tmp_path, text):
    """Each broken model through scan, patch, verify (either side), diff and tune: exit 2 (diff: 1 "differs"
    is its documented answer for a changed side file), at most two lines, no traceback, no control character,
    source untouched, no output."""
    out, run = tmp_path / "out", tmp_path / "run"
    for name, folder in broken_models(sharded, tmp_path).items():
        before = snapshot(folder)
        for args in (("scan", folder, *QUICK_SCAN, "--json", out),
                     ("patch", folder, "-o", out, "--recipe", "ffn-dampen", "--scan", sharded[1], "--quiet"),
                     ("verify", sharded[0], folder, *VERIFY, "--json", out),
                     ("verify", folder, sharded[0], *VERIFY),
                     ("tune", folder, "-o", run, "--scan", sharded[1], "--text", text, *TUNE)):
            line = refused(cli(*args), 2, out=out)
            assert len(line) < LINE_LIMIT + 100, (name, args[0])
            assert not run.exists() or not any(p.name in ("tune.json", "best.yaml") for p in run.iterdir())
        res = cli("diff", sharded[0], folder, "--json", out)
        if res.code != 1:
            refused(res, 2, out=out)
        else:
            out.unlink()
        assert snapshot(folder) == before, name


WEMASK_TAMPERING = {
    "dims-out-of-range": lambda w: w["per_layer"][0].update(dims=[9999]),
    "dims-negative": lambda w: w["per_layer"][0].update(dims=[-100]),
    "dims-a-string": lambda w: w["per_layer"][0].update(dims="abc"),
    "dims-empty": lambda w: w["per_layer"][0].update(dims=[]),
    "layer-out-of-range": lambda w: (w["per_layer"][0].update(layer=99), w.update(layers=[99])),
    "strength-a-string": lambda w: w["per_layer"][0].update(strength="x"),
    "strength-nan": lambda w: w["per_layer"][0].update(strength=NAN),
    "strength-above-one": lambda w: w["per_layer"][0].update(strength=7),
    "threshold-missing": lambda w: w["per_layer"][0].update(threshold=None),
    "selector-unknown": lambda w: w.update(selector="everything"),
    "selector-dims-out-of-range": lambda w: w.update(selector_dims=[10**6]),
    "norm-unknown": lambda w: w.update(norm="nope"),
    "module-path-escape": lambda w: w.update(layers_module="__class__.__init__.__globals__"),
    "per-layer-a-string": lambda w: w.update(per_layer="x"),
    "values-wrong-length": lambda w: w["per_layer"][0].update(values=[1.0]),
    "layers-not-configured": lambda w: w.update(layers=[5]),
    "entry-a-list": lambda w: (w.clear(), w.update(per_layer=[[]])),
}


@pytest.mark.slow
def test_verify_refuses_a_tampered_custom_layer_before_loading_it(sharded, tmp_path):
    """A wemask output whose `melsurgery_wemask` settings were edited (out-of-range dims and layers, wrong types,
    NaN, module paths that walk Python objects): one line naming the field, before any model is built."""
    wm = tmp_path / "wm"
    assert cli("patch", sharded[0], "-o", wm, "--recipe", "wemask", "--scan", sharded[1], "--quiet").code == 0
    for name, tamper in WEMASK_TAMPERING.items():
        folder = Path(shutil.copytree(wm, tmp_path / name))
        config = json.loads((folder / "config.json").read_text())
        tamper(config["melsurgery_wemask"])
        (folder / "config.json").write_text(json.dumps(config))
        line = refused(cli("verify", sharded[0], folder, *VERIFY))
        # a non-finite number is refused by the config check that every config passes, naming its key path
        fix = "finite numbers only" if "nan" in name or "inf" in name else "re-run the patch"
        assert "melsurgery_wemask" in line and fix in line, (name, line)


def _gguf(kvs: list[bytes], tensors: list[tuple[str, list[int], int, int]], alignment: int = 32,
          data: int = 64) -> bytes:
    """A GGUF v3 file from encoded key/values and (name, dims, ggml type, offset) tensor infos."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, qtype, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", qtype, offset)
    return out + bytes(-len(out) % alignment) + bytes(data)


def _kv_string(key: str, value: str) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<IQ", 8, len(value)) + value.encode()


def _kv_nested(key: str) -> bytes:
    """An array of arrays of u32 (llama.cpp refuses nested arrays)."""
    inner = struct.pack("<IQ", 4, 2) + struct.pack("<II", 1, 2)
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<IIQ", 9, 9, 2) + inner + inner


ARCH = _kv_string("general.architecture", "llama")
GOOD = [("a.weight", [4], 0, 0), ("b.weight", [8], 0, 32)]  # F32, 16 and 32 bytes, aligned
GGUF_FAMILY = {
    "nested-array": _gguf([ARCH, _kv_nested("tokenizer.ggml.merges")], GOOD),
    "misaligned-offset": _gguf([ARCH], [("a.weight", [4], 0, 0), ("b.weight", [8], 0, 17)]),
    "overlapping-tensors": _gguf([ARCH], [("a.weight", [8], 0, 0), ("b.weight", [8], 0, 0)]),
    "past-the-end": _gguf([ARCH], [("a.weight", [4096], 0, 0)]),
    "unknown-value-type": _gguf([struct.pack("<Q", 3) + b"key" + struct.pack("<I", 99)], GOOD),
    "unknown-tensor-type": _gguf([ARCH], [("a.weight", [4], 999, 0)]),
    "version-4": b"GGUF" + struct.pack("<IQQ", 4, 0, 0),
    "alignment-3": _gguf([ARCH, struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 3)], GOOD),
    "string-length-huge": b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62),
    "dims-count-huge": b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"a"
                       + struct.pack("<I", 2**31),
    "not-gguf": b"PK\x03\x04" + bytes(100),
}


def test_gguf_files_llama_cpp_would_refuse_are_refused(tmp_path):
    """Nested metadata arrays and misaligned tensor offsets (accepted before), overlaps, bad types and sizes, and
    every cut of a file: scan and diff refuse each in one line."""
    valid = _gguf([ARCH, _kv_string("general.name", "tiny")], GOOD)
    family = dict(GGUF_FAMILY)
    family.update({f"cut-at-{n}": valid[:n] for n in range(0, len(valid) - 64, 11)})
    for name, data in family.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        refused(cli("scan", path, *QUICK_SCAN), 2, path.name)
        refused(cli("diff", path, path), 2, path.name)


def _journal_family(tmp_path: Path, journal: bytes) -> dict[str, bytes]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    other = tmp_path / "other.journal"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    optuna.create_study(study_name="someone-else", storage=JournalStorage(JournalFileBackend(str(other))))
    lines = journal.splitlines(keepends=True)
    family = {f"cut-at-{n}": journal[:n] for n in range(7, len(journal), max(1, len(journal) // 6))
              if not journal[:n].endswith(b"\n")}  # a cut at a line's end is a shorter, sound journal
    family.update({
        "garbage-line": b"".join(lines[:2]) + b"\x00\xff not json\n" + b"".join(lines[2:]),
        "unknown-op": b"".join(lines) + b'{"op_code": 99, "worker_id": "w"}\n',
        "not-an-object": b'[1, 2, 3]\n"x"\n',
        "incomplete-entry": b"".join(lines) + b'{"op_code": 4, "worker_id": "w", "study_id": 0}\n',
        "nameless-study": b"".join(lines) + b'{"op_code": 0, "worker_id": "w"}\n',
        "foreign-study": other.read_bytes(),
        "binary": bytes(range(256)) + b"\n",
    })
    return family


@pytest.mark.slow
def test_tune_refuses_damaged_or_foreign_study_storage(sharded, tmp_path, text):
    """A journal cut mid-line, with garbage, unknown or incomplete operations, or another program's
    study; a SQLite file that is not a database, another program's database, or a cut Optuna database: refused
    before any work (before: tracebacks mid-study, or Optuna's tables added to a foreign database)."""
    import sqlite3

    import optuna

    run = tmp_path / "made"
    assert cli("tune", sharded[0], "-o", run, "--scan", sharded[1], "--text", text, *TUNE).code in (0, 4)
    for name, data in _journal_family(tmp_path, (run / "study.journal").read_bytes()).items():
        bad = tmp_path / f"run-{name}"
        bad.mkdir()
        (bad / "study.journal").write_bytes(data)
        before = snapshot(bad)
        refused(cli("tune", sharded[0], "-o", bad, "--scan", sharded[1], "--text", text, *TUNE), 2, "study.journal")
        assert snapshot(bad) == before, name
    good = tmp_path / "optuna.db"
    optuna.create_study(study_name="x", storage=f"sqlite:///{good}")
    with sqlite3.connect(tmp_path / "foreign.db") as db:
        db.execute("CREATE TABLE users (name TEXT)")
    dbs = {"not-a-database": b"hello" * 100, "foreign": (tmp_path / "foreign.db").read_bytes(),
           "cut": good.read_bytes()[: good.stat().st_size // 2]}
    for name, data in dbs.items():
        path = tmp_path / f"{name}.sqlite"
        path.write_bytes(data)
        res = cli("tune", sharded[0], "-o", tmp_path / f"r-{name}", "--storage", f"sqlite:///{path}", "--scan",
                  sharded[1], "--text", text, *TUNE)
        refused(res, 2, "--storage", out=tmp_path / f"r-{name}")
        assert path.read_bytes() == data, name


def test_names_longer_than_the_filesystem_allows_are_refused_up_front(sharded, tmp_path, text):
    """A 300-byte name as any output or input: one line before any work (before: ENAMETOOLONG tracebacks, or a
    refusal only after the whole scan)."""
    long = tmp_path / ("n" * 300)
    m, s = sharded[0], sharded[1]
    for args in (("scan", m, *QUICK_SCAN, "--json", long), ("scan", m, *QUICK_SCAN, "--plot", long),
                 ("patch", m, "-o", long, "--recipe", "ffn-dampen", "--scan", s, "--quiet"),
                 ("patch", m, "-o", tmp_path / ("n" * 240), "--recipe", "ffn-dampen", "--scan", s, "--quiet"),
                 ("tune", m, "-o", long, "--scan", s, "--text", text, *TUNE),
                 ("tune", m, "-o", tmp_path / "run", "--apply", long, "--scan", s, "--text", text, *TUNE),
                 ("tune", m, "-o", tmp_path / "run", "--storage", f"sqlite:///{long}", "--scan", s, "--text", text,
                  *TUNE),
                 ("verify", m, m, *VERIFY, "--json", long), ("diff", m, m, "--json", long),
                 ("scan", long, *QUICK_SCAN), ("scan", m, *QUICK_SCAN, "--calib", long),
                 ("verify", m, m, *VERIFY, "--text", long), ("patch", m, "-o", tmp_path / "o", "--scan", long,
                                                               "--recipe", "ffn-dampen", "--quiet"),
                 ("patch", m, "-o", tmp_path / "o", "--manifest", long, "--quiet")):
        line = refused(cli(*args), 2, out=tmp_path / "o")
        assert "too long" in line, line
    assert not (tmp_path / "run").exists()


# --- debris: signals and a full disk -------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
@pytest.mark.slow
def test_a_signal_mid_patch_leaves_nothing_and_exits_128_plus_n(sharded, tmp_path, sig):
    """The writer pauses after its first shard (test hook); the signal lands mid-write: exit 128 + n, one line,
    no output, no hidden sibling (SIGHUP killed the process uncleaned before)."""
    out, ready = tmp_path / "out", tmp_path / "first-shard-written"
    proc = subprocess.Popen(["melsurgery", "patch", str(sharded[0]), "-o", str(out), "--scan", str(sharded[1]),
                             "--recipe", "ffn-dampen", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_signals,
                            env={**os.environ, "MELSURGERY_TEST_PAUSE_FILE": str(ready)})
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    refused(Outcome(proc.returncode, stdout, stderr), 128 + sig, "interrupted", prefix="melsurgery: interrupted",
            out=out)


@pytest.mark.slow
def test_a_signal_during_tune_stops_cleanly_and_the_study_continues(sharded, tmp_path, text):
    """SIGINT while trials run (the journal already records a complete one): exit 130, one line, no traceback
    (Optuna logged the interrupted trial's traceback before); the journal stays sound and a rerun continues it."""
    run = tmp_path / "run"
    args = ["melsurgery", "tune", str(sharded[0]), "-o", str(run), "--scan", str(sharded[1]), "--text", str(text),
            "--max-tokens", "16", "--windows", "1", "--quiet"]
    proc = subprocess.Popen([*args, "--trials", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)
    try:
        deadline = time.monotonic() + 300
        journal = run / "study.journal"
        complete = re.compile(rb'"op_code":6,[^\n]*"state":1\b')  # a trial's state set to COMPLETE
        while not (journal.exists() and complete.search(journal.read_bytes())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    refused(Outcome(proc.returncode, stdout, stderr), 130, prefix="melsurgery: interrupted")
    made = len(re.findall(rb'"op_code":4\b', journal.read_bytes()))  # trials the first run created
    res = console(*args[1:], "--trials", str(made + 2), timeout=300)  # --trials counts the study's total
    assert res.code in (0, 4), res.stderr  # 4: no trial of this planted model cuts its sink within the budget
    held, ran = map(int, re.search(r"study: (\d+) trials \((\d+) run now\)", res.stdout).groups())
    assert ran >= 1 and held >= ran + 1, res.stdout  # the first run's complete trial is kept, new ones added


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only): a real ENOSPC. Unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}); the RLIMIT_FSIZE test still runs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_with_exit_5_and_leaves_nothing(sharded, small_disk):
    """A real ENOSPC (a 3 MB tmpfs; the model is about 1 MB a shard): patch, and a --json written into the
    last bytes, fail with one line and exit 5, and leave neither output nor hidden sibling behind."""
    filler = small_disk / "filler"
    out = small_disk / "out"
    filler.write_bytes(bytes(2_400_000))  # what is left cannot hold the two shards
    res = console("patch", sharded[0], "-o", out, "--scan", sharded[1], "--recipe", "ffn-dampen", "--quiet",
                  timeout=300)
    refused(res, 5, "No space left on device", "nothing was written", out=out)
    with open(filler, "ab", buffering=0) as fh:  # now fill the disk to the last bytes
        try:
            while True:
                fh.write(bytes(512))
        except OSError:
            pass
    res = console("diff", sharded[0], sharded[0], "--json", small_disk / "diff.json", timeout=300)
    refused(res, 5, "No space left on device", out=small_disk / "diff.json")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.slow
def test_a_file_size_limit_fails_with_exit_5_and_leaves_nothing(sharded, tmp_path):
    """RLIMIT_FSIZE in the child (EFBIG, as a quota would): the --json and the patch fail with exit 5."""
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    for args, out in ((("diff", sharded[0], sharded[0], "--json", tmp_path / "d.json"), tmp_path / "d.json"),
                      (("patch", sharded[0], "-o", tmp_path / "out", "--scan", sharded[1], "--recipe", "ffn-dampen",
                        "--quiet"), tmp_path / "out")):
        res = console(*args, preexec_fn=small_files, timeout=300)
        refused(res, 5, "File too large", out=out)


# --- raw echo ------------------------------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=3000))
def test_anything_taken_from_input_prints_as_one_bounded_escaped_line(text):
    """Arbitrary strings (ESC sequences, CR, bidi overrides, megabytes) as a value in a message and as a whole
    error line: no control character reaches the terminal, one line, bounded length."""
    shown = quote(text)
    assert not CONTROL.search(shown) and "\n" not in shown
    assert len(shown) <= 2 + 2 * QUOTE_LIMIT + 40  # escapes at most double a kept character; then the count
    code, line = failure(UserError(f"model_type {text}"))
    assert code == 2 and not CONTROL.search(line) and "\n" not in line
    assert len(line) <= len("error: ") + LINE_LIMIT + 40
    assert printable(text) == printable(printable(text)) or "\\" in text


@pytest.mark.slow
def test_a_config_value_with_escapes_is_quoted_and_cut(sharded, tmp_path):
    folder = copy_model(sharded, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "\x1b]0;owned\x07\x1b[2J\r" + "A" * 1_000_000
    (folder / "config.json").write_text(json.dumps(config))
    res = console("scan", folder, *QUICK_SCAN)
    line = refused(res, 2, "unsupported architecture", "\\x1b")
    assert len(line) < 400 and "more characters" in line


# --- terminals, pipes and names ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_the_command_quietly(sharded):
    """`melsurgery diff A B | head -c 1`: the closed pipe ends the command with 141 (128 + SIGPIPE) and nothing
    on stderr (before: a BrokenPipeError traceback, then 'Exception ignored' when Python flushed stdout)."""
    proc = subprocess.Popen(["melsurgery", "diff", str(sharded[0]), str(sharded[0])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (0, 141) and stderr == b"", (proc.returncode, stderr)


def test_an_unexpected_failure_is_one_line_with_exit_70():
    """A bug (any exception that is not a user error) is one line with exit 70 and no traceback; the traceback
    is there with MELSURGERY_DEBUG=1."""
    code, line = failure(ZeroDivisionError("division by zero"))
    assert code == 70 and "internal error (ZeroDivisionError" in line and "MELSURGERY_DEBUG" in line


def test_a_pipe_or_device_named_as_output_is_written_to_not_replaced(sharded, tmp_path):
    """`--json /dev/stdout`, a process substitution, a FIFO someone reads: written as a stream. Before, the
    atomic rename replaced the path itself (as root: /dev/stdout became a regular file). Checked here on a
    symlink to /dev/null and on a FIFO with a reader; a FIFO nobody reads is refused, not waited on."""
    import threading

    link = tmp_path / "null-link"
    link.symlink_to("/dev/null")
    res = cli("diff", sharded[0], sharded[0], "--json", link)
    assert res.code == 0 and link.is_symlink() and os.readlink(link) == "/dev/null", res.stderr
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    time.sleep(0.2)  # the reader is waiting in open()
    res = cli("diff", sharded[0], sharded[0], "--json", fifo)
    reader.join(timeout=60)
    assert res.code == 0 and json.loads(got[0])["identical"] is True, res.stderr
    refused(cli("diff", sharded[0], sharded[0], "--json", fifo), 2, "a FIFO that nobody reads")


@pytest.mark.slow
def test_undecodable_bytes_in_a_name_are_printed_escaped(tmp_path):
    """A folder name that is not UTF-8 (a lone surrogate once decoded): one escaped line, not a
    UnicodeEncodeError from a strict stream."""
    name = os.fsdecode(b"bad\xffname")
    (tmp_path / name).mkdir()
    res = console("scan", tmp_path / name, *QUICK_SCAN, env={"PYTHONIOENCODING": "utf-8:strict"})
    refused(res, 2, "the path is not valid UTF-8", "\\udcff")
