"""The walk through a ``torch.export`` program: from a layer's output to its activation.

Each layer's output is followed to its single consumer through BatchNorm (the eval-mode affine,
:class:`ChannelAffine`), dropout, padding, pooling and reshapes, up to the first pointwise
activation (ATen op names, as ``torch.export`` emits them); a BatchNorm right after that activation
is returned too. Anything else first (a residual add, a concatenation, several consumers) ends the
walk with the reason. :mod:`lowrank_compress.graph` turns the result into layer sites.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .activations import canonical_activation


@dataclass
class ChannelAffine:
    """A per-channel y = scale·x + shift (a BatchNorm in eval mode)."""

    name: str
    scale: torch.Tensor
    shift: torch.Tensor


# ---------------------------------------------------------------- op tables (ATen, as torch.export emits)

_ACT_OPS = {
    "relu": "relu", "relu_": "relu", "gelu": "gelu", "gelu_": "gelu", "silu": "silu", "silu_": "silu",
    "hardswish": "hardswish", "hardswish_": "hardswish", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "tanh_": "tanh", "hardsigmoid": "hardsigmoid", "hardsigmoid_": "hardsigmoid",
    "mish": "mish", "mish_": "mish", "elu": "elu", "elu_": "elu", "relu6": "relu6",
}
_PASS_OPS = {
    "dropout", "dropout_", "feature_dropout", "alpha_dropout", "native_dropout", "clone", "contiguous",
    "view", "reshape", "_unsafe_view", "flatten", "squeeze", "squeeze_", "unsqueeze", "permute", "transpose",
    "pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d",
    "max_pool1d", "max_pool2d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "to", "_to_copy", "type_as", "alias", "detach",
}
_BN_OPS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "_batch_norm_impl_index"}
_MERGE_OPS = {"add", "add_", "cat", "concat", "sub", "sub_", "stack"}


def op_name(node: torch.fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    # "relu_.default" → "relu_"; "aten::relu_" → "relu_"
    return name.split(".")[0].split("::")[-1]


def _merge_description(op: str) -> str:
    return "a concatenation" if op in ("cat", "concat", "stack") else "a residual add"


class ExportedGraph:
    """Maps nodes of an exported program back to the model's parameters and buffers."""

    def __init__(self, model: nn.Module, program: Any):
        self.model = model
        self.graph = program.graph
        sig = program.graph_signature
        self.placeholder: dict[str, str] = {}
        self.placeholder.update(sig.inputs_to_parameters)
        self.placeholder.update(sig.inputs_to_buffers)
        self.tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        consts = getattr(program, "constants", {}) or {}
        for name, target in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
            if target in consts:
                self.tensors[target] = consts[target]

    def fqn(self, node: Any) -> str | None:
        if isinstance(node, torch.fx.Node) and node.op == "placeholder":
            return self.placeholder.get(node.name)
        if isinstance(node, torch.fx.Node) and node.op == "get_attr":
            return str(node.target)
        return None

    def tensor(self, node: Any) -> torch.Tensor | None:
        name = self.fqn(node)
        return None if name is None else self.tensors.get(name)

    def batch_norm(self, node: torch.fx.Node) -> ChannelAffine | None:
        """The eval-mode affine of a batch-norm node, or None if it is not in eval mode."""
        args = list(node.args)
        op = op_name(node)
        if op == "batch_norm":
            # (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
            weight, bias, mean, var, training, eps = args[1], args[2], args[3], args[4], args[5], args[7]
        else:
            # _native_batch_norm_legit_no_training(input, weight, bias, mean, var, momentum, eps)
            weight, bias, mean, var, training, eps = args[1], args[2], args[3], args[4], False, args[-1]
        if training:
            return None
        mean_t, var_t = self.tensor(mean), self.tensor(var)
        if mean_t is None or var_t is None:
            return None
        w_t = self.tensor(weight) if weight is not None else None
        b_t = self.tensor(bias) if bias is not None else None
        inv = 1.0 / torch.sqrt(var_t.detach().to(torch.float64) + float(eps))
        scale = inv if w_t is None else w_t.detach().to(torch.float64) * inv
        shift = -mean_t.detach().to(torch.float64) * scale
        if b_t is not None:
            shift = shift + b_t.detach().to(torch.float64)
        name = (self.fqn(mean) or "batch_norm").rsplit(".", 1)[0]
        return ChannelAffine(name, scale, shift)


def _users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Consumers of ``node``'s value; tuple outputs (BatchNorm, max-pool with indices) go through item 0."""
    users = []
    for user in node.users:
        if op_name(user) == "getitem":
            if user.args[1] == 0:
                users.append(user)
            continue
        users.append(user)
    return users


def _activation_of(node: torch.fx.Node) -> str | None:
    op = op_name(node)
    if op in _ACT_OPS:
        return _ACT_OPS[op]
    if op in ("leaky_relu", "leaky_relu_"):
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return canonical_activation(f"leaky_relu({float(slope)})")
    if op in ("hardtanh", "hardtanh_"):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        if float(lo) == 0.0 and float(hi) == 6.0:
            return "relu6"
    return None


def walk(graph: ExportedGraph, start: torch.fx.Node) -> tuple[str, ChannelAffine | None, ChannelAffine | None, str | None]:
    """Follow a layer's output: (activation, BN before it, affine after it, why identity)."""
    node, bn_before = start, None
    while True:
        users = _users(node)
        if len(users) != 1:
            return "identity", bn_before, None, ("its output is not used" if not users else f"its output has {len(users)} consumers")
        user = users[0]
        op = op_name(user)
        if op in _BN_OPS and bn_before is None and user.args[0] is node:
            affine = graph.batch_norm(user)
            if affine is None:
                return "identity", None, None, "BatchNorm in training mode"
            bn_before, node = affine, user
            continue
        if op in _PASS_OPS or op == "getitem":
            node = user
            continue
        act = _activation_of(user)
        if act is not None:
            return act, bn_before, _affine_after(graph, user), None
        if op in _MERGE_OPS:
            return "identity", bn_before, None, f"its output reaches {_merge_description(op)}"
        if user.op == "output":
            return "identity", bn_before, None, "its output is the model output"
        return "identity", bn_before, None, f"its output feeds {op}"


def _affine_after(graph: ExportedGraph, act: torch.fx.Node) -> ChannelAffine | None:
    node = act
    while True:
        users = _users(node)
        if len(users) != 1:
            return None
        user = users[0]
        op = op_name(user)
        if op in _BN_OPS and user.args[0] is node:
            return graph.batch_norm(user)
        if op in ("dropout", "dropout_", "clone", "contiguous", "pad", "constant_pad_nd", "getitem"):
            node = user
            continue
        return None
