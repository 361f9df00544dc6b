"""Refinement of a factorization by gradient descent on sampled inputs (calibration rows or Gaussian).

Adam on A, B and the bias against the post-activation error, with the guards a user needs from a
step that runs unattended: gradient clipping, a learning rate relative to the factors' scale, the
best held-out iterate kept, early stopping on a patience, and never a result worse than the start.
"""

from __future__ import annotations

import math

import torch

from .activations import activation_fn
from .factors import Factorization, check_row_weights, flatten_weight


def refine(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factorization: Factorization,
    activation: str = "relu",
    inputs: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_weights: torch.Tensor | None = None,
    steps: int = 768,
    lr: float = 5e-3,
    batch_size: int = 512,
    samples: int = 1000,
    eval_every: int = 16,
    seed: int = 0,
    patience: int | None = None,
) -> tuple[Factorization, float, float]:
    """Adam on the sampled post-activation error (the paper's LFAI-WS-Adam), guarded.

    Inputs (n, d) default to ``samples`` Gaussian draws and targets (n, m) to σ(W x + b); held-out
    pairs default to as many fresh Gaussian draws. The learning rate is relative to each factor's
    RMS, gradients are clipped, and the iterate with the lowest held-out error is returned, so the
    result is never worse than the start on the held-out set. With ``patience`` the run stops after
    that many held-out evaluations without improvement.

    Returns (factorization, held-out error before, held-out error after), errors as mean Σ_i α_i (·)².
    """
    w = flatten_weight(weight).to(torch.float64)
    m, d = w.shape
    f = activation_fn(activation)
    b = torch.zeros(m, dtype=torch.float64) if bias is None else bias.to(torch.float64)
    alpha = check_row_weights(row_weights, m)
    gen = torch.Generator().manual_seed(seed)
    if inputs is None:
        inputs = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    inputs = inputs.to(torch.float64)
    targets = f(inputs @ w.T + b) if targets is None else targets.to(torch.float64)
    if held_out is None:
        xh = torch.randn(max(samples, 256), d, generator=gen, dtype=torch.float64)
        held_out = (xh, f(xh @ w.T + b))
    xh, yh = held_out[0].to(torch.float64), held_out[1].to(torch.float64)

    dtype = torch.float32
    A = factorization.A.detach().to(dtype).clone().requires_grad_(True)
    B = factorization.B.detach().to(dtype).clone().requires_grad_(True)
    train_bias = factorization.bias is not None or bias is not None
    c0 = factorization.bias if factorization.bias is not None else torch.zeros(m)
    c = c0.detach().to(dtype).clone().requires_grad_(train_bias)
    x32, y32, xh32, yh32 = inputs.to(dtype), targets.to(dtype), xh.to(dtype), yh.to(dtype)
    a32 = None if alpha is None else alpha.to(dtype)

    def loss_on(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        diff = (f((x @ B.T) @ A.T + c) - y) ** 2
        return (diff if a32 is None else diff * a32).sum(1).mean()

    def rms(t: torch.Tensor) -> float:
        return float(t.detach().pow(2).mean().sqrt()) or 1.0

    bias_scale = max(rms(c), float(yh32.std()) if yh32.numel() > 1 else 1.0, 1e-3)
    groups = [{"params": [A], "lr": lr * rms(A)}, {"params": [B], "lr": lr * rms(B)}]
    if train_bias:
        groups.append({"params": [c], "lr": lr * bias_scale})
    opt = torch.optim.Adam(groups)
    with torch.no_grad():
        start = float(loss_on(xh32, yh32))
    best, best_state = start, None
    stale = 0
    clip = None
    n = x32.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = loss_on(x32[idx], y32[idx])
        if not torch.isfinite(loss):
            break
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], clip if clip is not None else float("inf")))
        if clip is None:
            clip = 4.0 * norm if norm > 0 else float("inf")
        opt.step()
        if (step + 1) % eval_every == 0 or step == steps - 1:
            with torch.no_grad():
                val = float(loss_on(xh32, yh32))
            if math.isfinite(val) and val < best:
                best, best_state = val, (A.detach().clone(), B.detach().clone(), c.detach().clone())
                stale = 0
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    break
    if best_state is None:
        return factorization, start, start
    out_bias = best_state[2] if train_bias else None
    out_dtype = factorization.A.dtype
    return Factorization(best_state[0], best_state[1], out_bias).to(out_dtype), start, best
