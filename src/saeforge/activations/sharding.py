"""Splitting activation work between torch.distributed ranks (see activations/ranks.py).

Training: every rank keeps the one-process batcher (same chunks, same seeded shuffle, same
carried rows) and trains on its own slice of each global batch, so N processes see exactly
the rows one process would, and the batcher position in a checkpoint means the same thing
for any number of processes. Behind a live stream, each rank runs the LM on a contiguous
share of every chunk's windows and the rows are all-gathered in window order; behind a
cache, each rank reads the shard and keeps its rows (disk reads are cheap next to the LM).

Hook-parallel (sweeps, training/sweep.py): each rank owns some SAEs and needs only their hooks'
columns, but for the whole global batch. ``HookParallelStream`` runs the LM on the rank's share
of each chunk's windows for every hook of the sweep, then one ``all_to_all_single`` sends each
rank exactly its columns of every other rank's rows (gloo takes uneven splits there; its list
``all_to_all`` wants equal sizes). The batcher then shuffles these narrower rows with the
one-process permutation, so a rank's batches are the one-process batches' columns.

Caching: ``write_cache_parallel`` gives each rank a contiguous range of windows, written as
an ordinary resumable cache in ``part-RRR/``; rank 0 then lists every part's shards, in
window order, in one top-level manifest that a one-process ``CacheReader`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from saeforge.activations.batcher import ShuffledBatcher
from saeforge.activations.cache import MANIFEST, CacheError, _identity, read_manifest, write_cache
from saeforge.activations.ranks import DistContext, all_gather_rows, rank_rows
from saeforge.activations.stream import (
    ActivationStream,
    columns_of,
    hook_width,
    hook_widths,
    train_windows,
)
from saeforge.config import ActivationsConfig, DataConfig
from saeforge.data import excluded_mask
from saeforge.io import atomic_write_text


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

    def __init__(
        self,
        lm,
        hook_point,
        data_cfg: DataConfig,
        act_cfg: ActivationsConfig,
        ctx: DistContext,
        part: str = "train",
        seed: int = 0,
    ):
        super().__init__(lm, hook_point, data_cfg, act_cfg, part=part, seed=seed)
        self.ctx = ctx
        self._d_in: int | None = None

    @property
    def d_in(self) -> int:
        if self._d_in is None:
            self._d_in = hook_width(self.lm, self.hook_point)
        return self._d_in

    def _load_chunk(self, chunk: int, rows_wanted: int | None = None) -> torch.Tensor | None:
        # Every rank packs the same windows (tokenising is cheap); only the LM work is split.
        windows = self._chunk_windows(chunk, rows_wanted)
        if not windows:
            return None  # the same on every rank, so no rank waits in a collective alone
        lo, hi = share(len(windows), self.ctx)
        rows_ND = self._rows_of(windows[lo:hi]) if hi > lo else torch.empty(0, self.d_in, dtype=self.lm.dtype)
        return all_gather_rows(rows_ND, self.ctx)


class HookParallelStream(ActivationStream):
    """A live stream over several hooks of which this rank keeps only ``keep`` (hook names), for every row.

    Every rank runs the LM on its share of each chunk's windows (all hooks: another rank may need
    them), then ``all_to_all_single`` delivers to each rank its hooks' columns of all ranks' rows in
    window order. ``received_widths`` records the row widths this rank was actually sent.
    """

    def __init__(
        self,
        lm,
        hook_points,
        keep: list[str],
        data_cfg: DataConfig,
        act_cfg: ActivationsConfig,
        ctx: DistContext,
        part: str = "train",
        seed: int = 0,
    ):
        super().__init__(lm, hook_points, data_cfg, act_cfg, part=part, seed=seed)
        self.ctx, self.keep = ctx, list(keep)
        self.received_widths: set[int] = set()
        self._all: dict[str, slice] | None = None
        self._wanted: list[list[str]] | None = None

    @property
    def all_columns(self) -> dict[str, slice]:
        """Columns of the full rows the LM produces (every hook of the sweep)."""
        if self._all is None:
            names = [p.name for p in self.hook_points]
            self._all = columns_of(names, hook_widths(self.lm, self.hook_points))
            unknown = set(self.keep) - set(names)
            if unknown:
                raise ValueError(f"hooks {sorted(unknown)} are not among the stream's hooks {names}")
        return self._all

    @property
    def columns(self) -> dict[str, slice]:
        names = [n for n in self.all_columns if n in self.keep]  # the stream's hook order
        return columns_of(names, [self.all_columns[n].stop - self.all_columns[n].start for n in names])

    @property
    def d_in(self) -> int:
        return sum(s.stop - s.start for s in self.columns.values())

    def _index(self, names: list[str]) -> torch.Tensor:
        cols = [
            torch.arange(self.all_columns[n].start, self.all_columns[n].stop) for n in self.all_columns if n in names
        ]
        return torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)

    def _load_chunk(self, chunk: int, rows_wanted: int | None = None) -> torch.Tensor | None:
        import torch.distributed as dist

        if self._wanted is None:  # which hooks every rank keeps (one object all-gather, once)
            self._wanted = [None] * self.ctx.world
            dist.all_gather_object(self._wanted, self.keep)
        windows = self._chunk_windows(chunk, rows_wanted)
        if not windows:
            return None  # the same on every rank
        lo, hi = share(len(windows), self.ctx)
        full = sum(s.stop - s.start for s in self.all_columns.values())
        rows_ND = self._rows_of(windows[lo:hi]) if hi > lo else torch.empty(0, full, dtype=self.lm.dtype)
        # rows per rank (they differ: excluded positions), then each rank's columns of my rows, flattened
        n = torch.tensor([len(rows_ND)], dtype=torch.long, device=self.ctx.comm_device)
        counts = [torch.zeros_like(n) for _ in range(self.ctx.world)]
        dist.all_gather(counts, n)
        counts = [int(c) for c in counts]
        dtype = rows_ND.dtype if self.ctx.comm_device.type == "cuda" else torch.float32  # gloo: no bf16
        send = [rows_ND[:, self._index(names)].to(dtype) for names in self._wanted]
        mine = self._index(self.keep).numel()
        out = torch.empty(sum(counts) * mine, dtype=dtype, device=self.ctx.comm_device)
        dist.all_to_all_single(
            out,
            torch.cat([t.reshape(-1) for t in send]).to(self.ctx.comm_device),
            [c * mine for c in counts],
            [t.numel() for t in send],
        )
        got_ND = out.view(sum(counts), mine).to("cpu", rows_ND.dtype)
        self.received_widths.add(got_ND.shape[1])
        return got_ND


class KeepColumns:
    """A cache reader's batches with only some hooks' columns (hook-parallel from a cache: no exchange,
    every rank reads the shard and keeps its columns). Same position state as the reader."""

    def __init__(self, reader, keep: list[str], batch_size: int, seed: int):
        self.reader = reader
        cols = reader.columns
        names = [n for n in cols if n in keep]
        self._idx = torch.cat([torch.arange(cols[n].start, cols[n].stop) for n in names]) if names else None
        self.columns = columns_of(names, [cols[n].stop - cols[n].start for n in names])
        self.d_in = sum(s.stop - s.start for s in self.columns.values())
        self.batcher = ShuffledBatcher(self._load_chunk, batch_size, seed)

    def _load_chunk(self, chunk: int) -> torch.Tensor:
        rows_ND = self.reader._load_chunk(chunk)
        return rows_ND[:, self._idx] if self._idx is not None else rows_ND[:, :0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batcher)

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.batcher.load_state_dict(d)


# ---- parallel cache writing -------------------------------------------------------------
def windows_needed(tokenizer, data_cfg: DataConfig, n_tokens: int, part: str) -> int:
    """How many packed windows hold at least ``n_tokens`` kept rows (tokenising only, no LM)."""
    rows = 0
    for i, w_T in enumerate(train_windows(tokenizer, data_cfg, part)):
        rows += int((~excluded_mask(w_T[None], tokenizer, data_cfg)).sum())
        if rows >= n_tokens:
            return i + 1
    return i + 1 if rows else 0


def part_dir(folder: Path, rank: int) -> Path:
    return folder / f"part-{rank:03d}"


def write_cache_parallel(
    lm,
    hook_point,
    data_cfg: DataConfig,
    act_cfg: ActivationsConfig,
    folder: str | Path,
    n_tokens: int,
    ctx: DistContext,
    part: str = "train",
    progress: bool = True,
) -> dict:
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
        write_cache(
            lm,
            hook_point,
            data_cfg,
            act_cfg,
            part_dir(folder, ctx.rank),
            n_tokens,
            part=part,
            progress=progress and ctx.is_main,
            window_range=(lo, hi),
        )
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
    manifest = {
        "format_version": 1,
        **_identity(lm, hook_point, data_cfg, part),
        "shards": shards,
        "target_tokens": n_tokens,
        "complete": True,
        "parts": world,
        "n_rows": sum(s["rows"] for s in shards),
        "n_windows": shards[-1]["windows"][1] if shards else 0,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest
