"""Shell completion through click's protocol, in real subprocesses of the installed `melsurgery` script: the
source script of each shell prints without a traceback, and commands, options and MODEL arguments (the
`default` aliases, folders, .gguf files) complete as bash, zsh and fish ask for them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SHELLS = ("bash", "zsh", "fish")


def _melsurgery() -> list[str]:
    """The console script beside this interpreter (the installed entry point), else `python -m melsurgery`."""
    script = Path(sys.executable).with_name("melsurgery")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "melsurgery"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMP_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return {**env, **extra}


def _complete(shell: str, words: str, cwd: Path) -> list[tuple[str, str]]:
    """(type, value) pairs as click answers `shell` for the command line `words` (the cursor at its end)."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    if shell == "fish":  # fish passes the line up to the cursor and the current token
        env = _env(_MELSURGERY_COMPLETE="fish_complete", COMP_WORDS=words,
                   COMP_CWORD="" if words.endswith(" ") else words.split()[-1])
    else:
        env = _env(_MELSURGERY_COMPLETE=f"{shell}_complete", COMP_WORDS=words, COMP_CWORD=str(cword))
    proc = subprocess.run(_melsurgery(), env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    if shell == "bash":
        return [tuple(line.split(",", 1)) for line in proc.stdout.splitlines()]
    lines = proc.stdout.splitlines()
    if shell == "zsh":  # type, value, help ("_" for none)
        return [(lines[i], lines[i + 1]) for i in range(0, len(lines), 3)]
    return [tuple(line.split(",", 1)) for line in lines]  # fish: type,value[\thelp]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "my-model").mkdir()
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a model\n")
    return tmp_path


@pytest.mark.parametrize("shell", SHELLS)
def test_source_script_prints_without_traceback(shell):
    proc = subprocess.run(_melsurgery(), env=_env(_MELSURGERY_COMPLETE=f"{shell}_source"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "_melsurgery_completion" in proc.stdout and "_MELSURGERY_COMPLETE" in proc.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_commands_options_and_models_complete(shell, workdir):
    values = lambda words: [v.split("\t")[0] for _, v in _complete(shell, words, workdir)]  # noqa: E731
    assert values("melsurgery sc") == ["scan"]
    assert set(values("melsurgery ")) >= {"scan", "patch", "verify", "diff", "push", "tune"}
    assert "--overwrite" in values("melsurgery patch --ov")
    assert values("melsurgery scan de") == ["default"]
    # folders and .gguf files, never other files
    assert set(values("melsurgery scan ")) == {"default", "smollm2", "my-model/", "model.Q4_1.gguf"}
    assert values("melsurgery diff default my") == ["my-model/"]
    assert values(f"melsurgery verify {workdir}/m") == [f"{workdir}/model.Q4_1.gguf", f"{workdir}/my-model/"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_through_its_source_script(workdir):
    """bash itself: the source script defines the function that `complete` registers; calling it as bash would
    fills COMPREPLY."""
    line = " ".join(_melsurgery())
    script = (f'eval "$(_MELSURGERY_COMPLETE=bash_source {line})"\n'
              f"COMP_WORDS=(melsurgery scan de); COMP_CWORD=2\n"
              f"_melsurgery_completion {line}\n"
              'printf "%s\\n" "${COMPREPLY[@]}"\n'
              "complete -p melsurgery\n")
    proc = subprocess.run(["bash", "-c", script], env=_env(), cwd=workdir, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "default"
    assert "_melsurgery_completion" in proc.stdout.splitlines()[-1]
