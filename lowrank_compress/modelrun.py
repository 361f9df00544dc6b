"""Running and editing a model: calls with any input form, hooks, counting, module replacement."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class HeapTrimmer:
    """Hands memory that tensors freed back to the OS once the process has grown by ``slack`` bytes.

    glibc keeps the memory of freed tensors in its arenas; with batches of varying shapes (padded
    texts) it is reused poorly, and the process grows with the calibration set: the statistics pass
    of all-MiniLM-L6-v2 over 40 batches of 16 texts peaked at 7.4–8.1 GB resident for 0.4 GB of live
    tensors, and at 2.1–2.2 GB with this trimmer (21–22 s either way). Trimming only after growth
    keeps its cost (pages faulted in again) off the common case. A no-op where ``malloc_trim`` or
    ``/proc/self/statm`` is missing (not glibc, not Linux).
    """

    def __init__(self, slack: float = 1e9) -> None:
        self.slack, self.trim = slack, None
        try:
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
            self.page = os.sysconf("SC_PAGE_SIZE")
            self.floor = self.resident()
        except (OSError, AttributeError, ValueError):
            self.trim = None

    def resident(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __call__(self) -> None:
        """Trim when the resident size has grown by ``slack`` since the last trim."""
        if self.trim is not None and self.resident() > self.floor + self.slack:
            self.trim(0)
            self.floor = self.resident()


_TRIM = HeapTrimmer()


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a tensor, a tuple/list of positional inputs or a dict of keyword inputs.

    Every calibration pass goes through here: freed memory is handed back first (:class:`HeapTrimmer`)."""
    _TRIM()
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensors(result: Any, floating_only: bool = True) -> list[torch.Tensor]:
    """The floating-point tensors (every tensor with ``floating_only`` False) of a model's result
    (tensors, dicts, tuples, HF model outputs)."""
    if isinstance(result, torch.Tensor):
        return [result] if result.is_floating_point() or not floating_only else []
    if isinstance(result, dict):
        return [t for v in result.values() for t in output_tensors(v, floating_only)]
    if isinstance(result, (tuple, list)):
        return [t for v in result for t in output_tensors(v, floating_only)]
    return []


def padding_mask(batch: Any) -> torch.Tensor | None:
    """The (batch, tokens) attention mask of a keyword batch (1 = real token), if it carries one."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask != 0
    return None


def batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    return batch_size(batch[0])


def slice_batch(batch: Any, index: torch.Tensor | slice) -> Any:
    """The samples ``index`` of a batch (every tensor input indexed along its first axis)."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(slice_batch(v, index) for v in batch)


def float_batch(batch: Any, dtype: torch.dtype) -> Any:
    """The batch with its floating-point tensors cast to ``dtype`` (token ids and masks kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: float_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(float_batch(v, dtype) for v in batch)
    return batch


def forward_with_hooks(model: nn.Module, hooks: list[tuple[nn.Module, Callable]], inputs: Any) -> None:
    """One forward pass without gradients with forward hooks attached, removed afterwards."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the module of interest has run."""


def run_until(model: nn.Module, module: nn.Module, inputs: Any, capture: Callable[[tuple, dict, Any], None]) -> None:
    """Run ``model`` until ``module`` has run once; ``capture(args, kwargs, output)`` sees that call."""
    seen: dict[str, Any] = {}

    def pre(_m, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    def post(_m, _args, output):
        args, kwargs = seen["call"]
        capture(args, kwargs, output)
        raise StopForward

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, shared tensors counted once."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad inside the block; what did is restored after it.

    For passes under ``torch.utils.flop_counter.FlopCounterMode``: its module tracker hooks the
    autograd graph of every module input that requires grad, and a view of a parameter taken under
    ``no_grad`` (timm's CaiT and PiT hand ``cls_token.expand(...)`` to a block) requires grad
    without having a grad_fn, so the hook fails ("Expected gradient function to be set").
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


def count_flops(model: nn.Module, inputs: Any, forward: Callable[[nn.Module, Any], Any] = call_model) -> int:
    """FLOPs of one ``forward(model, inputs)`` pass, as torch.utils.flop_counter counts them.

    That counter counts matrix products and convolutions only, 2 FLOPs per multiply-add;
    elementwise ops, norms and pooling are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), frozen_parameters(model), counter:
        forward(model, inputs)
    return int(counter.get_total_flops())


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter (CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return torch.device("cpu") if param is None else param.device


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Replace every occurrence of ``old`` (shared modules included) by ``new``; returns the names."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return names
