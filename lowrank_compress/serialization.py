"""The ``.lrc.safetensors`` format: an ordinary safetensors file plus a JSON manifest.

The manifest (safetensors metadata key ``lrc``) is the recipe: how to rebuild the architecture
(arch spec + kwargs), the input shape, and each factorized layer's kind and rank. Loading rebuilds
the architecture, replays the structure with empty factors, then loads the tensors strictly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LrcError, UsageError
from .fileio import atomic_output
from .layers import LOW_RANK_TYPES, LowRankConv1d, LowRankConv2d, LowRankLinear

MANIFEST_KEY = "lrc"
FORMAT_VERSION = 1
_KINDS = {cls.__name__: cls for cls in (LowRankLinear, LowRankConv1d, LowRankConv2d)}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _version() -> str:
    from . import __version__

    return __version__


def structure_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per factorized module fqn: kind, rank, bias, and the fqn it is tied to when shared."""
    layers: dict[str, dict[str, Any]] = {}
    first_name: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, LOW_RANK_TYPES):
            continue
        entry: dict[str, Any] = {"kind": type(module).__name__, "rank": module.rank, "bias": module.up.bias is not None}
        if id(module) in first_name:
            entry["tied_to"] = first_name[id(module)]
        else:
            first_name[id(module)] = name
        layers[name] = entry
    return layers


def build_manifest(model: nn.Module, **fields: Any) -> dict[str, Any]:
    """The manifest for ``model``: fields from ``model.lrc_manifest`` updated by ``fields``."""
    base = dict(getattr(model, "lrc_manifest", None) or {})
    base.update({k: v for k, v in fields.items() if v is not None})
    if not base.get("arch"):
        raise UsageError("cannot save: the manifest needs the architecture spec (arch) to rebuild the model")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    base.update(
        format_version=FORMAT_VERSION,
        lrc_version=_version(),
        arch_kwargs=base.get("arch_kwargs") or {},
        input_shape=list(base["input_shape"]) if base.get("input_shape") else None,
        dtype=str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else "float32",
        layers=structure_of(model),
    )
    return base


def save(model: nn.Module, path: str | Path, **fields: Any) -> dict[str, Any]:
    """Write ``model`` and its manifest to ``path`` atomically; returns the manifest.

    ``fields`` (arch, arch_kwargs, input_shape, method, data_config, …) override what the model
    carries in ``model.lrc_manifest`` (set by ``compress`` and ``load``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    manifest = build_manifest(model, **fields)
    with atomic_output(path) as tmp:
        try:
            save_model(model, str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})
        except SafetensorError as exc:  # e.g. a full disk, reported by the Rust writer
            raise LrcError(f"cannot write {path}: {' '.join(str(exc).split())}") from None
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a compressed file, read from the header without loading tensors."""
    from .checkpoint import read_safetensors_metadata

    metadata = read_safetensors_metadata(path)
    if MANIFEST_KEY not in metadata:
        raise UsageError(f"{path} is not a compressed lrc model (no '{MANIFEST_KEY}' manifest in its metadata)")
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except json.JSONDecodeError:
        raise UsageError(f"{path} has a corrupt lrc manifest (not JSON)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict):
        raise UsageError(f"{path} has a corrupt lrc manifest (no layer table)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UsageError(f"{path} uses manifest format {version!r}; this lrc reads up to {FORMAT_VERSION}")
    return manifest


def _get(model: nn.Module, fqn: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise UsageError(f"the manifest names layer {fqn!r}, which the architecture does not have") from None


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_structure(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace each named dense layer by an empty factorized module of the recorded rank."""
    built: dict[str, nn.Module] = {}
    for fqn, entry in layers.items():
        if not isinstance(entry, dict) or entry.get("kind") not in _KINDS:
            raise UsageError(f"the manifest entry for {fqn!r} has an unknown kind")
        if "tied_to" in entry:
            continue
        dense = _get(model, fqn)
        rank = entry.get("rank")
        w = getattr(dense, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim < 2:
            raise UsageError(f"the manifest names {fqn!r}, which is not a Linear or Conv layer")
        # Bounded by the layer: a crafted rank must not make loading allocate more than the dense layer.
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(w.shape[0], w[0].numel()):
            raise UsageError(f"the manifest entry for {fqn!r} has a bad rank {rank!r}")
        cls = _KINDS[entry["kind"]]
        if cls is LowRankLinear:
            new = cls(dense.in_features, dense.out_features, rank, bool(entry.get("bias")), w.device, w.dtype)
        else:
            new = cls(
                dense.in_channels, dense.out_channels, rank, dense.kernel_size, dense.stride, dense.padding,
                dense.dilation, dense.padding_mode, bool(entry.get("bias")), w.device, w.dtype,
            )
        built[fqn] = new
    for fqn, entry in layers.items():
        target = built.get(entry.get("tied_to", fqn))
        if target is None:
            raise UsageError(f"the manifest ties {fqn!r} to an unknown layer")
        _set(model, fqn, target)
    return model


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


def _load_tensors(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a safetensors file into ``model``, not strictly: the (missing, unexpected) names.

    As ``safetensors.torch.load_model``, a name the file lacks is not missing when its tensor is
    one the file holds under another name (tied tensors are saved once); unlike it, module
    version metadata is kept.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path), device="cpu")
    own = model.state_dict(keep_vars=True)
    missing, unexpected = model.load_state_dict(with_module_versions(tensors, model), strict=False)
    loaded = {id(own[k]) for k in tensors if k in own}
    return [k for k in missing if id(own[k]) not in loaded], list(unexpected)


def load_compressed(path: str | Path, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None):
    """Rebuild a compressed model with its metadata (a :class:`checkpoint.LoadedModel`).

    The manifest's arch spec may only name torchvision/timm models or ``nn.Module`` classes; an
    ``arch`` given by the caller (e.g. a factory function) is trusted and used instead.
    """
    from .checkpoint import LoadedModel, build_model

    manifest = read_manifest(path)
    if arch is None:
        model = build_model(manifest.get("arch"), manifest.get("arch_kwargs") or {}, restricted=True)
    else:
        model = build_model(arch, arch_kwargs or manifest.get("arch_kwargs") or {})
    dtype = _DTYPES.get(manifest.get("dtype", "float32"), torch.float32)
    model.to(dtype)
    apply_structure(model, manifest["layers"])
    try:
        missing, unexpected = _load_tensors(model, path)
    except Exception as exc:
        raise UsageError(f"{path}: tensors do not fit the manifest's structure ({' '.join(str(exc).split())[:200]})") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(sorted(missing)[:4])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(sorted(unexpected)[:4])}")
        raise UsageError(f"{path}: tensors do not fit the manifest's structure ({'; '.join(parts)})")
    model.eval()
    model.lrc_manifest = manifest
    shape = tuple(manifest["input_shape"]) if manifest.get("input_shape") else None
    return LoadedModel(
        model=model,
        arch=manifest.get("arch"),
        arch_kwargs=manifest.get("arch_kwargs") or {},
        input_shape=shape,
        data_config=manifest.get("data_config") or {},
        manifest=manifest,
    )


def load(path: str | Path, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild a compressed model from a ``.lrc.safetensors`` file (architecture + strict tensors).

    ``arch`` overrides the manifest's spec; needed when that spec is a factory function.
    """
    return load_compressed(path, arch, arch_kwargs).model
