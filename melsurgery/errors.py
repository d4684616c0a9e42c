"""Errors the user can fix: the CLI prints their one line and exits without a traceback."""

# The exit status of every command, in one place (docs/budgeted-patch.md lists them).
EXIT_CODES = {
    0: "success",
    1: "diff: the checkpoints differ (as diff(1))",
    2: "a user error: bad input, an unreadable file, a refused option; nothing was written",
    3: "no massive activation persists: no ME Layer, so there is nothing to mitigate",
    4: "a quality budget is not met: a verify gate, no tune trial within the budget, or no setting of the "
       "budgeted patch's search space that cuts the sink within the budget (nothing written)",
    130: "interrupted (Ctrl-C); nothing half-written is left",
}


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


class BudgetNotMet(UserError):
    """Nothing meets the quality budget (a verify gate, tune, `patch --max-kl`): its own code, so pipelines can tell
    a measured "no" from a failure."""

    exit_code = 4


def one_line(text: str, secret: str | None = None) -> str:
    """A client/server message (bullets and all) as one line of at most 400 characters, `secret` scrubbed.

    Servers may echo the request's Authorization header back in their errors; the token must never
    reach the terminal or a log.
    """
    if secret:
        text = text.replace(secret, "***")
    lines = [line.strip().removeprefix("- ").strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line)[:400]
