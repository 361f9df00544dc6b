"""Find the layer sites of a model: each Linear/Conv layer with what its output feeds.

The model is traced with ``torch.export`` at the example inputs, which lowers module calls and
functional code alike (``nn.ReLU(inplace=True)``, ``F.relu``, ``torch.relu``, timm's fused
BatchNorm+activation modules) to one small set of ATen ops. From each layer the walk follows the
single consumer of its output through BatchNorm (folded into W, b for the math only), dropout,
padding, pooling and reshapes to the first pointwise activation. A BatchNorm right after that
activation becomes per-row weights α_i = scale_i². An output that reaches a residual add, a
concatenation, several consumers or anything else first counts as identity.

A layer whose weight the model's code reads directly (``F.linear(x, self.qkv.weight, bias)``
instead of calling ``self.qkv``) is found by where its matmul runs: in another module's forward.
It is still factorized (the factorized layers' ``weight`` is the product of the factors), and the
site says that this code then multiplies the factors back into a dense weight on each call.

The walk itself is :mod:`lowrank_compress.graphwalk`.

Where tracing fails (e.g. data-dependent control flow) the walk falls back to running the model
with hooks: layers are found, activations are treated as identity, and the sites say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import reraise_interrupt
from .io.files import quiet_output
from .layers import DENSE_TYPES, LOW_RANK_TYPES, unsupported_reason
from .factors import LARGE_WEIGHT
from .graphwalk import ChannelAffine, ExportedGraph, op_name, walk


@dataclass
class LayerSite:
    """One Linear/Conv layer and what follows it.

    ``shape`` is the flattened weight shape (m, d); ``bn_before`` is folded into the layer for the
    math; ``affine_after`` gives per-row weights α_i = scale_i² to the post-activation error.
    """

    name: str
    module: nn.Module
    kind: str
    shape: tuple[int, int]
    activation: str = "identity"
    bn_before: ChannelAffine | None = None
    affine_after: ChannelAffine | None = None
    skip_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    calls: int = 0

    @property
    def eligible(self) -> bool:
        return self.skip_reason is None

    @property
    def params(self) -> int:
        m, d = self.shape
        return m * d + (m if getattr(self.module, "bias", None) is not None else 0)

    @property
    def max_useful_rank(self) -> int:
        """The largest rank r whose factors still have fewer weights than W: r·(m+d) < m·d.

        That is floor(m·d/(m+d)), one less where m+d divides m·d (there the factors tie with W).
        """
        m, d = self.shape
        return (m * d - 1) // (m + d)

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) of the layer with the BatchNorm before the activation folded in, float64, (m, d).

        A weight of LARGE_WEIGHT elements or more keeps its dtype: the projection math reads it in
        float64 row blocks, and a whole float64 copy of a 16384² layer would take 2 GiB.
        """
        w = self.module.weight.detach().reshape(self.shape[0], -1)
        if w.numel() < LARGE_WEIGHT:
            w = w.to(torch.float64)
        b = self.module.bias
        b = None if b is None else b.detach().to(torch.float64)
        if self.bn_before is None:
            return w, b
        scale, shift = self.bn_before.scale.to(torch.float64), self.bn_before.shift.to(torch.float64)
        base = torch.zeros_like(shift) if b is None else b
        return w * scale.to(w.dtype)[:, None], base * scale + shift

    def row_weights(self) -> torch.Tensor | None:
        """α_i = scale_i² of the per-channel affine after the activation, if any."""
        if self.affine_after is None:
            return None
        return self.affine_after.scale.to(torch.float64) ** 2

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "activation": self.activation,
            "bn_before": None if self.bn_before is None else self.bn_before.name,
            "affine_after": None if self.affine_after is None else self.affine_after.name,
            "params": self.params,
            "max_useful_rank": self.max_useful_rank,
            "eligible": self.eligible,
            "skip_reason": self.skip_reason,
            "notes": list(self.notes),
        }


def _example_args(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, DENSE_TYPES) and not isinstance(module, LOW_RANK_TYPES)
        and not any(isinstance(module, t) for t in (nn.LazyLinear,))
    }


def _static_reasons(model: nn.Module, candidates: dict[str, nn.Module]) -> dict[str, str]:
    """Reasons known without a trace: MHA internals, factors of compressed layers, shared weights, unsupported convs."""
    reasons: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            for child_name, _ in parent.named_modules():
                full = f"{parent_name}.{child_name}" if child_name else parent_name
                if full in candidates:
                    reasons[full] = "inside nn.MultiheadAttention (its weights are used functionally)"
        elif isinstance(parent, LOW_RANK_TYPES):
            # A model loaded from a .lrc.safetensors: its factors are not layers to factorize again.
            for child_name, _ in parent.named_modules():
                full = f"{parent_name}.{child_name}"
                if full in candidates:
                    reasons[full] = f"part of the factorized layer {parent_name} (already compressed)"
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    for name, module in candidates.items():
        if name in reasons:
            continue
        reason = unsupported_reason(module)
        if reason is None:
            others = [o for o in owners.get(id(module.weight), []) if o != name and not o.startswith(name + ".")]
            if any(model.get_submodule(o) is not module for o in others):
                reason = f"weight is shared with {others[0]}"
        if reason is None and ((m := module.weight.shape[0]) * (d := module.weight[0].numel()) - 1) // (m + d) < 1:
            reason = "too small: no rank saves parameters"
        if reason is not None:
            reasons[name] = reason
    return reasons


def _new_site(name: str, module: nn.Module) -> LayerSite:
    m = module.weight.shape[0]
    d = int(math.prod(module.weight.shape[1:]))
    return LayerSite(name=name, module=module, kind=type(module).__name__, shape=(m, d))


def find_sites(model: nn.Module, example_inputs: Any) -> list[LayerSite]:
    """Every Linear/Conv1d/Conv2d layer of ``model`` with its activation, in execution order.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    The model is put in eval mode (BatchNorm statistics are what the math folds in).
    """
    model.eval()
    candidates = _candidates(model)
    reasons = _static_reasons(model, candidates)
    args, kwargs = _example_args(example_inputs)
    try:
        # torch.export logs and prints whole graphs when it fails; the site notes say what matters.
        with torch.no_grad(), quiet_output():
            program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # tracing can fail in many ways; the eager walk still finds the layers
        reraise_interrupt(exc)
        return _eager_sites(model, candidates, reasons, args, kwargs, exc)
    graph = ExportedGraph(model, program)
    # A module reachable under several names (shared) is lifted under any of them: use the first.
    first = {id(module): name for name, module in candidates.items()}
    aliases = {n: first[id(m)] for n, m in model.named_modules(remove_duplicate=False) if id(m) in first}
    found: dict[str, list[tuple[str, ChannelAffine | None, ChannelAffine | None, str | None]]] = {}
    readers: dict[str, set[str]] = {}
    order: list[str] = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or op_name(node) not in ("linear", "conv1d", "conv2d", "convolution"):
            continue
        fqn = graph.fqn(node.args[1])
        if fqn is None or not fqn.endswith(".weight") and fqn != "weight":
            continue
        layer_name = fqn[: -len(".weight")] if fqn.endswith(".weight") else ""
        layer_name = aliases.get(layer_name, layer_name)
        if layer_name not in candidates:
            continue
        if layer_name not in found:
            order.append(layer_name)
        found.setdefault(layer_name, []).append(walk(graph, node))
        caller = _calling_module(node)
        if caller is not None and aliases.get(caller, caller) != layer_name:
            readers.setdefault(layer_name, set()).add(caller)
    sites = []
    for name in order + [n for n in candidates if n not in found]:
        site = _new_site(name, candidates[name])
        walks = found.get(name, [])
        site.calls = len(walks)
        if not walks:
            site.skip_reason = reasons.get(name) or "not called in forward at the example inputs"
        else:
            site.skip_reason = reasons.get(name)
            acts = {w[0] for w in walks}
            if len(walks) == 1 or len(acts) == 1:
                site.activation, site.bn_before, site.affine_after, why = walks[0]
                if why and site.activation == "identity":
                    site.notes.append(f"identity: {why}")
            else:
                site.notes.append(f"called {len(walks)} times with different activations; identity used")
            if len(walks) > 1:
                site.notes.append(f"called {len(walks)} times")
        if name in readers:
            where = ", ".join(sorted(f"{r}'s forward" if r else "the model's forward" for r in readers[name]))
            site.notes.append(
                f"its weight is read directly by {where}: factorized, that code multiplies the factors "
                "back into the dense weight on each call (fewer parameters, not fewer FLOPs)"
            )
        sites.append(site)
    return sites


def _calling_module(node: torch.fx.Node) -> str | None:
    """The fqn of the innermost module whose forward ran ``node`` ("" for the model's own), or None if unknown."""
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return None
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def _eager_sites(
    model: nn.Module,
    candidates: dict[str, nn.Module],
    reasons: dict[str, str],
    args: tuple,
    kwargs: dict,
    error: Exception,
) -> list[LayerSite]:
    """Fallback: run the model with hooks to find which layers run and in what order."""
    calls: dict[str, int] = {}
    order: list[str] = []

    def hook(name: str):
        def record(_module, _inputs, _output):
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:
        raise ValueError(f"the model does not run on the example inputs ({type(exc).__name__}: {exc})") from None
    finally:
        for h in handles:
            h.remove()
    first_line = " ".join(str(error).split())[:120]
    note = f"tracing failed ({type(error).__name__}: {first_line}); eager walk, activation treated as identity"
    sites = []
    for name in order + [n for n in candidates if n not in calls]:
        site = _new_site(name, candidates[name])
        site.calls = calls.get(name, 0)
        site.skip_reason = reasons.get(name) or (None if site.calls else "not called in forward at the example inputs")
        site.notes.append(note)
        sites.append(site)
    return sites
