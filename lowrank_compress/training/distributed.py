"""This process's place in a torchrun job, and the collectives the training loop needs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LrcError
from ..evaluate import resolve_device


# Debugging aid: when set to a directory, every rank writes its final weights there as
# rank<R>.safetensors, so a distributed run can be checked for ranks that drifted apart.
RANK_STATE_ENV = "LRC_RANK_STATE_DIR"


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


def barrier(ctx: Dist) -> None:
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


class NonFiniteCheck:
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


def mean_over_ranks(loss_sum: torch.Tensor, count: int, ctx: Dist) -> float:
    total = torch.stack([loss_sum.float(), torch.tensor(float(count), device=loss_sum.device)])
    if ctx.distributed:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def dump_rank_state(model: nn.Module, ctx: Dist) -> None:
    directory = os.environ.get(RANK_STATE_ENV)
    if directory:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(directory) / f"rank{ctx.rank}.safetensors"))
