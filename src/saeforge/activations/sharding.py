"""Splitting activation work between torch.distributed ranks (see training/distributed.py).

Training: every rank keeps the one-process batcher (same chunks, same seeded shuffle, same
carried rows) and trains on its own slice of each global batch, so N processes see exactly
the rows one process would, and the batcher position in a checkpoint means the same thing
for any number of processes. Behind a live stream, each rank runs the LM on a contiguous
share of every chunk's windows and the rows are all-gathered in window order; behind a
cache, each rank reads the shard and keeps its rows (disk reads are cheap next to the LM).

Caching: ``write_cache_parallel`` gives each rank a contiguous range of windows, written as
an ordinary resumable cache in ``part-RRR/``; rank 0 then lists every part's shards, in
window order, in one top-level manifest that a one-process ``CacheReader`` reads.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator

import torch

from saeforge.activations.cache import MANIFEST, CacheError, _identity, read_manifest, write_cache
from saeforge.activations.stream import ActivationStream, hook_width, train_windows, window_activations
from saeforge.config import ActivationsConfig, DataConfig
from saeforge.io import atomic_write_text
from saeforge.training.distributed import DistContext, all_gather_rows, rank_rows


def share(n: int, ctx: DistContext) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n items (the first n % world ranks get one more)."""
    base, extra = divmod(n, ctx.world)
    lo = ctx.rank * base + min(ctx.rank, extra)
    return lo, lo + base + (ctx.rank < extra)


class RankSlice:
    """Wraps a global-batch source (stream or cache reader): yields this rank's rows of each batch.

    ``state_dict`` is the wrapped source's, i.e. the global position, the same on every rank.
    """

    def __init__(self, source, batch_size: int, ctx: DistContext):
        self.source, self.rows = source, rank_rows(batch_size, ctx)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for x_BD in self.source:
            yield x_BD[self.rows]

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.source.load_state_dict(d)

    def __getattr__(self, name):  # d_in, manifest, n_rows, ...
        return getattr(self.source, name)


class ShardedActivationStream(ActivationStream):
    """A live stream whose chunks are computed jointly: each rank runs the LM on its share of the windows."""

    def __init__(self, lm, hook_point, data_cfg: DataConfig, act_cfg: ActivationsConfig, ctx: DistContext,
                 part: str = "train", seed: int = 0):
        super().__init__(lm, hook_point, data_cfg, act_cfg, part=part, seed=seed)
        self.ctx = ctx
        self._d_in: int | None = None

    @property
    def d_in(self) -> int:
        if self._d_in is None:
            self._d_in = hook_width(self.lm, self.hook_point)
        return self._d_in

    def _load_chunk(self, chunk: int) -> torch.Tensor | None:
        # Every rank packs the same windows (tokenising is cheap); only the LM work is split.
        S = self.act_cfg.shuffle_sequences
        self._seek_windows(chunk * S)
        windows = list(itertools.islice(self._windows, S))
        self._next_window += len(windows)
        if not windows:
            return None  # the same on every rank, so no rank waits in a collective alone
        lo, hi = share(len(windows), self.ctx)
        rows = [wa.acts_STD[wa.keep_ST] for wa in window_activations(
            self.lm, self.hook_point, torch.stack(windows[lo:hi]), self.data_cfg, self.act_cfg.lm_batch_size)
        ] if hi > lo else [torch.empty(0, self.d_in, dtype=self.lm.dtype)]
        return all_gather_rows(torch.cat(rows), self.ctx)


def build_sharded_source(cfg, lm, hook_point, ctx: DistContext):
    """The training batches of this rank: its slice of every global batch, from a cache or the live LM."""
    from saeforge.training.run import build_source

    if cfg.activations.cache:
        source = build_source(cfg, lm, hook_point)
    else:
        source = ShardedActivationStream(lm, hook_point, cfg.data, cfg.activations, ctx, part="train",
                                          seed=cfg.train.seed)
    return RankSlice(source, cfg.activations.batch_size, ctx)


# ---- parallel cache writing -------------------------------------------------------------
def windows_needed(tokenizer, data_cfg: DataConfig, n_tokens: int, part: str) -> int:
    """How many packed windows hold at least ``n_tokens`` kept rows (tokenising only, no LM)."""
    from saeforge.data import excluded_mask

    rows = 0
    for i, w_T in enumerate(train_windows(tokenizer, data_cfg, part)):
        rows += int((~excluded_mask(w_T[None], tokenizer, data_cfg)).sum())
        if rows >= n_tokens:
            return i + 1
    return i + 1 if rows else 0


def part_dir(folder: Path, rank: int) -> Path:
    return folder / f"part-{rank:03d}"


def write_cache_parallel(lm, hook_point, data_cfg: DataConfig, act_cfg: ActivationsConfig, folder: str | Path,
                         n_tokens: int, ctx: DistContext, part: str = "train", progress: bool = True) -> dict:
    """Each rank caches its contiguous share of the windows; rank 0 writes one manifest over all parts.

    Resumable like ``write_cache`` (each part is one), provided it is re-run with the same number
    of processes: a part remembers its window range and refuses another one.
    """
    import torch.distributed as dist

    folder = Path(folder)
    if ctx.is_main and (folder / MANIFEST).exists() and not read_manifest(folder).get("parts"):
        raise CacheError(f"{folder} holds a one-process cache; finish it with one process or choose another folder")
    n_windows = windows_needed(lm.tokenizer, data_cfg, n_tokens, part)
    lo, hi = share(n_windows, ctx)
    if hi > lo:
        write_cache(lm, hook_point, data_cfg, act_cfg, part_dir(folder, ctx.rank), n_tokens, part=part,
                    progress=progress and ctx.is_main, window_range=(lo, hi))
    dist.barrier()  # every part is whole before rank 0 lists it
    manifest: dict = {}
    if ctx.is_main:
        manifest = _merge_parts(lm, hook_point, data_cfg, folder, n_tokens, ctx.world, part)
    dist.barrier()  # nobody returns (and reads the cache) before the manifest exists
    return manifest if ctx.is_main else read_manifest(folder)


def _merge_parts(lm, hook_point, data_cfg: DataConfig, folder: Path, n_tokens: int, world: int, part: str) -> dict:
    shards = []
    for r in range(world):
        pdir = part_dir(folder, r)
        if not (pdir / MANIFEST).exists():
            continue  # more ranks than windows: this rank had nothing to write
        m = read_manifest(pdir)
        if not m.get("complete"):
            raise CacheError(f"{pdir} is unfinished; run the same parallel `saeforge cache` command again")
        shards += [{**s, "file": f"{pdir.name}/{s['file']}"} for s in m["shards"]]
    # Part ranges are contiguous and in rank order, so the shards are in window order, as one process writes them.
    manifest = {"format_version": 1, **_identity(lm, hook_point, data_cfg, part), "shards": shards,
                "target_tokens": n_tokens, "complete": True, "parts": world,
                "n_rows": sum(s["rows"] for s in shards), "n_windows": shards[-1]["windows"][1] if shards else 0}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest
