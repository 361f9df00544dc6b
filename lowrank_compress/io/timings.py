"""The timing cache on disk: a JSON file of measured layer times that planning reuses.

``lrc compress --timing-cache FILE`` (or ``compress(..., timing_cache=FILE)``) reads the file
when it exists, times only what it lacks, and writes it back with the new entries, atomically.
The same command on the same machine then makes the same plan. The file holds plain numbers keyed
by strings; nothing in it is executed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError
from ..latencyplan import TimingCache
from .checks import parse_json
from .files import atomic_output, check_writable


def load_timing_cache(path: str | os.PathLike) -> TimingCache:
    """The cache stored at ``path``; an empty one when the file does not exist yet."""
    path = Path(path)
    if not path.exists():
        check_writable(path)
        return TimingCache()
    if not path.is_file():
        raise UsageError(f"timing cache {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read timing cache {path} ({exc})") from None
    return TimingCache.from_dict(parse_json(text, f"timing cache {path} is not valid"), f"timing cache {path}")


def save_timing_cache(cache: TimingCache, path: str | os.PathLike) -> None:
    """Write ``cache`` to ``path`` atomically (keys sorted: the file changes only where entries do)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(cache.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
