"""Errors the CLI turns into one-line messages and exit codes.

Usage errors (bad arguments, bad input files) exit 2, runtime failures exit 1 and a missed
budget (a CI gate) exits 3.
"""

from __future__ import annotations


class LrcError(Exception):
    """A failure with a message meant for the user (exit code 1)."""

    exit_code = 1


class UsageError(LrcError, ValueError):
    """Bad arguments or bad input files (exit code 2)."""

    exit_code = 2


class BudgetExceeded(LrcError):
    """A figure missed its budget (exit code 3); the outputs were still written."""

    exit_code = 3


def reraise_interrupt(exc: BaseException) -> None:
    """Raise KeyboardInterrupt if ``exc`` was caused by one.

    Tracers and exporters can turn an interrupt that lands inside them into errors of their own. A
    caller that answers a failure by trying another path calls this first, so that Ctrl-C (or
    SIGTERM, which the CLI turns into KeyboardInterrupt) stops the command instead of switching paths.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
