"""Factorized modules: x ↦ A(Bx) + b, conv geometry, to_dense, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compress import LowRankConv1d, LowRankConv2d, LowRankLinear, factorize
from lowrank_compress.layers import from_dense
from lowrank_compress.factors import Factorization
from lowrank_compress.layers import low_rank_class, overrides_forward, unsupported_reason


def random_factors(m: int, d: int, rank: int, bias: bool, seed: int = 0, dtype=torch.float64) -> Factorization:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, rank, generator=gen, dtype=dtype)
    B = torch.randn(rank, d, generator=gen, dtype=dtype)
    return Factorization(A, B, torch.randn(m, generator=gen, dtype=dtype) if bias else None)


def full_rank(layer: nn.Module, method: str = "nkp") -> Factorization:
    w = layer.weight.detach()
    m, d = w.shape[0], w[0].numel()
    b = None if layer.bias is None else layer.bias.detach()
    return factorize(w, min(m, d), method, "relu", b)


# ---------------------------------------------------------------- x ↦ A(Bx) + b


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_linear_computes_a_of_b_x_plus_bias(bias):
    dense = nn.Linear(12, 9, bias=bias).double()
    fac = random_factors(9, 12, 3, bias)
    module = LowRankLinear.from_dense(dense, fac)
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = (x @ fac.B.T) @ fac.A.T + (fac.bias if bias else 0)
    assert torch.allclose(module(x), expected, atol=1e-12)
    assert module.rank == 3
    assert module.down.weight.shape == (3, 12) and module.down.bias is None
    assert module.up.weight.shape == (9, 3) and (module.up.bias is not None) == bias


def test_low_rank_linear_keeps_the_dense_bias_when_factors_have_none():
    dense = nn.Linear(6, 4).double()
    fac = random_factors(4, 6, 2, bias=False)
    module = LowRankLinear.from_dense(dense, fac)
    assert torch.equal(module.up.bias, dense.bias)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(module(x), x @ (fac.A @ fac.B).T + dense.bias, atol=1e-12)


def test_low_rank_conv2d_computes_one_by_one_a_after_b_conv():
    dense = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    fac = random_factors(6, 4 * 9, 2, bias=True, seed=1)
    module = LowRankConv2d.from_dense(dense, fac)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    inner = torch.nn.functional.conv2d(x, fac.B.reshape(2, 4, 3, 3), stride=2, padding=1)
    expected = torch.einsum("or,brhw->bohw", fac.A, inner) + fac.bias[None, :, None, None]
    assert torch.allclose(module(x), expected, atol=1e-12)
    assert module.up.kernel_size == (1, 1) and module.down.bias is None


def test_factors_returns_what_was_loaded():
    dense = nn.Conv1d(3, 8, 5).double()
    fac = random_factors(8, 15, 4, bias=True, seed=2)
    got = LowRankConv1d.from_dense(dense, fac).factors()
    assert torch.equal(got.A, fac.A) and torch.equal(got.B, fac.B) and torch.equal(got.bias, fac.bias)
    assert got.rank == 4


# ---------------------------------------------------------------- full rank matches the dense layer


CONV2D_GEOMETRIES = [
    {"kernel_size": 3},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (3, 5), "stride": (2, 1), "padding": (2, 1), "dilation": (2, 3)},
    {"kernel_size": 3, "padding": 2, "dilation": 2, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "circular", "bias": False},
    {"kernel_size": 3, "stride": 3, "padding": 1, "padding_mode": "replicate"},
    {"kernel_size": 1, "stride": 2},
]


@pytest.mark.parametrize("method", ["nkp", "spectral"])
@pytest.mark.parametrize("geometry", CONV2D_GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
def test_full_rank_conv2d_matches_the_dense_conv(geometry, method):
    torch.manual_seed(0)
    dense = nn.Conv2d(5, 7, **geometry).double()
    module = from_dense(dense, full_rank(dense, method))
    assert isinstance(module, LowRankConv2d)
    x = torch.randn(2, 5, 13, 11, dtype=torch.float64)
    ref = dense(x)
    out = module(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    d = module.down
    assert (d.kernel_size, d.stride, d.padding, d.dilation, d.padding_mode) == (
        dense.kernel_size, dense.stride, dense.padding, dense.dilation, dense.padding_mode)


CONV1D_GEOMETRIES = [
    {"kernel_size": 5},
    {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2},
    {"kernel_size": 4, "padding": 3, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "circular", "bias": False},
]


@pytest.mark.parametrize("geometry", CONV1D_GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
def test_full_rank_conv1d_matches_the_dense_conv(geometry):
    torch.manual_seed(1)
    dense = nn.Conv1d(4, 6, **geometry).double()
    module = from_dense(dense, full_rank(dense))
    assert isinstance(module, LowRankConv1d)
    x = torch.randn(3, 4, 40, dtype=torch.float64)
    ref = dense(x)
    assert float((module(x) - ref).abs().max()) <= 1e-6 * float(ref.abs().max())


@pytest.mark.parametrize("shape", [(10, 7), (7, 10)])
def test_full_rank_linear_matches_the_dense_linear(shape):
    torch.manual_seed(2)
    dense = nn.Linear(shape[1], shape[0]).double()
    module = from_dense(dense, full_rank(dense))
    x = torch.randn(4, shape[1], dtype=torch.float64)
    assert float((module(x) - dense(x)).abs().max()) <= 1e-6 * float(dense(x).abs().max())


def test_full_rank_in_float32_matches_to_float_precision():
    torch.manual_seed(3)
    dense = nn.Conv2d(8, 16, 3, padding=1)
    module = from_dense(dense, full_rank(dense, "spectral"))
    assert module.down.weight.dtype == torch.float32
    x = torch.randn(2, 8, 10, 10)
    assert torch.allclose(module(x), dense(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- to_dense


@pytest.mark.parametrize(
    "dense",
    [
        nn.Linear(12, 9),
        nn.Linear(12, 9, bias=False),
        nn.Conv1d(3, 8, 5, stride=2, padding=2, padding_mode="reflect"),
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), bias=False),
    ],
    ids=["linear", "linear-no-bias", "conv1d-reflect", "conv2d-geometry"],
)
def test_to_dense_round_trip(dense):
    dense = dense.double()
    m, d = dense.weight.shape[0], dense.weight[0].numel()
    fac = random_factors(m, d, 2, dense.bias is not None, seed=4)
    module = from_dense(dense, fac)
    back = module.to_dense()
    assert type(back) is type(dense)
    assert back.weight.shape == dense.weight.shape and back.weight.dtype == torch.float64
    assert torch.allclose(back.weight.reshape(m, -1), fac.A @ fac.B, atol=1e-12)
    assert (back.bias is None) == (dense.bias is None)
    if isinstance(dense, (nn.Conv1d, nn.Conv2d)):
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            assert getattr(back, attr) == getattr(dense, attr)
    x = torch.randn(2, *((12,) if isinstance(dense, nn.Linear) else (dense.in_channels,) + (16,) * (dense.weight.ndim - 2)),
                    dtype=torch.float64)
    assert torch.allclose(back(x), module(x), atol=1e-10)
    # and back again: factorizing the dense product at its rank gives the same function
    again = from_dense(back, factorize(back.weight.detach(), 2, "spectral", "identity",
                                       None if back.bias is None else back.bias.detach()))
    assert torch.allclose(again(x), module(x), atol=1e-9)


# ---------------------------------------------------------------- weight and bias for model code that reads them

DENSE_LAYERS = [
    nn.Linear(12, 9),
    nn.Linear(12, 9, bias=False),
    nn.Conv1d(3, 8, 5, stride=2, padding=2),
    nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), bias=False),
]
DENSE_IDS = ["linear", "linear-no-bias", "conv1d", "conv2d-no-bias"]


def _input_for(dense: nn.Module) -> torch.Tensor:
    if isinstance(dense, nn.Linear):
        return torch.randn(2, dense.in_features, dtype=torch.float64)
    return torch.randn(2, dense.in_channels, *(9,) * (dense.weight.ndim - 2), dtype=torch.float64)


@pytest.mark.parametrize("dense", DENSE_LAYERS, ids=DENSE_IDS)
def test_weight_is_the_product_of_the_factors_in_the_dense_shape(dense):
    dense = dense.double()
    m, d = dense.weight.shape[0], dense.weight[0].numel()
    fac = random_factors(m, d, 2, dense.bias is not None, seed=5)
    module = from_dense(dense, fac)
    assert module.weight.shape == dense.weight.shape
    assert torch.allclose(module.weight.reshape(m, d), fac.A @ fac.B, atol=1e-12)
    assert module.bias is module.up.bias
    # what model code such as F.linear(x, layer.weight, layer.bias) computes is the layer's function
    functional = {nn.Linear: F.linear, nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}[type(dense)]
    geometry = {} if isinstance(dense, nn.Linear) else {"stride": dense.stride, "padding": dense.padding}
    x = _input_for(dense)
    assert torch.allclose(functional(x, module.weight, module.bias, **geometry), module(x), atol=1e-10)


@pytest.mark.parametrize("dense", DENSE_LAYERS, ids=DENSE_IDS)
def test_sizes_and_geometry_read_as_the_dense_layers(dense):
    m, d = dense.weight.shape[0], dense.weight[0].numel()
    module = from_dense(dense, random_factors(m, d, 2, dense.bias is not None, seed=8, dtype=torch.float32))
    names = ("in_features", "out_features") if isinstance(dense, nn.Linear) else (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    for name in names:
        assert getattr(module, name) == getattr(dense, name), name


def test_weight_follows_the_factors_and_carries_their_gradients():
    module = from_dense(nn.Linear(6, 5).double(), random_factors(5, 6, 2, True, seed=6))
    with torch.no_grad():
        module.up.weight.mul_(2)
    assert torch.allclose(module.weight, module.up.weight @ module.down.weight)
    F.linear(torch.randn(3, 6, dtype=torch.float64), module.weight, module.bias).sum().backward()
    assert module.up.weight.grad is not None and module.down.weight.grad is not None


def test_weight_is_read_only_and_not_in_the_state_dict():
    module = from_dense(nn.Conv2d(4, 6, 3), random_factors(6, 36, 2, True, seed=7, dtype=torch.float32))
    assert set(module.state_dict()) == {"down.weight", "up.weight", "up.bias"}
    assert [name for name, _ in module.named_parameters()] == ["down.weight", "up.weight", "up.bias"]
    with pytest.raises(AttributeError):
        module.weight = torch.zeros(6, 4, 3, 3)
    with pytest.raises(KeyError, match="already exists"):
        module.weight = nn.Parameter(torch.zeros(6, 4, 3, 3))


# ---------------------------------------------------------------- repr, dtype, refusals


def test_extra_repr_shows_the_rank():
    linear = LowRankLinear.from_dense(nn.Linear(12, 9), random_factors(9, 12, 3, True, dtype=torch.float32))
    assert "rank=3" in repr(linear) and "in_features=12" in repr(linear) and "out_features=9" in repr(linear)
    conv = LowRankConv2d.from_dense(nn.Conv2d(4, 6, 3, stride=2, padding=1),
                                    random_factors(6, 36, 5, True, dtype=torch.float32))
    text = conv.extra_repr()
    assert "rank=5" in text and "kernel_size=(3, 3)" in text and "stride=(2, 2)" in text and "padding=(1, 1)" in text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_factorized_module_keeps_the_layer_dtype(dtype):
    dense = nn.Linear(16, 12).to(dtype)
    module = from_dense(dense, factorize(dense.weight.detach(), 4, "nkp", "relu", dense.bias.detach()))
    assert module.down.weight.dtype == module.up.weight.dtype == module.up.bias.dtype == dtype
    assert module(torch.randn(3, 16).to(dtype)).dtype == dtype


def test_depthwise_and_grouped_convs_are_refused_with_a_reason():
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    grouped = nn.Conv2d(8, 16, 3, groups=2)
    assert "depthwise" in unsupported_reason(depthwise)
    assert "groups=2" in unsupported_reason(grouped)
    with pytest.raises(ValueError, match="depthwise"):
        from_dense(depthwise, random_factors(8, 9, 2, True, dtype=torch.float32))
    with pytest.raises(ValueError, match="grouped convolution"):
        LowRankConv2d.from_dense(grouped, random_factors(16, 36, 2, True, dtype=torch.float32))
    assert unsupported_reason(nn.Conv2d(8, 16, 3)) is None
    assert "not a Linear" in unsupported_reason(nn.Conv3d(2, 2, 3))
    with pytest.raises(ValueError, match="cannot factorize"):
        low_rank_class(nn.Conv3d(2, 2, 3))


def test_subclasses_with_their_own_forward_are_refused_with_a_reason():
    from timm.layers import Conv2dSame, StdConv2d
    from timm.layers import Linear as TimmLinear

    for layer in (Conv2dSame(4, 8, 3, stride=2), StdConv2d(4, 8, 3)):  # run-time padding, weight standardization
        assert overrides_forward(layer) and "has its own forward" in unsupported_reason(layer)
    for layer in (TimmLinear(8, 8), nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8), nn.Conv2d(4, 8, 3)):
        assert not overrides_forward(layer) and unsupported_reason(layer) is None


@pytest.mark.parametrize(
    ("A_shape", "B_shape"), [((9, 3), (3, 11)), ((8, 3), (3, 12)), ((9, 3), (2, 12))], ids=["d", "m", "rank"]
)
def test_factors_that_do_not_fit_the_layer_are_refused(A_shape, B_shape):
    dense = nn.Linear(12, 9)
    with pytest.raises(ValueError, match="do not fit a 9×12 layer"):
        from_dense(dense, Factorization(torch.randn(A_shape), torch.randn(B_shape)))


def test_dispatch_picks_the_class_by_layer_type():
    assert low_rank_class(nn.Linear(3, 3)) is LowRankLinear
    assert low_rank_class(nn.Conv1d(3, 3, 1)) is LowRankConv1d
    assert low_rank_class(nn.Conv2d(3, 3, 1)) is LowRankConv2d
