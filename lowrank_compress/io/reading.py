"""Reading original checkpoints safely, and loading their weights into a model.

A checkpoint is a state dict in ``.safetensors`` or a torch file (``.pt``/``.pth``/``.bin``/…) read
with ``torch.load(weights_only=True)``: no code in the file ever runs. Files that hold pickled
Python objects (a whole ``nn.Module``) are refused unless the caller trusts them explicitly.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .checks import short_error


_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")


_PREFIXES = ("module.", "_orig_mod.")


def check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"no such file: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise UsageError(f"{path} is empty")
    return path


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its header without loading tensors."""
    from safetensors import safe_open

    path = check_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise UsageError(f"{path} is not a valid safetensors file ({short_error(exc)})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    read_safetensors_metadata(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise UsageError(f"{path} is not a valid safetensors file ({short_error(exc)})") from None


def _check_torch_records(path: Path) -> None:
    """Refuse a torch zip file whose records inflate beyond the file itself, reading only its directory.

    ``torch.save`` stores records uncompressed, so their sizes add up to about the file's size; a
    compressed record that inflates to gigabytes would otherwise be read in full before any shape
    is checked.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = [info.file_size for info in archive.infolist()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UsageError(f"cannot read {path} as a PyTorch checkpoint (bad zip directory: {short_error(exc)})") from None
    size = path.stat().st_size
    if sum(sizes) > size + 2**20:
        raise UsageError(
            f"{path} is a {size / 1e6:.1f} MB file whose records inflate to {sum(sizes) / 1e6:.0f} MB; torch.save "
            "stores records uncompressed, so it is refused as a decompression bomb"
        )


def read_torch(path: Path, trust_pickle: bool) -> Any:
    _check_torch_records(path)
    try:
        # torch warns about the pickle protocol of files it then refuses; the error says all there is.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            try:
                return torch.load(str(path), map_location="cpu", weights_only=False)
            except Exception as inner:  # unpickling can fail in any way
                raise UsageError(f"cannot read {path} as a PyTorch checkpoint ({short_error(inner)})") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # no disallowed class named: a corrupt or foreign file, not a pickled object
            raise UsageError(f"cannot read {path} as a PyTorch checkpoint (not a torch.save file, or a corrupt one)") from None
        raise UsageError(
            f"{path} holds pickled Python objects ({found.group(1)}); unpickling runs arbitrary code, so it is refused. "
            "Save a state dict instead, or pass --trust-pickle for a file you trust"
        ) from None
    except Exception as exc:  # the weights-only unpickler fails in many ways on damaged bytes
        raise UsageError(f"cannot read {path} as a PyTorch checkpoint ({short_error(exc)})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict in a (possibly nested) checkpoint and strip DDP/compile prefixes."""
    for _ in range(4):
        if _is_state_dict(obj) or not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _NESTED_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise UsageError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UsageError(f"{path} holds no tensors")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """A state dict (or, only with ``trust_pickle``, a pickled module) read from ``path``."""
    path = check_file(path)
    if path.suffix == ".safetensors":
        return unwrap_state_dict(_read_safetensors(path), path)
    obj = read_torch(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj
    if trust_pickle and isinstance(obj, dict):
        module = next((v for v in obj.values() if isinstance(v, nn.Module)), None)
        if module is not None:
            return module
    return unwrap_state_dict(obj, path)


def state_numel(module: nn.Module) -> int:
    """Elements in ``module.state_dict()`` (what a strict load must find in the file); tied tensors count once."""
    seen: set[int] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def safetensors_numel(path: str | Path) -> int:
    """Elements of all tensors in a safetensors file, read from its header."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
    """Load ``state`` strictly; mismatches raise a UsageError listing the first few."""
    own = model.state_dict()
    state = with_tied_names(state, model)  # a tensor that modules share may be saved under one name
    if set(own) != set(state) and state and all(k.startswith("model.") for k in state):
        stripped = {k[len("model."):]: v for k, v in state.items()}
        if set(stripped) == set(own):  # a Lightning-style wrapper around the model
            state = stripped
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:4])}{' …' if len(unexpected) > 4 else ''} ({len(unexpected)})")
    if shapes:
        problems.append(f"shape mismatches: {', '.join(shapes[:3])}{' …' if len(shapes) > 3 else ''} ({len(shapes)})")
    if problems:
        raise UsageError(f"{source} does not match the architecture: " + "; ".join(problems))
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
        model.to(dtype)
    model.load_state_dict(with_module_versions(state, model), strict=True)  # torchvision's MNASNet needs the versions


def with_module_versions(state: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict:
    """``state`` with ``model``'s per-module version metadata where it carries none of its own.

    ``load_state_dict`` hands each module the ``version`` recorded in the state dict's
    ``_metadata``, and some modules need it (torchvision's MNASNet refuses a state dict without
    one). A state dict read from safetensors, or rebuilt as a plain dict, has lost it; its tensors
    are then taken to be in the layout of the code that reads them.
    """
    out = OrderedDict(state)
    out._metadata = getattr(state, "_metadata", None) or model.state_dict()._metadata
    return out


def with_tied_names(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` plus every name under which ``model`` holds a tensor that ``state`` has under another.

    Files written by ``safetensors.torch.save_model`` hold a tensor that modules share (timm's CoaT
    reuses its position-encoding convs across blocks) under one of its names only.
    """
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    out = dict(state)
    for group in names.values():
        present = next((n for n in group if n in state), None)
        if present is not None:
            for name in group:
                out.setdefault(name, state[present])
    return out
