"""The ``lrc`` application: the Typer app, the consoles, and how every failure becomes one line and an exit code.

The commands live one per module beside this one and register themselves on ``app``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator

import click
import rich.markup
import typer
from rich.console import Console

from ..errors import LrcError, UsageError

app = typer.Typer(
    name="lrc",
    help="Compress pretrained PyTorch models into low-rank layers that keep each layer's function.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()
if not out.is_terminal:
    out = Console(width=160)  # CI logs: wide enough that layer names are not cut


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    # main() reads --debug from argv before the app parses it, so that it also covers parse errors.
    del debug


def _fail(message: str, code: int) -> None:
    first = " ".join(str(message).strip().splitlines()[:1]) or "unknown error"
    # Escaped: a path or message with [brackets] is text, not rich markup.
    console.print(f"[bold red]error:[/] {rich.markup.escape(first)}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)


# Typer ≥ 0.16 ships its own copy of click: catch both its exceptions and click's.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_PARSE_ERRORS = (click.exceptions.ClickException, typer.TyperException)
# The exit code of the signal (SIGINT or SIGTERM) that stopped the running command, if one did.
_SIGNALLED: dict[str, int | None] = {"code": None}


def _on_signal(signum: int, frame) -> None:
    _SIGNALLED["code"] = 128 + signum
    raise KeyboardInterrupt


def _interrupted() -> None:
    import signal

    code = _SIGNALLED["code"] or 130
    what = "terminated" if code == 128 + signal.SIGTERM else "interrupted"
    _fail(f"{what}; no partial output was written", code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every failure into one line and an exit code.

    Ctrl-C (SIGINT) and SIGTERM (what CI runners send on cancel) raise KeyboardInterrupt, so every
    output in progress is removed on the way up, and exit with 130 or 143 and one line, however a
    library on the way wrapped the interrupt. A signal the parent process ignores stays ignored.
    """
    import signal
    import threading

    _SIGNALLED["code"] = None
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) == default:
                installed[sig] = signal.signal(sig, _on_signal)
    try:
        _main(argv)
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


# No command uses the network: the Hugging Face libraries (timm's Hub access) are switched offline.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _go_offline() -> None:
    os.environ.update(_OFFLINE)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported before main() ran: it read the environment already
        constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def _library_output(debug: bool) -> Iterator[None]:
    """Keep third-party warnings and log records off stderr, where a failure is one line; --debug shows them.

    Libraries log with handlers of their own (torch's fake-tensor errors print whole tracebacks), so
    logging is switched off for the command rather than only left without a root handler.
    """
    root = logging.getLogger()
    handler: logging.Handler = logging.StreamHandler(sys.stderr) if debug else logging.NullHandler()
    root.addHandler(handler)  # a handler on the root logger also keeps logging's last-resort printer quiet
    disabled = logging.root.manager.disable
    if not debug:
        logging.disable(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("default" if debug else "ignore")
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            logging.disable(disabled)
            root.removeHandler(handler)


def _main(argv: list[str] | None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("LRC_DEBUG") == "1"
    _go_offline()
    with _library_output(debug):
        _run(argv, debug)


def _run(argv: list[str] | None, debug: bool) -> None:
    try:
        code = app(args=argv, standalone_mode=False, prog_name="lrc")
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, *_ABORT):
        _interrupted()
    except _PARSE_ERRORS as exc:
        if debug:
            traceback.print_exc()
        _fail(exc.format_message() if hasattr(exc, "format_message") else str(exc), 2)
    except Exception as exc:
        if _SIGNALLED["code"] is not None:
            _interrupted()  # a library turned the KeyboardInterrupt into an error of its own
        if debug:
            traceback.print_exc()
        _fail(*_message(exc))
    # Typer ≥ 0.16 turns a KeyboardInterrupt into exit code 130 and, with standalone_mode=False,
    # returns that code instead of raising.
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == 130 or _SIGNALLED["code"] is not None:
            _interrupted()
        sys.exit(code)


def _message(exc: Exception) -> tuple[str, int]:
    """The one line and the exit code for a failure (any other failure still ends in one line)."""
    text = str(exc).strip() or type(exc).__name__
    if text.startswith("Caught ") and "Original Traceback" in text:
        # Re-raised from a DataLoader worker: the original error is the traceback's last line.
        text = text.splitlines()[-1].split(": ", 1)[-1].strip() or text
    if isinstance(exc, LrcError):
        return text, exc.exit_code
    if isinstance(exc, ValueError):
        return text, UsageError.exit_code
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return text, 1
    if isinstance(exc, MemoryError):
        return "out of memory" + (f" ({text})" if text != "MemoryError" else ""), 1
    return (text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"), 1
