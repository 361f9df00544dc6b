"""Checks of values read from files and options: JSON, input shapes, normalization values, file metadata.

A file is untrusted input: every number lrc reads from one is bounded before anything is allocated for it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import UsageError


# Caps on numbers read from files (an explicit --input-shape lifts the shape caps): a few bytes of
# JSON must not make a command allocate gigabytes.
# Elements per sample (C·H·W) of an input shape from a file, e.g. 3×591×591 or 1×1024×1024. Convolutions
# need their input's size times C·k² for im2col: at 2^21 elements a thin 1×2^21 strip took the small
# digits CNN past 2 GB at batch 2.
MAX_SAMPLE_ELEMENTS = 2**20


MAX_SHAPE_ELEMENTS = 2**24  # elements of a whole recorded example batch


MAX_JSON_CHARS = 16 * 2**20


MAX_JSON_DEPTH = 32


def clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text:  # e.g. EOFError from an empty or cut-off pickle
        return type(exc).__name__
    return text[:200] + ("…" if len(text) > 200 else "")


def _json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted up to ``limit + 1`` (no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: Any, what: str) -> Any:
    """Parse JSON read from a file; size, nesting or syntax out of bounds is a UsageError "``what`` (…)"."""
    if not isinstance(text, str):
        raise UsageError(f"{what} (not JSON text)")
    if len(text) > MAX_JSON_CHARS:
        raise UsageError(f"{what} (JSON of {len(text):,} characters; lrc reads at most {MAX_JSON_CHARS:,})")
    try:
        value = json.loads(text)
    except RecursionError:
        raise UsageError(f"{what} (JSON nested deeper than {MAX_JSON_DEPTH} levels)") from None
    except ValueError:  # JSONDecodeError, or an integer beyond Python's digit limit
        raise UsageError(f"{what} (not JSON)") from None
    if _json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise UsageError(f"{what} (JSON nested deeper than {MAX_JSON_DEPTH} levels)")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_input_shape(value: Any, source: str | Path, capped: bool = True) -> tuple[int, ...]:
    """An input shape read from ``source``: 1 to 8 positive integers below 2^31, within the caps.

    ``capped`` applies :data:`MAX_SAMPLE_ELEMENTS` and :data:`MAX_SHAPE_ELEMENTS`; callers skip it
    when the user gave the shape explicitly.
    """
    if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 8
            or not all(is_int(s) and 1 <= s < 2**31 for s in value)):
        raise UsageError(f"{source} records a bad input shape {clip(value)} (1 to 8 positive integers below 2^31)")
    shape = tuple(value)
    per_sample, total = math.prod(shape[1:]), math.prod(shape)
    if capped and (per_sample > MAX_SAMPLE_ELEMENTS or total > MAX_SHAPE_ELEMENTS):
        raise UsageError(
            f"{source} records the input shape {list(shape)} ({per_sample:,} elements per sample, {total:,} in all), "
            f"beyond the {MAX_SAMPLE_ELEMENTS:,} per sample and {MAX_SHAPE_ELEMENTS:,} in all that lrc takes from a "
            "file; pass --input-shape to use a shape this large"
        )
    return shape


def check_norm_values(value: Any, key: str, source: str | Path) -> tuple[float, ...]:
    """Per-channel ``mean`` or ``std`` read from ``source``: 1 to 4 finite numbers (std positive)."""
    if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            or (key == "std" and not all(v > 0 for v in value))):
        rule = "positive" if key == "std" else "finite"
        raise UsageError(f"{source} records a bad {key} {clip(value)} (1 to 4 {rule} numbers)")
    return tuple(float(v) for v in value)


def file_metadata(metadata: dict[str, str], source: str | Path = "the file") -> dict[str, Any]:
    """What lrc reads from a plain safetensors file's metadata, parsed and checked.

    Returns the present ones of ``arch`` (str), ``arch_kwargs`` (dict), ``input_shape`` (tuple, not
    capped: see :func:`check_input_shape`), ``mean`` and ``std`` (tuples); other keys are ignored.
    """
    fields: dict[str, Any] = {}
    if "arch" in metadata:
        fields["arch"] = metadata["arch"]
    if "arch_kwargs" in metadata:
        kwargs = parse_json(metadata["arch_kwargs"], f"{source} has bad arch_kwargs metadata")
        if not isinstance(kwargs, dict):
            raise UsageError(f"{source} has arch_kwargs metadata of type {type(kwargs).__name__}, not a JSON object")
        fields["arch_kwargs"] = kwargs
    if "input_shape" in metadata:
        shape = parse_json(metadata["input_shape"], f"{source} has bad input_shape metadata")
        fields["input_shape"] = check_input_shape(shape, source, capped=False)
    for key in ("mean", "std"):
        if key in metadata:
            fields[key] = check_norm_values(parse_json(metadata[key], f"{source} has bad {key} metadata"), key, source)
    return fields


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """Parse "1,3,224,224" (or "1x3x224x224") into a tuple of positive ints."""
    if text is None or text == "":
        return None
    if not re.fullmatch(r"\s*\d+(\s*[,x×]\s*\d+)*\s*", text):
        raise UsageError(f"bad --input-shape {text!r}: use comma-separated integers such as 1,3,224,224")
    shape = tuple(int(p) for p in re.split(r"\s*[,x×]\s*", text.strip()))
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"bad --input-shape {text!r}: every dimension must be a positive integer")
    if any(s >= 2**31 for s in shape):  # torch cannot even allocate it; say so before trying
        raise UsageError(f"bad --input-shape {text!r}: every dimension must be below 2^31")
    return shape


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--arch-kwargs`` JSON into a dict."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"--arch-kwargs is not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})") from None
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object")
    return value


def require_input_shape(loaded_shape: tuple[int, ...] | None, given: tuple[int, ...] | None, path: Path) -> tuple[int, ...]:
    """The shape to run ``path``'s model at: the one given, else the one the file records; a usage error without."""
    shape = given or loaded_shape
    if shape is None:
        raise UsageError(f"cannot tell the input shape of {path}; pass --input-shape, e.g. 1,3,224,224")
    return tuple(shape)
