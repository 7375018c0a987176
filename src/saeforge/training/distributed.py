"""Data-parallel training over torch.distributed (torchrun; NCCL on GPUs, gloo on CPU).

One process is the default and never touches torch.distributed: ``init()`` returns None unless
torchrun started several processes (WORLD_SIZE > 1).

With N processes every rank holds the same SAE and sees the same *global* batch order:
each rank's batcher is the one-process batcher (same chunks, same shuffle), and it trains on
rows ``[r*B/N, (r+1)*B/N)`` of each global batch of B = ``activations.batch_size`` rows (see
activations/sharding.py; the LM work behind a chunk is split between the ranks). Then:

- gradients are summed by an explicit all-reduce between backward and the optimiser step and
  divided by N. Every rank's loss is N times its share of the global loss, so that is the
  one-process gradient up to float rounding: for losses that are a mean over rows (ReLU + L1)
  by construction; losses that need statistics of the whole batch get them through
  ``LossContext.ranks`` (``RankOps``): FVU and AuxK (topk, batchtopk, matryoshka) divide by the
  global batch's variance (one all-reduce of D + 2 floats each), and BatchTopK / Matryoshka select
  the B * k largest activations of the global batch (an all-gather of each rank's top B * k
  values), so their inference threshold is the one-process one, identical on every rank;
- dead-latent firing counts and row counts are summed over ranks, the normalisation scale comes
  from all ranks' rows, and data-dependent init (TopK's geometric median) sees the whole first
  global batch, so the dead-latent statistics match the one-process run;
- only rank 0 writes the checkpoint and metrics.jsonl. The checkpoint holds the global batcher
  position, never a per-rank one, so a run resumes with any number of processes whose count
  divides the batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from saeforge.training.trainer import CHECKPOINT, Trainer


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
    import torch.distributed as dist

    if world_size_from_env() <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank,
                       torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        # Leave together: a rank that tears gloo down while a peer is still mid-collective (likely on a
        # loaded machine) can abort at exit with "terminate called without an active exception".
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over ranks (returns a new tensor on t's device)."""
    import torch.distributed as dist

    buf = t.to(ctx.comm_device, copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_gather_rows(x_ND: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; ranks may hold different row counts."""
    import torch.distributed as dist

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
        import torch.distributed as dist

        # gloo does not gather every dtype (bf16): float32 holds them exactly.
        dtype = t.dtype if self.ctx.comm_device.type == "cuda" else torch.float32
        buf = t.to(self.ctx.comm_device, dtype).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return torch.cat(parts).to(t.device, t.dtype)


def rank_rows(batch_size: int, ctx: DistContext) -> slice:
    """This rank's rows of every global batch."""
    if batch_size % ctx.world:
        raise ValueError(f"activations.batch_size={batch_size} is not divisible by the {ctx.world} processes: "
                         f"pass a multiple of {ctx.world} (the batch size is the global batch, split over ranks)")
    b = batch_size // ctx.world
    return slice(ctx.rank * b, (ctx.rank + 1) * b)


class DataParallelTrainer(Trainer):
    """A Trainer whose step is one global batch split over the ranks (see the module docstring)."""

    def __init__(self, sae, cfg, batch_size: int, run_dir: str | Path | None, ctx: DistContext, progress: bool = True):
        # batch_size is the global batch: n_steps, logged token counts and the schedules match one process.
        super().__init__(sae, cfg, batch_size, run_dir if ctx.is_main else None, progress=progress and ctx.is_main)
        self.ctx = ctx
        self.ranks = RankOps(ctx)
        self.checkpoint_dir = Path(run_dir) if run_dir else None
        self._broadcast_parameters()

    def _broadcast_parameters(self) -> None:
        # Seeded init already agrees; broadcasting makes it a guarantee (e.g. inits on different GPUs).
        import torch.distributed as dist

        with torch.no_grad():
            for p in self.sae.parameters():
                buf = p.detach().to(self.ctx.comm_device, copy=True)
                dist.broadcast(buf, src=0)
                p.copy_(buf.to(p.device))

    def resume(self, source=None) -> bool:
        """Rank 0 reads the checkpoint and sends it to the others (no shared filesystem needed)."""
        import torch.distributed as dist

        box: list = [None]
        if self.ctx.is_main and self.checkpoint_dir and (self.checkpoint_dir / CHECKPOINT).exists():
            box[0] = torch.load(self.checkpoint_dir / CHECKPOINT, map_location="cpu", weights_only=True)
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return False
        self.load_state_dict(box[0])
        if source is not None and self.source_state is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(self.source_state)
        if self.ctx.is_main:
            self._truncate_log()
        return True

    # The Trainer's data-parallel hooks.
    def _estimate_scale(self, batches: list[torch.Tensor]) -> float:
        if not self.cfg.normalize_activations:
            return 1.0
        norms = torch.cat(batches).double().norm(dim=-1)
        total = all_reduce_sum(torch.stack([norms.sum(), torch.tensor(float(len(norms)), dtype=torch.float64)]),
                               self.ctx)
        return (self.sae.cfg.d_in ** 0.5) / (total[0] / total[1]).item()

    def _gather_rows(self, x_BD: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(x_BD, self.ctx)

    def _sync_grads(self) -> None:
        import torch.distributed as dist

        # One flat buffer: one collective per step instead of one per parameter.
        params = [p for p in self.sae.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params]).to(self.ctx.comm_device)
        dist.all_reduce(flat)
        flat = flat.to(params[0].grad.device) / self.ctx.world
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def _sum_over_ranks(self, fires_F: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
        both = all_reduce_sum(torch.cat([fires_F.long(), torch.tensor([n_rows], device=fires_F.device)]), self.ctx)
        return both[:-1], int(both[-1])


def is_main_process() -> bool:
    """Rank 0, or a single process (for printing once under torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this ``saeforge`` command under torchrun with ``nproc`` processes on this machine.

    ``--standalone`` lets torchrun pick a free port, so two launches on one machine do not
    collide; for several machines call torchrun yourself (README, "Scaling out").
    """
    import subprocess
    import sys

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "saeforge.cli", *rest]
    return subprocess.run(cmd).returncode
