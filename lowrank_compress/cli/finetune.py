"""``lrc finetune``: distillation fine-tuning, or training from scratch."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..recipes import TrainConfig as _TrainConfig  # torch-free: only for the help defaults
from .app import app, out

_TD = _TrainConfig()


@app.command("finetune")
def finetune_command(
    model: Path | None = typer.Argument(None, help="The model to train: a .lrc.safetensors, or an original checkpoint with --arch. Omit with --from-scratch."),
    data: Path = typer.Option(..., "--data", help="Dataset root: DIR/train/<class>/<image>, and DIR/val/… for an evaluation after each epoch."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the trained model (.lrc.safetensors)."),
    teacher: Path | None = typer.Option(None, "--teacher", help="Original (uncompressed) model to distill from; a state dict takes --arch."),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="Train with cross-entropy only."),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML recipe of defaults (recipes/*.yaml); explicit flags override it."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture of a state-dict MODEL / teacher, or the one to build with --from-scratch."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W training input (default: the model's recorded shape, else the arch config)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow checkpoints holding pickled models (runs code from the file)."),
    from_scratch: bool | None = typer.Option(None, "--from-scratch", help="Build --arch with random init, factorize it data-free, and train it (no MODEL)."),
    method: str | None = typer.Option(None, "--method", help="Factorization for --from-scratch: nkp (default) or spectral."),
    rank: int | None = typer.Option(None, "--rank", help="--from-scratch: the same rank for every layer."),
    rank_ratio: float | None = typer.Option(None, "--rank-ratio", help="--from-scratch: rank = ratio × min(m, d) per layer."),
    param_ratio: float | None = typer.Option(None, "--param-ratio", help="--from-scratch: each layer keeps this fraction of its parameters."),
    epochs: int | None = typer.Option(None, "--epochs", help=f"Epochs (default {_TD.epochs})."),
    batch_size: int | None = typer.Option(None, "--batch-size", help=f"Global batch (images per step over all processes) (default {_TD.batch_size})."),
    lr: float | None = typer.Option(None, "--lr", help=f"Peak learning rate, used as given (a recipe's lr is scaled by batch/base_batch) (default {_TD.lr})."),
    optimizer: str | None = typer.Option(None, "--optimizer", help=f"sgd or adamw (default {_TD.optimizer})."),
    momentum: float | None = typer.Option(None, "--momentum", help=f"SGD momentum (default {_TD.momentum})."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help=f"Weight decay of weights (not biases or norms) (default {_TD.weight_decay})."),
    frobenius_decay: float | None = typer.Option(None, "--frobenius-decay", help="Penalty λ/2·‖AB‖²_F on each factorized layer's product, instead of plain decay on its factors (default off)."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help=f"Linear warm-up steps before the cosine decay (default {_TD.warmup_steps})."),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help=f"Cross-entropy label smoothing (default {_TD.label_smoothing})."),
    kd_temperature: float | None = typer.Option(None, "--kd-temperature", help=f"Distillation temperature T (default {_TD.kd_temperature})."),
    kd_weight: float | None = typer.Option(None, "--kd-weight", help=f"Weight of the KD term; CE gets 1 − weight (default {_TD.kd_weight})."),
    clip_grad: float | None = typer.Option(None, "--clip-grad", help="Clip the gradient norm to this value (default off)."),
    ema: float | None = typer.Option(None, "--ema", help="Keep an EMA of the weights with this decay; it is evaluated and written (default off)."),
    workers: int | None = typer.Option(None, "--workers", help=f"DataLoader workers per process (default {_TD.workers})."),
    seed: int | None = typer.Option(None, "--seed", help=f"Seed of data order, augmentation and init (default {_TD.seed})."),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Write a resumable checkpoint (last.pt) here at each epoch end."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Also checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --checkpoint-dir/last.pt when it exists."),
    log: Path | None = typer.Option(None, "--log", "--log-file", help="Append JSON-lines records (steps, epochs) to this file. Under torchrun spell it --log-file: torchrun takes --log as an abbreviation of its own options."),
    log_every: int | None = typer.Option(None, "--log-every", help=f"Steps between log records (default {_TD.log_every})."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many steps in total (the schedule still spans --epochs)."),
    min_crop_scale: float | None = typer.Option(None, "--min-crop-scale", help=f"RandomResizedCrop's smallest area fraction (default {_TD.min_crop_scale})."),
    hflip: float | None = typer.Option(None, "--hflip", help=f"Horizontal flip probability (default {_TD.hflip})."),
    precision: str | None = typer.Option(None, "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp16 or fp32."),
    train_split: str | None = typer.Option(None, "--train-split", help=f"Training split folder under --data (default {_TD.train_split})."),
    val_split: str | None = typer.Option(None, "--val-split", help=f"Split evaluated after each epoch, when it exists (default {_TD.val_split})."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu (under torchrun each process uses GPU LOCAL_RANK)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Fine-tune a compressed model (distillation or cross-entropy), or train one from scratch; DDP under torchrun."""
    from ..io.checks import parse_arch_kwargs, parse_input_shape
    from ..io.files import check_distinct_paths
    from ..recipes import recipe_keys
    from ..training.job import FinetuneJob, run_finetune

    check_distinct_paths(
        {"MODEL": model, "--teacher": teacher, "--data": data, "--recipe": recipe},
        {"-o": output, "--log-file": log, "--checkpoint-dir": None if checkpoint_dir is None else checkpoint_dir / "last.pt"},
    )
    given = {name: value for name, value in locals().items() if name in recipe_keys()}
    given.update(arch_kwargs=parse_arch_kwargs(arch_kwargs) or None,
                 input_shape=list(parse_input_shape(input_shape) or []) or None)
    job = FinetuneJob(
        data, output, given, recipe=recipe, model=model, teacher=teacher, no_teacher=no_teacher,
        trust_pickle=trust_pickle, checkpoint_dir=checkpoint_dir, resume=resume, log_path=log, device=device,
        show_progress=not quiet,
    )
    result = run_finetune(job)
    if os.environ.get("RANK", "0") == "0":
        val = f", val top-1 {result.val['top1']:.4f}" if result.val else ""
        stop = " (stopped at --max-steps)" if result.stopped_at_max_steps else ""
        out.print(f"wrote {result.output}: {result.steps} steps{stop}{val}", highlight=False)
