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
