"""Errors the user can fix, their exit codes, and how anything taken from input or a server is printed.

Exit codes (documented in docs/reliability.md): 0 success; 1 `diff` found a difference (as diff(1)); 2 bad
input (a UserError); 3 `scan` found no massive activation; 4 a `verify` gate or the `tune` budget is not met;
5 the machine ran out of space or memory (nothing was written); 6 an engine the command was asked to use
(vLLM) is not installed; 70 an internal error (a bug: one line, the
traceback only with MELSURGERY_DEBUG=1); 128+n killed by signal n (130 Ctrl-C, 129 SIGHUP, 143 SIGTERM).

Two functions stand between input and the user's terminal, logs and files: `redact` removes secrets (URL
userinfo, Hub tokens, bearer values, `password=`-style pairs, and every secret registered with
`register_secret`), `quote` bounds and escapes one value taken from input (control characters such as ESC
and CR would rewrite the terminal; a megabyte value would bury the message).
"""

from __future__ import annotations

import re

BAD_INPUT, NOTHING_FOUND, GATE, NO_SPACE, NO_ENGINE, INTERNAL = 2, 3, 4, 5, 6, 70
SIGNAL_BASE = 128

# The exit status of every command, in one place (docs/budgeted-patch.md lists them).
EXIT_CODES = {
    0: "success",
    1: "diff: the checkpoints differ (as diff(1))",
    2: "a user error: bad input, an unreadable file, a refused option; nothing was written",
    3: "no massive activation persists: no ME Layer, so there is nothing to mitigate",
    4: "a quality budget is not met: a verify gate, no tune trial within the budget, or no setting of the "
       "budgeted patch's search space that cuts the sink within the budget (nothing written)",
    5: "the machine ran out of space (ENOSPC, a quota, a file-size limit) or memory; nothing was written",
    6: "an engine the command was asked to use is not installed (`--engine vllm` without vLLM); nothing was run",
    70: "an internal error (a bug in melsurgery), one line; MELSURGERY_DEBUG=1 prints the traceback",
    129: "stopped by SIGHUP (a closed terminal); nothing half-written is left",
    130: "interrupted (Ctrl-C); nothing half-written is left",
    141: "the reader of stdout went away (`| head`); nothing is printed about it",
    143: "stopped by SIGTERM; nothing half-written is left",
}


class UserError(Exception):
    """An error the user can fix; the CLI prints its one line and exits with ``exit_code``."""

    exit_code = BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class NoMassiveActivations(UserError):
    """Scan found nothing massive: a distinct exit code so pipelines can tell it from failure."""

    exit_code = NOTHING_FOUND


class BudgetNotMet(UserError):
    """Nothing meets the quality budget (a verify gate, tune, `patch --max-kl`): its own code, so pipelines can tell
    a measured "no" from a failure."""

    exit_code = 4


class Interrupted(KeyboardInterrupt):
    """A catchable signal (SIGINT, SIGTERM, SIGHUP) arrived: unwinds like Ctrl-C, so every cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it."""
        return SIGNAL_BASE + self.signum


# --- secrets -------------------------------------------------------------------------------------------

_SECRETS: set[str] = set()
MASK = "***"
_PATTERNS = [
    # userinfo of any URL (user:password@host), up to the last @ before the path: a raw @ in a password too
    (re.compile(r"""(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@"'<>\\]*(?:@[^/\s@"'<>\\]*)*@"""), r"\1" + MASK + "@"),
    # Hugging Face user and organisation tokens
    (re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{8,}"), r"\1" + MASK),
    # HTTP credentials: "Bearer <value>", "Basic <value>"
    (re.compile(r"\b(Bearer|Basic)(\s+)[A-Za-z0-9._~+/-]{6,}=*"), r"\1\2" + MASK),
    # key=value and "key": "value" pairs whose key names a secret; after "token", a number is a figure, and a
    # "token" that ends a hyphenated name is prose ("first-token: gradient steps of the fit")
    (re.compile(r"""(?i)\b((?:api|access|auth|secret|private)[_-]?(?:key|token)|apikey|secret|password|passwd|pwd|"""
                r"""client[_-]?secret|authorization)(["']?\s*[=:]\s*["']?)(?!(?:Bearer|Basic)\s)"""
                r"""(?=[^\s"'&,;)}\]]{4,})[^\s"'&,;)}\]]+"""), r"\1\2" + MASK),
    (re.compile(r"""(?i)(?<![\w-])(token)(["']?\s*[=:]\s*["']?)(?![-+]?[\d.]+(?:e[-+]?\d+)?%?(?:[\s"'&,;)}\]]|$))"""
                r"""(?=[^\s"'&,;)}\]]{6,})[^\s"'&,;)}\]]+"""), r"\1\2" + MASK),
]


def register_secret(value: str | None) -> None:
    """Never print `value` (a token, a password taken from a URL): `redact` replaces it wherever it appears."""
    if value and len(value) >= 4:
        _SECRETS.update({value, repr(value)[1:-1], value.encode("unicode_escape").decode("ascii")})


def redact(text: str) -> str:
    """`text` with every registered secret and every credential-shaped substring replaced by ***."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# --- bounded, escaped echo -----------------------------------------------------------------------------

# C0 and C1 controls, DEL, the bidirectional overrides that reorder what a terminal shows, and lone surrogates
# (undecodable bytes of a file name, which a strict UTF-8 stream refuses to print)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
QUOTE_LIMIT = 120
LINE_LIMIT = 2000


def _escape(match: re.Match) -> str:
    c = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def escape(text: str, keep: str = "") -> str:
    """Every control character of `text` (except those in `keep`) as a visible escape such as \\x1b."""
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """One value taken from input, for a message, as `!r` would show it (a string quoted, anything else its repr)
    but with control characters escaped, at most `limit` characters kept (the rest counted), secrets redacted."""
    if not isinstance(value, str):
        return escape(_bounded(redact(repr(value)), limit))
    return "'" + escape(_bounded(redact(value), limit)).replace("'", "\\'") + "'"


def printable(text: str, limit: int = LINE_LIMIT) -> str:
    """A whole message as one safe line: secrets redacted, control characters (newlines too) escaped, bounded."""
    return _bounded(escape(redact(text)), limit)


def one_line(text: str, limit: int = 400) -> str:
    """A client/server message (bullets and all) as one line of at most `limit` characters, secrets redacted.

    Servers may echo the request's Authorization header back in their errors; the token must never reach the
    terminal or a log.
    """
    lines = [line.strip().removeprefix("- ").strip() for line in redact(text).splitlines()]
    return printable(" ".join(line for line in lines if line), limit)
