"""Building architectures from specs under the trust model.

Architecture specs: ``torchvision:NAME``, ``timm:NAME`` (random init; nothing is ever downloaded) or
``package.module:callable`` (called with the arch kwargs). A spec read from a file may only name a
registry model or an ``nn.Module`` class of a module the user allowed, with kwargs that cannot load
weights or name a path.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .checks import clip, short_error


# Architecture specs read from files (a manifest, safetensors metadata) are untrusted: a file may name
# a torchvision or timm registry model, or an nn.Module class in a module the user allowed. The check
# happens before anything is imported, since importing a module runs its code.
TRUSTED_MODULES_ENV = "LRC_TRUSTED_MODULES"


_BUILTIN_TRUSTED = ("lowrank_compress.examples.digits",)  # the bundled model; importing it runs nothing else


# Modules that moved, by their old name: files written before the move still name the old one.
_MOVED_MODULES = {"lowrank_compress.digits": "lowrank_compress.examples.digits"}


_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"


_CALLABLE_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")


# Keyword arguments a file may pass to a registry builder: sizes and regularization, never weights or paths.
_FILE_KWARGS = {
    "torchvision": frozenset({
        "num_classes", "dropout", "attention_dropout", "aux_logits", "aux_loss", "transform_input",
        "init_weights", "zero_init_residual", "groups", "width_per_group", "replace_stride_with_dilation",
        "stochastic_depth_prob", "image_size", "num_keypoints",
    }),
    "timm": frozenset({
        "num_classes", "in_chans", "drop_rate", "drop_path_rate", "drop_block_rate", "global_pool", "img_size",
        "output_stride", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "patch_drop_rate", "class_token",
        "reg_tokens", "qkv_bias", "init_values", "dynamic_img_size",
    }),
}


# Names that can load weights, read a file or name a download; refused from files even for allowed modules.
_WEIGHT_LIKE = re.compile(r"pretrain|weight|checkpoint|ckpt|path|file|dir|url|uri|hub|repo|cache|download|root|cfg|"
                          r"config|overlay|load|model_name|name_or|source|location", re.IGNORECASE)


# Bounds on sizing kwargs from files (an explicit --arch-kwargs lifts them): a 1 KB file must not
# make the tool allocate gigabytes before the tensors are even compared.
_FILE_KWARG_CAPS = {"num_classes": 100_000, "num_keypoints": 1_000, "in_chans": 64, "img_size": 4096,
                    "image_size": 4096, "groups": 1024, "width_per_group": 4096, "reg_tokens": 64}


_NEVER_DOWNLOAD = ("pretrained", "weights", "weights_backbone")


def trusted_modules() -> tuple[str, ...]:
    """Modules whose ``nn.Module`` classes a file may name: the bundled digits model's and those listed
    (comma- or space-separated) in the ``LRC_TRUSTED_MODULES`` environment variable; a listed package
    covers its submodules."""
    listed = os.environ.get(TRUSTED_MODULES_ENV, "").replace(",", " ").split()
    return (*_BUILTIN_TRUSTED, *listed)


def current_spec(spec: Any) -> Any:
    """``spec`` with a module that moved renamed to where it lives now (any other value as it is)."""
    if isinstance(spec, str):
        module, sep, attr = spec.partition(":")
        if sep and module in _MOVED_MODULES:
            return f"{_MOVED_MODULES[module]}:{attr}"
    return spec


def _is_trusted(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in trusted_modules())


def check_file_spec(spec: Any, source: str | Path = "the file") -> None:
    """Refuse an architecture spec read from ``source`` that a file may not name, importing nothing."""
    spec = current_spec(spec)
    if not isinstance(spec, str) or ":" not in spec or len(spec) > 256:
        raise UsageError(f"{source} names a malformed architecture {clip(spec)}; pass --arch to choose one")
    kind, _, name = spec.partition(":")
    if kind == "timm" and (":" in name or "/" in name):
        raise UsageError(
            f"{source} names the architecture {spec!r}, a Hugging Face Hub model; lrc never downloads, so a file may "
            "only name timm registry models: pass --arch timm:NAME and the weights as a checkpoint file"
        )
    if kind in ("torchvision", "timm"):
        return  # the registries are checked when the model is built
    match = _CALLABLE_SPEC.fullmatch(spec)
    if match is None:
        raise UsageError(f"{source} names a malformed architecture {clip(spec)}; pass --arch to choose one")
    if not _is_trusted(match.group(1)):
        raise UsageError(
            f"{source} names the architecture {spec!r}, which is not an nn.Module class of a module you allowed "
            f"(a file may name torchvision:NAME, timm:NAME or a class in a module listed in {TRUSTED_MODULES_ENV}); "
            "pass --arch to choose the architecture yourself"
        )


def _plain_value(value: Any, depth: int = 0) -> bool:
    """A JSON scalar or a short list of them, and no string that could be a path, URL or Hub id."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) < 2**31
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 64 and not re.search(r"[/\\:~]|^\.", value)
    if isinstance(value, (list, tuple)) and depth == 0:
        return len(value) <= 16 and all(_plain_value(v, 1) for v in value)
    return False


def file_kwargs(arch: str, kwargs: Any, source: str | Path = "the file") -> dict[str, Any]:
    """Architecture keyword arguments read from ``source``, checked against what a file may pass.

    torchvision and timm builders take only the names in their allow-list; the classes of allowed
    modules take any name that does not suggest weights, a path or a URL. Values are JSON scalars or
    short lists of them, and sizing values are bounded. Anything else is a UsageError that says how to
    pass it explicitly.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise UsageError(f"{source} has arch_kwargs of type {type(kwargs).__name__}, not a JSON object")
    kind = arch.partition(":")[0] if isinstance(arch, str) else ""
    allowed = _FILE_KWARGS.get(kind)
    explicit = "pass it yourself with --arch and --arch-kwargs (or arch= and arch_kwargs= in Python) if you trust it"
    for key, value in kwargs.items():
        if not isinstance(key, str) or (allowed is not None and key not in allowed) or (allowed is None and _WEIGHT_LIKE.search(key)):
            raise UsageError(f"{source} passes the arch kwarg {clip(key)}, which a file may not set "
                             f"(it could load weights, read a path or name a URL); {explicit}")
        if not _plain_value(value):
            raise UsageError(f"{source} passes arch kwarg {key!r} the value {clip(value)}, which a file may not set "
                             f"(only numbers, booleans, short names and short lists of them); {explicit}")
        cap = _FILE_KWARG_CAPS.get(key)
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if cap is not None and any(isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v <= cap for v in numbers):
            raise UsageError(f"{source} passes arch kwarg {key}={clip(value)}, outside [0, {cap}] for a value "
                             f"read from a file; {explicit}")
    return dict(kwargs)


def _resolve_callable(spec: str, restricted: bool, trusted_only: bool = False):
    spec = current_spec(spec)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"bad --arch {spec!r}: use torchvision:NAME, timm:NAME or package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"bad --arch {spec!r}: cannot import {module_name} ({exc})") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UsageError(f"bad --arch {spec!r}: {module_name} has no attribute {attr}")
    if not callable(target):
        raise UsageError(f"bad --arch {spec!r}: {attr} is not callable")
    if restricted and not (inspect.isclass(target) and issubclass(target, nn.Module)):
        raise UsageError(
            f"the file names the architecture {spec!r}, which is not an nn.Module class; "
            "pass the architecture explicitly (--arch) to call a factory function"
        )
    if trusted_only and not _is_trusted(target.__module__):
        # A trusted module's attributes lead to other modules' classes (digits:torch.nn.Linear): not allowed.
        raise UsageError(
            f"the file names the architecture {spec!r}, a class defined in {target.__module__}, which is not a "
            f"module you allowed ({TRUSTED_MODULES_ENV}); pass --arch to choose the architecture yourself"
        )
    return target


def _refuse_downloads(arch: str, kwargs: dict[str, Any]) -> None:
    for key in _NEVER_DOWNLOAD:
        if kwargs.get(key) not in (None, False):
            raise UsageError(
                f"arch kwarg {key}={clip(kwargs[key])} for {arch} would download weights, and lrc never uses the "
                "network: build with random weights and pass the weights as a checkpoint file"
            )


def _construct(arch: str, kwargs: dict[str, Any], restricted: bool, trusted_only: bool = False) -> nn.Module:
    kind, _, name = arch.partition(":")
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise UsageError(f"unknown torchvision model {name!r}")
        _refuse_downloads(arch, kwargs)
        if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
            kwargs = {**kwargs, "weights_backbone": None}  # detection/segmentation builders fetch a backbone by default
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if kind == "timm":
        import timm

        if ":" in name or "/" in name:
            raise UsageError(f"unknown timm model {name!r}: lrc never downloads from the Hugging Face Hub")
        if not timm.is_model(name):
            raise UsageError(f"unknown timm model {name!r}")
        _refuse_downloads(arch, kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)
    return _resolve_callable(arch, restricted, trusted_only)(**kwargs)


def _checked_kwargs(arch: Any, arch_kwargs: dict[str, Any] | None, restricted: bool, source: str | Path) -> dict[str, Any]:
    """The kwargs to build ``arch`` with, after the checks of a spec read from a file (``restricted``)
    or of a spec the user gave."""
    kwargs = dict(arch_kwargs or {})
    if restricted:
        check_file_spec(arch, source)
        return file_kwargs(arch, kwargs, source)
    if not isinstance(arch, str) or ":" not in arch:
        raise UsageError(f"bad --arch {arch!r}: use torchvision:NAME, timm:NAME or package.module:callable")
    return kwargs


def build_model(
    arch: str, arch_kwargs: dict[str, Any] | None = None, restricted: bool = False, source: str | Path = "the file"
) -> nn.Module:
    """Build an architecture with random weights from a spec; nothing is ever downloaded.

    ``restricted`` says the spec and kwargs were read from a file: the spec may then only name a
    torchvision/timm registry model or an ``nn.Module`` class of a trusted module (checked before
    anything is imported, see :func:`check_file_spec`), and the kwargs pass :func:`file_kwargs`;
    ``source`` names the file in their messages.
    """
    kwargs = _checked_kwargs(arch, arch_kwargs, restricted, source)
    try:
        model = _construct(arch, kwargs, restricted, trusted_only=restricted)
    except UsageError:
        raise
    except TypeError as exc:
        raise UsageError(f"cannot build {arch} with kwargs {kwargs} ({short_error(exc)})") from None
    except (ValueError, RuntimeError, OverflowError, AssertionError, KeyError, IndexError, MemoryError) as exc:
        # A constructor rejecting its arguments (or unable to allocate for them) is bad input, not a crash.
        raise UsageError(f"cannot build {arch} with kwargs {clip(kwargs)} ({type(exc).__name__}: {short_error(exc)})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


def meta_model(
    arch: str, arch_kwargs: dict[str, Any] | None = None, restricted: bool = False, source: str | Path = "the file"
) -> nn.Module | None:
    """The architecture built on the meta device (shapes only, no memory), or None where it cannot be.

    Lets a loader compare what a file's spec would build with the tensors the file holds before
    anything is allocated. The spec and kwargs checks of :func:`build_model` apply; a constructor
    that needs real values (a ``.item()`` during init) or rejects its arguments gives None, and the
    real build then reports what is wrong.
    """
    kwargs = _checked_kwargs(arch, arch_kwargs, restricted, source)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _construct(arch, kwargs, restricted, trusted_only=restricted)
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - whatever the meta build cannot do, the real build reports
        return None
    return model if isinstance(model, nn.Module) else None


def _layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rebuild_spec(model: nn.Module, arch: str | None, arch_kwargs: dict[str, Any] | None, path: Path) -> str | None:
    """The spec that rebuilds a pickled model's structure (what a manifest records), or None.

    An explicit ``arch`` must build the same state-dict layout. Without one, the model's own class
    is the spec when constructing it with ``arch_kwargs`` (default: none) gives that layout.
    """
    if arch is not None:
        if _layout(build_model(arch, arch_kwargs)) != _layout(model):
            raise UsageError(f"--arch {arch} does not build the structure of the model pickled in {path}")
        return arch
    cls = type(model)
    spec = f"{cls.__module__}:{cls.__qualname__}"
    try:
        # Class only, but no module allow-list: unpickling the file the user trusts imported it already.
        fresh = _construct(spec, dict(arch_kwargs or {}), restricted=True)
    except Exception:  # a constructor that needs arguments, a class defined in a function, …
        return None
    return spec if _layout(fresh) == _layout(model) else None
