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

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .archsig import (
    BUILD_CHANS, LIBRARIES, ProgressFn, SignatureCache, build_kwargs, construct, key_hash, registry_names, resolve_key,
)

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
    in_chans = solved["chans"] or BUILD_CHANS[0]
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
        digest = key_hash(shapes)
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
    from .dataconfig import default_input_shape

    kwargs = build_kwargs(a.library, 0)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            first = construct(a.library, a.key, **kwargs).eval()
            second = construct(b.library, b.key, **build_kwargs(b.library, 0)).eval()
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
