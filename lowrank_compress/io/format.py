"""The ``.lrc.safetensors`` format: an ordinary safetensors file plus a JSON manifest.

The manifest (safetensors metadata key ``lrc``) is the recipe: how to rebuild the architecture
(arch spec + kwargs), the input shape, and each factorized layer's kind and rank. Loading rebuilds
the architecture, replays the structure with empty factors, then loads the tensors strictly.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CompressReport, Manifest
from ..errors import LrcError, UsageError
from ..layers import LOW_RANK_TYPES, LowRankConv1d, LowRankConv2d, LowRankLinear, overrides_forward
from ..modelrun import replace_module
from .archspec import build_model, file_kwargs, meta_model
from .checks import MAX_SAMPLE_ELEMENTS, check_input_shape, check_norm_values, clip, is_int, parse_json
from .files import atomic_output
from .reading import read_safetensors_metadata, safetensors_numel, state_numel, with_module_versions
from .records import DataConfig, LoadedModel


MANIFEST_KEY = "lrc"


FORMAT_VERSION = 1


_KINDS = {cls.__name__: cls for cls in (LowRankLinear, LowRankConv1d, LowRankConv2d)}


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


_DENSE_KINDS = {"LowRankLinear": nn.Linear, "LowRankConv1d": nn.Conv1d, "LowRankConv2d": nn.Conv2d}


_ENTRY_KEYS = frozenset({"kind", "rank", "bias", "tied_to"})


_DATA_CONFIG_KEYS = frozenset({"input_size", "mean", "std", "interpolation", "crop_pct"})


_INTERPOLATIONS = frozenset({"nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"})


_LAYER_NAME = re.compile(r"[^.\s]+(?:\.[^.\s]+)*")


MAX_LAYERS = 100_000


# Names a layer path may not pass through: what every nn.Module has (methods, training, _modules, …).
_MODULE_ATTRIBUTES = frozenset(dir(nn.Module()))


# A file naming a registry model may make the loader build its dense form before the factorized layers
# replace it: at most this many weights, or 64 times what the file holds (an explicit arch lifts it).
MAX_DENSE_NUMEL = 2**28


# Each model's manifest, beside it rather than on it: filled by ``compress`` and ``load``, read by ``save``.
_MANIFESTS: weakref.WeakKeyDictionary[nn.Module, Manifest] = weakref.WeakKeyDictionary()


def manifest_of(model: nn.Module) -> Manifest | None:
    """The manifest ``compress`` or ``load`` recorded for ``model`` (None when neither did)."""
    return _MANIFESTS.get(model)


def keep_manifest(model: nn.Module, manifest: Manifest) -> None:
    """Record ``manifest`` beside ``model`` (for a later :func:`save` of it)."""
    _MANIFESTS[model] = manifest


def _version() -> str:
    from ..version import __version__

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


def build_manifest(model: nn.Module, manifest: Manifest | CompressReport | None = None,
                   **fields: Any) -> dict[str, Any]:
    """The manifest for ``model``: ``manifest`` (or a report's; by default the one recorded beside
    the model by ``compress`` or ``load``) updated by ``fields``."""
    if isinstance(manifest, CompressReport):
        manifest = manifest.manifest
    given = {k: v for k, v in fields.items() if v is not None}
    base = (manifest or manifest_of(model) or Manifest()).updated(**given)
    if not base.arch:
        raise UsageError("cannot save: the manifest needs the architecture spec (arch) to rebuild the model")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return {
        **base.to_dict(),
        "format_version": FORMAT_VERSION,
        "lrc_version": _version(),
        "arch_kwargs": base.arch_kwargs or {},
        "input_shape": list(base.input_shape) if base.input_shape else None,
        "dtype": str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else "float32",
        "layers": structure_of(model),
    }


def save(model: nn.Module, path: str | Path, manifest: Manifest | CompressReport | None = None,
         **fields: Any) -> dict[str, Any]:
    """Write ``model`` and its manifest to ``path`` atomically; returns the manifest.

    ``manifest`` (a :class:`config.Manifest`, or the :class:`config.CompressReport` that carries
    one) is the base; by default, the one ``compress`` or ``load`` recorded beside the model.
    ``fields`` (arch, arch_kwargs, input_shape, method, data_config, …) override it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    written = build_manifest(model, manifest, **fields)
    with atomic_output(path) as tmp:
        try:
            save_model(model, str(tmp), metadata={MANIFEST_KEY: json.dumps(written, sort_keys=True)})
        except SafetensorError as exc:  # e.g. a full disk, reported by the Rust writer
            raise LrcError(f"cannot write {path}: {' '.join(str(exc).split())}") from None
    return written


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a compressed file, read from the header without loading tensors and validated
    whole (:func:`validate_manifest`)."""
    metadata = read_safetensors_metadata(path)
    if MANIFEST_KEY not in metadata:
        raise UsageError(f"{path} is not a compressed lrc model (no '{MANIFEST_KEY}' manifest in its metadata)")
    return validate_manifest(parse_json(metadata[MANIFEST_KEY], f"{path} has a corrupt lrc manifest"), path)


def validate_manifest(manifest: Any, path: str | Path = "the file") -> dict[str, Any]:
    """Check every field lrc reads from a manifest (types, ranges, names) and return it unchanged.

    Nothing is imported or built: whether the layers exist in the architecture is checked when the
    model is rebuilt (:func:`apply_structure`). Unknown top-level fields are kept but never used.
    """
    bad = f"{path} has a corrupt lrc manifest"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict):
        raise UsageError(f"{bad} (no layer table)")
    version = manifest.get("format_version")
    if not is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise UsageError(f"{path} uses manifest format {clip(version)}; this lrc reads up to {FORMAT_VERSION}")
    arch = manifest.get("arch")
    if not isinstance(arch, str) or not 1 <= len(arch) <= 256 or ":" not in arch:
        raise UsageError(f"{bad} (arch {clip(arch)} is not a spec such as torchvision:NAME)")
    kwargs = manifest.get("arch_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UsageError(f"{bad} (arch_kwargs is a {type(kwargs).__name__}, not an object)")
    if manifest.get("input_shape") is not None:
        check_input_shape(manifest["input_shape"], path, capped=False)
    dtype = manifest.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UsageError(f"{bad} (dtype {clip(dtype)} is not one of {', '.join(_DTYPES)})")
    for key in ("method", "lrc_version"):
        if manifest.get(key) is not None and not (isinstance(manifest[key], str) and len(manifest[key]) <= 64):
            raise UsageError(f"{bad} ({key} {clip(manifest[key])} is not a short string)")
    config = manifest.get("data_config")
    if config is not None:
        if not isinstance(config, dict) or not set(config) <= _DATA_CONFIG_KEYS:
            raise UsageError(f"{bad} (data_config {clip(config)} is not an object of {', '.join(sorted(_DATA_CONFIG_KEYS))})")
        if "input_size" in config:  # one sample's shape: C, H, W for images, D for vectors
            check_input_shape(config["input_size"], path, capped=False)
        for key in ("mean", "std"):
            if key in config:
                check_norm_values(config[key], key, path)
        interpolation = config.get("interpolation", "bilinear")
        if not isinstance(interpolation, str) or interpolation not in _INTERPOLATIONS:  # a list is unhashable
            raise UsageError(f"{bad} (data_config interpolation {clip(config['interpolation'])} is not one of "
                             f"{', '.join(sorted(_INTERPOLATIONS))})")
        crop = config.get("crop_pct", 1.0)
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0.1 <= crop <= 1.0:
            raise UsageError(f"{bad} (data_config crop_pct {clip(crop)} is not a number in [0.1, 1])")
    check_layers(manifest["layers"], path)
    return manifest


def check_layers(layers: Any, path: str | Path = "the file") -> None:
    """Check a manifest's layer table: names, kinds, ranks, bias flags and ties (to untied entries of the
    same kind and rank). A name may not pass through an attribute of ``nn.Module`` (``forward``, ``__class__``)."""
    if not isinstance(layers, dict) or len(layers) > MAX_LAYERS:
        raise UsageError(f"{path} has a corrupt lrc manifest (the layer table is not an object of at most {MAX_LAYERS:,} layers)")
    for fqn, entry in layers.items():
        if (not isinstance(fqn, str) or len(fqn) > 512 or not _LAYER_NAME.fullmatch(fqn)
                or any(part in _MODULE_ATTRIBUTES for part in fqn.split("."))):
            raise UsageError(f"{path}: the manifest names a bad layer {clip(fqn)} (a module path such as blocks.0.fc)")
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str) or entry["kind"] not in _KINDS:
            raise UsageError(f"{path}: the manifest entry for {fqn!r} has an unknown kind")
        if not set(entry) <= _ENTRY_KEYS:
            raise UsageError(f"{path}: the manifest entry for {fqn!r} has unknown fields {sorted(set(entry) - _ENTRY_KEYS)}")
        rank = entry.get("rank")
        if not is_int(rank) or not 1 <= rank < 2**31:
            raise UsageError(f"{path}: the manifest entry for {fqn!r} has a bad rank {clip(rank)}")
        if not isinstance(entry.get("bias", False), bool):
            raise UsageError(f"{path}: the manifest entry for {fqn!r} has a bias flag {clip(entry['bias'])}, not true or false")
    for fqn, entry in layers.items():
        if "tied_to" not in entry:
            continue
        target = layers.get(entry["tied_to"]) if isinstance(entry["tied_to"], str) else None
        if target is None or "tied_to" in target or entry["tied_to"] == fqn:
            raise UsageError(f"{path}: the manifest ties {fqn!r} to an unknown layer")
        if (target["kind"], target["rank"], target.get("bias", False)) != (entry["kind"], entry["rank"], entry.get("bias", False)):
            raise UsageError(f"{path}: the manifest ties {fqn!r} to {entry['tied_to']!r}, a layer of another kind or rank")


def _get(model: nn.Module, fqn: str, prefix: str = "") -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise UsageError(f"{prefix}the manifest names layer {fqn!r}, which the architecture does not have") from None


def apply_structure(model: nn.Module, layers: dict[str, dict[str, Any]], source: str | Path | None = None) -> nn.Module:
    """Replace each named dense layer by an empty factorized module of the recorded rank.

    The whole table is checked against the model (names, layer types, ranks) before the first
    module is replaced, so a bad entry leaves the model as it was. ``source`` (the file) prefixes
    error messages.
    """
    prefix = f"{source}: " if source is not None else ""
    check_layers(layers, source if source is not None else "the manifest")
    plans: dict[str, tuple[type[nn.Module], nn.Module, int, bool]] = {}
    for fqn, entry in layers.items():
        if "tied_to" in entry:
            continue
        dense = _get(model, fqn, prefix)
        cls = _KINDS[entry["kind"]]
        if not isinstance(dense, _DENSE_KINDS[entry["kind"]]) or overrides_forward(dense):
            raise UsageError(f"{prefix}the manifest names {fqn!r} as a {entry['kind']}, but the architecture has a "
                             f"{type(dense).__name__} there")
        w = dense.weight
        if not isinstance(w, torch.Tensor) or w.ndim < 2 or getattr(dense, "groups", 1) != 1:
            raise UsageError(f"{prefix}the manifest names {fqn!r}, which is not a plain Linear or Conv layer")
        rank = entry["rank"]
        # Bounded by the layer: a crafted rank must not make loading allocate more than the dense layer.
        if w.numel() == 0:
            raise UsageError(f"{prefix}the manifest names {fqn!r}, which has an empty weight {tuple(w.shape)} here "
                             "(check arch_kwargs)")
        if not 1 <= rank <= min(w.shape[0], w[0].numel()):
            raise UsageError(f"{prefix}the manifest entry for {fqn!r} has a bad rank {rank!r}")
        plans[fqn] = (cls, dense, rank, bool(entry.get("bias")))
    built = {fqn: cls.empty_like(dense, rank, bias) for fqn, (cls, dense, rank, bias) in plans.items()}
    for fqn, entry in layers.items():
        replace_module(model, model.get_submodule(fqn), built[entry.get("tied_to", fqn)])
    return model


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


def load_compressed(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
):
    """Rebuild a compressed model with its metadata (a :class:`checkpoint.LoadedModel`).

    The manifest is validated whole first. Its arch spec may only name torchvision/timm registry
    models or ``nn.Module`` classes of trusted modules, and its kwargs pass
    :func:`checkpoint.file_kwargs`; an ``arch`` given by the caller (e.g. a factory function) is
    trusted and used instead. The architecture is first built on the meta device, to check the
    layer table against it and the sizes against the file's tensors before anything is allocated.
    ``input_shape`` (the caller's) replaces the recorded one and lifts the caps on it.
    """
    manifest = read_manifest(path)
    restricted = arch is None
    if restricted:
        spec, kwargs = manifest["arch"], manifest.get("arch_kwargs") or {}
    else:
        spec, kwargs = arch, arch_kwargs or file_kwargs(arch, manifest.get("arch_kwargs") or {}, path)
    if input_shape is None:
        shape = tuple(manifest["input_shape"]) if manifest.get("input_shape") else None
        if shape is not None:
            check_input_shape(shape, path)
        size = (manifest.get("data_config") or {}).get("input_size")
        if size is not None and math.prod(size) > MAX_SAMPLE_ELEMENTS:
            check_input_shape([1, *size], path)
    else:
        shape = tuple(input_shape)
    dtype = _DTYPES[manifest.get("dtype", "float32")]
    layers = manifest["layers"]
    file_numel = safetensors_numel(path)
    hf = spec.startswith("hf:")  # a Hugging Face model: rebuilt from the config the manifest records (io.hf)
    if hf:
        from .hf import model_from_manifest
    meta = model_from_manifest(manifest, path, meta=True)[0] if hf else meta_model(spec, kwargs, restricted, source=path)
    if meta is not None:
        dense = state_numel(meta)
        if restricted and dense > max(MAX_DENSE_NUMEL, 64 * file_numel):
            raise UsageError(
                f"{path} names {spec}, which builds a dense model of {dense:,} weights for a file of {file_numel:,}; "
                f"pass --arch {spec} (arch= in Python) to build it anyway"
            )
        apply_structure(meta.to(dtype), layers, path)
        if (needed := state_numel(meta)) > file_numel:
            raise UsageError(f"{path}: tensors do not fit the manifest's structure (it needs {needed:,} weights, "
                             f"the file holds {file_numel:,})")
    model, info = model_from_manifest(manifest, path) if hf else (build_model(spec, kwargs, restricted, source=path), None)
    model.to(dtype)
    apply_structure(model, layers, path)
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
    keep_manifest(model, Manifest.from_dict(manifest))
    return LoadedModel(
        model=model,
        arch=manifest.get("arch"),
        arch_kwargs=manifest.get("arch_kwargs") or {},
        input_shape=shape,
        data_config=DataConfig.from_dict(manifest.get("data_config")),
        manifest=manifest_of(model),
        hf=info,
    )


def load(path: str | Path, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild a compressed model from a ``.lrc.safetensors`` file (architecture + strict tensors).

    ``arch`` overrides the manifest's spec; needed when that spec is a factory function.
    """
    return load_compressed(path, arch, arch_kwargs).model
