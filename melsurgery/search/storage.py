"""Where a tune study lives (RUN_DIR's journal, or any Optuna storage URL), checked before any work.

Optuna trusts its storage: a truncated or foreign journal, a file that is not a database, or a database of
another program surfaced as tracebacks in the middle of a study, or (a foreign SQLite file) got Optuna's tables
added to it. Here the storage is proven sound first: the URL parses and its driver is installed; a SQLite file
lies outside every model the command reads (the path guard), is a regular file, and is empty or an Optuna
storage; a journal has only complete lines, replays cleanly through Optuna's own `JournalStorage` and holds
only our study (named `STUDY`, marked `MARK`: another program's study, even under that name, is refused).
The URL is printed and recorded redacted (its password never appears), and a database server gets the
network timeout policy. Failures that only the storage can raise later go through `storage_errors`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from melsurgery.checkpoint.guard import check_writable
from melsurgery.checkpoint.network import storage_engine_kwargs
from melsurgery.errors import UserError, one_line, quote, redact
from melsurgery.formats.textfile import read_bytes, refuse_special

STUDY = "melsurgery-tune"
MARK = "melsurgery"  # the user attribute that marks a study as melsurgery's search
JOURNAL = "study.journal"
LOCK = ".lock"
RUN_FILES = (JOURNAL, f"{JOURNAL}.lock", LOCK, "scan.json", "heldout.txt", "heldout.json", "tune.json", "best.yaml",
             "tune.png")
_FIX = "move it away or choose another RUN_DIR"


def describe(storage: str | None, run_dir: Path) -> str:
    """How messages, the report and tune.json name the storage: the journal's path, or the URL redacted."""
    return redact(storage) if storage else str(Path(run_dir) / JOURNAL)


def check_run_dir(run_dir: Path, storage: str | None, protect: Path | None = None) -> None:
    """Before any work: RUN_DIR and a SQLite --storage outside every model read (and `protect`), RUN_DIR's own
    files regular files or absent, its journal (or the --storage) sound."""
    run_dir = Path(run_dir)
    check_writable(run_dir, protect)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{quote(str(run_dir), 300)}: exists and is not a folder; choose another RUN_DIR")
    for name in RUN_FILES:
        refuse_special(run_dir / name, f"the run folder's {name}")
    if storage:
        check_storage(storage, protect)
    else:
        check_journal(run_dir / JOURNAL)


def check_storage(url: str, protect: Path | None = None) -> None:
    """An Optuna storage URL a study may open: parsed, its driver installed, a SQLite file guarded and sound."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    storage_engine_kwargs(url)  # registers the URL's password as a secret before anything can print it
    shown = quote(redact(url), 300)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
        dialect.import_dbapi()
        dialect().create_connect_args(parsed)  # what the dialect refuses (sqlite with a password) is refused now
    except NoSuchModuleError:  # an ArgumentError too: first
        raise UserError(f"--storage {shown}: unknown database kind {quote(url.split(':', 1)[0])}") from None
    except (ArgumentError, ValueError):
        raise UserError(f"--storage {shown}: not a database URL (e.g. sqlite:///study.db, postgresql://...)") from None
    except ImportError as exc:
        raise UserError(f"--storage {shown}: its database driver is not installed ({exc.name or exc})") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        _check_sqlite(Path(parsed.database), shown, protect)


def _check_sqlite(path: Path, shown: str, protect: Path | None) -> None:
    check_writable(path, protect)
    refuse_special(path, "a study database")
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise UserError(f"--storage {shown}: not a SQLite database ({exc}); {_FIX.replace('RUN_DIR', 'path')}"
                        ) from None
    if tables and not {"studies", "version_info"} <= tables:
        raise UserError(f"--storage {shown}: a database of another program (tables {', '.join(sorted(tables)[:5])})"
                        "; Optuna would add its tables to it: name a new file")


def check_journal(path: Path) -> None:
    """RUN_DIR's journal, if any: a regular file of complete JSON lines that Optuna replays cleanly, holding only
    melsurgery's study."""
    refuse_special(path, "the study journal")
    if not path.exists():
        return
    data = read_bytes(path, "the study journal")
    if data and not data.endswith(b"\n"):
        raise UserError(f"{quote(str(path), 300)}: the study journal ends in a cut line (a write was interrupted); "
                        f"{_FIX}")
    for number, line in enumerate(data.splitlines(), 1):
        try:
            op = json.loads(line)
        except (ValueError, RecursionError):
            op = None
        if not isinstance(op, dict):
            raise UserError(f"{quote(str(path), 300)}: line {number} is not an Optuna journal entry; {_FIX}")
    try:
        studies = _replay(path)
    except Exception as exc:  # noqa: BLE001 - Optuna's replay of a damaged journal raises anything
        raise UserError(f"{quote(str(path), 300)}: the study journal does not replay "
                        f"({one_line(f'{type(exc).__name__}: {exc}', 200)}); {_FIX}") from None
    others = sorted(set(studies) - {STUDY})
    if others:
        raise UserError(f"{quote(str(path), 300)}: the journal holds other studies "
                        f"({', '.join(quote(n, 40) for n in others)}); {_FIX}")
    if STUDY in studies and (why := not_ours(*studies[STUDY])):
        raise UserError(f"{quote(str(path), 300)}: {why}; {_FIX}")


def not_ours(attrs: dict, directions: list[str], trials: int) -> str | None:
    """Why a study named `STUDY` is not melsurgery's (None: it is, or it is new and empty): ours carry `MARK` (or,
    from before the mark, the search's fingerprint) and maximise the cut while minimising KL."""
    if not attrs and not trials and directions == ["MAXIMIZE", "MINIMIZE"]:
        return None
    if directions != ["MAXIMIZE", "MINIMIZE"]:
        return f"the study {STUDY!r} is not melsurgery's (it optimises {', '.join(directions).lower()})"
    if MARK not in attrs and "fingerprint" not in attrs:
        return f"the study {STUDY!r} is not melsurgery's (it carries no {MARK!r} mark)"
    return None


def _replay(path: Path) -> dict[str, tuple[dict, list[str], int]]:
    """Each study of a journal (replayed read-only through Optuna's public storage API, every trial too, so that a
    bad reference shows here): its user attributes, directions and trial count, by name."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    store = JournalStorage(JournalFileBackend(str(path)))
    out = {}
    for study in store.get_all_studies():
        trials = store.get_all_trials(store.get_study_id_from_name(study.study_name), deepcopy=False)
        out[study.study_name] = (dict(study.user_attrs), [d.name for d in study.directions], len(trials))
    return out


def open_storage(storage: str | None, run_dir: Path) -> Any:
    """What optuna.create_study takes: RUN_DIR's journal, or an RDB storage with the network timeout policy."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if storage is None:
        return JournalStorage(JournalFileBackend(str(Path(run_dir) / JOURNAL)))
    if storage.split(":", 1)[0].lower().startswith(("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")):
        return RDBStorage(storage, engine_kwargs=storage_engine_kwargs(storage))
    return storage


@contextmanager
def storage_errors(storage: str | None, run_dir: Path, doing: str) -> Iterator[None]:
    """Any failure of the storage while `doing` becomes one line naming it (redacted); ours pass unchanged."""
    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - storage back-ends raise their own errors (sqlalchemy, network)
        raise UserError(f"{quote(describe(storage, run_dir), 300)}: cannot {doing} "
                        f"({one_line(f'{type(exc).__name__}: {exc}', 300)})") from None
