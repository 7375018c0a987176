"""The process group as the pipeline sees it: which rank this is, and the few collectives it uses.

torchrun starts the processes (NCCL on GPUs, gloo on CPU); one process never touches torch.distributed.
The activation streams split LM work and rows between ranks with these (activations/sharding.py), the
losses see the global batch through ``RankOps``, and training/distributed.py builds the data-parallel
trainer on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from saeforge.config import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    comm_device: torch.device  # where collectives' tensors must live (cuda for NCCL, cpu for gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> DistContext | None:
    """Join the process group torchrun set up; None (and no process group) in a single process."""
    if world_size_from_env() <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(
        dist.get_rank(),
        dist.get_world_size(),
        local_rank,
        torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )


def shutdown() -> None:
    if dist.is_initialized():
        # Leave together: a rank that tears gloo down while a peer is still mid-collective (likely on a
        # loaded machine) can abort at exit with "terminate called without an active exception".
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over ranks (returns a new tensor on t's device)."""
    buf = t.to(ctx.comm_device, copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_gather_rows(x_ND: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; ranks may hold different row counts."""
    n = torch.tensor([len(x_ND)], dtype=torch.long, device=ctx.comm_device)
    counts = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    # gloo does not gather every dtype (bf16 activations): float32 holds them exactly.
    dtype = x_ND.dtype if ctx.comm_device.type == "cuda" else torch.float32
    padded = torch.zeros((max(counts), *x_ND.shape[1:]), dtype=dtype, device=ctx.comm_device)
    padded[: len(x_ND)] = x_ND
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x_ND.device, x_ND.dtype)


class RankOps:
    """``saes.base.Ranks`` over the process group: what a loss needs to see the global batch."""

    def __init__(self, ctx: DistContext):
        self.ctx, self.world = ctx, ctx.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.ctx)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        # gloo does not gather every dtype (bf16): float32 holds them exactly.
        dtype = t.dtype if self.ctx.comm_device.type == "cuda" else torch.float32
        buf = t.to(self.ctx.comm_device, dtype).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return torch.cat(parts).to(t.device, t.dtype)


def rank_rows(batch_size: int, ctx: DistContext) -> slice:
    """This rank's rows of every global batch."""
    if batch_size % ctx.world:
        raise ConfigError(
            f"activations.batch_size={batch_size} is not divisible by the {ctx.world} processes: "
            f"pass a multiple of {ctx.world} (the batch size is the global batch, split over ranks)"
        )
    b = batch_size // ctx.world
    return slice(ctx.rank * b, (ctx.rank + 1) * b)


def is_main_process() -> bool:
    """Rank 0, or a single process (for printing once under torchrun)."""
    return os.environ.get("RANK", "0") == "0"
