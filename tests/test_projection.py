"""The projection math: closed forms, quadrature, nkp vs spectral, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_compress import factorize
from lowrank_compress.activations import ACTIVATIONS, activation_fn, canonical_activation
from lowrank_compress.factors import Factorization
from lowrank_compress.gaussian import arccos_kernel, function_error, function_error_mc, output_energy
from lowrank_compress.projection import error_curve, factorize_all, fit_rows, kernel_projection, spectral_factors
from lowrank_compress.refine import refine

ALL_ACTIVATIONS = (*ACTIVATIONS, "leaky_relu(0.2)")
NONLINEAR_FOR_SEARCH = ("gelu", "silu", "tanh", "sigmoid", "hardswish", "leaky_relu", "elu")


def gaussian_layer(m: int, d: int, seed: int = 0, scale: float = 1.0, bias: bool = False, spread: bool = True):
    """W ~ N(0, scale²/d) with row norms spread over [0.3, 3]·scale (so that scale matters), and a bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, d, generator=gen, dtype=torch.float64) / math.sqrt(d) * scale
    if spread:
        w = w * torch.logspace(math.log10(0.3), math.log10(3.0), m, dtype=torch.float64)[:, None]
    b = 0.5 * scale * torch.randn(m, generator=gen, dtype=torch.float64) if bias else None
    return w, b


def monte_carlo(w, b, fac, activation, samples=200_000, seed=1):
    """Independent Monte-Carlo estimates of E Σ (σ(Wx+b) − σ(ABx+c))² and E Σ σ(Wx+b)², x ~ N(0, I)."""
    f = activation_fn(activation)
    gen = torch.Generator().manual_seed(seed)
    m, d = w.shape
    v = fac.A.double() @ fac.B.double()
    b = torch.zeros(m, dtype=torch.float64) if b is None else b
    c = torch.zeros(m, dtype=torch.float64) if fac.bias is None else fac.bias.double()
    err = energy = 0.0
    for _ in range(samples // 50_000):
        x = torch.randn(50_000, d, generator=gen, dtype=torch.float64)
        y = f(x @ w.T + b)
        err += float(((y - f(x @ v.T + c)) ** 2).sum())
        energy += float((y**2).sum())
    return err / samples, energy / samples


# ---------------------------------------------------------------- Gaussian expectations vs Monte Carlo


def _mc_cases():
    for activation in ALL_ACTIVATIONS:
        for with_bias in (False, True):
            for norms in ("unit", "spread"):
                yield pytest.param(
                    activation, with_bias, norms, id=f"{activation}-{'bias' if with_bias else 'no-bias'}-{norms}",
                )


@pytest.mark.parametrize(("activation", "with_bias", "norms"), list(_mc_cases()))
def test_function_error_matches_monte_carlo_within_one_percent(activation, with_bias, norms):
    """Rows ~ N(0, I/d) (norms ≈ 1), and rows with norms spread over [0.3, 3] as after folding BatchNorm."""
    w, b = gaussian_layer(8, 16, seed=3, bias=with_bias, spread=norms == "spread")
    fac = factorize(w, 3, "nkp", activation, b)
    err_mc, energy_mc = monte_carlo(w, b, fac, activation)
    err = function_error(w, b, fac, activation)
    energy = output_energy(w, b, activation)
    assert err > 0 and energy > 0
    assert err == pytest.approx(err_mc, rel=0.01)
    assert energy == pytest.approx(energy_mc, rel=0.01)
    assert function_error(w, b, fac, activation, relative=True) == pytest.approx(err / energy, rel=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_library_monte_carlo_agrees_with_the_exact_error(activation):
    w, b = gaussian_layer(6, 10, seed=4, bias=True, spread=False)
    fac = factorize(w, 2, "spectral", activation, b)
    exact = function_error(w, b, fac, activation)
    assert function_error_mc(w, b, fac, activation, samples=200_000, seed=2) == pytest.approx(exact, rel=0.01)


def test_row_weights_weight_each_row_error():
    w, b = gaussian_layer(6, 10, seed=5, bias=True)
    fac = factorize(w, 2, "spectral", "gelu", b)
    alpha = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    per_row = [function_error(w[i:i + 1], b[i:i + 1], Factorization(fac.A[i:i + 1], fac.B, fac.bias[i:i + 1]), "gelu")
               for i in range(6)]
    weighted = function_error(w, b, fac, "gelu", row_weights=alpha)
    assert weighted == pytest.approx(sum(a * e for a, e in zip(alpha.tolist(), per_row)), rel=1e-10)
    assert function_error_mc(w, b, fac, "gelu", row_weights=alpha) == pytest.approx(weighted, rel=0.01)


def test_arc_cosine_kernel_values_and_monotonicity():
    rho = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    assert arccos_kernel(rho).tolist() == pytest.approx([0.0, 1 / (2 * math.pi), 0.5], abs=1e-15)
    grid = torch.linspace(-1, 1, 201, dtype=torch.float64)
    assert bool((arccos_kernel(grid).diff() > 0).all())
    # E[relu(u) relu(ρu + √(1−ρ²)v)] by Monte Carlo at ρ = 0.6
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 400_000, generator=gen, dtype=torch.float64)
    mc = float((torch.relu(u) * torch.relu(0.6 * u + 0.8 * v)).mean())
    assert float(arccos_kernel(torch.tensor(0.6, dtype=torch.float64))) == pytest.approx(mc, rel=0.01)


def test_relu_output_energy_is_half_the_squared_row_norms():
    w, _ = gaussian_layer(7, 9, seed=6)
    assert output_energy(w, None, "relu") == pytest.approx(float((w**2).sum()) / 2, rel=1e-12)
    assert output_energy(w, None, "identity") == pytest.approx(float((w**2).sum()), rel=1e-12)


# ---------------------------------------------------------------- the nkp construction


def test_relu_nkp_keeps_svd_subspace_and_rescales_rows_to_two_kappa():
    w, _ = gaussian_layer(20, 30, seed=7)
    rank = 4
    nkp, spec = factorize(w, rank, "nkp", "relu"), factorize(w, rank, "spectral", "relu")
    _, _, vt = torch.linalg.svd(w)
    projection = w @ vt[:rank].T @ vt[:rank]
    assert torch.allclose(spec.product(), projection, atol=1e-10)
    norms = w.norm(dim=1)
    rho = projection.norm(dim=1) / norms
    expected = projection * (2 * arccos_kernel(rho) / rho)[:, None]
    assert torch.allclose(nkp.product(), expected, atol=1e-10)
    assert nkp.bias is None


def test_nkp_rows_are_about_one_over_pi_rho_longer_at_small_rho():
    w, _ = gaussian_layer(64, 256, seed=8, spread=False)
    nkp, spec = factorize(w, 1, "nkp", "relu"), factorize(w, 1, "spectral", "relu")
    ratio = nkp.product().norm(dim=1) / spec.product().norm(dim=1)
    rho = spec.product().norm(dim=1) / w.norm(dim=1)
    assert bool((ratio >= 1.0).all())  # 2κ(ρ) ≥ ρ: never shorter than the SVD row
    assert torch.allclose(ratio, 2 * arccos_kernel(rho) / rho, rtol=1e-9)
    small = rho < 0.1
    assert int(small.sum()) >= 10
    scaled = ratio[small] * math.pi * rho[small]  # → 1 as ρ → 0 (2κ(ρ)/ρ = 1/(πρ) + 1/2 + O(ρ))
    assert float(scaled.min()) >= 1.0 and float(scaled.max()) <= 1.2


def test_identity_nkp_reduces_to_spectral():
    w, b = gaussian_layer(10, 14, seed=9, bias=True)
    nkp, spec = factorize(w, 3, "nkp", "identity", b), factorize(w, 3, "spectral", "identity", b)
    assert torch.equal(nkp.A, spec.A) and torch.equal(nkp.B, spec.B) and torch.equal(nkp.bias, spec.bias)


def test_spectral_factors_are_the_balanced_svd_split():
    w, _ = gaussian_layer(12, 18, seed=10, spread=False)
    fac = spectral_factors(w, 5)
    _, s, _ = torch.linalg.svd(w)
    # A = U√S, B = √S Vᵀ: AᵀA = B Bᵀ = diag(S)
    assert torch.allclose(fac.A.T @ fac.A, torch.diag(s[:5]), atol=1e-10)
    assert torch.allclose(fac.B @ fac.B.T, torch.diag(s[:5]), atol=1e-10)
    # Eckart–Young: the Frobenius error is the tail of the spectrum.
    assert float(((w - fac.product()) ** 2).sum()) == pytest.approx(float((s[5:] ** 2).sum()), rel=1e-9)


def test_public_shortcuts_equal_factorize():
    w, b = gaussian_layer(9, 11, seed=11, bias=True)
    kp = kernel_projection(w, 3, "silu", b)
    ref = factorize(w, 3, "nkp", "silu", b)
    assert torch.equal(kp.A, ref.A) and torch.equal(kp.B, ref.B) and torch.equal(kp.bias, ref.bias)
    sf = spectral_factors(w, 3, b)
    ref = factorize(w, 3, "spectral", "relu", b)
    assert torch.equal(sf.A, ref.A) and torch.equal(sf.B, ref.B) and torch.equal(sf.bias, b)


def test_factorize_all_shares_the_subspace_between_methods():
    w, b = gaussian_layer(16, 24, seed=12, bias=True)
    both = factorize_all(w, 5, "gelu", b)
    assert set(both) == {"nkp", "spectral"}
    assert torch.equal(both["nkp"].B, both["spectral"].B)
    for method, fac in both.items():
        single = factorize(w, 5, method, "gelu", b)
        assert torch.equal(single.A, fac.A) and torch.equal(single.B, fac.B)


def test_conv_weight_is_flattened_to_m_by_c_k_k():
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(8, 3, 3, 5, generator=gen)
    fac = factorize(w, 4, "nkp", "relu")
    assert fac.A.shape == (8, 4) and fac.B.shape == (4, 45) and fac.rank == 4
    assert function_error(w, None, fac, "relu") == pytest.approx(function_error(w.reshape(8, -1), None, fac, "relu"))


def test_error_curve_equals_function_error_of_each_factorization():
    w, b = gaussian_layer(20, 32, seed=14, bias=True)
    ranks = [1, 3, 8, 20]
    for method in ("nkp", "spectral"):
        curve = error_curve(w, ranks, method, "silu", b)
        direct = [function_error(w, b, factorize(w, r, method, "silu", b), "silu", relative=True) for r in ranks]
        assert curve == pytest.approx(direct, rel=1e-6, abs=1e-12)


def test_design_reference_gap_at_d1024_m4096():
    """docs/design.md §2: W ~ N(0, 1/d), d = 1024, m = 4096; relative error at r = 1, 16, 256."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 1024, generator=gen, dtype=torch.float64) / math.sqrt(1024)
    spectral = error_curve(w, [1, 16, 256], "spectral", "relu")
    nkp = error_curve(w, [1, 16, 256], "nkp", "relu")
    assert spectral == pytest.approx([0.976, 0.883, 0.492], rel=0.02)
    assert nkp == pytest.approx([0.886, 0.828, 0.488], rel=0.02)


# ---------------------------------------------------------------- nkp never loses to spectral


def _assert_nkp_not_worse(m, d, rank, activation, scale, with_bias, seed):
    w, b = gaussian_layer(m, d, seed=seed, scale=scale, bias=with_bias)
    both = factorize_all(w, rank, activation, b)
    energy = output_energy(w, b, activation)
    e_nkp = function_error(w, b, both["nkp"], activation)
    e_spec = function_error(w, b, both["spectral"], activation)
    assert math.isfinite(e_nkp) and math.isfinite(e_spec)
    assert e_nkp <= e_spec * (1 + 1e-9) + 1e-12 * energy, (m, d, rank, activation, scale, with_bias, e_nkp, e_spec)


@st.composite
def layer_cases(draw, activations):
    m = draw(st.integers(1, 300))
    d = draw(st.integers(1, 300))
    rank = draw(st.integers(1, min(m, d)))
    activation = draw(st.sampled_from(activations))
    scale = draw(st.sampled_from([0.05, 0.3, 1.0, 3.0, 20.0]))
    return m, d, rank, activation, scale, draw(st.booleans()), draw(st.integers(0, 2**16))


def _search(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@_search(80)
@given(layer_cases(("relu",)))
def test_nkp_error_never_exceeds_spectral_relu(case):
    _assert_nkp_not_worse(*case)


@_search(40)
@given(layer_cases(NONLINEAR_FOR_SEARCH))
def test_nkp_error_never_exceeds_spectral_other_activations(case):
    _assert_nkp_not_worse(*case)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_nkp_not_worse_than_spectral_at_every_rank(activation):
    w, b = gaussian_layer(12, 30, seed=15, scale=2.0, bias=True)
    for rank in range(1, 13):
        both = factorize_all(w, rank, activation, b)
        e_nkp = function_error(w, b, both["nkp"], activation)
        e_spec = function_error(w, b, both["spectral"], activation)
        assert e_nkp <= e_spec * (1 + 1e-9) + 1e-15, (rank, e_nkp, e_spec)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu"])
@pytest.mark.parametrize("scale", [0.05, 10.0])
def test_per_row_fit_is_evaluated_at_the_real_row_scale(activation, scale):
    """The row fit must not assume σ is homogeneous: rows of norm ≪ 1 or ≫ 1 still gain or tie."""
    rho = 0.4
    n = torch.full((5,), scale, dtype=torch.float64)
    a = torch.linspace(-1, 1, 5, dtype=torch.float64) * scale
    t, c = fit_rows(activation, a, n, torch.full((5,), rho, dtype=torch.float64), fit_bias=True)
    # Rows w_i = n_i e₁; candidates along ρ e₁ + √(1−ρ²) e₂ with length t_i (fit) or ρ n_i (spectral).
    w = torch.stack([n, torch.zeros_like(n)], 1)
    direction = torch.tensor([rho, math.sqrt(1 - rho**2)], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    e_fit = function_error(w, a, Factorization(t[:, None] * direction, eye, c), activation)
    e_start = function_error(w, a, Factorization((rho * n)[:, None] * direction, eye, a), activation)
    assert e_fit <= e_start * (1 + 1e-9)


# ---------------------------------------------------------------- full rank, dtypes, degenerate weights


@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (9, 9)])
@pytest.mark.parametrize("method", ["nkp", "spectral"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_full_rank_reproduces_the_layer(shape, method, activation):
    w, b = gaussian_layer(*shape, seed=16, bias=True)
    fac = factorize(w, min(shape), method, activation, b)
    assert float((fac.product() - w).abs().max()) <= 1e-6 * float(w.abs().max())
    assert float((fac.bias - b).abs().max()) <= 1e-6


@pytest.mark.parametrize(
    ("activation", "with_bias", "tolerance"),
    [
        ("relu", False, 1e-10), ("identity", True, 1e-10), ("gelu", False, 1e-10), ("tanh", True, 1e-10),
        ("sigmoid", True, 1e-10),
        # ReLU with a bias: exact moments minus a 1-D quadrature of the kinked cross term.
        ("relu", True, 1e-4),
    ],
)
def test_function_error_of_the_layer_itself_is_zero(activation, with_bias, tolerance):
    w, b = gaussian_layer(7, 12, seed=16, bias=with_bias)
    same = Factorization(w.clone(), torch.eye(12, dtype=torch.float64), None if b is None else b.clone())
    assert function_error(w, b, same, activation, relative=True) < tolerance


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["nkp", "spectral"])
def test_results_come_back_in_the_weight_dtype(dtype, method):
    w64, b64 = gaussian_layer(16, 24, seed=17, bias=True)
    w, b = w64.to(dtype), b64.to(dtype)
    fac = factorize(w, 4, method, "gelu", b)
    assert fac.A.dtype == fac.B.dtype == fac.bias.dtype == dtype
    # The dtype round trip only rounds: same as factorizing the rounded weights in float64.
    ref = factorize(w.double(), 4, method, "gelu", b.double())
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    assert torch.allclose(fac.product().double(), ref.product(), atol=tol * float(ref.product().abs().max()))


@pytest.mark.parametrize("method", ["nkp", "spectral"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_zero_and_duplicate_rows_give_finite_factors(method, activation):
    w, b = gaussian_layer(10, 16, seed=18, bias=True)
    w[2] = 0.0
    w[7] = 0.0
    w[5] = w[4]
    b[5] = b[4]
    fac = factorize(w, 3, method, activation, b)
    for t in (fac.A, fac.B, fac.bias):
        assert bool(torch.isfinite(t).all())
    product = fac.product()
    assert float(product[2].abs().max()) == 0.0 and float(product[7].abs().max()) == 0.0
    assert torch.allclose(product[5], product[4], atol=1e-12)
    assert math.isfinite(function_error(w, b, fac, activation))


@pytest.mark.parametrize("method", ["nkp", "spectral"])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_all_zero_and_rank_deficient_weights_give_finite_factors(method, shape):
    zero = torch.zeros(shape, dtype=torch.float64)
    fac = factorize(zero, 3, method, "relu")
    assert bool(torch.isfinite(fac.A).all() and torch.isfinite(fac.B).all())
    assert float(fac.product().abs().max()) == 0.0
    gen = torch.Generator().manual_seed(19)
    low = torch.randn(shape[0], 2, generator=gen, dtype=torch.float64) @ torch.randn(2, shape[1], generator=gen, dtype=torch.float64)
    fac = factorize(low, 4, method, "relu")
    assert bool(torch.isfinite(fac.A).all() and torch.isfinite(fac.B).all())
    assert torch.allclose(fac.product(), low, atol=1e-9)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("weight", "rank", "kwargs", "message"),
    [
        (torch.randn(6, 8), 0, {}, r"rank 0 is outside \[1, 6\]"),
        (torch.randn(6, 8), -2, {}, r"rank -2 is outside"),
        (torch.randn(6, 8), 7, {}, r"rank 7 is outside \[1, 6\]"),
        (torch.randn(6, 8), 2.5, {}, r"rank must be an integer"),
        (torch.randn(6, 8), True, {}, r"rank must be an integer"),
        (torch.randn(8), 1, {}, r"weight must be at least 2-D.*\(8,\)"),
        (torch.tensor(3.0), 1, {}, r"weight must be at least 2-D"),
        ([[1.0, 2.0]], 1, {}, r"weight must be a tensor"),
        (torch.zeros(0, 4), 1, {}, r"empty dimension"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, {}, r"weight contains NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, {}, r"weight contains NaN or Inf"),
        (torch.randn(6, 8), 2, {"bias": torch.tensor([0.0, float("nan"), 0, 0, 0, 0])}, r"bias contains NaN or Inf"),
        (torch.randn(6, 8), 2, {"bias": torch.zeros(5)}, r"bias must have shape \(6,\)"),
        (torch.randn(6, 8), 2, {"activation": "swishy"}, r"unknown activation 'swishy'"),
        (torch.randn(6, 8), 2, {"method": "svd"}, r"unknown method 'svd'"),
        (torch.randn(6, 8), 2, {"row_weights": -torch.ones(6)}, r"row_weights must be finite and non-negative"),
    ],
    ids=[
        "rank-0", "rank-negative", "rank-too-big", "rank-float", "rank-bool", "1-D", "0-D", "not-a-tensor",
        "empty", "nan", "inf", "nan-bias", "bias-shape", "unknown-activation", "unknown-method", "negative-alpha",
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(weight, rank, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factorize(weight, rank, **kwargs)


def test_activation_names_are_canonicalized():
    assert canonical_activation("Swish") == "silu"
    assert canonical_activation("leaky_relu(0.01)") == "leaky_relu"
    assert canonical_activation("leaky-relu(0.2)") == "leaky_relu(0.2)"
    assert canonical_activation("none") == "identity"
    with pytest.raises(ValueError, match="unknown activation"):
        canonical_activation("softplus")
    with pytest.raises(ValueError, match="activation must be a string"):
        canonical_activation(None)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_activation_functions_match_torch(activation):
    z = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    reference = {
        "identity": z, "relu": torch.relu(z), "leaky_relu": torch.nn.functional.leaky_relu(z, 0.01),
        "gelu": torch.nn.functional.gelu(z), "silu": torch.nn.functional.silu(z),
        "hardswish": torch.nn.functional.hardswish(z), "sigmoid": torch.sigmoid(z), "tanh": torch.tanh(z),
        "relu6": torch.nn.functional.relu6(z), "hardsigmoid": torch.nn.functional.hardsigmoid(z),
        "mish": torch.nn.functional.mish(z), "elu": torch.nn.functional.elu(z),
        "leaky_relu(0.2)": torch.nn.functional.leaky_relu(z, 0.2),
    }[activation]
    assert torch.allclose(activation_fn(activation)(z), reference, atol=1e-15)


# ---------------------------------------------------------------- refinement


def _held_out_error(w, b, fac, activation, x):
    f = activation_fn(activation)
    c = torch.zeros(w.shape[0], dtype=torch.float64) if fac.bias is None else fac.bias.double()
    y = f(x @ w.T + (0 if b is None else b))
    return float(((f(x @ (fac.A.double() @ fac.B.double()).T + c) - y) ** 2).sum(1).mean())


@pytest.mark.parametrize(
    ("activation", "with_bias", "lr"),
    [("relu", False, 5e-3), ("gelu", True, 5e-3), ("tanh", True, 5e-3), ("relu", True, 50.0), ("sigmoid", False, 1e3)],
    ids=["relu", "gelu-bias", "tanh-bias", "relu-huge-lr", "sigmoid-absurd-lr"],
)
def test_refine_never_returns_a_worse_held_out_error(activation, with_bias, lr):
    w, b = gaussian_layer(24, 40, seed=20, bias=with_bias)
    start = factorize(w, 4, "spectral", activation, b)
    gen = torch.Generator().manual_seed(21)
    xh = torch.randn(512, 40, generator=gen, dtype=torch.float64)
    held_out = (xh, activation_fn(activation)(xh @ w.T + (0 if b is None else b)))
    fac, before, after = refine(w, b, start, activation, held_out=held_out, steps=96, lr=lr, samples=512)
    assert after <= before
    assert fac.A.shape == start.A.shape and fac.B.shape == start.B.shape
    assert fac.A.dtype == start.A.dtype
    measured_before = _held_out_error(w, b, start, activation, xh)
    measured_after = _held_out_error(w, b, fac, activation, xh)
    assert measured_before == pytest.approx(before, rel=1e-4)
    assert measured_after <= measured_before * (1 + 1e-5)
    assert measured_after == pytest.approx(after, rel=1e-4)


def test_refine_improves_a_low_rank_relu_start():
    w, _ = gaussian_layer(32, 64, seed=22, spread=False)
    start = factorize(w, 2, "spectral", "relu")
    _, before, after = refine(w, None, start, "relu", steps=256, samples=1000)
    assert after < 0.98 * before
