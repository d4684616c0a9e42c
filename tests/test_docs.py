"""The front door stays a front door, and the docs do not rot when code moves.

`mkdocs build --strict` (make docs, CI) catches broken links and anchors between pages; these tests catch
what it cannot: a repository path named in the text that no longer exists, a public name missing from the
API page, a README grown back past its budget.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import melsurgery

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / n for n in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")]
# a repository path in backticks, e.g. `melsurgery/measure/definitions.py` or `tests/support/planted.py`
PATH = re.compile(r"`((?:melsurgery|tests|scripts|benchmarks|manifests)/[\w./-]+)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(page):
    named = {m.group(1).rstrip("/.") for m in PATH.finditer(page.read_text())}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_api_page_documents_every_public_name():
    """Each name of `melsurgery.__all__` has its entry, pointing at where the object is defined."""
    api = (ROOT / "docs" / "api.md").read_text()
    documented = dict(re.findall(r'^::: ([\w.]+)\n    options:\n      heading: "melsurgery\.(\w+)"', api, re.M))
    documented = {name: target for target, name in documented.items()}
    for name in melsurgery.__all__:
        if name == "__version__":
            continue
        obj = getattr(melsurgery, name)
        assert documented.get(name) == f"{obj.__module__}.{obj.__qualname__}", f"docs/api.md: melsurgery.{name}"


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 12_000, f"README.md is {len(readme):,} bytes: move details to docs/"
    text = readme.decode()
    assert "make demo" in text and "make test" in text  # the two set-up commands
    assert (ROOT / ".ci" / "run").read_text().count("make test\n") == 1  # what the README says CI runs


# Development history belongs in CHANGELOG.md: what users and maintainers read elsewhere says what the tool does
# now. The words are assembled so that this file does not match itself.
_WORKLOG = re.compile("|".join([
    r"\b(?:issue|round)s? ?#?\d+", r"\bthis (?:round|session)\b", r"\b(?:last|previous|earlier) session\b",
    r"\bhouse round\b", r"\blanding in\b", r"\buntil it lands\b", "<" + "!--",
]), re.I)
_PLACEHOLDER = re.compile(r"\b(?:T" + "ODO|FIX" + "ME|X" + "XX)\b")  # upper case: `todo` is a fine variable name
_WORKLOG_FILES = sorted(
    p for pattern in ("README.md", "CONTRIBUTING.md", "Makefile", "mkdocs.yml", "docs/**/*.md", "melsurgery/**/*.py",
                      "scripts/**/*", "benchmarks/**/*.py", "tests/**/*.py", "manifests/*")
    for p in ROOT.glob(pattern) if p.is_file() and p.name != "changelog.md" and "__pycache__" not in p.parts)


def test_no_work_log_words():
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in _WORKLOG_FILES
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if _WORKLOG.search(line) or _PLACEHOLDER.search(line)]
    assert not found, "work-log words (history goes to CHANGELOG.md):\n" + "\n".join(found)
