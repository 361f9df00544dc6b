"""What a resumable training checkpoint holds: the trainables, the position and every rank's random state.

Checkpoints are written atomically and read with ``weights_only=True``: nothing in one can run code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError
from ..io.files import atomic_output
from ..recipes import TrainConfig
from .distributed import Dist
from .parts import Notes


CHECKPOINT_NAME = "last.pt"


CHECKPOINT_FORMAT = "lrc-train-checkpoint"


CHECKPOINT_VERSION = 1


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


@dataclass
class Position:
    """Where a run is: epoch (0-based), batches done in it, optimizer steps done in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class Trainables:
    """The objects whose state a checkpoint holds, besides the position and the RNGs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm's CosineLRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None  # timm's ModelEmaV3

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


def read_on_rank0(ckpt_file: Path, ctx: Dist) -> dict[str, Any] | None:
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


def restore(trainables: Trainables, state: dict[str, Any], config: TrainConfig, ctx: Dist) -> tuple[Position, int]:
    """Load a checkpoint's state into ``trainables``; returns the position and this rank's samples to skip.

    With the same world size and global batch the RNG states and the data position are restored
    exactly; otherwise the run continues from the same step with fresh generators (and says so).
    """
    trainables.load_state_dict(state)
    pos = Position(state["epoch"], state["step_in_epoch"], state["global_step"])
    trainables.scheduler.step_update(pos.global_step + 1)
    if state["world_size"] == ctx.world_size and state["batch_size"] == config.batch_size:
        set_rng_state(state["rng"][ctx.rank])
    else:
        seed_everything(config.seed + ctx.rank + pos.global_step)
        Notes(ctx.main)(
            f"resuming with {ctx.world_size} processes × batch {config.batch_size} (the checkpoint was "
            f"{state['world_size']} × {state['batch_size']}): continuing approximately, not bit-exactly"
        )
    samples_seen = state["samples_seen"]
    if pos.step_in_epoch >= state["steps_per_epoch"]:
        pos, samples_seen = Position(pos.epoch + 1, 0, pos.global_step), 0
    return pos, samples_seen // ctx.world_size
