"""Registry models' signatures: the keys and shapes of their state dicts, built on the meta device, cached on disk.

A signature comes from building the model with 997 classes; the dims that follow ``num_classes`` and
``in_chans`` come from a second build (1999 classes, and for timm 5 input channels instead of 3).
Signatures are cached per library version in ``$LRC_CACHE_DIR`` or else ``~/.cache/lowrank_compress``:
an index of key-set hashes and one file per model, each written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LrcError
from .files import atomic_output, quiet_output

CACHE_ENV = "LRC_CACHE_DIR"


CACHE_FORMAT = 3


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


LIBRARIES = ("torchvision", "timm")


# The two builds behind a signature: their num_classes (primes no layer width is likely to equal, so
# the head shows by its size), and for timm their in_chans.
_BUILD_CLASSES = (997, 1999)


BUILD_CHANS = (3, 5)


_TORCHVISION_CLASSES = 1000


ProgressFn = Callable[[str, int, int], None]


def cache_dir() -> Path:
    """``$LRC_CACHE_DIR``, else ``lowrank_compress`` in ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowrank_compress"


# Layouts that torchvision's pretrained models have and its default build does not: GoogLeNet and
# Inception v3 loaded with weights drop their auxiliary heads and normalize their input themselves.
_VARIANTS = {
    ("torchvision", "googlenet+pretrained"): ("googlenet", {"aux_logits": False, "transform_input": True}),
    ("torchvision", "inception_v3+pretrained"): ("inception_v3", {"aux_logits": False, "transform_input": True}),
}


def resolve_key(library: str, key: str) -> tuple[str, dict[str, Any]]:
    """The registry name and build kwargs of a signature key (a name, or a ``name+variant`` above)."""
    return _VARIANTS.get((library, key), (key, {}))


def construct(library: str, key: str, **kwargs: Any) -> nn.Module:
    name, extra = resolve_key(library, key)
    kwargs = {**extra, **kwargs}
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


@contextlib.contextmanager
def _parameters_to_meta() -> Iterator[None]:
    """Move each parameter to the meta device as it is registered.

    For constructors that compute with real values while building (``.item()`` on a
    ``torch.linspace`` of drop-path rates) and so cannot run under ``torch.device("meta")``;
    initializers then act on meta tensors and cost nothing.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# In-place random fills: the bulk of a meta build's time (meta tensors run them as Python
# decompositions), and meaningless for a model whose values are never read.
_RANDOM_FILLS = ("normal_", "uniform_", "erfinv_", "exponential_", "bernoulli_", "random_", "log_normal_", "cauchy_")


@contextlib.contextmanager
def _no_random_fills() -> Iterator[None]:
    saved = {name: getattr(torch.Tensor, name) for name in _RANDOM_FILLS}

    def unchanged(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    for name in _RANDOM_FILLS:
        setattr(torch.Tensor, name, unchanged)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def meta_build(library: str, name: str, **kwargs: Any) -> nn.Module:
    """``library``'s model ``name`` with every parameter on the meta device and no values filled in."""
    with warnings.catch_warnings(), _no_random_fills():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return construct(library, name, **kwargs)
        except Exception:  # noqa: BLE001 - e.g. .item() on a meta tensor; retry keeping buffers real
            with _parameters_to_meta():
                return construct(library, name, **kwargs)


def build_kwargs(library: str, which: int, chans: bool = True) -> dict[str, int]:
    kwargs = {"num_classes": _BUILD_CLASSES[which]}
    if library == "timm" and chans:
        kwargs["in_chans"] = BUILD_CHANS[which]
    return kwargs


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fit(a: int, b: int, x0: int, x1: int) -> int | None:
    """k with a = k·x0 and b = k·x1 (a dim proportional to num_classes or in_chans), or None."""
    if a % x0 or b % x1 or a // x0 != b // x1 or a // x0 < 1:
        return None
    return a // x0


def key_hash(keys: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()


def signature_entry(library: str, name: str) -> dict[str, Any]:
    """The cached record of one registry model, first stage: its class, default num_classes, keys
    and shapes as built with 997 classes (and 3 input channels), and the hashes of its key set with
    and without the head (the keys with a dim of 997). A model that cannot be built gives ``{"error": ...}``."""
    try:
        model = meta_build(library, name, **build_kwargs(library, 0))
    except Exception as exc:  # noqa: BLE001 - a registry entry that does not build is recorded, not fatal
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    shapes = _shapes(model)
    head = {k for k, shape in shapes.items() if _BUILD_CLASSES[0] in shape}
    return {
        "class": f"{type(model).__module__}:{type(model).__qualname__}",
        "default_classes": _default_classes(library, resolve_key(library, name)[0]),
        "keys": list(shapes),
        "shapes": [list(shape) for shape in shapes.values()],
        "key_hash": key_hash(shapes),
        "headless_hash": key_hash(k for k in shapes if k not in head) if head else None,
    }


def with_head_and_stem(library: str, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Second stage, for the models a lookup matches: ``entry`` plus the dims that follow num_classes
    and in_chans as ``[key index, dim, factor]``, from a build with 1999 classes (and 5 input
    channels) compared with the first. None are known when that build fails or changes the keys."""
    keys, first = entry["keys"], entry["shapes"]
    second = None
    for with_chans in (True, False):
        try:
            second = _shapes(meta_build(library, name, **build_kwargs(library, 1, with_chans)))
            break
        except Exception:  # noqa: BLE001 - then only the default in_chans (or nothing) is known
            continue
    classes: list[list[int]] = []
    chans: list[list[int]] = []
    if second is not None and set(second) == set(keys):
        for index, (key, a) in enumerate(zip(keys, first)):
            b = second[key]
            if len(a) != len(b):
                classes, chans = [], []
                break
            for dim, (x, y) in enumerate(zip(a, b)):
                if x == y:
                    continue
                k = _fit(x, y, *_BUILD_CLASSES)
                if k is not None:
                    classes.append([index, dim, k])
                elif (k := _fit(x, y, *BUILD_CHANS)) is not None:
                    chans.append([index, dim, k])
    return {**entry, "classes": classes, "chans": chans}


def _default_classes(library: str, name: str) -> int:
    if library == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        return int(cfg.num_classes) if cfg is not None and cfg.num_classes is not None else 1000
    return _TORCHVISION_CLASSES


def registry_names(library: str) -> list[str]:
    """The signature keys of ``library``: its classification models and their variants."""
    variants = [key for lib, key in _VARIANTS if lib == library]
    if library == "torchvision":
        import torchvision

        return list(torchvision.models.list_models(module=torchvision.models)) + variants
    import timm

    return list(timm.list_models()) + variants


def library_version(library: str) -> str:
    module = __import__(library)
    return f"{module.__version__}-torch{torch.__version__}"


class SignatureCache:
    """One library's signatures under ``<dir>/<library>-<version>-v<format>/``.

    ``index.json`` holds, per model, the hashes of its key set (with and without the head) or the
    error that kept it from building, and each timm model's stem conv names: a lookup reads only
    the index and then ``models/<name>.json`` of the few models whose key set is the state dict's.
    Every file is written atomically; the index is merged with what another process may have
    written meanwhile.
    """

    def __init__(self, library: str, directory: Path | None = None):
        self.library = library
        self.version = library_version(library)
        self.root = (directory or cache_dir()) / f"{library}-{self.version}-v{CACHE_FORMAT}"
        self.index: dict[str, dict[str, Any]] = {}
        self.stems: dict[str, list[str]] = {}
        self.equivalent: dict[str, bool] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._read_index()

    def _read_index(self) -> None:
        try:
            data = json.loads((self.root / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent or unreadable: rebuilt as needed
            return
        if isinstance(data, dict) and data.get("format") == CACHE_FORMAT:
            self.index.update(data.get("models", {}))
            self.stems.update(data.get("stems", {}))
            self.equivalent.update(data.get("equivalent", {}))

    def _write(self, path: Path, data: Any) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        except (OSError, LrcError):  # a read-only or full cache directory: lookups work, only slower next time
            pass

    def save(self) -> None:
        """Write the index, merged with the one on disk."""
        mine = dict(self.index), dict(self.stems), dict(self.equivalent)
        self._read_index()
        self.index.update(mine[0])
        self.stems.update(mine[1])
        self.equivalent.update(mine[2])
        data = {"format": CACHE_FORMAT, "library": self.library, "version": self.version,
                "models": self.index, "stems": self.stems, "equivalent": self.equivalent}
        self._write(self.root / "index.json", data)

    def _model_path(self, name: str) -> Path:
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"not a registry model name: {name!r}")
        return self.root / "models" / f"{name}.json"

    def entry(self, name: str) -> dict[str, Any]:
        """The whole signature of ``name`` (both stages), from its file; what is missing or damaged is built."""
        if name not in self._entries:
            try:
                entry = json.loads(self._model_path(name).read_text(encoding="utf-8"))
                if not isinstance(entry, dict) or "keys" not in entry:
                    raise ValueError("not a signature")
            except (OSError, ValueError):
                entry = self._build(name)
            self._entries[name] = entry
        entry = self._entries[name]
        if "error" not in entry and "classes" not in entry:
            entry = self._entries[name] = with_head_and_stem(self.library, name, entry)
            self._write(self._model_path(name), entry)
        return entry

    def _build(self, name: str) -> dict[str, Any]:
        entry = signature_entry(self.library, name)
        if "error" in entry:
            self.index[name] = {"error": entry["error"]}
        else:
            self._write(self._model_path(name), entry)
            self.index[name] = {"key_hash": entry["key_hash"], "headless_hash": entry["headless_hash"]}
        self._entries[name] = entry
        return entry

    def ensure(self, names: Iterable[str], progress: ProgressFn | None = None) -> int:
        """Build the signatures of ``names`` not cached yet; returns how many were built."""
        missing = [n for n in names if n not in self.index]
        if not missing:
            return 0
        with quiet_output():  # some constructors print or log while building
            for i, name in enumerate(missing):
                if progress is not None:
                    progress(f"{self.library}:{name}", i, len(missing))
                self._build(name)
                if i % 100 == 99:  # a long build that is cut short keeps what it did
                    self.save()
        self.save()
        return len(missing)

    def with_key_hash(self, digest: str) -> list[str]:
        """Models whose key set, with or without the head, hashes to ``digest``."""
        return [n for n, e in self.index.items() if digest in (e.get("key_hash"), e.get("headless_hash"))]
