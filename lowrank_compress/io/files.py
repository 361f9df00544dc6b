"""Atomic file output: write to a temporary file beside the target, rename on success."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import LrcError, UsageError

_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"output path {path} is a directory")
    if path.exists() and not path.is_file():
        # A device, FIFO or socket: renaming a temporary file over it would replace it (as root, even /dev/null).
        raise UsageError(f"output path {path} is not a regular file")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"output directory {parent} is not a directory")
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory {parent} is not writable")
    return path


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop or an unreadable component: compare as given
        return path.absolute()


def _same_file(a: Path, b: Path) -> bool:
    if _resolved(a) == _resolved(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_distinct_paths(
    inputs: Mapping[str, str | os.PathLike | None], outputs: Mapping[str, str | os.PathLike | None]
) -> None:
    """Fail before any work when an output would replace an input or another output.

    ``inputs`` and ``outputs`` map what the user called each path (``CHECKPOINT``, ``--json``) to the
    path, or None when not given; a missing input cannot be overwritten (its own check reports it).
    Paths are compared after resolving symlinks and, where both exist, with ``os.path.samefile``
    (hard links), so no spelling of a path slips through.
    """
    given_inputs = [(label, Path(p)) for label, p in inputs.items() if p is not None and os.path.lexists(p)]
    given_outputs = [(label, Path(p)) for label, p in outputs.items() if p is not None]
    for i, (label, out) in enumerate(given_outputs):
        for other_label, other in given_outputs[:i]:
            if _same_file(out, other):
                raise UsageError(f"{other_label} and {label} both name {out}; give each output its own path")
        for in_label, source in given_inputs:
            if _same_file(out, source):
                raise UsageError(f"{label} {out} would overwrite the input {in_label} {source}; choose another output path")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; it replaces ``path`` only on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed, so no partial
    output is ever left behind.
    """
    path = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        if exc.errno in _WRITE_ERRORS:  # e.g. no inode left on a full file system
            raise LrcError(f"cannot write {path}: {exc.strerror}") from exc
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno in _WRITE_ERRORS:  # name the target, not the temporary file
            raise LrcError(f"cannot write {path}: {exc.strerror}") from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Send file descriptors 1 and 2 to a scratch file for the duration of the block.

    The TorchScript exporter dumps its whole IR graph to C++ stderr when it fails and the dynamo
    exporter prints progress lines; neither helps a user who gets a one-line error instead.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def write_json(data: Any, path: str | os.PathLike, *, sort_keys: bool = False, final_newline: bool = True) -> None:
    """Write ``data`` as JSON indented by 2, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + ("\n" if final_newline else ""))
