"""Every documented example runs: the shell examples of the README and the docs pages, and every command's
`--help` examples, executed against the default model with MELSURGERY_SMOKE=1 (a few samples, tokens, windows
and trials), so that an example cannot go stale.

A page runs top to bottom in one empty folder, as a reader would type it: an example may use `default`, the
fixtures below (the embedded GGUF as `smollm2.gguf` or `model.Q4_1.gguf`, the default model's safetensors
folder as `my-model`, a calibration file `prompts.jsonl`, the repository's `manifests/`) and whatever an earlier
example of the same page wrote. What needs the network, vLLM or a new environment (a Hub id, a push without
--dry-run, `--engine vllm`, `pip`, `make`, `vllm`, `lm_eval`) is parsed for its flags only.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from melsurgery.cli import main
from tests.commands.test_cli_help import examples_of, parse

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)
# commands that need a network, vLLM or a fresh environment: never run here
NOT_RUN = {"pip", "pipx", "make", "vllm", "lm_eval", "source", "git", "huggingface-cli", "hf", "cd"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# exit statuses an example may end with under MELSURGERY_SMOKE: 4 is a budget or gate not met on a few tokens
ACCEPTED = {"scan": {0}, "patch": {0, 4}, "verify": {0, 4}, "tune": {0, 4}, "diff": {0, 1}, "push": {0}}


@dataclass(frozen=True)
class Example:
    """One example as a reader would type it: where it stands, its language and its text."""

    where: str
    lang: str  # bash or python
    text: str


def shell_lines(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, blank and comment-only lines dropped."""
    out, cmd = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        line = line[2:] if line.startswith("$ ") else line
        cmd += line
        if cmd.endswith("\\"):
            cmd = cmd[:-1] + " "
            continue
        if cmd and not cmd.startswith("#"):
            out.append(cmd)
        cmd = ""
    return out


def page_examples(page: Path) -> list[Example]:
    where = str(page.relative_to(ROOT))
    found = []
    for match in FENCE.finditer(page.read_text()):
        lang, block = match.groups()
        line = page.read_text()[: match.start()].count("\n") + 1
        if lang == "bash":
            found += [Example(f"{where}:{line}", "bash", cmd) for cmd in shell_lines(block)]
        elif "# not run" in block:
            compile(block, f"{where}:{line}", "exec")  # not run (said why in the block), but it must parse
        else:
            found.append(Example(f"{where}:{line}", "python", block))
    return found


def help_examples() -> list[Example]:
    order = ["scan", "patch", "verify", "diff", "push", "tune"]  # the pipeline: later examples use earlier outputs
    names = order + sorted(set(main.commands) - set(order))
    return [Example(f"melsurgery {name} --help", "bash", shlex.join(args))
            for name in names for args in examples_of(main.commands[name])]


def flags_only(argv: list[str]) -> bool:
    """Needs the network or vLLM: a push that sends, a Hub id as a model, vLLM as the engine."""
    name, args = argv[1], argv[2:]
    if name == "push" and "--dry-run" not in args:
        return True
    if "--engine" in args and args[args.index("--engine") + 1] == "vllm":
        return True
    positional = [a for a in args if not a.startswith("-")]
    # an owner/name-shaped argument that names nothing on disk is taken for a Hub id (push: its first argument);
    # this also takes an output not yet written (`-o out/x`) for one, so such examples are checked for flags only
    return any(HUB_ID.match(a) and not Path(a).exists() for a in positional[: 1 if name == "push" else 2])


def fixtures(folder: Path, default_folder: Path) -> None:
    from melsurgery.checkpoint.source import default_gguf

    for name in ("smollm2.gguf", "model.Q4_1.gguf"):
        (folder / name).symlink_to(default_gguf())
    (folder / "my-model").symlink_to(default_folder, target_is_directory=True)
    shutil.copy(ROOT / "melsurgery" / "data" / "calibration.jsonl", folder / "prompts.jsonl")
    (folder / "manifests").symlink_to(ROOT / "manifests", target_is_directory=True)


def run_example(example: Example, folder: Path, env: dict) -> None:
    if example.lang == "python":
        res = subprocess.run([sys.executable, "-c", example.text], cwd=folder, env=env, capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, f"{example.where}: python example failed\n{res.stderr[-3000:]}"
        return
    argv = shlex.split(example.text, comments=True)
    if argv[0] != "melsurgery":
        assert argv[0] in NOT_RUN, f"{example.where}: `{argv[0]}` is neither melsurgery nor a known setup command"
        return
    assert argv[1] in main.commands, f"{example.where}: no command `{argv[1]}`"
    parse(main.commands[argv[1]], argv[1], argv[2:])  # every flag exists and every value converts
    if flags_only(argv):
        return
    res = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode in ACCEPTED[argv[1]], (
        f"{example.where}: `{example.text}` exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    assert "Traceback" not in res.stderr, res.stderr


def run_all(examples: list[Example], folder: Path, default_folder: Path) -> None:
    fixtures(folder, default_folder)
    env = {**os.environ, "MELSURGERY_SMOKE": "1", "HF_HUB_OFFLINE": "1"}
    for example in examples:
        run_example(example, folder, env)


RUN_PAGES = [p for p in PAGES if any(e.lang == "bash" and e.text.startswith("melsurgery ") or e.lang == "python"
                                     for e in page_examples(p))]


def test_pages_have_examples():
    """The parser finds the examples: the README's quick start at least."""
    readme = [e.text for e in page_examples(ROOT / "README.md")]
    assert any(t.startswith("melsurgery patch default") for t in readme), readme


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, tmp_path, smollm2):
    run_all(page_examples(page), tmp_path, smollm2.folder)


@pytest.mark.slow
def test_help_examples_run(tmp_path, smollm2):
    run_all(help_examples(), tmp_path, smollm2.folder)
