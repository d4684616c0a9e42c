"""Errors the user can fix: the CLI prints their one line and exits without a traceback."""


class UserError(Exception):
    """An error the user can fix; the CLI prints its one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class NoMassiveActivations(UserError):
    """Scan found nothing massive: a distinct exit code so pipelines can tell it from failure."""

    exit_code = 3


def one_line(text: str, secret: str | None = None) -> str:
    """A client/server message (bullets and all) as one line of at most 400 characters, `secret` scrubbed.

    Servers may echo the request's Authorization header back in their errors; the token must never
    reach the terminal or a log.
    """
    if secret:
        text = text.replace(secret, "***")
    lines = [line.strip().removeprefix("- ").strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line)[:400]
