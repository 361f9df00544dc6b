"""Calibration inputs from disk: image folders, tensor files, or Gaussian samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UsageError

_TENSOR_SUFFIXES = (".npy", ".pt", ".pth", ".bin", ".safetensors")


def _tensor_file(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UsageError(f"cannot read calibration file {path} ({exc})") from None
        return torch.from_numpy(np.ascontiguousarray(array))
    if path.suffix == ".safetensors":
        from .io.reading import read_safetensors_metadata

        read_safetensors_metadata(path)
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        from .io.reading import read_torch

        obj = read_torch(path, trust_pickle=False)
        tensors = obj if isinstance(obj, dict) else {"x": obj}
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    for key in ("x", "inputs", "input", "images", "x_test", "x_train", "data"):
        if key in tensors:
            return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise UsageError(f"calibration file {path} holds {len(tensors)} float tensors; name the inputs 'x'")


_TEXT_SUFFIXES = (".txt", ".jsonl")
_MAX_LINE_CHARS = 100_000


def read_texts(path: str | Path, samples: int | None = None) -> list[str]:
    """Texts of a ``.txt`` file (one sample per non-empty line) or a ``.jsonl`` file (a ``text`` field
    per line), the first ``samples`` of them."""
    path = Path(path)
    if path.suffix not in _TEXT_SUFFIXES or not path.is_file():
        raise UsageError(f"text data {path}: expected an existing .txt (one sample per line) or .jsonl file")
    texts: list[str] = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if samples is not None and len(texts) >= samples:
                    break
                if len(line) > _MAX_LINE_CHARS:
                    raise UsageError(f"{path}:{number}: a line of more than {_MAX_LINE_CHARS:,} characters")
                if path.suffix == ".jsonl" and line.strip():
                    line = _jsonl_text(line, path, number)
                if line.strip():
                    texts.append(line.strip())
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    if not texts:
        raise UsageError(f"text data {path} holds no text")
    return texts


def _jsonl_text(line: str, path: Path, number: int) -> str:
    from .io.checks import parse_json

    record = parse_json(line, f"{path}:{number} is not a JSON line")
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise UsageError(f"{path}:{number}: each JSON line needs a string field 'text'")
    return record["text"]


def text_batches(spec: str, hf: Any, samples: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Texts tokenized by a Hugging Face model's tokenizer (``io.hf.HFModel``): batches of input ids,
    attention masks (1 = real token; padding is masked out of every statistic) and token types.

    Texts of similar length are batched together (sorted by token count), so that a batch is padded
    little: on 256 docstring paragraphs in batches of 16, 2.5× fewer positions than in file order."""
    if Path(spec).suffix not in _TEXT_SUFFIXES:
        raise UsageError(f"calibration data for a Hugging Face model is text: a .txt or .jsonl file, not {spec}")
    texts = hf.by_length(read_texts(spec, samples))
    return [hf.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def calibration_batches(
    spec: str,
    input_shape: tuple[int, ...],
    data_config: dict[str, Any],
    samples: int,
    batch_size: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hf: Any = None,
    views: bool = True,
) -> list[Any]:
    """Calibration inputs as a list of batches of shape (b, *input_shape[1:]).

    ``spec``: ``gaussian``, an image folder (class subfolders or flat, eval-transformed to the input
    shape; with ``views``, a folder of fewer than ``samples`` images is filled up with random views
    of them, :func:`lowrank_compress.data.image_tensors`), or a tensor file (.npy, .pt via
    weights_only, .safetensors) whose first axis indexes samples. With ``hf`` (a Hugging Face
    model's ``io.hf.HFModel``) a text file, tokenized: batches are dicts of tensors
    (:func:`text_batches`).
    """
    if samples < 1 or batch_size < 1:
        raise UsageError("--calib-samples and --calib-batch-size must be ≥ 1")
    if hf is not None:
        return text_batches(spec, hf, samples, batch_size)
    if Path(spec).suffix in _TEXT_SUFFIXES:
        raise UsageError(f"text calibration ({spec}) needs a Hugging Face folder, whose tokenizer reads it")
    per_sample = tuple(input_shape[1:])
    if spec == "gaussian":
        gen = torch.Generator().manual_seed(seed + 1)
        data = torch.randn((samples, *per_sample), generator=gen)
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"calibration data {path} does not exist (give a folder, a tensor file or 'gaussian')")
        if path.is_dir():
            from .data import image_tensors

            data = image_tensors(path, input_shape, data_config, samples, seed=seed, views=views)
        elif path.suffix in _TENSOR_SUFFIXES:
            data = _tensor_file(path)
            if tuple(data.shape[1:]) != per_sample:
                raise UsageError(
                    f"calibration tensor in {path} has samples of shape {tuple(data.shape[1:])}; "
                    f"the model takes {per_sample} (input shape {tuple(input_shape)})"
                )
            data = data[:samples].float()
        else:
            raise UsageError(f"calibration data {path}: expected a folder, {', '.join(_TENSOR_SUFFIXES)} or 'gaussian'")
    if data.shape[0] == 0:
        raise UsageError(f"calibration data {spec} is empty")
    if not torch.isfinite(data).all():
        raise UsageError(f"calibration data {spec} contains NaN or Inf")
    return [b.to(dtype) for b in data.split(batch_size)]


# ---------------------------------------------------------------- per-layer views
