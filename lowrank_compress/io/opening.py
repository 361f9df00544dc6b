"""Opening any model file: a compressed ``.lrc.safetensors``, or an original checkpoint with its architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UsageError
from .archspec import build_model, meta_model, rebuild_spec
from .checks import check_input_shape, file_metadata
from .dataconfig import data_config, default_input_shape
from .format import MANIFEST_KEY, load_compressed
from .reading import check_file, load_weights, read_checkpoint, read_safetensors_metadata, safetensors_numel, state_numel
from .records import LoadedModel


def open_model(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Load a model from a compressed ``.lrc.safetensors`` file, an original checkpoint + arch, or a
    Hugging Face / timm Hub folder (``config.json`` + ``model.safetensors``; io.hf)."""
    if (Path(path) / "config.json").is_file() or (isinstance(arch, str) and arch.startswith("hf:")):
        from .hf import open_folder

        return open_folder(Path(path), arch, arch_kwargs, input_shape, open_model)
    path = check_file(path)
    metadata: dict[str, str] = {}
    restricted = False
    arch_note = None
    if path.suffix == ".safetensors":
        metadata = read_safetensors_metadata(path)
        if MANIFEST_KEY in metadata:
            return load_compressed(path, arch, arch_kwargs, input_shape)
        fields = file_metadata(metadata, path)
        if arch is None and "arch" in fields:
            arch, restricted = fields["arch"], True
            arch_kwargs = arch_kwargs or fields.get("arch_kwargs") or {}
        if input_shape is None and "input_shape" in fields:
            check_input_shape(fields["input_shape"], path)
        if restricted:
            _check_fits(meta_model(arch, arch_kwargs, restricted=True, source=path), safetensors_numel(path), arch, path)
    content = read_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(content, nn.Module):
        model = content
        arch = rebuild_spec(model, arch, arch_kwargs, path)
    else:
        if arch is None:
            # No spec: the torchvision/timm model whose keys and shapes the state dict has (archinfer).
            from .archinfer import infer_arch

            inferred = infer_arch(content, path)
            arch, arch_kwargs, restricted = inferred.arch, {**inferred.arch_kwargs, **(arch_kwargs or {})}, True
            arch_note = inferred.message
        model = build_model(arch, arch_kwargs, restricted=restricted, source=path)
        load_weights(model, content, path)
    model.eval()
    shape = input_shape or default_input_shape(arch, model, metadata)
    if shape is None and isinstance(content, nn.Module):
        # A pickled torchvision/timm model: its registry entry's input shape (archinfer).
        from .archinfer import registry_arch

        shape = default_input_shape(registry_arch(model), model, metadata)
    return LoadedModel(
        model=model,
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        input_shape=shape,
        data_config=data_config(arch, model, metadata),
        metadata=metadata,
        arch_note=arch_note,
    )


def _check_fits(meta: nn.Module | None, file_numel: int, arch: str, path: Path) -> None:
    """Refuse, before allocating it, a model (built on the meta device) larger than the file's tensors:
    a strict load could never fill it."""
    if meta is not None and (needed := state_numel(meta)) > file_numel:
        raise UsageError(
            f"{path} does not match the architecture {arch}: it builds {needed:,} weights but the file holds "
            f"{file_numel:,}"
        )


def load_model(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """The ``nn.Module`` of :func:`open_model`."""
    return open_model(path, arch, arch_kwargs, trust_pickle).model
