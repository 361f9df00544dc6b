"""Throughput as a GPU deployment or training run sees it: bf16 autocast, channels_last,
``torch.compile`` of every model, blocks of steps between device synchronizations, inference and
training (:func:`measure_throughput`). Per-call latency is in :mod:`lowrank_compress.bench`.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import UsageError


@dataclass
class ThroughputResult:
    """Samples per second of one model at one batch size, inference or one training step.

    ``step_s``: median seconds per step over the timed rounds; ``ratio``: samples/s against the
    baseline's (above 1: faster).
    """

    model: str
    mode: str  # "inference" or "training"
    batch_size: int
    step_s: float
    samples_per_s: float
    rounds: int
    ratio: float | None = None


@dataclass
class ThroughputReport:
    """Throughput of several models measured together (see :func:`measure_throughput`)."""

    device: str
    input_shape: list[int]
    baseline: str
    bf16: bool
    channels_last: bool
    compiled: bool
    results: list[ThroughputResult] = field(default_factory=list)

    def ratio(self, model: str, mode: str, batch_size: int) -> float | None:
        return next((r.ratio for r in self.results
                     if r.model == model and r.mode == mode and r.batch_size == batch_size), None)

    def to_dict(self) -> dict:
        return asdict(self)


def _training_loss(output) -> torch.Tensor:
    """A loss over every output element: the step's backward then costs what training would."""
    items = [output] if isinstance(output, torch.Tensor) else [o for o in output if isinstance(o, torch.Tensor)]
    return sum(o.float().square().mean() for o in items)


def _prepare_for_speed(model: nn.Module, device: str, channels_last: bool, compile: bool, training: bool):
    """A copy of ``model`` on ``device`` as it would be deployed: channels_last, compiled."""
    module = copy.deepcopy(model).to(device).train(training)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if training:
        module.requires_grad_(True)
    return (torch.compile(module) if compile else module), module


def _step_fn(model: nn.Module, x: torch.Tensor, device: str, bf16: bool, training: bool,
             optimizer: torch.optim.Optimizer | None) -> Callable[[], object]:
    autocast = functools.partial(torch.autocast, device_type=device, dtype=torch.bfloat16, enabled=bf16)
    if not training:
        def infer() -> object:
            with torch.inference_mode(), autocast():
                return model(x)

        return infer

    def train_step() -> object:
        with autocast():
            loss = _training_loss(model(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return train_step


def measure_throughput(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (256,),
    device: str = "cuda",
    modes: Sequence[str] = ("inference", "training"),
    bf16: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = True,
    warmup: int = 10,
    steps: int = 20,
    rounds: int = 3,
    baseline: str | None = None,
) -> ThroughputReport:
    """Inference and training throughput of each model, measured the way a GPU deployment runs.

    Each model is copied to ``device`` and, by default, run under bf16 autocast (on CUDA),
    channels_last (for 4-D inputs) and ``torch.compile`` (both models, so neither gets an unfair
    advantage; ``compile=False`` turns it off). Training is SGD with momentum on the mean squared
    output. Per (mode, batch size): ``warmup`` untimed steps of each model (compilation and
    autotuning happen there), then ``rounds`` rounds, each timing ``steps`` steps of every model
    between two device synchronizations (``torch.cuda.synchronize``), the model order rotating
    each round. samples/s = batch × steps / seconds; the figure kept is the median round. The
    input models are not changed.
    """
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA was asked for but is not available")
    unknown = [m for m in modes if m not in ("inference", "training")]
    if unknown or not modes:
        raise UsageError(f"modes must be inference and/or training, got {list(modes)}")
    if not models:
        raise UsageError("nothing to time")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if steps < 1 or rounds < 1 or warmup < 0:
        raise UsageError(f"steps and rounds must be ≥ 1 and warmup ≥ 0, got {steps}, {rounds} and {warmup}")
    baseline = baseline if baseline is not None else next(iter(models))
    if baseline not in models:
        raise UsageError(f"baseline {baseline!r} is not among the models")
    shape = tuple(int(s) for s in input_shape)
    bf16 = device == "cuda" if bf16 is None else bf16
    channels_last = len(shape) == 4 if channels_last is None else channels_last
    cuda = device == "cuda"
    report = ThroughputReport(device, list(shape), baseline, bf16, channels_last, compile)
    for mode in modes:
        training = mode == "training"
        prepared = {name: _prepare_for_speed(model, device, channels_last, compile, training)
                    for name, model in models.items()}
        optimizers = {name: torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9) if training else None
                      for name, (_, plain) in prepared.items()}
        for batch in batch_sizes:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn((batch, *shape[1:]), generator=gen).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            steps_fn = {name: _step_fn(run, x, device, bf16, training, optimizers[name])
                        for name, (run, _) in prepared.items()}
            for fn in steps_fn.values():
                for _ in range(warmup):
                    fn()
            names = list(steps_fn)
            seconds: dict[str, list[float]] = {name: [] for name in names}
            for k in range(rounds):
                for name in names[k % len(names):] + names[: k % len(names)]:
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(steps):
                        steps_fn[name]()
                    if cuda:
                        torch.cuda.synchronize()
                    seconds[name].append((time.perf_counter() - start) / steps)
            base = batch / statistics.median(seconds[baseline])
            for name, values in seconds.items():
                step = statistics.median(values)
                report.results.append(
                    ThroughputResult(name, mode, batch, step, batch / step, rounds, (batch / step) / base)
                )
    return report
