"""Factorized replacements for Linear and Conv layers.

Each computes x ↦ up(down(x)): ``down`` maps the input into r channels without a bias (a Linear,
or a conv with the original kernel, stride, padding, dilation and padding mode), ``up`` maps r back
to the output width and carries the bias (a Linear, or a 1×1 conv).

Model code that reads a layer's tensors directly (``F.linear(x, self.qkv.weight, self.qkv.bias)``
in timm's EVA-02 and torchvision's Swin, ``.weight.dtype`` in XCiT) still works: ``weight`` is the
product of the factors in the dense layer's shape, formed on each access (so it follows the
factors and carries their gradients), and ``bias`` is the bias of ``up``. Neither is a registered
tensor, so neither is in the state dict or a saved file. The dense layer's sizes and conv geometry
(``in_features``, ``kernel_size``, ``stride``, …) read as they did.
"""

from __future__ import annotations

import torch
from torch import nn

from .factors import Factorization, flatten_weight

DENSE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Subclasses that override forward yet compute what their base class does: timm's Linear only casts
# its weight for TorchScript.
_SAME_FUNCTION = frozenset({"timm.layers.linear.Linear"})


def overrides_forward(layer: nn.Module) -> bool:
    """Whether ``layer`` is a subclass of a dense type with its own forward (say, timm's Conv2dSame
    padding at run time, or StdConv2d standardizing its weight), which a factorized layer would not do."""
    base = next((b for b in DENSE_TYPES if isinstance(layer, b)), None)
    cls = type(layer)
    if base is None or cls is base or f"{cls.__module__}.{cls.__qualname__}" in _SAME_FUNCTION:
        return False
    methods = ("forward",) if base is nn.Linear else ("forward", "_conv_forward")
    return any(getattr(cls, method) is not getattr(base, method) for method in methods)


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be factorized, or None when it can."""
    if not isinstance(layer, DENSE_TYPES):
        return f"{type(layer).__name__} is not a Linear, Conv1d or Conv2d"
    if overrides_forward(layer):
        return f"{type(layer).__name__} has its own forward (e.g. run-time padding) that a factorized layer would drop"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups > 1 and layer.groups == layer.in_channels:
            return "depthwise convolution (nothing to factorize)"
        if layer.groups > 1:
            return f"grouped convolution (groups={layer.groups})"
    if layer.weight.is_meta:
        return "weight is on the meta device"
    return None


class _LowRank(nn.Module):
    down: nn.Module
    up: nn.Module

    @property
    def rank(self) -> int:
        return self.up.weight.shape[1]

    @classmethod
    def from_dense(cls, layer: nn.Module, factors: Factorization):
        """The factorized replacement of ``layer`` holding ``factors`` (see :func:`empty_like`)."""
        _check_shapes(layer, factors)
        factors = _resolve_bias(layer, factors)
        module = cls.empty_like(layer, factors.rank, factors.bias is not None)
        module._load_factors(factors)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """A·B in the dense layer's weight shape: (m, d) for a Linear, (m, C, k…) for a conv."""
        up, down = self.up.weight, self.down.weight
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return product.reshape(up.shape[0], *down.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def factors(self) -> Factorization:
        """The current A (m, r), B (r, d) and bias."""
        A = self.up.weight.detach().reshape(self.up.weight.shape[0], -1)
        B = flatten_weight(self.down.weight.detach())
        bias = None if self.up.bias is None else self.up.bias.detach()
        return Factorization(A, B, bias)

    def _load_factors(self, factors: Factorization) -> None:
        with torch.no_grad():
            self.down.weight.copy_(factors.B.reshape(self.down.weight.shape))
            self.up.weight.copy_(factors.A.reshape(self.up.weight.shape))
            if factors.bias is not None:
                self.up.bias.copy_(factors.bias)


def _resolve_bias(layer: nn.Module, factors: Factorization) -> Factorization:
    if factors.bias is None and layer.bias is not None:
        return Factorization(factors.A, factors.B, layer.bias.detach())
    return factors


def _check_shapes(layer: nn.Module, factors: Factorization) -> None:
    m, d = flatten_weight(layer.weight).shape
    if factors.A.shape[0] != m or factors.B.shape[1] != d or factors.A.shape[1] != factors.B.shape[0]:
        raise ValueError(
            f"factors A {tuple(factors.A.shape)}, B {tuple(factors.B.shape)} do not fit a {m}×{d} layer"
        )


class LowRankLinear(_LowRank):
    """Linear d → r (no bias), then Linear r → m (with the bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def empty_like(cls, layer: nn.Linear, rank: int, bias: bool) -> LowRankLinear:
        """An uninitialized rank-``rank`` replacement of ``layer`` (its shape, device and dtype)."""
        w = layer.weight
        return cls(layer.in_features, layer.out_features, rank, bias, w.device, w.dtype)

    def to_dense(self) -> nn.Linear:
        w = self.up.weight
        dense = nn.Linear(self.in_features, self.out_features, self.up.bias is not None, w.device, w.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class _LowRankConv(_LowRank):
    _conv: type[nn.Module]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.down = self._conv(
            in_channels, rank, kernel_size, stride, padding, dilation,
            bias=False, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self.up = self._conv(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @classmethod
    def empty_like(cls, layer: nn.Module, rank: int, bias: bool):
        """An uninitialized rank-``rank`` replacement of the conv ``layer`` (its geometry, device and dtype)."""
        w = layer.weight
        return cls(layer.in_channels, layer.out_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.padding_mode, bias, w.device, w.dtype)

    @classmethod
    def from_dense(cls, layer: nn.Module, factors: Factorization):
        reason = unsupported_reason(layer)
        if reason is not None:
            raise ValueError(f"cannot factorize: {reason}")
        return super().from_dense(layer, factors)

    def to_dense(self) -> nn.Module:
        d, w = self.down, self.up.weight
        dense = self._conv(
            self.in_channels, self.out_channels, d.kernel_size, d.stride, d.padding, d.dilation,
            bias=self.up.bias is not None, padding_mode=d.padding_mode, device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense

    # The dense conv's geometry, for model code that reads it (timm's DaViT pads by ``conv.kernel_size``).
    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.down.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.down.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.down.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.down.dilation

    @property
    def padding_mode(self) -> str:
        return self.down.padding_mode

    @property
    def groups(self) -> int:
        return 1

    def extra_repr(self) -> str:
        d = self.down
        return (
            f"{self.in_channels}, {self.out_channels}, rank={self.rank}, kernel_size={d.kernel_size}, "
            f"stride={d.stride}, padding={d.padding}, dilation={d.dilation}"
        )


class LowRankConv1d(_LowRankConv):
    """Conv1d C → r with the original kernel (no bias), then a 1×1 Conv1d r → m (with the bias)."""

    _conv = nn.Conv1d


class LowRankConv2d(_LowRankConv):
    """Conv2d C → r with the original kernel (no bias), then a 1×1 Conv2d r → m (with the bias)."""

    _conv = nn.Conv2d


LOW_RANK_TYPES = (LowRankLinear, LowRankConv1d, LowRankConv2d)


def low_rank_class(layer: nn.Module) -> type[_LowRank]:
    """The factorized class for a dense layer (first match wins)."""
    for dense, low in ((nn.Linear, LowRankLinear), (nn.Conv2d, LowRankConv2d), (nn.Conv1d, LowRankConv1d)):
        if isinstance(layer, dense):
            return low
    raise ValueError(f"cannot factorize {type(layer).__name__}")


def from_dense(layer: nn.Module, factors: Factorization) -> _LowRank:
    """Build the factorized replacement of ``layer`` from ``factors``."""
    reason = unsupported_reason(layer)
    if reason is not None:
        raise ValueError(f"cannot factorize: {reason}")
    return low_rank_class(layer).from_dense(layer, factors)


def low_rank_modules(model: nn.Module) -> list[nn.Module]:
    """The distinct factorized modules of ``model`` (a tied module once)."""
    seen: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, LOW_RANK_TYPES):
            seen.setdefault(id(module), module)
    return list(seen.values())
