"""Reading checkpoints safely and building architectures from specs.

A checkpoint is a state dict in ``.safetensors`` or a torch file (``.pt``/``.pth``/``.bin``/…) read
with ``torch.load(weights_only=True)``: no code in the file ever runs. Files that hold pickled
Python objects (a whole ``nn.Module``) are refused unless the caller trusts them explicitly.

Architecture specs: ``torchvision:NAME``, ``timm:NAME`` (random init, then the weights are loaded
strictly) or ``package.module:callable`` (called with the arch kwargs).
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
_PREFIXES = ("module.", "_orig_mod.")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A model with what is known about how to rebuild and feed it."""

    model: nn.Module
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- files


def _check_file(path: str | Path) -> Path:
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

    path = _check_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise UsageError(f"{path} is not a valid safetensors file ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text:  # e.g. EOFError from an empty or cut-off pickle
        return type(exc).__name__
    return text[:200] + ("…" if len(text) > 200 else "")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    read_safetensors_metadata(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise UsageError(f"{path} is not a valid safetensors file ({_short(exc)})") from None


def _read_torch(path: Path, trust_pickle: bool) -> Any:
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
                raise UsageError(f"cannot read {path} as a PyTorch checkpoint ({_short(inner)})") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # no disallowed class named: a corrupt or foreign file, not a pickled object
            raise UsageError(f"cannot read {path} as a PyTorch checkpoint (not a torch.save file, or a corrupt one)") from None
        raise UsageError(
            f"{path} holds pickled Python objects ({found.group(1)}); unpickling runs arbitrary code, so it is refused. "
            "Save a state dict instead, or pass --trust-pickle for a file you trust"
        ) from None
    except Exception as exc:  # the weights-only unpickler fails in many ways on damaged bytes
        raise UsageError(f"cannot read {path} as a PyTorch checkpoint ({_short(exc)})") from None


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
    path = _check_file(path)
    if path.suffix == ".safetensors":
        return unwrap_state_dict(_read_safetensors(path), path)
    obj = _read_torch(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj
    if trust_pickle and isinstance(obj, dict):
        module = next((v for v in obj.values() if isinstance(v, nn.Module)), None)
        if module is not None:
            return module
    return unwrap_state_dict(obj, path)


# ---------------------------------------------------------------- architectures


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--arch-kwargs`` JSON into a dict."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arch-kwargs is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object")
    return value


def _resolve_callable(spec: str, restricted: bool):
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
    return target


def build_model(arch: str, arch_kwargs: dict[str, Any] | None = None, restricted: bool = False) -> nn.Module:
    """Build an architecture with random weights from a spec.

    ``restricted`` (used for specs read from files) only allows torchvision/timm names and
    ``nn.Module`` subclasses, so a file cannot make the tool call an arbitrary function.
    """
    kwargs = dict(arch_kwargs or {})
    if not isinstance(arch, str) or ":" not in arch:
        raise UsageError(f"bad --arch {arch!r}: use torchvision:NAME, timm:NAME or package.module:callable")
    kind, _, name = arch.partition(":")
    try:
        if kind == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models():
                raise UsageError(f"unknown torchvision model {name!r}")
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        elif kind == "timm":
            import timm

            if not timm.is_model(name):
                raise UsageError(f"unknown timm model {name!r}")
            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            model = _resolve_callable(arch, restricted)(**kwargs)
    except UsageError:
        raise
    except TypeError as exc:
        raise UsageError(f"cannot build {arch} with kwargs {kwargs} ({_short(exc)})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
    """Load ``state`` strictly; mismatches raise a UsageError listing the first few."""
    own = model.state_dict()
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
    from .serialization import with_module_versions  # torchvision's MNASNet needs the versions

    model.load_state_dict(with_module_versions(state, model), strict=True)


def _layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _rebuild_spec(model: nn.Module, arch: str | None, arch_kwargs: dict[str, Any] | None, path: Path) -> str | None:
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
        fresh = build_model(spec, arch_kwargs, restricted=True)
    except Exception:  # a constructor that needs arguments, a class defined in a function, …
        return None
    return spec if _layout(fresh) == _layout(model) else None


# ---------------------------------------------------------------- input shapes and data configs


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


def _torchvision_config(name: str) -> dict[str, Any]:
    import torchvision

    try:
        weights = list(torchvision.models.get_model_weights(name))
    except (ValueError, KeyError):
        return {}
    if not weights:
        return {}
    tf = weights[0].transforms()
    crop = getattr(tf, "crop_size", [224])
    resize = getattr(tf, "resize_size", [256])
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    resize = resize[0] if isinstance(resize, (list, tuple)) else resize
    return {
        "input_size": (3, int(crop), int(crop)),
        "mean": tuple(getattr(tf, "mean", IMAGENET_MEAN)),
        "std": tuple(getattr(tf, "std", IMAGENET_STD)),
        "interpolation": str(getattr(tf, "interpolation", "bilinear")).split(".")[-1].lower(),
        "crop_pct": float(crop) / float(resize),
    }


def data_config(arch: str | None, model: nn.Module, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Eval preprocessing for a model: input_size (C, H, W), mean, std, interpolation, crop_pct."""
    meta = metadata or {}
    config: dict[str, Any] = {}
    if arch and arch.startswith("timm:"):
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        config = {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in cfg}
    elif arch and arch.startswith("torchvision:"):
        config = _torchvision_config(arch.split(":", 1)[1])
    for key in ("mean", "std"):
        if key in meta:
            config[key] = tuple(json.loads(meta[key]))
    if "input_shape" in meta:
        config["input_size"] = tuple(json.loads(meta["input_shape"]))[1:]
    return config


def default_input_shape(arch: str | None, model: nn.Module, metadata: dict[str, str] | None = None) -> tuple[int, ...] | None:
    """A batch-1 example input shape from the file's metadata, the arch config, or the first layer."""
    meta = metadata or {}
    if "input_shape" in meta:
        return tuple(int(s) for s in json.loads(meta["input_shape"]))
    shape = getattr(model, "default_input_shape", None)
    if shape:
        return tuple(shape)
    cfg = data_config(arch, model, meta)
    if "input_size" in cfg and (arch or "").split(":")[0] in ("timm", "torchvision"):
        return (1, *cfg["input_size"])
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return (1, first.in_features)
    return None


# ---------------------------------------------------------------- entry points


def open_model(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Load a model from a compressed ``.lrc.safetensors`` file or an original checkpoint + arch."""
    from .serialization import MANIFEST_KEY, load_compressed

    path = _check_file(path)
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        metadata = read_safetensors_metadata(path)
        if MANIFEST_KEY in metadata:
            loaded = load_compressed(path, arch, arch_kwargs)
            if input_shape is not None:
                loaded.input_shape = input_shape
            return loaded
        if arch is None and "arch" in metadata:
            arch = metadata["arch"]
            arch_kwargs = arch_kwargs or json.loads(metadata.get("arch_kwargs", "{}"))
            restricted = True
        else:
            restricted = False
    else:
        restricted = False
    content = read_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(content, nn.Module):
        model = content
        arch = _rebuild_spec(model, arch, arch_kwargs, path)
    else:
        if arch is None:
            raise UsageError(f"{path} holds a state dict; pass --arch to say which architecture it belongs to")
        model = build_model(arch, arch_kwargs, restricted=restricted)
        load_weights(model, content, path)
    model.eval()
    shape = input_shape or default_input_shape(arch, model, metadata)
    return LoadedModel(
        model=model,
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        input_shape=shape,
        data_config=data_config(arch, model, metadata),
        metadata=metadata,
    )


def load_model(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """The ``nn.Module`` of :func:`open_model`."""
    return open_model(path, arch, arch_kwargs, trust_pickle).model
