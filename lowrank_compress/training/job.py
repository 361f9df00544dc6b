"""An ``lrc finetune`` run as one checked record: the options merged with a recipe, which model to
train and from what; :func:`run_finetune` builds the models and trains."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..recipes import TrainConfig, load_recipe, resolve_options


@dataclass
class FinetuneJob:
    """Everything a fine-tuning (or from-scratch) run needs; the combinations are checked when built.

    ``options`` are the recipe-able values given explicitly (None = not given): the fields of
    :class:`TrainConfig` and the model keys of ``recipes.MODEL_KEYS``.
    """

    data: Path
    output: Path
    options: dict[str, Any]
    recipe: Path | None = None
    model: Path | None = None
    teacher: Path | None = None
    no_teacher: bool = False
    trust_pickle: bool = False
    checkpoint_dir: Path | None = None
    resume: bool = False
    log_path: Path | None = None
    device: str = "auto"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.checkpoint_dir is not None and self.checkpoint_dir.exists() and not self.checkpoint_dir.is_dir():
            raise UsageError(f"--checkpoint-dir {self.checkpoint_dir} is a file, not a folder")
        self.values = resolve_options(load_recipe(self.recipe) if self.recipe is not None else {}, self.options)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        self.config = TrainConfig(**{k: v for k, v in self.values.items() if k in names})
        if self.teacher is not None and self.no_teacher:
            raise UsageError("--teacher and --no-teacher exclude each other")
        if self.values.get("from_scratch"):
            if self.model is not None:
                raise UsageError("--from-scratch builds the model from --arch; drop MODEL")
            if not self.values.get("arch"):
                raise UsageError("--from-scratch needs --arch")
            return
        if self.model is None:
            raise UsageError("missing MODEL (or pass --from-scratch --arch SPEC)")
        if self.teacher is None and not self.no_teacher:
            raise UsageError("pass --teacher ORIGINAL to distill from the uncompressed model, or --no-teacher")
        if any(self.values.get(k) is not None for k in ("rank", "rank_ratio", "param_ratio", "method")):
            raise UsageError("--rank, --rank-ratio, --param-ratio and --method only apply with --from-scratch")

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return tuple(self.values["input_shape"]) if self.values.get("input_shape") else None


def run_finetune(job: FinetuneJob):
    """Open (or build and factorize) the student, open the teacher, and train: a ``train.TrainResult``."""
    from ..io.opening import open_model
    from ..train import build_from_scratch, finetune

    values, arch, kwargs = job.values, job.values.get("arch"), job.values.get("arch_kwargs")
    if values.get("from_scratch"):
        student = build_from_scratch(
            arch, kwargs, job.input_shape, values.get("method") or "nkp", values.get("rank"),
            values.get("rank_ratio"), values.get("param_ratio"), job.config.seed,
        )
    else:
        student = open_model(job.model, arch, kwargs, job.trust_pickle, job.input_shape)
    teacher = open_model(job.teacher, arch, kwargs, job.trust_pickle).model if job.teacher is not None else None
    return finetune(
        student, job.data, job.output, job.config, teacher=teacher, checkpoint_dir=job.checkpoint_dir,
        resume=job.resume, log_path=job.log_path, device=job.device, show_progress=job.show_progress,
    )
