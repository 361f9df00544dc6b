"""Label-free distillation on the calibration inputs: the original model is the teacher.

After the per-layer and block fits, all factors are trained together to reproduce the original
model's output on the calibration inputs: the softmax KL for classifiers (the teacher's
probabilities are the only labels), and for other outputs a mean squared error standardized per
feature, so that a few outlier channels of a hidden state do not dominate the loss. Optionally
(``feature_weight`` > 0) the outputs of intermediate modules (the blocks) are matched too, with
the same per-channel standardization. Few inputs overfit fast, so image batches are augmented
(flips and mixup of pairs: the teacher labels any input), one micro-batch in four is held out
(in a compression, the samples block reconstruction held out: ``calibration.holdout_split``),
and the iterate with the lowest held-out output metric is kept: the result is never worse than
the start on the held-out inputs.

New inputs beat augmented copies of the same few (``stream``): on EfficientNet-Lite0 at
``--target-params 0.5``, 300 steps of 32 new random crops of the calibration photos each lowered
the KL to the original on other crops from 0.054 to 0.033 (at ``lr`` 0.003), while random crops of
the 256 stored calibration crops themselves (crops of crops) ended worse than the start (0.060).
``lrc compress --calib FOLDER`` therefore distills on new random views of the folder's images when
it has fewer than ``--calib-samples`` (:class:`lowrank_compress.views.ViewStream`), and on a text
file's texts beyond ``--calib-samples`` when it has twice as many (:class:`~lowrank_compress.views.TextStream`;
all-MiniLM-L6-v2 at half of its Linear parameters: nearest-neighbour agreement 0.673 → 0.728 after
600 steps of 64). ``compress(..., distill_inputs=...)`` takes any iterable of input batches, such as
a DataLoader with a training transform.

The step size (``lr``) is relative to each factor's RMS, and no one value suits every model: on the
bundled digits CNN at a tenth of its parameters 0.03 is best, and pretrained EfficientNet-Lite0 and
all-MiniLM-L6-v2 want 0.003 and 0.002, where a step of 0.1 makes every step worse. So by default
(``lr="auto"``) :func:`choose_lr` probes the run's first steps at each of :data:`LR_CANDIDATES`.

How long (``distill_steps`` None, the default): :func:`auto_schedule` runs up to
:data:`MAX_STEPS` steps, at most :data:`MAX_EPOCHS` passes over the calibration inputs, and only
as many as fit a compute budget (:data:`FLOP_BUDGET`, about a minute on the device the model is
on). On the bundled digits CNN at a twentieth of its parameters, 1,000 steps of 64 took test
accuracy from 55% to 97–98% in under a minute on one CPU thread; a ResNet-50 on a CPU gets no steps
by default (one step of 64 crops costs more than the budget), and ``distill_steps`` N asks for N.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UsageError
from .modelrun import batch_size, call_model, output_tensors, padding_mask
from .sensitivity import output_metric
from .layers import low_rank_modules
from .losses import BestIterate, distillation_loss, rms_adam, split_held_out


MAX_STEPS = 1000  # what the automatic schedule runs at most
MAX_EPOCHS = 100  # nor more passes over the calibration inputs: few inputs overfit fast
MIN_STEPS = 50  # an automatic schedule shorter than this is skipped: a few steps move nothing
FLOP_BUDGET = {"cpu": 2e12, "cuda": 1e14}  # automatic schedule, per device type: about a minute
LR_CANDIDATES = (0.1, 0.03, 0.01, 0.003, 0.001)  # Adam, relative to each factor's RMS: what the probe tries
PROBE_STEPS = 50  # each candidate's probe runs a twentieth of the steps, at most this many
PROBE_TOLERANCE = 0.1  # the largest step whose probe ends within 10% of the best one's is chosen


@dataclass
class DistillReport:
    """Held-out output metric (KL or relative MSE) before and after, the steps run, and why that many."""

    metric: str
    before: float
    after: float
    steps: int
    batch_size: int = 0
    schedule: str = ""
    lr: float = 0.0
    inputs: str = "calibration inputs"
    lr_probe: dict[str, float] = field(default_factory=dict)  # step size -> held-out metric after its probe


@dataclass(frozen=True)
class Schedule:
    """How many steps of how many samples, and why."""

    steps: int
    batch_size: int
    reason: str


def batch_size_for(samples: int) -> int:
    """Distillation batch size: 64, or an eighth of the inputs when they are few (a quarter is held out)."""
    return max(1, min(64, samples // 8))


def auto_schedule(samples: int, sample_flops: float, device_type: str, requested: int | None,
                  fresh: bool = False) -> Schedule:
    """The steps to run: ``requested`` when given, else the automatic schedule (module docstring).

    ``sample_flops``: one teacher forward plus one student forward and backward, per sample.
    ``fresh``: the training batches are new inputs (a stream), so passes over the calibration
    inputs do not bound the steps.
    """
    batch = batch_size_for(samples)
    if requested is not None:
        return Schedule(requested, batch, "requested")
    per_epoch = max(1, math.ceil(samples * 3 / 4 / batch))
    budget = FLOP_BUDGET.get(device_type, FLOP_BUDGET["cpu"])
    by_flops = int(budget // max(batch * sample_flops, 1.0))
    limits = {"max steps": MAX_STEPS, f"compute budget {budget / 1e12:g} TFLOP": by_flops}
    if not fresh:
        limits[f"{MAX_EPOCHS} passes over the inputs"] = MAX_EPOCHS * per_epoch
    bound = min(limits, key=limits.get)
    steps = limits[bound]
    if steps < MIN_STEPS:
        return Schedule(0, batch, f"auto: skipped, only {steps} steps fit the {bound}; pass --distill-steps N")
    return Schedule(steps, batch, f"auto: {steps} steps, bound by the {bound}")


def _is_image_batch(batch: Any) -> bool:
    return isinstance(batch, torch.Tensor) and batch.dim() == 4 and batch.is_floating_point()


def _augment(batch: Any, gen: torch.Generator) -> Any:
    """Flips and mixup for image batches (B, C, H, W); other inputs pass unchanged."""
    if not _is_image_batch(batch):
        return batch
    x = batch
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    # Beta(0.4, 0.4) drawn from ``gen`` (torch.distributions reads the global generator: a run would
    # depend on whatever ran before it); X / (X + Y) with X, Y ~ Gamma(0.4).
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    lam = torch.from_numpy(rng.beta(0.4, 0.4, size=x.shape[0])).to(x.dtype).clamp(0.0, 1.0)
    lam = torch.maximum(lam, 1 - lam)[:, None, None, None]
    partner = torch.randperm(x.shape[0], generator=gen)
    return lam * x + (1 - lam) * x[partner]


def _training_batches(train: Sequence[Any], stream: Iterable[Any] | None, gen: torch.Generator) -> Iterator[Any]:
    """Training batches: augmented draws from ``train`` without end, or ``stream`` taken as it
    comes, iterated again when it ends (a DataLoader starts a new epoch); a one-shot iterator that
    has run out ends them."""
    if stream is None:
        while True:
            yield _augment(train[int(torch.randint(len(train), (1,), generator=gen))], gen)
    passes = 0
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield batch
        if empty and passes == 0:
            raise UsageError("the distillation inputs (distill_inputs) yielded no batch")
        if empty:
            return
        passes += 1


def _loss(student: list[torch.Tensor], teacher: list[torch.Tensor], metric: str, scales: list[torch.Tensor],
          mask: torch.Tensor | None) -> torch.Tensor:
    if metric == "kl":
        labels = teacher[0].argmax(-1)
        return distillation_loss(student[0], labels, teacher[0], temperature=1.0, kd_weight=1.0, label_smoothing=0.0)
    total = torch.zeros(())
    for s, t, scale in zip(student, teacher, scales):
        diff = ((s.float() - t.float()) / scale) ** 2
        if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
            weights = mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - 2)))
            total = total + (diff * weights).sum() / (weights.sum() * diff[0, 0].numel()).clamp_min(1.0)
        else:
            total = total + diff.mean()
    return total


def _feature_scales(outputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-feature (last axis) standard deviation of each teacher output over the calibration set."""
    scales = []
    for i in range(len(outputs[0])):
        rows = torch.cat([o[i].detach().float().reshape(-1, o[i].shape[-1]) for o in outputs])
        scales.append(rows.std(0).clamp_min(float(rows.std()) * 1e-3 + 1e-12))
    return scales


class _Features:
    """Forward hooks that keep the first output tensor of named modules during one call."""

    def __init__(self, model: nn.Module, names: dict[str, bool]):
        self.model, self.names, self.values = model, names, {}

    def __call__(self, batch: Any) -> list[torch.Tensor]:
        self.values = {}
        handles = [self.model.get_submodule(n).register_forward_hook(self._keep(n)) for n in self.names]
        try:
            return output_tensors(call_model(self.model, batch))
        finally:
            for h in handles:
                h.remove()

    def _keep(self, name: str):
        def hook(_m, _inputs, output):
            tensor = output if isinstance(output, torch.Tensor) else output[0]
            self.values.setdefault(name, tensor)

        return hook

    def rows(self, name: str) -> torch.Tensor:
        t = self.values[name]
        return t.reshape(-1, t.shape[-1]) if self.names[name] or t.dim() < 3 else t.movedim(1, -1).reshape(-1, t.shape[1])


class _Trainer:
    """One distillation step and the held-out check, shared by the step-size probe and the run."""

    def __init__(self, model: nn.Module, teacher: nn.Module, metric: str, params: list[torch.Tensor],
                 held: list[Any], features: dict[str, bool], feature_weight: float):
        self.model, self.metric, self.params, self.held = model, metric, params, held
        self.feature_weight = feature_weight
        self.t_run, self.s_run = _Features(teacher, features), _Features(model, features)
        self.held_ref, held_rows = [], {n: [] for n in features}
        with torch.no_grad():
            for b in held:
                self.held_ref.append(self.t_run(b))
                for n in held_rows:
                    held_rows[n].append(self.t_run.rows(n).float())
        self.scales = _feature_scales(self.held_ref) if metric == "mse" else []
        self.feature_scales = {n: torch.cat(r).std(0).clamp_min(float(torch.cat(r).std()) * 1e-3 + 1e-12)
                               for n, r in held_rows.items()}

    def held_metric(self) -> float:
        num, den = 0.0, 0.0
        with torch.no_grad():
            for batch, ref in zip(self.held, self.held_ref):
                outputs = output_tensors(call_model(self.model, batch))
                n, d = output_metric(ref, outputs, self.metric, padding_mask(batch))
                num, den = num + n, den + d
        return num / den if den > 0 else 0.0

    def step(self, batch: Any, opt: torch.optim.Optimizer) -> bool:
        """One optimizer step on ``batch``; False (and no step) when the loss is not finite."""
        with torch.no_grad():
            target = self.t_run(batch)
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = _loss(self.s_run(batch), target, self.metric, self.scales, padding_mask(batch))
            for name, scale in self.feature_scales.items():
                diff = (self.s_run.rows(name).float() - self.t_run.rows(name).float()) / scale
                loss = loss + self.feature_weight * diff.pow(2).mean() / len(self.feature_scales)
            if not torch.isfinite(loss):
                return False
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        opt.step()
        return True


def _cosine(opt: torch.optim.Optimizer, steps: int):
    from timm.scheduler import CosineLRScheduler  # timm's import costs seconds: only when distilling

    return CosineLRScheduler(opt, t_initial=steps, warmup_t=min(10, steps // 10), warmup_lr_init=0.0, lr_min=0.0)


def probe_steps(steps: int) -> int:
    """The length of each step-size probe for a run of ``steps``: a twentieth of it, 5 to 50 steps."""
    return max(5, min(PROBE_STEPS, steps // 20))


def choose_lr(trainer: _Trainer, batches: Sequence[Any], run_steps: int) -> tuple[float, dict[float, float]]:
    """The step size of a run of ``run_steps`` (``lr="auto"``): its first steps, on ``batches``, at
    each of :data:`LR_CANDIDATES`, largest first, each from the same start with the run's own
    warm-up and cosine schedule, then the held-out metric. It stops at the first candidate worse
    than a larger one. A short probe favours small steps (they move less in the first steps, where
    every step size raises the held-out error a little), so the largest candidate within
    :data:`PROBE_TOLERANCE` of the best is chosen. Returns it and every probed value."""
    start = BestIterate(trainer.params, math.inf, patience=1)  # restore() puts these parameters back
    values: dict[float, float] = {}
    for lr in LR_CANDIDATES:
        try:
            opt = rms_adam(trainer.params, lr)
            schedule = _cosine(opt, run_steps)
            finite = True
            for i, batch in enumerate(batches):
                finite = trainer.step(batch, opt)
                if not finite:
                    break
                schedule.step(i + 1)
            value = trainer.held_metric() if finite else math.inf
            values[lr] = value if math.isfinite(value) else math.inf
        finally:
            start.restore()
        if len(values) > 1 and value > min(values.values()) and math.isfinite(min(values.values())):
            break
    best = min(values.values())
    if not math.isfinite(best):
        return LR_CANDIDATES[-1], values
    return max(lr for lr, v in values.items() if v <= best * (1 + PROBE_TOLERANCE)), values


def distill(model: nn.Module, teacher: nn.Module, batches: Sequence[Any], metric: str, steps: int,
            lr: float | str = "auto", seed: int = 0, eval_every: int = 25, patience: int = 8,
            features: dict[str, bool] | None = None, feature_weight: float = 0.0,
            held_out: Sequence[Any] | None = None, stream: Iterable[Any] | None = None) -> DistillReport:
    """Train the factors of ``model`` in place against ``teacher`` on ``batches`` (see the module docstring).

    ``features``: names of modules (present in both models) whose outputs are matched too, each
    mapped to whether its channels are on the last axis; ``feature_weight`` weighs that loss.
    ``held_out``: the batches of the held-out check; by default every fourth of ``batches``.
    ``stream``: training batches to use instead of augmented ``batches`` (fresh inputs, taken as
    they come and iterated again when exhausted; a one-shot iterator that runs out ends the steps);
    its first batches, as many as ``held_out`` has, become the held-out check, and it stops early
    only after half of the steps' evaluations (at least ``patience``) in a row without a gain.
    ``lr``: Adam's step relative to each factor's RMS; ``"auto"`` chooses it by :func:`choose_lr` on
    the run's first :func:`probe_steps` batches (which the run then trains on too).
    """
    train, held = (list(batches), list(held_out)) if held_out else split_held_out(batches)
    gen = torch.Generator().manual_seed(seed)
    draws = _training_batches(train, stream, gen)
    if stream is not None and steps > 0:
        # The check runs on inputs that neither the fits nor these steps saw: the stream's first
        # batches, as many as were held out. Calibration samples that the per-layer fits were made
        # on favour the start.
        wanted, held = len(held), list(itertools.islice(draws, len(held)))
        if len(held) < wanted:
            raise UsageError(f"the distillation inputs (distill_inputs) yielded {len(held)} batches; "
                             f"its held-out check alone takes {wanted}")
    params = [p for m in low_rank_modules(model) for p in m.parameters() if p.is_floating_point()]
    trainer = _Trainer(model, teacher, metric, params, held, features if feature_weight > 0 else {}, feature_weight)
    start = trainer.held_metric()
    if stream is not None:
        inputs = getattr(stream, "description", "new inputs from distill_inputs")
    else:
        inputs = "calibration inputs, flipped and mixed up" if _is_image_batch(train[0]) else "calibration inputs"
    if not params or steps <= 0 or not math.isfinite(start):
        return DistillReport(metric, start, start, 0, batch_size(batches[0]), lr=0.0 if lr == "auto" else lr,
                             inputs=inputs)
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if stream is not None:
        # New inputs do not overfit; what stalls the check early is the first steps' transient (on
        # all-MiniLM-L6-v2 the held-out error rose for 100 steps, then fell below the start).
        patience = max(patience, steps // eval_every // 2)
    was_training = model.training
    model.eval()  # BatchNorm statistics and dropout stay as in the original
    size, done, probed = batch_size(batches[0]), 0, {}
    try:
        if lr == "auto":
            first = list(itertools.islice(draws, min(steps, probe_steps(steps))))
            lr, probed = choose_lr(trainer, first, steps)
            draws = itertools.chain(first, draws)
        kept = BestIterate(params, start, patience)
        opt = rms_adam(params, lr)
        schedule = _cosine(opt, steps)
        try:
            for step in range(steps):
                batch = next(draws, None)
                if batch is None or not trainer.step(batch, opt):  # a one-shot iterator ran out, or no finite loss
                    break
                size, done = batch_size(batch), step + 1
                schedule.step(done)
                if (done % eval_every == 0 or done == steps) and kept.update(trainer.held_metric()):
                    break
        finally:
            kept.restore()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return DistillReport(metric, start, kept.best, done, size, lr=lr, inputs=inputs,
                         lr_probe={f"{k:g}": v for k, v in probed.items()})
