"""The one path guard every writer calls: sources are read-only, whatever path leads into them.

A command registers each model it reads (`protect`: the folder, a .gguf file and its conversion, a Hub
snapshot); every path it is about to write (-o, --json, --plot, tune's RUN_DIR and --apply, a --storage
database) goes through `check_writable` before any work and again when written. The comparison is made on
resolved paths, so `..`, symlinks and relative spellings lead to the same verdict. Names too long for the
filesystem (counting the hidden temporary sibling an atomic write needs) are refused up front instead of
failing after the work with ENAMETOOLONG.

melsurgery's own cache is written through `cache_folder` only: a cache that leads into a model the command reads
($MELSURGERY_CACHE, $XDG_CACHE_HOME or $HOME inside it, one of the cache's folders a link into it, or the home of
a library's cache such as matplotlib's) is refused like any other output there, in one line naming the variable
to set, before the cache is read or written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from melsurgery.errors import UserError, quote
from melsurgery.outputs import cache_dir

TMP_PREFIX = ".melsurgery-tmp-"
TMP_EXTRA = len(TMP_PREFIX) + 1 + 10 + len("-old")  # prefix, name, "-<pid>", "-old" (see atomic.py)

_PROTECTED: list[tuple[Path, str]] | None = None  # None: no command scope is open (library use)


@contextmanager
def protecting() -> Iterator[None]:
    """The scope of one command: models resolved inside it are read-only until it ends."""
    global _PROTECTED
    previous, _PROTECTED = _PROTECTED, []
    try:
        yield
    finally:
        _PROTECTED = previous


def protect(path: Path, what: str = "the source model") -> None:
    """Make `path` (a folder or a file) read-only for the rest of the command; outside a command, nothing."""
    if _PROTECTED is not None:
        _PROTECTED.append((Path(path).resolve(), what))


def resolved(path: Path) -> Path:
    """`path` made absolute with symlinks and `..` resolved as far as it exists (the rest appended)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a component too long
        raise UserError(f"{quote(str(path))}: cannot be used as an output path ({_why(exc)})") from None


def check_apart(out: Path, protect: Path, what: str = "the source model") -> None:
    """Refuse an output that is `protect`, holds it, or lies inside it (writing there would change it)."""
    source, target = resolved(protect), resolved(out)
    if source == target:
        raise UserError(f"{out}: is {what} ({source}); write the output somewhere else")
    if target in source.parents:
        raise UserError(f"{out}: holds {what} ({source}); write the output somewhere else")
    if source in target.parents:
        raise UserError(f"{out}: is inside {what} folder {source}; write the output somewhere else")


def check_writable(out: Path, protect: Path | None = None) -> Path:
    """Refuse an output path that leads into (or holds) a protected source or `protect`, or whose name the
    filesystem cannot hold; returns it absolute (unresolved, so that the name the user gave is kept)."""
    out = Path(out)
    check_name(out)
    for source, what in [*(_PROTECTED or []), *([(Path(protect), "the source model")] if protect else [])]:
        check_apart(out, source, what)
    return out.absolute()


# Where melsurgery and the libraries it runs keep caches and settings (matplotlib's font cache, huggingface_hub,
# torch, triton), by the variables that place them.
CACHE_HOMES = ("MELSURGERY_CACHE", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HOME", "MPLCONFIGDIR", "HF_HOME",
               "TORCH_HOME", "TRITON_CACHE_DIR")


def cache_folder(name: str) -> Path:
    """The cache's folder `name` (shapes, gguf, search), once no cache can land in a model the command reads: the
    folder itself and every variable of CACHE_HOMES are refused when they are a protected source or lie inside
    one (a plain `scan` wrote its skeleton, and matplotlib its font cache, into the model it read). Refused rather
    than skipped, as any other output leading into a source is: the cache is misplaced for every later command
    too, and the fix is one variable."""
    folder = cache_dir() / name
    places = [(folder, f"melsurgery's cache {quote(str(folder))}", "MELSURGERY_CACHE, XDG_CACHE_HOME or HOME")]
    places += [(Path(os.environ[var]), f"${var} ({quote(os.environ[var])})", var) for var in CACHE_HOMES
               if os.environ.get(var)]
    for place, named, fix in places:
        target = resolved(place)
        for source, what in _PROTECTED or []:
            if target == source or source in target.parents:
                raise UserError(f"{named} lies inside {what} ({source}), and caches are written there; set {fix} "
                                "to a folder outside it")
    return folder


def check_name(path: Path) -> None:
    """Every component of `path` short enough for its filesystem, with room for the temporary sibling's name."""
    absolute = Path(os.path.abspath(path))
    existing = next((p for p in [absolute, *absolute.parents] if exists(p)), Path("/"))
    name_max, path_max = _limits(existing)
    if len(os.fsencode(str(absolute))) + TMP_EXTRA > path_max:
        raise UserError(f"{quote(str(path))}: the path is too long for this filesystem ({path_max} bytes at most)")
    for part in absolute.parts[1:]:
        if len(os.fsencode(part)) + (TMP_EXTRA if part == absolute.name else 0) > name_max:
            raise UserError(f"{quote(str(path))}: the name {quote(part, 40)} is too long for this filesystem "
                            f"({name_max} bytes at most, {TMP_EXTRA} of them kept for the temporary copy)")


def exists(path: Path) -> bool:
    """Whether `path` exists; a name too long or a symlink loop counts as absent (the length check speaks)."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def _limits(folder: Path) -> tuple[int, int]:
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
