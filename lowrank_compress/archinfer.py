"""Which torchvision or timm architecture a state dict belongs to, from its keys and shapes alone.

A registry model's *signature* is its state dict's keys and their shapes, from building the model
on the meta device (no memory, no initialization) with 997 classes. A state dict matches a model
when it has the same keys (or the same keys without the head, timm's ``num_classes=0``) and the
same shapes except in the dims that follow ``num_classes`` and ``in_chans``, which then give them.
Those dims come from a second build (1999 classes, and for timm 5 input channels instead of 3),
made only for the models whose key set, hashed, is the state dict's.

Signatures are cached on disk per library version, in ``$LRC_CACHE_DIR`` or else
``~/.cache/lowrank_compress``: an index of key-set hashes and one file per model, each written
atomically, so a lookup reads the index and the few signatures whose key set fits. A lookup
builds only the signatures it may need: torchvision's ~80 classification models (when the state
dict has a 2-D conv) and those of timm's ~1400 whose pretrained config names a stem conv the state
dict has (for every timm 1.0.31 model, a key of its own state dict). ``build_cache`` builds all.

When several models match:

1. models that compute the same function (the same outputs from the same weights, e.g. timm's
   ``vit_tiny_patch16_224`` and ``deit_tiny_patch16_224``) count as one; the verdict is cached too;
2. a torchvision model wins over timm models of the same signature: timm's ResNets keep
   torchvision's names so as to load its weights, so the names say torchvision;
3. whatever is left is ambiguous: the error lists the candidates and asks for ``--arch``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LrcError, UsageError
from .fileio import atomic_output, quiet_output

CACHE_ENV = "LRC_CACHE_DIR"
CACHE_FORMAT = 3
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
LIBRARIES = ("torchvision", "timm")
# The two builds behind a signature: their num_classes (primes no layer width is likely to equal, so
# the head shows by its size), and for timm their in_chans.
_BUILD_CLASSES = (997, 1999)
_BUILD_CHANS = (3, 5)
_TORCHVISION_CLASSES = 1000

ProgressFn = Callable[[str, int, int], None]


def cache_dir() -> Path:
    """``$LRC_CACHE_DIR``, else ``lowrank_compress`` in ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowrank_compress"


# ---------------------------------------------------------------- building models without weights


# Layouts that torchvision's pretrained models have and its default build does not: GoogLeNet and
# Inception v3 loaded with weights drop their auxiliary heads and normalize their input themselves.
_VARIANTS = {
    ("torchvision", "googlenet+pretrained"): ("googlenet", {"aux_logits": False, "transform_input": True}),
    ("torchvision", "inception_v3+pretrained"): ("inception_v3", {"aux_logits": False, "transform_input": True}),
}


def resolve_key(library: str, key: str) -> tuple[str, dict[str, Any]]:
    """The registry name and build kwargs of a signature key (a name, or a ``name+variant`` above)."""
    return _VARIANTS.get((library, key), (key, {}))


def _construct(library: str, key: str, **kwargs: Any) -> nn.Module:
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
                return _construct(library, name, **kwargs)
        except Exception:  # noqa: BLE001 - e.g. .item() on a meta tensor; retry keeping buffers real
            with _parameters_to_meta():
                return _construct(library, name, **kwargs)


def _build_kwargs(library: str, which: int, chans: bool = True) -> dict[str, int]:
    kwargs = {"num_classes": _BUILD_CLASSES[which]}
    if library == "timm" and chans:
        kwargs["in_chans"] = _BUILD_CHANS[which]
    return kwargs


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fit(a: int, b: int, x0: int, x1: int) -> int | None:
    """k with a = k·x0 and b = k·x1 (a dim proportional to num_classes or in_chans), or None."""
    if a % x0 or b % x1 or a // x0 != b // x1 or a // x0 < 1:
        return None
    return a // x0


def _key_hash(keys: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()


def signature_entry(library: str, name: str) -> dict[str, Any]:
    """The cached record of one registry model, first stage: its class, default num_classes, keys
    and shapes as built with 997 classes (and 3 input channels), and the hashes of its key set with
    and without the head (the keys with a dim of 997). A model that cannot be built gives ``{"error": ...}``."""
    try:
        model = meta_build(library, name, **_build_kwargs(library, 0))
    except Exception as exc:  # noqa: BLE001 - a registry entry that does not build is recorded, not fatal
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    shapes = _shapes(model)
    head = {k for k, shape in shapes.items() if _BUILD_CLASSES[0] in shape}
    return {
        "class": f"{type(model).__module__}:{type(model).__qualname__}",
        "default_classes": _default_classes(library, resolve_key(library, name)[0]),
        "keys": list(shapes),
        "shapes": [list(shape) for shape in shapes.values()],
        "key_hash": _key_hash(shapes),
        "headless_hash": _key_hash(k for k in shapes if k not in head) if head else None,
    }


def with_head_and_stem(library: str, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Second stage, for the models a lookup matches: ``entry`` plus the dims that follow num_classes
    and in_chans as ``[key index, dim, factor]``, from a build with 1999 classes (and 5 input
    channels) compared with the first. None are known when that build fails or changes the keys."""
    keys, first = entry["keys"], entry["shapes"]
    second = None
    for with_chans in (True, False):
        try:
            second = _shapes(meta_build(library, name, **_build_kwargs(library, 1, with_chans)))
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
                elif (k := _fit(x, y, *_BUILD_CHANS)) is not None:
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


# ---------------------------------------------------------------- the on-disk cache


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


# ---------------------------------------------------------------- matching


@dataclass(frozen=True)
class Match:
    """A registry model whose signature fits a state dict, with the num_classes and in_chans that make it fit.

    ``key`` is the signature's key: the model's name, or ``name+variant`` for a layout it is built
    into with extra kwargs.
    """

    library: str
    key: str
    num_classes: int
    in_chans: int
    default_classes: int

    @property
    def arch(self) -> str:
        return f"{self.library}:{resolve_key(self.library, self.key)[0]}"

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        kwargs = dict(resolve_key(self.library, self.key)[1])
        if self.num_classes != self.default_classes:
            kwargs["num_classes"] = self.num_classes
        if self.in_chans != 3:
            kwargs["in_chans"] = self.in_chans
        return kwargs


def _solve(size: int, factor: int, value: int | None) -> int | None:
    """The num_classes / in_chans a dim of ``size`` gives (consistent with ``value`` so far), or -1 if none."""
    if size % factor:
        return -1
    solved = size // factor
    if solved < 1 or (value is not None and value != solved):
        return -1
    return solved


def match_entry(
    library: str, name: str, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> Match | None:
    """``entry`` fits ``shapes`` (key → shape) up to its head and stem dims: the Match, else None."""
    keys = entry["keys"]
    head = {keys[i] for i, _, _ in entry["classes"]}
    if len(shapes) == len(keys):
        headless = False
    elif head and len(shapes) == len(keys) - len(head):
        headless = True
    else:
        return None
    variable = {(i, d): ("classes", k) for i, d, k in entry["classes"]}
    variable.update({(i, d): ("chans", k) for i, d, k in entry["chans"]})
    solved: dict[str, int | None] = {"classes": None, "chans": None}
    for index, (key, expected) in enumerate(zip(keys, entry["shapes"])):
        if headless and key in head:
            continue
        actual = shapes.get(key)
        if actual is None or len(actual) != len(expected):
            return None
        for dim, (got, want) in enumerate(zip(actual, expected)):
            what = variable.get((index, dim))
            if what is None:
                if got != want:
                    return None
                continue
            value = _solve(got, what[1], solved[what[0]])
            if value == -1:
                return None
            solved[what[0]] = value
    # A model whose head did not change with num_classes (or whose second build failed) keeps its default.
    num_classes = 0 if headless else solved["classes"] or entry["default_classes"]
    in_chans = solved["chans"] or _BUILD_CHANS[0]
    return Match(library, name, num_classes, in_chans, entry["default_classes"])


def _stems(cache: SignatureCache) -> dict[str, list[str]]:
    """Per timm model, the stem convs its pretrained config names (cached in the index)."""
    names = registry_names("timm")
    if any(n not in cache.stems for n in names):
        from timm.models import get_pretrained_cfg

        for name in names:
            cfg = get_pretrained_cfg(name)
            convs = cfg.first_conv if cfg is not None else None
            cache.stems[name] = [convs] if isinstance(convs, str) else [c for c in convs or () if isinstance(c, str)]
        cache.save()
    return cache.stems


def _plausible_timm(cache: SignatureCache, keys: set[str]) -> list[str]:
    """timm models worth building: those whose pretrained config names a stem conv that ``keys`` has."""
    return [name for name, convs in _stems(cache).items() if all(f"{conv}.weight" in keys for conv in convs)]


class Registry:
    """The signature caches of torchvision and timm, built as lookups need them.

    ``names`` restricts a library to the given models (tests, and callers that know the family).
    """

    def __init__(self, directory: Path | None = None, libraries: Iterable[str] = LIBRARIES,
                 progress: ProgressFn | None = None, names: Mapping[str, Iterable[str]] | None = None):
        self.caches = {lib: SignatureCache(lib, directory) for lib in libraries}
        self.progress = progress
        self.names = {lib: list(names[lib]) for lib in self.caches if names and lib in names}

    def _names(self, library: str) -> list[str]:
        return self.names[library] if library in self.names else registry_names(library)

    def matches(self, state: Mapping[str, torch.Tensor] | Mapping[str, tuple[int, ...]]) -> list[Match]:
        """Every registry model that fits ``state`` (tensors or shapes), building signatures lazily."""
        shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state.items()}
        for library, cache in self.caches.items():
            names = self._names(library)
            if library == "torchvision" and not any(len(shape) == 4 for shape in shapes.values()):
                continue  # every torchvision classification model has a 2-D convolution
            if library == "timm":
                plausible = set(_plausible_timm(cache, set(shapes)))
                names = [n for n in names if n in plausible]
            cache.ensure(names, self.progress)
        return self._cached_matches(shapes)

    def _cached_matches(self, shapes: Mapping[str, tuple[int, ...]]) -> list[Match]:
        digest = _key_hash(shapes)
        found = []
        for library, cache in self.caches.items():
            allowed = set(self.names[library]) if library in self.names else None
            for name in cache.with_key_hash(digest):
                if allowed is not None and name not in allowed:
                    continue
                match = match_entry(library, name, cache.entry(name), shapes)
                if match is not None:
                    found.append(match)
        return found

    def entry(self, match: Match) -> dict[str, Any]:
        return self.caches[match.library].entry(match.key)

    def same_networks(self, matches: list[Match]) -> list[list[Match]]:
        """``matches`` grouped by the function they compute (verdicts cached); preferred first in each group."""
        groups: list[list[Match]] = []
        for match in sorted(matches, key=_preference):
            for group in groups:
                if self._equivalent(group[0], match):
                    group.append(match)
                    break
            else:
                groups.append([match])
        return groups

    def _equivalent(self, a: Match, b: Match) -> bool:
        key = "|".join(sorted((f"{a.library}:{a.key}", f"{b.library}:{b.key}")))
        cache = self.caches[a.library] if a.library == b.library else self.caches["torchvision"]
        if key not in cache.equivalent:
            cache.equivalent[key] = same_function(a, b)
            cache.save()
        return cache.equivalent[key]


def _preference(match: Match) -> tuple:
    return (LIBRARIES.index(match.library), len(match.key), match.key)


def same_function(a: Match, b: Match) -> bool:
    """Whether ``a`` and ``b`` compute the same outputs from the same (random) weights at ``a``'s input size.

    Runs on its own random state: the caller's is left as it was.
    """
    from .checkpoint import default_input_shape

    kwargs = _build_kwargs(a.library, 0)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            first = _construct(a.library, a.key, **kwargs).eval()
            second = _construct(b.library, b.key, **_build_kwargs(b.library, 0)).eval()
            second.load_state_dict(first.state_dict(), strict=True)
            shape = default_input_shape(a.arch, first) or (1, kwargs.get("in_chans", 3), 224, 224)
            x = torch.randn(shape)
            with torch.no_grad():
                y1, y2 = first(x), second(x)
    except Exception:  # noqa: BLE001 - a pair that cannot be compared is taken to differ
        return False
    return (
        isinstance(y1, torch.Tensor) and isinstance(y2, torch.Tensor) and y1.shape == y2.shape
        and bool(torch.allclose(y1, y2, rtol=1e-4, atol=1e-5))
    )


# ---------------------------------------------------------------- the answer


@dataclass
class InferredArch:
    """The architecture a state dict was found to belong to."""

    arch: str
    arch_kwargs: dict[str, Any]
    same_network: list[str] = field(default_factory=list)
    other_fits: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        kwargs = "".join(f", {k}={v}" for k, v in self.arch_kwargs.items())
        text = f"architecture {self.arch}{kwargs}, inferred from the state dict's keys and shapes"
        if self.same_network:
            text += f" (the same network as {', '.join(self.same_network)})"
        if self.other_fits:
            text += f"; {', '.join(self.other_fits)} also fit but compute something else: pass --arch to use one"
        return text


def _resolve(groups: list[list[Match]], source: str | Path) -> tuple[list[Match], list[Match]]:
    """(the chosen group, the preferred match of every other group); a UsageError when ambiguous."""
    if len(groups) == 1:
        return groups[0], []
    torchvision = [g for g in groups if g[0].library == "torchvision"]
    if len(torchvision) == 1:
        return torchvision[0], [g[0] for g in groups if g is not torchvision[0]]
    listed = "; ".join(
        g[0].arch + (f" (= {', '.join(m.arch for m in g[1:])})" if len(g) > 1 else "") for g in groups
    )
    kwargs = groups[0][0].arch_kwargs
    with_kwargs = f" with --arch-kwargs '{json.dumps(kwargs)}'" if kwargs else ""
    error = UsageError(
        f"{source} fits {len(groups)} architectures with the same keys and shapes: {listed}; "
        f"pass --arch{with_kwargs} to say which"
    )
    error.candidates = [g[0].arch for g in groups]
    raise error


def infer_arch(
    state: Mapping[str, torch.Tensor],
    source: str | Path = "the state dict",
    registry: Registry | None = None,
) -> InferredArch:
    """The torchvision/timm architecture (and num_classes, in_chans) of ``state``.

    Ambiguity raises a UsageError (exit 2) whose ``candidates`` lists the architectures; no match
    raises one that says so.
    """
    registry = registry or Registry()
    matches = registry.matches(state)
    if not matches:
        raise UsageError(
            f"{source} holds a state dict; pass --arch to say which architecture it belongs to "
            "(its keys and shapes match no torchvision or timm classification model)"
        )
    chosen, others = _resolve(registry.same_networks(matches), source)
    best = chosen[0]
    return InferredArch(best.arch, best.arch_kwargs, [m.arch for m in chosen[1:]], [m.arch for m in others])


def registry_arch(model: nn.Module, registry: Registry | None = None) -> str | None:
    """The ``library:name`` of a torchvision/timm model instance (e.g. unpickled), or None.

    Only registry models of the instance's own class count; None where that leaves none or several.
    """
    cls = type(model)
    library = cls.__module__.split(".")[0]
    if library not in LIBRARIES:
        return None
    registry = registry or Registry(libraries=(library,))
    qualified = f"{cls.__module__}:{cls.__qualname__}"
    matches = [m for m in registry.matches(model.state_dict()) if registry.entry(m)["class"] == qualified]
    if not matches:
        return None
    try:
        chosen, _ = _resolve(registry.same_networks(matches), "the model")
    except UsageError:
        return None
    return chosen[0].arch


def build_cache(libraries: Iterable[str] = LIBRARIES, directory: Path | None = None,
                progress: ProgressFn | None = None) -> dict[str, int]:
    """Build the key sets of every model of ``libraries`` now (tens of minutes for timm on 2 cores):
    lookups then build nothing, and also consider the models whose config names a stem conv the state
    dict lacks. Returns how many models each library has."""
    counts = {}
    for library in libraries:
        cache = SignatureCache(library, directory)
        cache.ensure(registry_names(library), progress)
        counts[library] = sum("error" not in e for e in cache.index.values())
    return counts
