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
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
from .errors import UsageError
from .evaluate import evaluate
from .io.files import check_writable
from .io.format import manifest_of, save
from .layers import low_rank_modules
from .losses import distillation_loss
from .recipes import TrainConfig
from .training.distributed import (
    Dist, NonFiniteCheck, barrier, distributed_context, dump_rank_state, mean_over_ranks, sync_buffers,
)
from .training.parts import (
    Notes, RunLog, frobenius_penalty, lr_schedule, model_ema, num_outputs, parameter_groups, precision_dtype, progress_bar,
)
from .training.state import (
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Position, Trainables, checkpoint_path, read_on_rank0, restore, rng_state,
    save_checkpoint, seed_everything,
)


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
    if not (student.arch or getattr(manifest_of(student.model), "arch", None)):
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
    autocast_dtype = precision_dtype(config.precision, device)
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
    classes = num_outputs(model, data_config["input_size"], device)
    if images.num_classes > classes:
        raise UsageError(
            f"{train_folder} has class index {images.num_classes - 1} but the model predicts {classes} classes"
        )
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
        teacher_classes = num_outputs(teacher, data_config["input_size"], device)
        if teacher_classes != classes:
            raise UsageError(f"the teacher predicts {teacher_classes} classes, the model {classes}")
    factors = low_rank_modules(model) if config.frobenius_decay > 0 else []
    groups = parameter_groups(model, config.weight_decay, config.frobenius_decay)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    scheduler = lr_schedule(optimizer, config.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    ema = model_ema(model, config.ema) if config.ema is not None else None

    trainables = Trainables(model, optimizer, scheduler, scaler, ema)
    ckpt_file = checkpoint_path(checkpoint_dir) if checkpoint_dir is not None else None
    log = RunLog(log_path, ctx.main)
    note = Notes(ctx.main)
    state = read_on_rank0(ckpt_file, ctx) if resume and ckpt_file is not None else None
    if state is not None:
        pos, skip = restore(trainables, state, config, ctx)
        note(f"resumed from {ckpt_file} at step {pos.global_step} (epoch {pos.epoch + 1}, batch {pos.step_in_epoch})")
        log.write(event="resume", step=pos.global_step, epoch=pos.epoch + 1, step_in_epoch=pos.step_in_epoch)
    else:
        if resume:
            note(f"no checkpoint at {ckpt_file}; starting from the beginning")
        pos, skip = Position(), 0
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
    nonfinite = NonFiniteCheck(ctx)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    stop_at = min(total_steps, config.max_steps) if config.max_steps is not None else total_steps
    last_loss: float | None = None
    val_result: dict[str, Any] | None = None
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        with progress_bar(show_progress and ctx.main) as progress:
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
                    scheduler.step_update(pos.global_step + 2)  # the LR of the next step
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
                        last_loss = mean_over_ranks(loss_sum, loss_count, ctx)
                        elapsed = time.perf_counter() - interval_start
                        speed = interval_steps * config.batch_size / max(elapsed, 1e-9)
                        lr = optimizer.param_groups[0]["lr"]
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
        dump_rank_state(final_model, ctx)
        if ctx.main:
            input_shape = student.input_shape or (1, *data_config["input_size"])
            fields = {"arch": student.arch, "arch_kwargs": student.arch_kwargs, "input_shape": list(input_shape),
                      "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}}
            save(_export(final_model), output, manifest_of(student.model), **fields)
            log.write(event="end", step=pos.global_step, output=str(output), stopped_at_max_steps=stopped)
        barrier(ctx)
    finally:
        log.close()
    return TrainResult(pos.global_step, pos.epoch, last_loss, val_result, output, stopped)


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
