"""Block-wise reconstruction: refine all factors inside a block jointly against the original block.

A block is a module that holds between 2 and ``MAX_BLOCK_SITES`` compressed layers, runs once per
forward pass and returns a tensor (or a tuple that starts with one): a residual block, a
transformer layer. The largest such modules are taken, so blocks do not nest; layers outside every
block keep their per-layer fit. Users may name blocks instead (``CompressConfig.blocks``).

Each block, in execution order, is fed the inputs it receives in the model *as compressed so far*
(asymmetric, like the per-layer fit) and trained to reproduce the output the original block gives
on the original model's inputs. The squared error of each output channel is weighted by its
output sensitivity (:mod:`lowrank_compress.sensitivity`), so the loss estimates how much the block
moves the model's output. Adam, learning rates relative to each factor's RMS; the iterate with the
lowest held-out loss is kept, and the start is kept when nothing beats it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .layers import LOW_RANK_TYPES
from .losses import BestIterate, rms_adam, split_held_out
from .modelrun import padding_mask, run_until

MAX_BLOCK_SITES = 6


@dataclass
class Block:
    """A module of the model and the compressed layers inside it."""

    name: str
    sites: list[str]
    channels_last: bool


@dataclass
class BlockReport:
    """Held-out block loss (predicted output-metric units) before and after the joint refit."""

    name: str
    layers: list[str]
    loss_before: float
    loss_after: float
    steps: int


def _inside(site: str, block: str) -> bool:
    return site.startswith(block + ".")


def find_blocks(model: nn.Module, site_names: Sequence[str], called_once: set[str], tensor_output: set[str],
                conv1d_sites: set[str], names: str | None = None) -> list[Block]:
    """Blocks in execution order (the order of ``site_names``), see the module docstring.

    ``called_once`` / ``tensor_output``: module names that run once per forward and return a
    tensor (or a tuple starting with one). ``names``: a regular expression matched in full against
    module names, to choose blocks by hand.
    """
    modules = [n for n, _ in model.named_modules() if n]
    if names is not None:
        chosen = [n for n in modules if re.fullmatch(names, n)]
        chosen = [n for n in chosen if not any(_inside(n, other) for other in chosen if other != n)]
        bad = [n for n in chosen if n not in called_once or n not in tensor_output]
        if bad:
            raise UsageError(f"block {bad[0]!r} does not run once per forward pass returning a tensor")
        limit = len(site_names)
    else:
        chosen, limit = [], MAX_BLOCK_SITES
        for name in sorted(modules, key=lambda n: n.count(".")):
            if any(_inside(name, c) or name == c for c in chosen):
                continue
            if name in called_once and name in tensor_output:
                inside = [s for s in site_names if _inside(s, name)]
                if 2 <= len(inside) <= limit:
                    chosen.append(name)
    blocks = []
    for name in chosen:
        inside = [s for s in site_names if _inside(s, name)]
        if len(inside) >= 1 if names is not None else len(inside) >= 2:
            blocks.append(Block(name, inside, channels_last=not any(s in conv1d_sites for s in inside)))
    order = {s: i for i, s in enumerate(site_names)}
    return sorted(blocks, key=lambda b: min(order[s] for s in b.sites))


def first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _channel_view(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(rows, channels) view of a block output."""
    return t.reshape(-1, t.shape[-1]) if channels_last or t.dim() < 3 else t.movedim(1, -1).reshape(-1, t.shape[1])


def _row_mask(batch: Any, output: torch.Tensor, channels_last: bool) -> torch.Tensor | None:
    """Which rows of ``_channel_view(output)`` are real tokens (None: all)."""
    mask = padding_mask(batch)
    if mask is None or not channels_last or output.dim() < 3 or tuple(output.shape[:2]) != tuple(mask.shape):
        return None
    rows = output.numel() // output.shape[-1]
    return mask.reshape(mask.shape[0], mask.shape[1], *([1] * (output.dim() - 3))).expand(
        *output.shape[:-1]).reshape(rows)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


@dataclass
class _Sample:
    args: tuple
    kwargs: dict
    target: torch.Tensor  # (rows, channels) original block output
    rows: torch.Tensor | None  # real-token rows


def _collect(model: nn.Module, original: nn.Module, block: Block, batches: Sequence[Any]) -> list[_Sample]:
    module, reference = model.get_submodule(block.name), original.get_submodule(block.name)
    samples = []
    for batch in batches:
        got: dict[str, Any] = {}

        def keep_inputs(args, kwargs, _output):
            got["args"], got["kwargs"] = _clone(args), _clone(kwargs)

        def keep_target(_args, _kwargs, output):
            got["target"] = first_tensor(output).detach().to(torch.float32)

        run_until(model, module, batch, keep_inputs)
        run_until(original, reference, batch, keep_target)
        target = got["target"]
        samples.append(_Sample(got["args"], got["kwargs"], _channel_view(target, block.channels_last),
                               _row_mask(batch, target, block.channels_last)))
    return samples


def _factor_parameters(module: nn.Module) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, LOW_RANK_TYPES):
            params += [p for p in m.parameters() if p.is_floating_point()]
    return params


def reconstruct_block(
    model: nn.Module,
    original: nn.Module,
    block: Block,
    batches: Sequence[Any],
    weights: torch.Tensor,
    steps: int,
    lr: float = 1e-2,
    eval_every: int = 10,
    patience: int = 8,
    seed: int = 0,
    held_out: Sequence[Any] | None = None,
) -> BlockReport:
    """Refine the factors inside ``block`` of ``model`` in place (see the module docstring).

    ``batches``: calibration micro-batches; every fourth is held out (the last one when there are
    fewer than four), or ``held_out`` micro-batches are. ``weights`` (channels,): per-channel
    output sensitivity of the block output.
    """
    module = model.get_submodule(block.name)
    samples = _collect(model, original, block, batches)
    if held_out:
        train, held = samples, _collect(model, original, block, held_out)
    else:
        train, held = split_held_out(samples)
    params = _factor_parameters(module)
    w = weights.to(torch.float32)
    w = w / w.mean().clamp_min(1e-30)
    w = w.clamp_min(1e-3)

    def loss_of(sample: _Sample) -> torch.Tensor:
        out = _channel_view(first_tensor(module(*sample.args, **sample.kwargs)), block.channels_last)
        diff = (out.to(torch.float32) - sample.target) ** 2 * w
        if sample.rows is not None:
            diff = diff[sample.rows]
        return diff.sum(1).mean()

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(s)) for s in held) / len(held)

    start = held_loss()
    if not params or steps <= 0 or not math.isfinite(start):
        return BlockReport(block.name, block.sites, start, start, 0)
    others = [p for p in module.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in others:
        p.requires_grad_(False)
    opt = rms_adam(params, lr)
    kept, done = BestIterate(params, start, patience), 0
    gen = torch.Generator().manual_seed(seed)
    try:
        for step in range(steps):
            sample = train[int(torch.randint(len(train), (1,), generator=gen))]
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_of(sample)
                if not torch.isfinite(loss):
                    break
                loss.backward()
            opt.step()
            done = step + 1
            if (done % eval_every == 0 or done == steps) and kept.update(held_loss()):
                break
    finally:
        kept.restore()  # the best held-out iterate, or the start when nothing beat it
        for p in others:
            p.requires_grad_(True)
    return BlockReport(block.name, block.sites, start, kept.best, done)
