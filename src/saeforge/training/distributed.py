"""Data-parallel training over torch.distributed (torchrun; NCCL on GPUs, gloo on CPU).

One process is the default and never touches torch.distributed: ``activations.ranks.init()`` returns
None unless torchrun started several processes (WORLD_SIZE > 1).

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

import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from saeforge.activations.ranks import DistContext, RankOps, all_gather_rows, all_reduce_sum
from saeforge.training.trainer import CHECKPOINT, Trainer


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
        with torch.no_grad():
            for p in self.sae.parameters():
                buf = p.detach().to(self.ctx.comm_device, copy=True)
                dist.broadcast(buf, src=0)
                p.copy_(buf.to(p.device))

    def resume(self, source=None) -> bool:
        """Rank 0 reads the checkpoint and sends it to the others (no shared filesystem needed)."""
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
        total = all_reduce_sum(
            torch.stack([norms.sum(), torch.tensor(float(len(norms)), dtype=torch.float64)]), self.ctx
        )
        return (self.sae.cfg.d_in**0.5) / (total[0] / total[1]).item()

    def _gather_rows(self, x_BD: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(x_BD, self.ctx)

    def _sync_grads(self) -> None:
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


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this ``saeforge`` command under torchrun with ``nproc`` processes on this machine.

    ``--standalone`` lets torchrun pick a free port, so two launches on one machine do not
    collide; for several machines call torchrun yourself (README, "Scaling out").
    """
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "saeforge.cli",
        *rest,
    ]
    return subprocess.run(cmd).returncode
