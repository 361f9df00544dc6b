"""A layer's responses on calibration data: rows, streaming statistics, and what they give.

A layer's response rows are its outputs z = W x + b at every position (BatchNorm before it folded
in), (positions, m). Their float64 mean μ and covariance Σ (m × m, never the d × d input
covariance) drive the calibrated projection and the rank-error curves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .activations import canonical_activation
from .graph import LayerSite
from .factors import Factorization
from .gaussian import gaussian_row_error, second_moment
from .projection import fit_rows


def patches(site: LayerSite, x: torch.Tensor) -> torch.Tensor:
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


def responses(site: LayerSite, z: torch.Tensor) -> torch.Tensor:
    """Layer output (N, m, ...) or (..., m) as rows (positions, m), BatchNorm before folded in."""
    if isinstance(site.module, nn.Linear):
        rows = z.reshape(-1, z.shape[-1])
    else:
        rows = z.movedim(1, -1).reshape(-1, z.shape[1])
    if site.bn_before is not None:
        rows = rows * site.bn_before.scale.to(rows.dtype) + site.bn_before.shift.to(rows.dtype)
    return rows


def real_rows(site: LayerSite, rows: torch.Tensor, output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of a Linear layer's (batch, tokens, …, m) output that belong to real tokens.

    ``mask`` is the batch's (batch, tokens) attention mask; padded positions change no statistic,
    reservoir or target. Other layers, and outputs whose leading axes are not (batch, tokens),
    keep every row.
    """
    if mask is None or not isinstance(site.module, nn.Linear) or output.dim() < 3:
        return rows
    if tuple(output.shape[:2]) != tuple(mask.shape):
        return rows
    keep = mask.reshape(*mask.shape, *([1] * (output.dim() - 3))).expand(*output.shape[:-1]).reshape(-1)
    return rows[keep]


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

    def shrunk_covariance(self, weight: torch.Tensor) -> torch.Tensor:
        """Σ shrunk toward the data-free response covariance s²·W Wᵀ by λ = m / (m + n).

        n rows span at most n of the m response directions: a classifier calibrated on 64 images
        sees only the logits of what those images show, and a projection onto that span drops
        every other class. The prior is the response covariance of isotropic inputs with the same
        total response variance (s² = tr Σ / ‖W‖²_F), what the data-free projection assumes; it
        keeps the directions the weight itself carries. λ falls as rows accumulate (a conv layer
        sees thousands of positions per image) and the statistics speak for themselves.
        """
        cov = self.covariance
        m = cov.shape[0]
        lam = m / (m + max(self.count, 1))
        if lam < 1e-3 or weight.shape[0] != m:
            return cov
        w = weight.reshape(m, -1)
        gram = torch.zeros(m, m, dtype=torch.float64)
        for lo in range(0, w.shape[1], 4096):  # column blocks: no float64 copy of a large weight
            part = w[:, lo:lo + 4096].to(torch.float64)
            gram += part @ part.T
        norm = float(torch.trace(gram))
        if norm <= 0:
            return cov
        return (1 - lam) * cov + lam * (float(torch.trace(cov)) / norm) * gram


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
    cov, mu = stats.shrunk_covariance(w), stats.mean
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


def stats_error_curve(site: LayerSite, stats: ResponseStats, ranks: list[int],
                      alpha: torch.Tensor | None = None, absolute: bool = False) -> list[float]:
    """Relative post-activation error vs rank under z ~ N(μ, Σ), from the response statistics.

    Each row keeps its projection onto the top-r response directions (no per-row refit), which
    makes a curve cost one eigendecomposition plus closed-form or 1-D Gaussian moments per rank.
    ``alpha`` overrides the per-row weights; ``absolute=True`` returns Σ α_i E[(σ(z̃_i) − σ(z_i))²]
    instead of its ratio to Σ α_i E[σ(z_i)²] (with output sensitivities as α: the predicted
    output-metric cost).
    """
    cov, mu = stats.shrunk_covariance(site.effective_weight()[0]), stats.mean
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
