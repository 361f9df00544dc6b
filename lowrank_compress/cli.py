"""The ``lrc`` command line: argument parsing and rendering only; the work is in the library."""

from __future__ import annotations

import os
import sys
import traceback

import click
import typer
from rich.console import Console

from .errors import LrcError, UsageError

app = typer.Typer(
    name="lrc",
    help="Compress pretrained PyTorch models into low-rank layers that keep each layer's function.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _DEBUG["on"] = debug


# --- compress / inspect commands ---

# --- export / bench commands ---

# --- eval / finetune commands ---

# --- demo command ---


def _fail(message: str, code: int) -> None:
    first = " ".join(str(message).strip().splitlines()[:1]) or "unknown error"
    console.print(f"[bold red]error:[/] {first}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every failure into one line and an exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("LRC_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=False, prog_name="lrc")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except click.exceptions.ClickException as exc:
        if debug:
            traceback.print_exc()
        _fail(exc.format_message(), 2)
    except KeyboardInterrupt:
        _fail("interrupted; no partial output was written", 130)
    except LrcError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), UsageError.exit_code if isinstance(exc, ValueError) else 1)
    except Exception as exc:  # any other failure still ends in one line unless --debug
        if debug:
            traceback.print_exc()
        _fail(f"{type(exc).__name__}: {exc}", 1)
