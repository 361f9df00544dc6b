"""Calibration-aware projection (DESIGN.md §3): keep a pretrained model's function at low rank.

For each layer, in execution order:
1. its inputs x̃ come from the model *as compressed so far* while its targets σ(z) come from the
   original model at the same positions (asymmetric reconstruction, Zhang et al. 2015);
2. streaming float64 statistics of the pre-activation responses z̃ = W x̃ + b (mean μ, covariance
   Σ, m×m — never the d×d input covariance) and a bounded reservoir of (input patch, target) pairs;
3. candidates — spectral, data-free nkp, and the calibrated response-space projection with a
   bounded per-row Gaussian (scale, bias) fit; the spectral start and the best other start are
   then refined by guarded Adam on the post-activation error;
4. the candidate with the lowest held-out post-activation error is kept (never worse than SVD on
   the held-out samples, since spectral is always a candidate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .activations import activation_fn, canonical_activation
from .compress import (
    CompressConfig,
    LayerReport,
    ProgressFn,
    _call,
    _factor_params,
    plan_ranks,
    replace_module,
    unfold_batchnorm,
)
from .errors import UsageError
from .graph import LayerSite
from .layers import from_dense
from .blocks import Block, find_blocks, first_tensor, reconstruct_block
from .modelrun import batch_size, forward_with_hooks, slice_batch
from .sensitivity import channel_sensitivities, detect_output_metric, probe_gradients
from .projection import (
    Factorization,
    gaussian_row_error,
    factorize_all,
    fit_rows,
    function_error,
    refine,
    second_moment,
)

RESERVOIR = 2048  # (input patch, target) pairs kept per layer: 3/4 for refinement, 1/4 held out
_TENSOR_SUFFIXES = (".npy", ".pt", ".pth", ".bin", ".safetensors")


# ---------------------------------------------------------------- inputs


def _tensor_file(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UsageError(f"cannot read calibration file {path} ({exc})") from None
        return torch.from_numpy(np.ascontiguousarray(array))
    if path.suffix == ".safetensors":
        from .checkpoint import read_safetensors_metadata

        read_safetensors_metadata(path)
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        from .checkpoint import _read_torch

        obj = _read_torch(path, trust_pickle=False)
        tensors = obj if isinstance(obj, dict) else {"x": obj}
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    for key in ("x", "inputs", "input", "images", "x_test", "x_train", "data"):
        if key in tensors:
            return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise UsageError(f"calibration file {path} holds {len(tensors)} float tensors; name the inputs 'x'")


def calibration_batches(
    spec: str,
    input_shape: tuple[int, ...],
    data_config: dict[str, Any],
    samples: int,
    batch_size: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Calibration inputs as a list of batches of shape (b, *input_shape[1:]).

    ``spec``: ``gaussian``, an image folder (class subfolders or flat, eval-transformed to the input
    shape), or a tensor file (.npy, .pt via weights_only, .safetensors) whose first axis indexes
    samples.
    """
    if samples < 1 or batch_size < 1:
        raise UsageError("--calib-samples and --calib-batch-size must be ≥ 1")
    per_sample = tuple(input_shape[1:])
    if spec == "gaussian":
        gen = torch.Generator().manual_seed(seed + 1)
        data = torch.randn((samples, *per_sample), generator=gen)
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"calibration data {path} does not exist (give a folder, a tensor file or 'gaussian')")
        if path.is_dir():
            from .data import image_tensors

            data = image_tensors(path, input_shape, data_config, samples)
        elif path.suffix in _TENSOR_SUFFIXES:
            data = _tensor_file(path)
            if tuple(data.shape[1:]) != per_sample:
                raise UsageError(
                    f"calibration tensor in {path} has samples of shape {tuple(data.shape[1:])}; "
                    f"the model takes {per_sample} (input shape {tuple(input_shape)})"
                )
            data = data[:samples].float()
        else:
            raise UsageError(f"calibration data {path}: expected a folder, {', '.join(_TENSOR_SUFFIXES)} or 'gaussian'")
    if data.shape[0] == 0:
        raise UsageError(f"calibration data {spec} is empty")
    if not torch.isfinite(data).all():
        raise UsageError(f"calibration data {spec} contains NaN or Inf")
    return [b.to(dtype) for b in data.split(batch_size)]


# ---------------------------------------------------------------- per-layer views


def _patches(site: LayerSite, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows matching its flattened weight: (positions, d)."""
    module = site.module
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        # 'same' padding and non-zero padding modes: pad explicitly, exactly as the conv does.
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * (x.dim() - 2)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-1)
        kernel, stride = (module.kernel_size[0], 1), (module.stride[0], 1)
        dilation, padding = (module.dilation[0], 1), (padding[0], 0)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, d, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _responses(site: LayerSite, z: torch.Tensor) -> torch.Tensor:
    """Layer output (N, m, ...) or (..., m) as rows (positions, m), BatchNorm before folded in."""
    if isinstance(site.module, nn.Linear):
        rows = z.reshape(-1, z.shape[-1])
    else:
        rows = z.movedim(1, -1).reshape(-1, z.shape[1])
    if site.bn_before is not None:
        rows = rows * site.bn_before.scale.to(rows.dtype) + site.bn_before.shift.to(rows.dtype)
    return rows


@dataclass
class ResponseStats:
    """Streaming float64 mean (m,) and covariance (m, m) of response rows (Chan's merge)."""

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def empty(cls, m: int) -> ResponseStats:
        return cls(0, torch.zeros(m, dtype=torch.float64), torch.zeros(m, m, dtype=torch.float64))

    def update(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        batch_mean = rows.mean(0, dtype=torch.float64)
        centered = rows - batch_mean.to(rows.dtype)
        batch_scatter = (centered.T @ centered).to(torch.float64)
        total = self.count + n
        delta = batch_mean - self.mean
        self.scatter += batch_scatter + torch.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    @property
    def covariance(self) -> torch.Tensor:
        return self.scatter / max(self.count - 1, 1)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _ancestors(name: str) -> list[str]:
    """Enclosing module names, outermost first, without the root and the layer itself."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class _LayerInputs:
    """Runs the model up to one layer per batch, re-entering at the innermost cached block.

    Compressing layers inside a block never changes that block's inputs, so once a pass has
    recorded the (args, kwargs) a block received, the next layers inside it are reached by calling
    the block alone instead of the whole model. Only blocks called exactly once per forward are
    cached; a cache is dropped as soon as the walk leaves its block.
    """

    def __init__(self, model: nn.Module, batches: list[Any], once: set[str]):
        self.model, self.batches, self.once = model, batches, once
        self.cache: dict[str, list[tuple[tuple, dict]]] = {}

    def run(self, site_name: str, module: nn.Module, capture) -> None:
        """Call ``capture(batch_index, layer_input, layer_output)`` for every batch."""
        ancestors = [a for a in _ancestors(site_name) if a in self.once]
        self.cache = {k: v for k, v in self.cache.items() if k in ancestors}
        start = next((a for a in reversed(ancestors) if a in self.cache), None)
        deeper = ancestors[ancestors.index(start) + 1:] if start is not None else ancestors
        recorded: dict[str, list[tuple[tuple, dict]]] = {a: [] for a in deeper}
        for b, batch in enumerate(self.batches):
            handles = []
            for name in deeper:
                def pre(_m, args, kwargs, name=name):
                    recorded[name].append((_clone(args), _clone(kwargs)))

                handles.append(self.model.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True))

            def stop(_m, inputs, output, b=b):
                capture(b, inputs[0], output)
                raise _Stop

            handles.append(module.register_forward_hook(stop))
            try:
                with torch.no_grad():
                    if start is None:
                        _call(self.model, batch)
                    else:
                        args, kwargs = self.cache[start][b]
                        self.model.get_submodule(start)(*_clone(args), **_clone(kwargs))
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
        self.cache.update({k: v for k, v in recorded.items() if len(v) == len(self.batches)})


def _called_once(model: nn.Module, sites: list[LayerSite], batch: Any) -> set[str]:
    """Enclosing blocks of the sites that run exactly once in a forward pass."""
    return modules_called_once(model, {a for s in sites for a in _ancestors(s.name)}, batch)


def modules_called_once(model: nn.Module, names: set[str], batch: Any) -> set[str]:
    """The modules among ``names`` that run exactly once in a forward pass."""
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        def pre(_m, _args, name=name):
            counts[name] += 1

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n for n, c in counts.items() if c == 1}


# ---------------------------------------------------------------- original-model pass


@dataclass
class _Targets:
    positions: list[torch.Tensor]  # per batch: indices into that batch's response rows
    post: torch.Tensor  # (P, m) targets σ(z) at the reservoir positions
    stats: ResponseStats  # of the original responses (for rank allocation)


def _original_pass(
    original: nn.Module, sites: list[LayerSite], batches: list[Any], seed: int
) -> dict[str, _Targets]:
    """One pass over the original model: reservoir positions, targets and response statistics."""
    gen = torch.Generator().manual_seed(seed + 7)
    per_batch = math.ceil(RESERVOIR / max(len(batches), 1))
    modules = {s.name: original.get_submodule(s.name) for s in sites}
    acc = {s.name: ([], [], ResponseStats.empty(s.shape[0])) for s in sites}
    fns = {s.name: activation_fn(s.activation) for s in sites}

    called: set[str] = set()

    def hook(site: LayerSite):
        def record(_m, _inputs, output):
            # A module called several times per forward (shared) is calibrated on its first call,
            # the one the compressed pass stops at.
            if site.name in called:
                return
            called.add(site.name)
            rows = _responses(site, output.detach().to(torch.float32))
            positions, post, stats = acc[site.name]
            stats.update(rows)
            idx = torch.randperm(rows.shape[0], generator=gen)[:per_batch].sort().values
            positions.append(idx)
            post.append(fns[site.name](rows[idx]))

        return record

    handles = [modules[s.name].register_forward_hook(hook(s)) for s in sites]
    try:
        with torch.no_grad():
            for batch in batches:
                called.clear()
                _call(original, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: _Targets(p, torch.cat(t), st) for name, (p, t, st) in acc.items()}


# ---------------------------------------------------------------- candidates


def _post_error(site: LayerSite, factors: Factorization, x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor | None) -> float:
    """Mean α-weighted squared post-activation error on (x, y) rows, relative to Σ α y²."""
    f = activation_fn(site.activation)
    with torch.no_grad():
        A, B = factors.A.to(torch.float32), factors.B.to(torch.float32)
        z = (x @ B.T) @ A.T
        if factors.bias is not None:
            z = z + factors.bias.to(torch.float32)
        diff = (f(z) - y) ** 2
        energy = y**2
        if alpha is not None:
            diff, energy = diff * alpha, energy * alpha
        total = float(energy.sum())
    return float(diff.sum()) / total if total > 0 else float(diff.sum())


def response_projection(
    w: torch.Tensor,
    b: torch.Tensor | None,
    stats: ResponseStats,
    rank: int,
    activation: str,
    alpha: torch.Tensor | None = None,
) -> Factorization:
    """Calibrated nkp: response-space projection plus the per-row Gaussian (scale, bias) fit.

    With S̃ = diag(√α) Σ diag(√α) = U Λ Uᵀ and M = diag(α^-½) U_r U_rᵀ diag(α^½), the linear part is
    z' = M(z − μ) + μ; each row is then rescaled and shifted by the bounded fit of
    :func:`projection.fit_rows` for z_i ~ N(μ_i, Σ_ii) and its captured correlation ρ_i.
    A = diag(D) diag(α^-½) U_r, B = U_rᵀ diag(α^½) W.
    """
    m = w.shape[0]
    cov, mu = stats.covariance, stats.mean
    a = torch.ones(m, dtype=torch.float64) if alpha is None else alpha
    a = a.clamp_min(float(a.max()) * 1e-8 + 1e-30)
    root = a.sqrt()
    evals, evecs = torch.linalg.eigh(root[:, None] * cov * root[None, :])
    order = torch.argsort(evals, descending=True)[:rank]
    lam, u = evals[order].clamp_min(0.0), evecs[:, order]
    n = torch.diagonal(cov).clamp_min(0.0).sqrt()
    captured = ((u * u * lam).sum(1) / a).clamp_min(0.0).sqrt()  # std of the projected row
    rho = torch.where(n > 0, captured / n.clamp_min(1e-300), torch.zeros_like(n)).clamp(0.0, 1.0)
    act = canonical_activation(activation)
    if act == "identity":
        t, c = captured, mu.clone()
    else:
        t, c = fit_rows(act, mu, n, rho, fit_bias=True)
    scale = torch.where(captured > 0, t / captured.clamp_min(1e-300), torch.zeros_like(t))
    left = root.reciprocal()[:, None] * u  # diag(α^-½) U_r
    B = u.T @ (root[:, None] * w)
    base = torch.zeros(m, dtype=torch.float64) if b is None else b
    linear_bias = left @ (u.T @ (root * (base - mu)))  # M (b − μ)
    A = scale[:, None] * left
    return Factorization(A, B, scale * linear_bias + c)


def _candidates(
    site: LayerSite,
    rank: int,
    stats: ResponseStats,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_held: torch.Tensor,
    y_held: torch.Tensor,
    refine_steps: int,
    seed: int,
    alpha: torch.Tensor | None = None,
) -> tuple[dict[str, Factorization], dict[str, float], dict[str, float]]:
    """Every candidate (in BN-folded space) with its relative held-out post-activation error, and
    the Gaussian (data-free) relative function errors of spectral and nkp. ``alpha``: per-row
    weights of the errors (default: the site's own, from an affine after its activation)."""
    w, b = site.effective_weight()
    alpha = site.row_weights() if alpha is None else alpha
    act = canonical_activation(site.activation)
    base = factorize_all(w, rank, act, b, alpha)
    gaussian = {k: function_error(w, b, f, act, alpha, relative=True) for k, f in base.items()}
    cands: dict[str, Factorization] = {
        "spectral": base["spectral"],
        "nkp": base["nkp"],
        "nkp_calibrated": response_projection(w, b, stats, rank, act, alpha),
    }
    # A factorization without a bias cannot move the mean; give every candidate an explicit one.
    zeros = torch.zeros(w.shape[0], dtype=torch.float64)
    cands = {
        k: Factorization(f.A.to(torch.float64), f.B.to(torch.float64),
                         f.bias.to(torch.float64) if f.bias is not None else (zeros if b is None else b))
        for k, f in cands.items()
    }
    a32 = None if alpha is None else alpha.to(torch.float32)
    errors = {k: _post_error(site, f, x_held, y_held, a32) for k, f in cands.items()}
    if refine_steps > 0:
        # Refine the SVD anchor and the best other start: refined candidates tend to converge to
        # similar optima, so refining every start costs time without changing the pick.
        others = [k for k in cands if k != "spectral" and math.isfinite(errors[k])]
        starts = ["spectral"] + ([min(others, key=errors.__getitem__)] if others else [])
        for k in starts:
            if not math.isfinite(errors[k]):
                continue
            refined, _, _ = refine(
                w, None, cands[k], act, inputs=x_train, targets=y_train, held_out=(x_held, y_held),
                row_weights=alpha, steps=refine_steps, batch_size=256, eval_every=20, seed=seed, patience=4,
            )
            name = f"{k}+refine"
            cands[name] = refined
            errors[name] = _post_error(site, refined, x_held, y_held, a32)
    return cands, errors, gaussian


def choose_candidate(errors: dict[str, float], method: str) -> str:
    """The lowest held-out error; spectral wins ties; ``--method spectral`` only picks spectral ones."""
    allowed = {k: v for k, v in errors.items() if math.isfinite(v) and (method != "spectral" or k.startswith("spectral"))}
    return min(allowed, key=lambda k: (allowed[k], not k.startswith("spectral")))


# ---------------------------------------------------------------- rank curves from statistics


def stats_error_curve(site: LayerSite, stats: ResponseStats, ranks: list[int],
                      alpha: torch.Tensor | None = None, absolute: bool = False) -> list[float]:
    """Relative post-activation error vs rank under z ~ N(μ, Σ), from the response statistics.

    Each row keeps its projection onto the top-r response directions (no per-row refit), which
    makes a curve cost one eigendecomposition plus closed-form or 1-D Gaussian moments per rank.
    ``alpha`` overrides the per-row weights; ``absolute=True`` returns Σ α_i E[(σ(z̃_i) − σ(z_i))²]
    instead of its ratio to Σ α_i E[σ(z_i)²] (with output sensitivities as α: the predicted
    output-metric cost).
    """
    cov, mu = stats.covariance, stats.mean
    m = cov.shape[0]
    alpha = site.row_weights() if alpha is None else alpha
    a = torch.ones(m, dtype=torch.float64) if alpha is None else alpha
    a = a.clamp_min(float(a.max()) * 1e-8 + 1e-30)
    evals, evecs = torch.linalg.eigh(a.sqrt()[:, None] * cov * a.sqrt()[None, :])
    order = torch.argsort(evals, descending=True)
    lam, u = evals[order].clamp_min(0.0), evecs[:, order]
    cum = torch.cumsum(u * u * lam, dim=1) / a[:, None]
    n = torch.diagonal(cov).clamp_min(0.0).sqrt()
    act = canonical_activation(site.activation)
    energy = second_moment(act, mu, n)
    weight = torch.ones(m, dtype=torch.float64) if alpha is None else alpha
    total = float((weight * energy).sum())
    out = []
    for r in ranks:
        captured = cum[:, min(r, m) - 1].clamp_min(0.0).sqrt()
        rho = torch.where(n > 0, captured / n.clamp_min(1e-300), torch.zeros_like(n)).clamp(0.0, 1.0)
        # No per-row refit here: it only lowers each layer's error, and refitting at every
        # candidate rank of every layer would dominate the run time.
        t, c = captured, mu
        err = gaussian_row_error(act, mu, n, c, t, rho)
        value = float((weight * err).sum())
        out.append(value if absolute else (value / total if total > 0 else 0.0))
    return out


# ---------------------------------------------------------------- the calibrated job


def site_sensitivities(original: nn.Module, sites: list[LayerSite], batches: list[Any], metric: str,
                       seed: int) -> dict[str, torch.Tensor]:
    """Per site, output sensitivity of each output channel's post-activation value (float64, (m,)).

    Gradients are taken at the layer's own output z and mapped to the post-activation value
    σ(scale·z + shift) of the BN-folded response (see :mod:`lowrank_compress.sensitivity`).
    """
    targets = {s.name: original.get_submodule(s.name) for s in sites}
    linear = {s.name for s in sites if isinstance(s.module, nn.Linear)}
    slopes = {s.name: _slope(s) for s in sites}
    return channel_sensitivities(original, targets, batches, metric, lambda n: n in linear, seed=seed, slopes=slopes)


def _slope(site: LayerSite) -> Callable[[torch.Tensor], torch.Tensor]:
    """z ↦ ∂σ(scale·z + shift)/∂z elementwise, channels on the layer's channel axis."""
    fn = activation_fn(site.activation)
    linear = isinstance(site.module, nn.Linear)

    def slope(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().to(torch.float32)
        if site.bn_before is not None:
            shape = [1] * z.dim()
            shape[-1 if linear else 1] = -1
            scale = site.bn_before.scale.to(torch.float32).reshape(shape)
            shift = site.bn_before.shift.to(torch.float32).reshape(shape)
        else:
            scale, shift = torch.ones(()), torch.zeros(())
        with torch.enable_grad():
            x = z.requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(x * scale + shift).sum(), x)
        return grad

    return slope


def output_cost_curves(original: nn.Module, sites: list[LayerSite], batches: list[Any], metric: str,
                       stats: dict[str, ResponseStats], alphas: dict[str, torch.Tensor | None],
                       seed: int) -> dict[str, torch.Tensor]:
    """Per site, the predicted output-metric cost of keeping only r response directions, r = 0..m.

    The site's BN-folded response z (rows, m) is projected, like the calibrated fit, onto the top
    eigenvectors U of S̃ = √α Σ √α; dropping directions j ≥ r changes z by Δ = −Σ_{j≥r} c_j u_j/√α
    with c = √α (z − μ) U. To first order the metric moves by κ E_x[(Σ_positions g·Δ)²], with g the
    probe gradient (:mod:`lowrank_compress.sensitivity`), so with h = (g/√α) U and
    t_j(x) = Σ_positions c_j h_j, the cost at rank r is κ E_x[(Σ_{j≥r} t_j(x))²]. Unlike a per-channel
    estimate this keeps the correlation of errors across positions (a layer before global pooling).
    Returns a (m + 1,) float64 tensor per site, index r.
    """
    bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for site in sites:
        st = stats[site.name]
        m = st.mean.shape[0]
        a = alphas.get(site.name)
        a = torch.ones(m, dtype=torch.float64) if a is None else a.clamp_min(float(a.max()) * 1e-8 + 1e-30)
        root = a.sqrt()
        evals, evecs = torch.linalg.eigh(root[:, None] * st.covariance * root[None, :])
        u = evecs[:, torch.argsort(evals, descending=True)]
        bases[site.name] = (st.mean.to(torch.float32), root.to(torch.float32), u.to(torch.float32))
    by_name = {s.name: s for s in sites}
    totals = {s.name: torch.zeros(s.shape[0] + 1, dtype=torch.float64) for s in sites}

    def visit(name: str, z: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> None:
        site = by_name[name]
        mu, root, u = bases[name]
        n = z.shape[0]
        rows = _responses(site, z.to(torch.float32))
        grad = _rows(site, g.to(torch.float32))
        if site.bn_before is not None:
            scale = site.bn_before.scale.to(torch.float32)
            grad = grad / torch.where(scale.abs() > 1e-12, scale, torch.full_like(scale, float("inf")))
        if mask is not None and isinstance(site.module, nn.Linear) and tuple(z.shape[:2]) == tuple(mask.shape):
            grad = grad * mask.reshape(-1, *([1] * (z.dim() - 2))).expand(*z.shape[:-1]).reshape(-1, 1)
        c = ((rows - mu) * root) @ u
        h = (grad / root) @ u
        t = (c * h).reshape(n, -1, c.shape[1]).sum(1).to(torch.float64)  # (N, m)
        tail = torch.cat([t.flip(1).cumsum(1).flip(1), torch.zeros(n, 1, dtype=torch.float64)], dim=1)
        totals[name] += (tail**2).sum(0)

    targets = {s.name: original.get_submodule(s.name) for s in sites}
    factor = probe_gradients(original, targets, batches, metric, visit, seed=seed)
    return {name: total * factor for name, total in totals.items()}


def _rows(site: LayerSite, t: torch.Tensor) -> torch.Tensor:
    """A layer output (N, m, ...) or (..., m) as rows (positions, m), without the BN fold."""
    if isinstance(site.module, nn.Linear):
        return t.reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _row_weights(site: LayerSite, sensitivity: torch.Tensor | None) -> torch.Tensor | None:
    """Row weights of a site's fit: its output sensitivities, normalized to mean 1, floored."""
    if sensitivity is None:
        return site.row_weights()
    a = sensitivity.to(torch.float64)
    mean = float(a.mean())
    if not math.isfinite(mean) or mean <= 0:
        return site.row_weights()
    return (a / mean).clamp_min(1e-3)


def _probe_batches(batches: list[Any], samples: int = 64) -> list[Any]:
    """The first ``samples`` calibration samples, for the gradient probes."""
    out, seen = [], 0
    for batch in batches:
        if seen >= samples:
            break
        take = min(batch_size(batch), samples - seen)
        out.append(slice_batch(batch, slice(0, take)))
        seen += take
    return out


def _micro_batches(batches: list[Any], size: int = 8) -> list[Any]:
    """The calibration batches re-split into batches of ``size`` samples (for block training)."""
    out = []
    for batch in batches:
        n = batch_size(batch)
        out += [slice_batch(batch, slice(i, i + size)) for i in range(0, n, size)]
    return out


def calibrated_compress(
    model: nn.Module,
    sites: list[LayerSite],
    config: CompressConfig,
    example_inputs: Any,
    calibration: Iterable[Any],
    progress: ProgressFn | None = None,
    asymmetric: bool = True,
    observer: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[list[LayerReport], list[dict[str, str]]]:
    """Compress ``sites`` of ``model`` in place with calibration data (see the module docstring).

    ``asymmetric=False`` calibrates every layer on the original model's inputs instead (for
    comparison; the asymmetric default is what works). ``observer(name, inputs, targets)`` sees
    each layer's reservoir: input rows (P, d) and target rows σ(z) (P, m).
    """
    import copy

    batches = list(calibration)
    if not batches:
        raise UsageError("the calibration data is empty")
    original = copy.deepcopy(model).eval()
    targets = _original_pass(original, sites, batches, config.seed)
    by_name = {s.name: s for s in sites}
    network_aware = config.allocation != "layer"
    metric = config.output_metric
    if metric == "auto":
        metric = detect_output_metric(original, batches[0])
    probe = _probe_batches(batches)
    sens = site_sensitivities(original, sites, probe, metric, config.seed) if network_aware else {}
    costs = {}
    if network_aware:
        alphas = {s.name: _row_weights(s, sens.get(s.name)) for s in sites}
        costs = output_cost_curves(original, sites, probe, metric, {n: t.stats for n, t in targets.items()},
                                   alphas, config.seed)

    def curve(site: LayerSite, ranks: list[int]) -> list[float]:
        if site.name in costs:
            return [float(costs[site.name][min(r, site.shape[0])]) for r in ranks]
        return stats_error_curve(site, targets[site.name].stats, ranks)

    ranks, notes, reasons = plan_ranks(model, sites, config, example_inputs, curve, calibrated=True)
    skipped = [{"name": n, "reason": r} for n, r in reasons.items()]
    todo = [s for s in sites if s.name in ranks]
    reports: list[LayerReport] = []
    source = model if asymmetric else original
    once = _called_once(source, todo, batches[0])
    runner = _LayerInputs(source, batches, once)
    blocks = _blocks(model, todo, batches[0], once, config) if config.block_steps > 0 and asymmetric else []
    block_of_last = {b.sites[-1]: b for b in blocks}
    block_sens = _block_sensitivities(original, blocks, batches, metric, config.seed) if blocks else {}
    micro = _micro_batches(batches) if blocks else []
    block_reports = []
    for i, site in enumerate(todo):
        if progress is not None:
            progress(site.name, i, len(todo))
        target = targets[site.name]
        stats = ResponseStats.empty(site.shape[0])
        inputs: list[torch.Tensor] = []
        module = site.module if asymmetric else original.get_submodule(site.name)

        def capture(b: int, x: torch.Tensor, output: torch.Tensor, site=site, stats=stats, inputs=inputs, target=target) -> None:
            stats.update(_responses(site, output.detach().to(torch.float32)))
            inputs.append(_patches(site, x.detach().to(torch.float32))[target.positions[b]])

        runner.run(site.name, module, capture)
        x_all = torch.cat(inputs)
        y_all = target.post
        if observer is not None:
            observer(site.name, x_all, y_all)
        gen = torch.Generator().manual_seed(config.seed + i)
        perm = torch.randperm(x_all.shape[0], generator=gen)
        held = max(1, x_all.shape[0] // 4)
        h_idx, t_idx = perm[:held], perm[held:] if x_all.shape[0] > 1 else perm
        alpha = _row_weights(by_name[site.name], sens.get(site.name))
        cands, errors, gaussian = _candidates(
            by_name[site.name], ranks[site.name], stats, x_all[t_idx], y_all[t_idx], x_all[h_idx], y_all[h_idx],
            config.refine_steps, config.seed + i, alpha=alpha,
        )
        best = choose_candidate(errors, config.method)
        module_factors = unfold_batchnorm(site, cands[best]).to(site.module.weight.dtype)
        new = from_dense(site.module, module_factors)
        replace_module(model, site.module, new)
        reports.append(LayerReport(
            name=site.name, kind=site.kind, activation=site.activation, shape=list(site.shape), rank=ranks[site.name],
            params_before=site.params,
            params_after=_factor_params(site, ranks[site.name], module_factors.bias is not None),
            error_spectral=gaussian["spectral"], error_nkp=gaussian["nkp"], method=best,
            note=notes.get(site.name), candidates=errors,
        ))
        block = block_of_last.get(site.name)
        if block is not None:
            block_reports.append(reconstruct_block(
                model, original, block, micro, block_sens[block.name], config.block_steps, seed=config.seed + i))
    if progress is not None:
        progress("done", len(todo), len(todo))
    return reports, skipped


def _blocks(model: nn.Module, sites: list[LayerSite], batch: Any, once: set[str], config: CompressConfig) -> list[Block]:
    """The blocks of :mod:`lowrank_compress.blocks` among modules that run once and return a tensor."""
    names = [n for n, _ in model.named_modules() if n]
    tensor_out: set[str] = set()

    def record(name: str):
        def hook(_m, _inputs, output):
            if first_tensor(output) is not None:
                tensor_out.add(name)

        return hook

    forward_with_hooks(model, [(model.get_submodule(n), record(n)) for n in names], batch)
    all_once = modules_called_once(model, set(names), batch) | once
    conv1d = {s.name for s in sites if isinstance(s.module, nn.Conv1d)}
    return find_blocks(model, [s.name for s in sites], all_once, tensor_out, conv1d, config.blocks)


def _block_sensitivities(original: nn.Module, blocks: list[Block], batches: list[Any], metric: str,
                         seed: int) -> dict[str, torch.Tensor]:
    targets = {b.name: original.get_submodule(b.name) for b in blocks}
    last = {b.name: b.channels_last for b in blocks}
    return channel_sensitivities(original, targets, batches, metric, lambda n: last[n], seed=seed)
