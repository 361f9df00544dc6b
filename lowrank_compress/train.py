"""Fine-tuning and from-scratch training of (compressed) image classifiers, on one device or many.

One function, :func:`finetune`, trains a model on ``DIR/train/<class>/<image>`` with cross-entropy or
knowledge distillation from a teacher, and writes a ``.lrc.safetensors``. Launched by ``torchrun`` it
runs data-parallel (DDP; NCCL on CUDA, gloo on CPU) — ranks, world size and the rendezvous come
from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so the same code runs
on one node or several.

Batch size is global: ``batch_size`` images per optimizer step across all ranks, split evenly.

Determinism and resumption: the data order is DistributedSampler's (seed, epoch), augmentation is
seeded per sample (see ``data``), and a checkpoint holds every piece of state that influences later
steps — model, optimizer, LR schedule, grad scaler, EMA, position (epoch, batches done in it) and
each rank's RNG states. ``resume`` therefore continues exactly where the run stopped, mid-epoch
included: a run stopped and resumed ends with the same weights as one that was never stopped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .io.records import LoadedModel
from .data import (
    ImageFolder,
    SeededAugmentFolder,
    TrainSampler,
    eval_loader,
    make_loader,
    resolve_data_config,
    split_dir,
    train_transform,
)
from .errors import LrcError, UsageError
from .evaluate import evaluate, resolve_device
from .io.files import atomic_output, check_writable
from .layers import low_rank_modules
from .losses import distillation_loss
from .recipes import TrainConfig

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "lrc-train-checkpoint"
CHECKPOINT_VERSION = 1
# Debugging aid: when set to a directory, every rank writes its final weights there as
# rank<R>.safetensors, so a distributed run can be checked for ranks that drifted apart.
RANK_STATE_ENV = "LRC_RANK_STATE_DIR"


@dataclass
class TrainResult:
    """What a run did: steps taken (in total, resumed ones included), the last logged train loss,
    the last validation figures (None without a val split) and the written output."""

    steps: int
    epochs_completed: int
    train_loss: float | None
    val: dict[str, Any] | None
    output: Path
    stopped_at_max_steps: bool


# ---------------------------------------------------------------- distributed context


@dataclass
class Dist:
    """This process's place in the job: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[Dist]:
    """Join the torchrun job described by the environment (or run alone) and leave it on exit.

    ``device``: "auto" (CUDA when available, else CPU), "cuda" or "cpu". Under torchrun each rank
    uses GPU LOCAL_RANK. The process group is created here only when WORLD_SIZE > 1 and destroyed on
    exit, errors included, so a failing rank does not leave the others hanging in a collective.
    """
    use_cuda = resolve_device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    created = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        created = True
    try:
        yield Dist(rank, world_size, local_rank, dev)
    finally:
        if created:
            dist.destroy_process_group()


def _barrier(ctx: Dist) -> None:
    if ctx.distributed:
        dist.barrier()


def sync_buffers(module: nn.Module, ctx: Dist) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, as DDP does before each forward.

    Each rank's last forward updated its buffers from its own batch; after this all ranks hold the
    buffers that rank 0 evaluates and saves.
    """
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------- randomness


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global generators' states, made of tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """Lists back to tuples (random.setstate needs tuples; some serializers turn them into lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- losses and regularizers


def frobenius_penalty(modules: list[nn.Module]) -> torch.Tensor:
    """Σ over factorized modules of ‖A B‖²_F, A = up weight (m, r), B = down weight flattened (r, d).

    Computed as Σ (AᵀA) ∘ (B Bᵀ) = tr(AᵀA B Bᵀ): r×r products instead of the m×d matrix. Float32.
    """
    total = torch.zeros((), device=modules[0].up.weight.device)
    for module in modules:
        a = module.up.weight.float().reshape(module.up.weight.shape[0], -1)
        b = module.down.weight.float().reshape(a.shape[1], -1)
        total = total + ((a.T @ a) * (b @ b.T)).sum()
    return total


def parameter_groups(model: nn.Module, weight_decay: float, frobenius_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: weights with decay; biases and norm parameters (1-D) without; factor weights
    without plain decay when Frobenius decay regularizes their product instead (Khodak et al. 2021)."""
    factors = {id(p) for m in low_rank_modules(model) for p in (m.up.weight, m.down.weight)}
    decay, no_decay, factor = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in factors:
            factor.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": factor, "weight_decay": 0.0 if frobenius_decay > 0 else weight_decay},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at 0-based ``step``: linear warm-up to 1 over ``warmup_steps``, then cosine to 0
    at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ModelEma:
    """Exponential moving average of a model's parameters (buffers are copied).

    After each step: ema ← decay·ema + (1 − decay)·param. The copy lives on the model's device,
    in eval mode, without gradients.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


# ---------------------------------------------------------------- checkpoints


@dataclass
class _Position:
    """Where a run is: epoch (0-based), batches done in it, optimizer steps done in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class _Trainables:
    """The objects whose state a checkpoint holds, besides the position and the RNGs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEma | None

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise UsageError("the checkpoint was written without --ema; resume without it or start afresh")
            self.ema.module.load_state_dict(state["ema"])



def checkpoint_path(directory: str | Path) -> Path:
    """Where a run's resumable checkpoint lives: ``DIR/last.pt``."""
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a crash never leaves half a checkpoint."""
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    The file holds only tensors and plain values, so nothing in it can run code when loaded.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read checkpoint {path} ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not an lrc training checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise UsageError(
            f"{path} is a checkpoint version {state['version']}; this lrc reads up to {CHECKPOINT_VERSION}"
        )
    return state


# ---------------------------------------------------------------- the run


class _Log:
    """JSON-lines log (rank 0 only), appended to so a resumed run continues the same file.

    One object per line, each with ``time`` (Unix seconds) and ``event``: ``start`` (world_size,
    device, config, steps_per_epoch, total_steps), ``resume`` (step, epoch, step_in_epoch), ``step``
    (step, epoch, loss = mean over ranks and steps since the last record, lr, images_per_s),
    ``epoch`` (epoch, step, train_loss, val_top1/val_top5/val_samples when a val split exists) and
    ``end`` (step, output, stopped_at_max_steps). Epochs count from 1, steps are optimizer steps.
    """

    def __init__(self, path: str | Path | None, enabled: bool) -> None:
        self.file = open(path, "a") if (path is not None and enabled) else None

    def write(self, **record: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def _num_outputs(model: nn.Module, input_size: tuple[int, ...], device: torch.device) -> int:
    """The number of logits the model returns for one input of ``input_size`` (C, H, W)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    if out.ndim != 2:
        raise UsageError(f"the model returned shape {tuple(out.shape)}, not (batch, classes) logits")
    return out.shape[1]


def _export(module: nn.Module) -> nn.Module:
    """A CPU copy in the default memory format (safetensors stores contiguous tensors)."""
    return copy.deepcopy(module).to("cpu", memory_format=torch.contiguous_format)


def finetune(
    student: LoadedModel,
    data_dir: str | Path,
    output: str | Path,
    config: TrainConfig,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    log_path: str | Path | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> TrainResult:
    """Train ``student`` on ``data_dir/<train_split>`` and write it to ``output`` (.lrc.safetensors).

    With ``teacher`` the loss is :func:`distillation_loss`, else label-smoothed cross-entropy. Each
    epoch ends with an evaluation on ``data_dir/<val_split>`` when that folder exists, and with a
    checkpoint when ``checkpoint_dir`` is given (also every ``checkpoint_every`` steps). ``resume``
    continues from ``checkpoint_dir/last.pt`` when it exists. The written model is the EMA when
    ``config.ema`` is set. Raises LrcError naming the step when the loss becomes NaN or Inf.
    """
    output = check_writable(output)
    if not (student.arch or (getattr(student.model, "lrc_manifest", None) or {}).get("arch")):
        raise UsageError(
            "the model's architecture spec is unknown (a pickled module has none), so the output could not be "
            "rebuilt; save the weights as a state dict and pass --arch"
        )
    if resume and checkpoint_dir is None:
        raise UsageError("--resume needs --checkpoint-dir (where the checkpoint to resume from is)")
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    if log_path is not None:
        check_writable(log_path)
    train_folder = split_dir(data_dir, config.train_split)
    val_folder = Path(data_dir) / config.val_split
    data_config = resolve_data_config(student)

    with distributed_context(device) as ctx:
        if config.batch_size % ctx.world_size:
            raise UsageError(
                f"--batch-size {config.batch_size} (global) is not divisible by the {ctx.world_size} processes"
            )
        return _run(student, train_folder, val_folder, output, config, teacher, checkpoint_dir, resume,
                    log_path, show_progress, data_config, ctx)


def _run(
    student: LoadedModel,
    train_folder: Path,
    val_folder: Path,
    output: Path,
    config: TrainConfig,
    teacher: nn.Module | None,
    checkpoint_dir: str | Path | None,
    resume: bool,
    log_path: str | Path | None,
    show_progress: bool,
    data_config: dict[str, Any],
    ctx: Dist,
) -> TrainResult:
    """The body of :func:`finetune` inside the distributed context."""
    device = ctx.device
    cuda = device.type == "cuda"
    autocast_dtype = _autocast_dtype(config.precision, device)
    if cuda:
        torch.backends.cudnn.benchmark = True
    seed_everything(config.seed + ctx.rank)

    # Data: this rank's shard of a seeded order; augmentation seeded per sample.
    images = ImageFolder(train_folder, channels=data_config["input_size"][0])
    timm_arch = (student.arch or "").startswith("timm:")
    augment = train_transform(data_config, timm_arch, config.min_crop_scale, config.hflip)
    dataset = SeededAugmentFolder(images, augment, config.seed)
    sampler = TrainSampler(dataset, ctx.world_size, ctx.rank, config.seed)
    per_rank_batch = config.batch_size // ctx.world_size
    loader = make_loader(dataset, per_rank_batch, sampler, config.workers, device, drop_last=True, seed=config.seed)
    steps_per_epoch = sampler.num_samples // per_rank_batch
    if steps_per_epoch == 0:
        raise UsageError(
            f"{train_folder} has {len(images)} images, fewer than one batch of {config.batch_size}; lower --batch-size"
        )
    total_steps = config.epochs * steps_per_epoch
    val = (
        eval_loader(val_folder, data_config, per_rank_batch, config.workers, device, ctx.world_size, ctx.rank)
        if val_folder.is_dir() else None
    )

    # Models.
    memory_format = torch.channels_last if cuda else torch.preserve_format
    model = student.model.to(device, memory_format=memory_format).train()
    classes = _num_outputs(model, data_config["input_size"], device)
    if images.num_classes > classes:
        raise UsageError(
            f"{train_folder} has class index {images.num_classes - 1} but the model predicts {classes} classes"
        )
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
        teacher_classes = _num_outputs(teacher, data_config["input_size"], device)
        if teacher_classes != classes:
            raise UsageError(f"the teacher predicts {teacher_classes} classes, the model {classes}")
    factors = low_rank_modules(model) if config.frobenius_decay > 0 else []
    groups = parameter_groups(model, config.weight_decay, config.frobenius_decay)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, total_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    ema = ModelEma(model, config.ema) if config.ema is not None else None

    trainables = _Trainables(model, optimizer, scheduler, scaler, ema)
    ckpt_file = checkpoint_path(checkpoint_dir) if checkpoint_dir is not None else None
    log = _Log(log_path, ctx.main)
    note = _Notes(ctx.main)
    state = _read_on_rank0(ckpt_file, ctx) if resume and ckpt_file is not None else None
    if state is not None:
        pos, skip = _restore(trainables, state, config, ctx)
        note(f"resumed from {ckpt_file} at step {pos.global_step} (epoch {pos.epoch + 1}, batch {pos.step_in_epoch})")
        log.write(event="resume", step=pos.global_step, epoch=pos.epoch + 1, step_in_epoch=pos.step_in_epoch)
    else:
        if resume:
            note(f"no checkpoint at {ckpt_file}; starting from the beginning")
        pos, skip = _Position(), 0
        log.write(event="start", world_size=ctx.world_size, device=str(device), config=asdict(config),
                  steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    train_model: nn.Module = model
    if ctx.distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    def write_checkpoint() -> None:
        # Every rank's generators: each drew its own stream (dropout, …) and resumes it.
        rngs: list[Any] = [None] * ctx.world_size
        if ctx.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if ctx.main and ckpt_file is not None:
            save_checkpoint(ckpt_file, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **trainables.state_dict(),
                **asdict(pos), "samples_seen": pos.step_in_epoch * config.batch_size,
                "steps_per_epoch": steps_per_epoch, "world_size": ctx.world_size, "batch_size": config.batch_size,
                "rng": rngs, "config": asdict(config),
            })

    final_model = ema.module if ema is not None else model
    nonfinite = _NonFiniteCheck(ctx)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    stop_at = min(total_steps, config.max_steps) if config.max_steps is not None else total_steps
    last_loss: float | None = None
    val_result: dict[str, Any] | None = None
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        with _progress(show_progress and ctx.main) as progress:
            task = progress.add_task(
                "training", total=stop_at, completed=min(pos.global_step, stop_at), loss="–", lr="–", speed="–"
            )
            while pos.epoch < config.epochs and pos.global_step < stop_at:
                sampler.set_position(pos.epoch, skip)
                skip = 0
                train_model.train()
                for inputs, labels in loader:
                    inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
                    labels = labels.to(device, non_blocking=True)
                    with autocast():
                        logits = train_model(inputs)
                        teacher_logits = None
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(inputs)
                    loss = distillation_loss(logits, labels, teacher_logits, config.kd_temperature,
                                             config.kd_weight, config.label_smoothing)
                    if factors:
                        loss = loss + 0.5 * config.frobenius_decay * frobenius_penalty(factors)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if config.clip_grad is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    if ema is not None:
                        ema.update(model)
                    pos.global_step += 1
                    pos.step_in_epoch += 1
                    # The finiteness flag of this step is read one step later, so the host does not wait
                    # for the device every step; checkpoints and the end force the read first.
                    nonfinite.push(pos.global_step, loss)
                    loss_sum += loss.detach().float()
                    loss_count += 1
                    interval_steps += 1
                    progress.advance(task)
                    epoch_done = pos.step_in_epoch == steps_per_epoch
                    if pos.global_step % config.log_every == 0 or pos.global_step == stop_at or epoch_done:
                        nonfinite.flush()
                        last_loss = _mean_over_ranks(loss_sum, loss_count, ctx)
                        elapsed = time.perf_counter() - interval_start
                        speed = interval_steps * config.batch_size / max(elapsed, 1e-9)
                        lr = scheduler.get_last_lr()[0]
                        progress.update(task, loss=f"{last_loss:.4f}", lr=f"{lr:.3g}", speed=f"{speed:,.0f}")
                        log.write(event="step", step=pos.global_step, epoch=pos.epoch + 1, loss=last_loss, lr=lr,
                                  images_per_s=speed)
                        loss_sum.zero_()
                        loss_count = 0
                        interval_start, interval_steps = time.perf_counter(), 0
                    if pos.global_step >= stop_at:
                        break
                    # A checkpoint due at an epoch's last step is written after its evaluation instead.
                    if config.checkpoint_every and pos.global_step % config.checkpoint_every == 0 and not epoch_done:
                        nonfinite.flush()
                        write_checkpoint()
                nonfinite.flush()
                if pos.step_in_epoch < steps_per_epoch:
                    break  # stopped at max_steps mid-epoch
                sync_buffers(model, ctx)
                if val is not None:
                    if ema is not None:
                        sync_buffers(ema.module, ctx)
                    val_result = evaluate(final_model, val, device, channels_last=cuda)
                    note(f"epoch {pos.epoch + 1}/{config.epochs}: train loss {last_loss:.4f}, "
                         f"val top-1 {val_result['top1']:.4f}, top-5 {val_result['top5']:.4f}")
                log.write(event="epoch", epoch=pos.epoch + 1, step=pos.global_step, train_loss=last_loss,
                          **({f"val_{k}": v for k, v in val_result.items()} if val_result else {}))
                write_checkpoint()
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                interval_start, interval_steps = time.perf_counter(), 0
        nonfinite.flush()
        stopped = pos.global_step < total_steps
        if stopped and pos.step_in_epoch > 0:  # a stop at an epoch end already has its checkpoint
            write_checkpoint()
        sync_buffers(model, ctx)
        if ema is not None:
            sync_buffers(ema.module, ctx)
        _dump_rank_state(final_model, ctx)
        if ctx.main:
            input_shape = student.input_shape or (1, *data_config["input_size"])
            fields = {"arch": student.arch, "arch_kwargs": student.arch_kwargs, "input_shape": list(input_shape),
                      "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}}
            from .io.format import save

            save(_export(final_model), output, **fields)
            log.write(event="end", step=pos.global_step, output=str(output), stopped_at_max_steps=stopped)
        _barrier(ctx)
    finally:
        log.close()
    return TrainResult(pos.global_step, pos.epoch, last_loss, val_result, output, stopped)


def _read_on_rank0(ckpt_file: Path, ctx: Dist) -> dict[str, Any] | None:
    """The checkpoint as rank 0 reads it (None when there is none), sent to every rank.

    Only rank 0 writes checkpoints, so only its node needs the directory: other nodes of a
    multi-node job receive the state over the process group. A read error is raised on every rank.
    """
    state, error = None, None
    if ctx.main and ckpt_file.exists():
        try:
            state = load_checkpoint(ckpt_file)
        except UsageError as exc:
            error = str(exc)
    if ctx.distributed:
        shared = [state, error]
        dist.broadcast_object_list(shared, src=0)
        state, error = shared
    if error is not None:
        raise UsageError(error)
    return state


def _restore(trainables: _Trainables, state: dict[str, Any], config: TrainConfig, ctx: Dist) -> tuple[_Position, int]:
    """Load a checkpoint's state into ``trainables``; returns the position and this rank's samples to skip.

    With the same world size and global batch the RNG states and the data position are restored
    exactly; otherwise the run continues from the same step with fresh generators (and says so).
    """
    trainables.load_state_dict(state)
    pos = _Position(state["epoch"], state["step_in_epoch"], state["global_step"])
    if state["world_size"] == ctx.world_size and state["batch_size"] == config.batch_size:
        set_rng_state(state["rng"][ctx.rank])
    else:
        seed_everything(config.seed + ctx.rank + pos.global_step)
        _Notes(ctx.main)(
            f"resuming with {ctx.world_size} processes × batch {config.batch_size} (the checkpoint was "
            f"{state['world_size']} × {state['batch_size']}): continuing approximately, not bit-exactly"
        )
    samples_seen = state["samples_seen"]
    if pos.step_in_epoch >= state["steps_per_epoch"]:
        pos, samples_seen = _Position(pos.epoch + 1, 0, pos.global_step), 0
    return pos, samples_seen // ctx.world_size


class _Notes:
    """One-line messages to stderr from rank 0."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True) if enabled else None

    def __call__(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, markup=False)


class _NonFiniteCheck:
    """Stops the run at the first step whose loss is NaN or Inf on any rank.

    Each step's flag is reduced over ranks (so every rank stops at the same step and none waits
    in a collective for a rank that left) and read at the next ``push`` or ``flush``.
    """

    def __init__(self, ctx: Dist) -> None:
        self.ctx = ctx
        self.pending: tuple[int, torch.Tensor] | None = None

    def push(self, step: int, loss: torch.Tensor) -> None:
        flag = (~torch.isfinite(loss.detach())).to(torch.int32)
        if self.ctx.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.flush()
        self.pending = (step, flag)

    def flush(self) -> None:
        if self.pending is not None:
            step, flag = self.pending
            self.pending = None
            if flag.item():
                raise LrcError(
                    f"the loss is NaN or Inf at step {step}; nothing after the last checkpoint was kept "
                    "(try a lower --lr, --clip-grad, or --precision fp32)"
                )


def _mean_over_ranks(loss_sum: torch.Tensor, count: int, ctx: Dist) -> float:
    total = torch.stack([loss_sum.float(), torch.tensor(float(count), device=loss_sum.device)])
    if ctx.distributed:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def _dump_rank_state(model: nn.Module, ctx: Dist) -> None:
    directory = os.environ.get(RANK_STATE_ENV)
    if directory:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(directory) / f"rank{ctx.rank}.safetensors"))


# ---------------------------------------------------------------- from scratch


def build_from_scratch(
    arch: str,
    arch_kwargs: dict[str, Any] | None,
    input_shape: tuple[int, ...] | None,
    method: str,
    rank: int | None,
    rank_ratio: float | None,
    param_ratio: float | None,
    seed: int,
) -> LoadedModel:
    """A randomly initialised ``arch``, factorized data-free by ``compress`` (the paper's setting).

    The random init is fixed by ``seed``, so every rank of a distributed run builds the same model.
    ``input_shape`` (N, C, H, W) defaults to the arch's config. Exactly one of rank / rank_ratio /
    param_ratio must be given (README: rank policies).
    """
    from .io.archspec import build_model
    from .io.dataconfig import data_config, default_input_shape
    from .compress import CompressConfig, compress

    policies = (("--rank", rank), ("--rank-ratio", rank_ratio), ("--param-ratio", param_ratio))
    chosen = [name for name, value in policies if value is not None]
    if len(chosen) != 1:
        raise UsageError("--from-scratch needs exactly one of --rank, --rank-ratio, --param-ratio"
                         + (f" (got {', '.join(chosen)})" if chosen else ""))
    seed_everything(seed)
    model = build_model(arch, arch_kwargs)
    shape = input_shape or default_input_shape(arch, model)
    if shape is None:
        raise UsageError(f"cannot tell the input shape of {arch}; pass --input-shape N,C,H,W")
    model.eval()
    compressed, _ = compress(
        model, CompressConfig(method=method, rank=rank, rank_ratio=rank_ratio, param_ratio=param_ratio),
        torch.zeros(shape),
    )
    return LoadedModel(
        model=compressed, arch=arch, arch_kwargs=dict(arch_kwargs or {}), input_shape=tuple(shape),
        data_config=data_config(arch, compressed),
    )
