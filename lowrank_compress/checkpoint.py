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
import math
import os
import pickle
import re
import warnings
import zipfile
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
    arch_note: str | None = None  # how the architecture was found when no spec named it


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
        raise UsageError(f"cannot read {path} as a PyTorch checkpoint (bad zip directory: {_short(exc)})") from None
    size = path.stat().st_size
    if sum(sizes) > size + 2**20:
        raise UsageError(
            f"{path} is a {size / 1e6:.1f} MB file whose records inflate to {sum(sizes) / 1e6:.0f} MB; torch.save "
            "stores records uncompressed, so it is refused as a decompression bomb"
        )


def _read_torch(path: Path, trust_pickle: bool) -> Any:
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


# Architecture specs read from files (a manifest, safetensors metadata) are untrusted: a file may name
# a torchvision or timm registry model, or an nn.Module class in a module the user allowed. The check
# happens before anything is imported, since importing a module runs its code.
TRUSTED_MODULES_ENV = "LRC_TRUSTED_MODULES"
_BUILTIN_TRUSTED = ("lowrank_compress.digits",)  # the bundled model; importing it runs nothing else
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


def _is_trusted(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in trusted_modules())


def check_file_spec(spec: Any, source: str | Path = "the file") -> None:
    """Refuse an architecture spec read from ``source`` that a file may not name, importing nothing."""
    if not isinstance(spec, str) or ":" not in spec or len(spec) > 256:
        raise UsageError(f"{source} names a malformed architecture {_clip(spec)}; pass --arch to choose one")
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
        raise UsageError(f"{source} names a malformed architecture {_clip(spec)}; pass --arch to choose one")
    if not _is_trusted(match.group(1)):
        raise UsageError(
            f"{source} names the architecture {spec!r}, which is not an nn.Module class of a module you allowed "
            f"(a file may name torchvision:NAME, timm:NAME or a class in a module listed in {TRUSTED_MODULES_ENV}); "
            "pass --arch to choose the architecture yourself"
        )


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


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
            raise UsageError(f"{source} passes the arch kwarg {_clip(key)}, which a file may not set "
                             f"(it could load weights, read a path or name a URL); {explicit}")
        if not _plain_value(value):
            raise UsageError(f"{source} passes arch kwarg {key!r} the value {_clip(value)}, which a file may not set "
                             f"(only numbers, booleans, short names and short lists of them); {explicit}")
        cap = _FILE_KWARG_CAPS.get(key)
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if cap is not None and any(isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v <= cap for v in numbers):
            raise UsageError(f"{source} passes arch kwarg {key}={_clip(value)}, outside [0, {cap}] for a value "
                             f"read from a file; {explicit}")
    return dict(kwargs)


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


def _resolve_callable(spec: str, restricted: bool, trusted_only: bool = False):
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
                f"arch kwarg {key}={_clip(kwargs[key])} for {arch} would download weights, and lrc never uses the "
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


def build_model(
    arch: str, arch_kwargs: dict[str, Any] | None = None, restricted: bool = False, source: str | Path = "the file"
) -> nn.Module:
    """Build an architecture with random weights from a spec; nothing is ever downloaded.

    ``restricted`` says the spec and kwargs were read from a file: the spec may then only name a
    torchvision/timm registry model or an ``nn.Module`` class of a trusted module (checked before
    anything is imported, see :func:`check_file_spec`), and the kwargs pass :func:`file_kwargs`;
    ``source`` names the file in their messages.
    """
    kwargs = dict(arch_kwargs or {})
    if restricted:
        check_file_spec(arch, source)
        kwargs = file_kwargs(arch, kwargs, source)
    elif not isinstance(arch, str) or ":" not in arch:
        raise UsageError(f"bad --arch {arch!r}: use torchvision:NAME, timm:NAME or package.module:callable")
    try:
        model = _construct(arch, kwargs, restricted, trusted_only=restricted)
    except UsageError:
        raise
    except TypeError as exc:
        raise UsageError(f"cannot build {arch} with kwargs {kwargs} ({_short(exc)})") from None
    except (ValueError, RuntimeError, OverflowError, AssertionError, KeyError, IndexError, MemoryError) as exc:
        # A constructor rejecting its arguments (or unable to allocate for them) is bad input, not a crash.
        raise UsageError(f"cannot build {arch} with kwargs {_clip(kwargs)} ({type(exc).__name__}: {_short(exc)})") from None
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
    kwargs = dict(arch_kwargs or {})
    if restricted:
        check_file_spec(arch, source)
        kwargs = file_kwargs(arch, kwargs, source)
    elif not isinstance(arch, str) or ":" not in arch:
        raise UsageError(f"bad --arch {arch!r}: use torchvision:NAME, timm:NAME or package.module:callable")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _construct(arch, kwargs, restricted, trusted_only=restricted)
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - whatever the meta build cannot do, the real build reports
        return None
    return model if isinstance(model, nn.Module) else None


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
    from .serialization import with_module_versions, with_tied_names

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
        # Class only, but no module allow-list: unpickling the file the user trusts imported it already.
        fresh = _construct(spec, dict(arch_kwargs or {}), restricted=True)
    except Exception:  # a constructor that needs arguments, a class defined in a function, …
        return None
    return spec if _layout(fresh) == _layout(model) else None


# ---------------------------------------------------------------- input shapes and data configs


# Caps on numbers read from files (an explicit --input-shape lifts the shape caps): a few bytes of
# JSON must not make a command allocate gigabytes.
# Elements per sample (C·H·W) of an input shape from a file, e.g. 3×591×591 or 1×1024×1024. Convolutions
# need their input's size times C·k² for im2col: at 2^21 elements a thin 1×2^21 strip took the small
# digits CNN past 2 GB at batch 2.
MAX_SAMPLE_ELEMENTS = 2**20
MAX_SHAPE_ELEMENTS = 2**24  # elements of a whole recorded example batch
MAX_JSON_CHARS = 16 * 2**20
MAX_JSON_DEPTH = 32


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_input_shape(value: Any, source: str | Path, capped: bool = True) -> tuple[int, ...]:
    """An input shape read from ``source``: 1 to 8 positive integers below 2^31, within the caps.

    ``capped`` applies :data:`MAX_SAMPLE_ELEMENTS` and :data:`MAX_SHAPE_ELEMENTS`; callers skip it
    when the user gave the shape explicitly.
    """
    if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 8
            or not all(_is_int(s) and 1 <= s < 2**31 for s in value)):
        raise UsageError(f"{source} records a bad input shape {_clip(value)} (1 to 8 positive integers below 2^31)")
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
        raise UsageError(f"{source} records a bad {key} {_clip(value)} (1 to 4 {rule} numbers)")
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
    meta = file_metadata(metadata or {}, "the file")
    config: dict[str, Any] = {}
    if arch and arch.startswith("timm:"):
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        config = {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in cfg}
    elif arch and arch.startswith("torchvision:"):
        config = _torchvision_config(arch.split(":", 1)[1])
    for key in ("mean", "std"):
        if key in meta:
            config[key] = meta[key]
    if "input_shape" in meta:
        config["input_size"] = meta["input_shape"][1:]
    return config


def default_input_shape(arch: str | None, model: nn.Module, metadata: dict[str, str] | None = None) -> tuple[int, ...] | None:
    """A batch-1 example input shape from the file's metadata, the arch config, or the first layer."""
    meta = file_metadata(metadata or {}, "the file")
    if "input_shape" in meta:
        return meta["input_shape"]
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
        arch = _rebuild_spec(model, arch, arch_kwargs, path)
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
