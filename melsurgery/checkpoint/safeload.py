"""Everything melsurgery loads through transformers goes through here, so nothing shipped in a model folder runs.

transformers imports the Python file a folder names in `auto_map` (config.json, tokenizer_config.json) when
trust_remote_code is True, and when it is left unset it asks on the terminal: a user who answers "y", or a
script that pipes "y" into melsurgery, would run the folder's code. Every call here passes
trust_remote_code=False, so `auto_map` is ignored: the stock classes load the folder, and a config or tokenizer
that exists only as shipped code is refused with one line. melsurgery's own WeMask layer comes from the
installed package (engines/modeling_melsurgery.py), never from the folder. A test walks the package's syntax
tree: no `from_pretrained` or `from_config` call bypasses `from_pretrained`/`from_config` below.

Chat templates are Jinja run by transformers in its sandbox, which bounds `range` but not nested loops: here
rendering is bounded in time (MELSURGERY_TEMPLATE_TIMEOUT seconds, default 10) and in size.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from melsurgery.architectures import is_patched_config, transformers_config
from melsurgery.checkpoint.network import env_seconds
from melsurgery.errors import UserError, one_line, quote
from melsurgery.formats.textfile import refuse_special_files

TEMPLATE_ENV = "MELSURGERY_TEMPLATE_TIMEOUT"
TEMPLATE_SECONDS = 10.0
TEMPLATE_MAX_CHARS = 1_000_000  # a rendered conversation longer than this is a template gone wrong
PROBE = [{"role": "user", "content": "Hello"}]


def from_pretrained(auto_class: Any, path: Path | str, **kwargs) -> Any:
    """`auto_class.from_pretrained(path, ...)` with trust_remote_code=False: the one such call of the package."""
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("melsurgery never runs code shipped with a checkpoint (trust_remote_code=True refused)")
    return auto_class.from_pretrained(path, trust_remote_code=False, **kwargs)


def from_config(auto_class: Any, config: Any, **kwargs) -> Any:
    """`auto_class.from_config(config, ...)` with trust_remote_code=False (a config's auto_map is ignored)."""
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("melsurgery never runs code shipped with a checkpoint (trust_remote_code=True refused)")
    return auto_class.from_config(config, trust_remote_code=False, **kwargs)


def load_config(folder: Path) -> Any:
    """The folder's config through transformers (stock class for its model_type; auto_map ignored). A patch that
    runs a custom layer declares a model type no engine knows: it is read as its base architecture."""
    from transformers import AutoConfig

    try:
        patched = _patched_config(Path(folder))
        return patched if patched is not None else from_pretrained(AutoConfig, folder)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{Path(folder) / 'config.json'}: transformers cannot read it ({_why(exc)})") from None


def load_tokenizer(folder: Path) -> object:
    """The folder's tokenizer (special files refused, auto_map ignored, its chat template tried once within the
    bounds), or a one-line error."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if folder.is_dir():
        refuse_special_files(folder)
    try:
        patched = _patched_config(folder) if folder.is_dir() else None
        options = {"config": patched} if patched is not None else {}
        tokenizer = from_pretrained(AutoTokenizer, folder, **options)
    except Exception as exc:  # noqa: BLE001 - third-party parsers of untrusted files raise anything (KeyError...)
        raise UserError(f"{quote(str(folder), 300)}: cannot load the tokenizer ({_why(exc)})") from None
    if getattr(tokenizer, "chat_template", None):
        try:
            render_chat(tokenizer, PROBE, add_generation_prompt=True)
        except TemplateError:
            pass  # a template that refuses this probe may take real conversations; using it reports the error
    return tokenizer


def _patched_config(folder: Path) -> Any:
    """transformers' config of a patched checkpoint's base architecture, or None for any other folder (or one whose
    config.json is unreadable: the caller's own load says what is wrong)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return transformers_config(config) if isinstance(config, dict) and is_patched_config(config) else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def check_tokenizer(folder: Path) -> None:
    """A folder that ships a tokenizer must ship one that loads without running code: a patch copies it into an
    output that users load, so a broken one (or one that exists only as shipped code) is refused before any work."""
    if any((Path(folder) / name).exists() for name in TOKENIZER_FILES):
        load_tokenizer(folder)


class TemplateError(UserError):
    """The chat template raised an error on a conversation (not a hang: that is refused outright)."""


class _TooSlow(BaseException):
    """Raised by the alarm inside Jinja; a BaseException, so that no `except Exception` in between swallows it."""


def render_chat(tokenizer: Any, messages: list[dict], **kwargs) -> str:
    """The tokenizer's chat template applied to `messages` (text, not ids), bounded in time and size."""
    seconds = _template_seconds()
    try:
        with _time_limit(seconds):
            text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except _TooSlow:
        raise UserError(f"the chat template of {quote(_name(tokenizer), 300)} did not finish within {seconds:g} s "
                        f"(a template that loops or grows without end); set {TEMPLATE_ENV} to allow longer") from None
    except (MemoryError, RecursionError) as exc:
        why = "ran out of memory" if isinstance(exc, MemoryError) else "recurses without end"
        raise UserError(f"the chat template of {quote(_name(tokenizer), 300)} {why}") from None
    except Exception as exc:  # noqa: BLE001 - Jinja and the template's own `raise_exception` raise anything
        raise TemplateError(f"the chat template of {quote(_name(tokenizer), 300)} fails: {_why(exc)}") from None
    if not isinstance(text, str) or len(text) > TEMPLATE_MAX_CHARS:
        size = f"{len(text):,} characters" if isinstance(text, str) else type(text).__name__
        raise UserError(f"the chat template of {quote(_name(tokenizer), 300)} renders {size} for "
                        f"{len(messages)} messages (at most {TEMPLATE_MAX_CHARS:,})")
    return text


def _template_seconds() -> float:
    return env_seconds(TEMPLATE_ENV, TEMPLATE_SECONDS)


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _TooSlow after `seconds` (SIGALRM, main thread only: elsewhere the sandbox's own limits apply)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum, frame):  # noqa: ARG001 - signal handler signature
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # a caller's own alarm is kept and restored
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001))


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    if "custom code" in text or "trust_remote_code" in text:
        return "it names Python code shipped in the folder (auto_map), which melsurgery never runs"
    return one_line(f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no message'}", 300)
